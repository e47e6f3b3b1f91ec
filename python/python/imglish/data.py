"""Datasets: :class:`Dataset` (a packed dataset's index, counts, verify) and :class:`StreamingDataset` (its
training stream as a ``torch.utils.data.IterableDataset``)."""

import json
import math
import multiprocessing
import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import _native


class Dataset:
    """A packed dataset: the folder ``imglish pack`` wrote (``index.json`` and Arrow IPC shards).

    >>> ds = Dataset("demo/dataset")            # doctest: +SKIP
    >>> ds.counts, len(ds)                      # doctest: +SKIP
    ({'train': 900, 'val': 100}, 1000)
    """

    def __init__(self, path):
        self._native = _native.Dataset(os.fspath(path))
        #: ``index.json`` as a dict (format version, tokenizer, pack settings, counts, shards).
        self.index = json.loads(self._native.index_json())

    @property
    def path(self):
        """The dataset folder."""
        return self._native.path

    def __len__(self):
        return len(self._native)

    @property
    def counts(self):
        """Samples per split: ``{"train": n, "val": m}``."""
        return dict(self.index["counts"])

    @property
    def splits(self):
        """The splits that have samples."""
        return [s for s, n in self.index["counts"].items() if n > 0]

    @property
    def tokenizer(self):
        """The visual (and text) tokenizer the dataset was made with: grid, vocabularies, fingerprint, card."""
        return dict(self.index["tokenizer"])

    @property
    def shards(self):
        """The shards: file, split, rows, record batches, bytes, sha256."""
        return list(self.index["shards"])

    @property
    def schema(self):
        """The shards' Arrow schema as ``(name, type)`` pairs, in column order (docs/format.md)."""
        return [tuple(f) for f in json.loads(self._native.schema_json())]

    def stats(self):
        """Counts by split and kind, token and text length summaries (reads every shard)."""
        return json.loads(self._native.stats_json())

    def verify(self):
        """Checks every shard (size, sha256, structure, every batch decoded) and the dataset's counts.

        Returns the report (``shards``, ``bad``: list of (file, error), ``counts``, ``problems``); ``ok`` is
        true when nothing is wrong.
        """
        report = json.loads(self._native.verify_json())
        report["ok"] = not report["bad"] and not report["problems"]
        return report


def train_config(path, **options):
    """The configuration ``imglish train`` uses for these options on the dataset at ``path`` (a dict).

    Options are ``imglish train``'s, with underscores: ``model="beit3"``, ``preset="tiny"``, ``depth=2``,
    ``batch_size=64``, ``seed=0``, ``shuffle={"kind": "global"}``, ``mix=[1, 1, 1]``, ... Unknown options are an
    error.
    """
    return json.loads(_native.train_config(os.fspath(path), json.dumps(options)))


def default_options():
    """``imglish train``'s default options (a dict)."""
    return json.loads(_native.default_options())


def _rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _arrays(raw):
    out = {}
    for name, value in raw.items():
        if name.startswith("__"):
            out[name] = value
            continue
        dtype, shape, buf = value
        out[name] = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return out


def batch_to_torch(batch, device=None):
    """The batch's numpy arrays as torch tensors (zero-copy on the CPU), optionally moved to ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v)
            out[k] = t.to(device, non_blocking=True) if device is not None else t
        else:
            out[k] = v
    return out


class StreamingDataset(IterableDataset):
    """A dataset's training stream as a ``torch.utils.data.IterableDataset`` of ready batches.

    Each item is one rank's batch, assembled by the Rust trainer's own code, so views, masks, sample kinds and
    captions are those ``imglish train`` uses for the same ``(seed, epoch, sample_id)``: a dict of numpy arrays
    (names in ``imglish_train::BatchMaker``: ``tokens``, ``mask``, ``pixels``, ... for BEiT; ``image.tokens``,
    ``text.text``, ``pair.mask``, ... for BEiT-3) plus ``__len__`` (samples), ``__skipped__`` (sample id, reason)
    and ``__state__`` (``{"epoch", "position"}`` after this batch). Use it with
    ``DataLoader(ds, batch_size=None, num_workers=W)``.

    Exactly once: global batch ``j`` covers stream positions ``[j * G, (j + 1) * G)`` with ``G = batch_size *
    world_size``; rank ``r`` takes every ``world_size``-th of them from the ``r``-th, and DataLoader worker ``w``
    makes the rank's batches ``j = w, w + W, ...`` (the order the DataLoader returns them in). After any number
    of steps in lock-step, the ranks together have consumed a prefix of the stream, so a resume from
    ``state_dict()`` continues exactly, with any world size and worker count.

    Rank and world size come from ``torch.distributed`` when it is initialised, else ``RANK``/``WORLD_SIZE``.

    ``endless=False`` (default): one epoch per iteration, from the resumed position; ``set_epoch(n)`` picks
    the epoch. The last global batch of an epoch may be short (ranks may get one sample fewer, or an empty batch
    when fewer samples than ranks remain: every rank gets the same number of batches). ``endless=True``: the
    epochs one after the other, a batch may span two, as ``imglish train`` reads them; ``max_batches`` bounds it.
    """

    def __init__(
        self,
        path,
        batch_size,
        *,
        config=None,
        split="train",
        endless=False,
        max_batches=None,
        rank=None,
        world_size=None,
        read_ahead=8,
        samples=False,
        **options,
    ):
        super().__init__()
        self.path = os.fspath(path)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.batch_size = int(batch_size)
        if config is None:
            options.setdefault("model", "beit")
            model = options["model"]
            config = train_config(self.path, **options)
        elif options:
            raise TypeError(f"give either config or options, not both (options: {sorted(options)})")
        else:
            model = "beit3" if "objective" in config else "beit"
        self.model = model
        self.config = config
        self.split = split
        self.endless = endless
        self.max_batches = max_batches
        self._rank, self._world = rank, world_size
        #: Batches a worker reads from the shards in one call (each record batch they share is decoded once).
        self.read_ahead = max(1, int(read_ahead))
        #: Yield single samples (use ``DataLoader(ds, batch_size=B, collate_fn=ds.collate)``) instead of batches.
        self.samples = bool(samples)
        # Epoch and resume point in shared memory: set_epoch() and load_state_dict() in the main process reach
        # DataLoader workers that already exist (persistent_workers=True).
        self._shared = multiprocessing.RawArray("q", 3)
        self._reader = None
        # Fail here, not in a worker: opens the dataset and checks the split.
        self._epoch_len = self._get_reader().epoch_len

    @property
    def _epoch(self):
        return self._shared[0]

    @_epoch.setter
    def _epoch(self, value):
        self._shared[0] = value

    @property
    def _resume(self):
        return {"epoch": self._shared[1], "position": self._shared[2]}

    @_resume.setter
    def _resume(self, state):
        self._shared[1], self._shared[2] = state["epoch"], state["position"]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None  # a native object; each worker opens its own
        return state

    def _get_reader(self):
        if self._reader is None:
            self._reader = _native.Reader(self.path, self.model, json.dumps(self.config), self.split)
        return self._reader

    @property
    def epoch_len(self):
        """Samples per epoch of the split."""
        return self._epoch_len

    def rank_world(self):
        """(rank, world size) this dataset reads for."""
        r, w = _rank_world()
        return (self._rank if self._rank is not None else r, self._world if self._world is not None else w)

    def set_epoch(self, epoch):
        """The epoch the next iteration reads (``endless=False``)."""
        self._epoch = int(epoch)

    def state_dict(self, num_batches=None):
        """Where the stream is: ``{"epoch", "position"}`` (global: valid for any world size).

        ``num_batches``: batches each rank has consumed since this iteration began (all ranks in step); without
        it, the resume point the next iteration starts from. Every batch also carries its ``__state__``.
        """
        start = self._start_offset()
        if num_batches is None:
            offset = start
        else:
            _, world = self.rank_world()
            offset = start + int(num_batches) * self.batch_size * world
            if not self.endless:
                offset = min(offset, (self._iteration_epoch() + 1) * self._epoch_len)
        epoch, position = divmod(offset, self._epoch_len)
        return {"epoch": epoch, "position": position}

    def load_state_dict(self, state):
        """Resume from ``state_dict()``'s result: the next iteration starts there (and, with ``endless=False``,
        ``set_epoch`` is set to its epoch)."""
        self._resume = {"epoch": int(state["epoch"]), "position": int(state["position"])}
        self._epoch = self._resume["epoch"]

    def _iteration_epoch(self):
        return self._resume["epoch"] if self.endless else self._epoch

    def _start_offset(self):
        if self.endless or self._resume["epoch"] == self._epoch:
            return self._resume["epoch"] * self._epoch_len + self._resume["position"]
        return self._epoch * self._epoch_len

    def batches_per_rank(self):
        """Batches each rank gets in one iteration (``None`` when endless without ``max_batches``)."""
        _, world = self.rank_world()
        if self.endless:
            return self.max_batches
        left = (self._epoch + 1) * self._epoch_len - self._start_offset()
        return math.ceil(left / (self.batch_size * world))

    def __iter__(self):
        rank, world = self.rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self._get_reader()
        g = self.batch_size * world
        start = self._start_offset()
        end = None if self.endless else (self._epoch + 1) * self._epoch_len
        total = self.batches_per_rank()
        j = worker
        while total is None or j < total:
            # This worker's next batches, read together (a record batch they share is decoded once).
            group = [j + k * workers for k in range(self.read_ahead) if total is None or j + k * workers < total]
            requests = []
            for jj in group:
                offset = start + jj * g
                requests.append((offset, g if end is None else min(g, end - offset)))
            for jj, (offset, count), raw in zip(group, requests, reader.batches(requests, rank, world)):
                batch = _arrays(raw)
                epoch, position = divmod(offset + count, self._epoch_len)
                batch["__state__"] = {"epoch": epoch, "position": position}
                batch["__batch__"] = jj
                if self.samples:
                    yield from split_batch(batch)
                else:
                    yield batch
            j = group[-1] + workers


    def collate(self, samples):
        """Samples (``samples=True``) back into one batch with the arrays a batch has (texts padded with the
        text tokenizer's pad id); a ``collate_fn`` for ``DataLoader``."""
        return collate(samples, self.config.get("objective", {}).get("text", {}).get("pad_id", 0))


def split_batch(batch):
    """A batch's samples as dicts of numpy arrays (views into the batch's arrays, no copies): ``sample_id``,
    ``kind``, and the sample's rows: ``tokens``, ``mask``, ``pixels`` (images), ``text``, ``predict``,
    ``targets`` (texts, without padding), ``label`` (BEiT)."""
    if "sample_ids" in batch:  # BEiT
        for i, sid in enumerate(batch["sample_ids"]):
            s = {"kind": "image", "sample_id": int(sid), "label": int(batch["labels"][i])}
            for k in ("tokens", "mask", "pixels"):
                if k in batch:
                    s[k] = batch[k][i]
            yield s
        return
    for kind in ("image", "text", "pair"):
        if f"{kind}.ids" not in batch:
            continue
        ids = batch[f"{kind}.ids"]
        if f"{kind}.predict" in batch:
            counts = batch[f"{kind}.predict"].sum(axis=1)
            starts = np.concatenate([[0], np.cumsum(counts)])
        for i, sid in enumerate(ids):
            s = {"kind": kind, "sample_id": int(sid)}
            for k in ("tokens", "mask", "pixels"):
                if f"{kind}.{k}" in batch:
                    s[k] = batch[f"{kind}.{k}"][i]
            if f"{kind}.text" in batch:
                keep = ~batch[f"{kind}.padding"][i]
                s["text"] = batch[f"{kind}.text"][i][keep]
                s["predict"] = batch[f"{kind}.predict"][i][keep]
                s["targets"] = batch[f"{kind}.targets"][starts[i] : starts[i + 1]]
            yield s


def collate(samples, pad_id=0):
    """The default collate of ``split_batch``'s samples: the batch arrays again (BEiT: ``sample_ids``, ``labels``,
    ``tokens``, ``mask``, ``pixels``; BEiT-3: per kind ``K.ids``, ``K.tokens``, ``K.mask``, ``K.pixels``, ``K.text``,
    ``K.padding``, ``K.predict``, ``K.targets``), as numpy arrays, samples of a kind in the order given."""
    out = {"__len__": len(samples)}
    if samples and "label" in samples[0]:
        out["sample_ids"] = np.array([s["sample_id"] for s in samples], dtype=np.uint64)
        out["labels"] = np.array([s["label"] for s in samples], dtype=np.int64)
        for k in ("tokens", "mask", "pixels"):
            if k in samples[0]:
                out[k] = np.stack([s[k] for s in samples])
        return out
    for kind in ("image", "text", "pair"):
        group = [s for s in samples if s["kind"] == kind]
        if not group:
            continue
        out[f"{kind}.ids"] = np.array([s["sample_id"] for s in group], dtype=np.uint64)
        for k in ("tokens", "mask", "pixels"):
            if k in group[0]:
                out[f"{kind}.{k}"] = np.stack([s[k] for s in group])
        if "text" in group[0]:
            n = max(len(s["text"]) for s in group)
            text = np.full((len(group), n), pad_id, dtype=np.int64)
            padding = np.ones((len(group), n), dtype=bool)
            predict = np.zeros((len(group), n), dtype=bool)
            for i, s in enumerate(group):
                m = len(s["text"])
                text[i, :m], padding[i, :m], predict[i, :m] = s["text"], False, s["predict"]
            out[f"{kind}.text"], out[f"{kind}.padding"], out[f"{kind}.predict"] = text, padding, predict
            out[f"{kind}.targets"] = np.concatenate([s["targets"] for s in group]).astype(np.int64)
    return out
