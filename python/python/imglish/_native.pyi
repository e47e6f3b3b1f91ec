"""Type stubs of the native module (python/src/lib.rs)."""

from typing import Dict, List, Tuple, Union

__version__: str

class ImglishError(Exception):
    """An error from imglish's Rust core; the message names the shard, sample or file and the reason."""

class Dataset:
    """A packed dataset (a folder with ``index.json`` and shards)."""

    def __init__(self, path: str) -> None: ...
    def __len__(self) -> int: ...
    @property
    def path(self) -> str: ...
    def index_json(self) -> str: ...
    def schema_json(self) -> str: ...
    def stats_json(self) -> str: ...
    def verify_json(self) -> str: ...

def train_config(dataset: str, options_json: str) -> str:
    """The configuration ``imglish train`` would use for these options (JSON in, JSON out)."""

def set_cache(cache_dir: str | None = None, cache_limit: int | None = None, prefetch: int | None = None) -> None:
    """Sets the shard cache of remote datasets opened later in this process (the first call wins)."""

def default_options() -> str:
    """``imglish train``'s default options as JSON."""

ArrayTriple = Tuple[str, Tuple[int, ...], bytearray]

class Reader:
    """Batches of a run's endless training stream (epoch after epoch)."""

    def __init__(self, path: str, model: str, config_json: str, split: str = "train") -> None: ...
    @property
    def epoch_len(self) -> int: ...
    def batch(
        self, offset: int, count: int, rank: int, world_size: int
    ) -> Dict[str, Union[ArrayTriple, int, List[Tuple[int, str]], List[Tuple[int, int, int]]]]:
        """Rank ``rank``'s share of stream offsets ``offset .. offset + count``: name → (dtype, shape, bytes), plus
        ``__len__``, ``__skipped__`` ((sample id, reason)) and ``__samples__`` ((epoch, position, sample id))."""
    def batches(
        self, requests: List[Tuple[int, int]], rank: int, world_size: int
    ) -> List[Dict[str, Union[ArrayTriple, int, List[Tuple[int, str]], List[Tuple[int, int, int]]]]]:
        """Several ``batch`` calls in one: each record batch they share is decoded once."""
    def validation(
        self, batch_size: int, limit: int
    ) -> List[Dict[str, Union[ArrayTriple, int, List[Tuple[int, str]], List[Tuple[int, int, int]]]]]:
        """The validation batches ``imglish train`` evaluates on (val split, dataset order, fixed masks)."""
