"""imglish datasets in PyTorch.

- :class:`Dataset`: a packed dataset (``imglish pack`` output, a folder or an ``s3://``, ``gs://``, ``az://`` or
  ``https://`` URL read through a local shard cache, see :func:`set_cache`): index, splits, counts, ``verify()``.
- :class:`StreamingDataset`: a ``torch.utils.data.IterableDataset`` over a dataset's training stream, with the
  same order, views and masks as ``imglish train``; each of the stream's samples is delivered exactly once
  across torch.distributed ranks and DataLoader workers, and ``state_dict()`` / ``load_state_dict()`` resume
  mid-epoch with another world size or worker count.
- ``python -m imglish.pretrain``: data-parallel BEiT / BEiT-3 pretraining under ``torchrun``.

Errors from the Rust core are :class:`ImglishError`, naming the shard, sample or file.
"""

# The native module links against libtorch (through the trainer crate); importing torch first loads the same
# libtorch it was built against (the project's torch==2.13.0).
import torch  # noqa: F401

from ._native import ImglishError, __version__, set_cache
from .data import Dataset, StreamingDataset, batch_to_torch

__all__ = ["Dataset", "StreamingDataset", "ImglishError", "batch_to_torch", "set_cache", "__version__"]
