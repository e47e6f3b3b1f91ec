"""Type stubs of the imglish package."""

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils.data import IterableDataset

from ._native import ImglishError as ImglishError
from ._native import set_cache as set_cache

__version__: str

Batch = Dict[str, Any]

class Dataset:
    index: Dict[str, Any]
    def __init__(self, path: str) -> None: ...
    @property
    def path(self) -> str: ...
    def __len__(self) -> int: ...
    @property
    def counts(self) -> Dict[str, int]: ...
    @property
    def splits(self) -> List[str]: ...
    @property
    def tokenizer(self) -> Dict[str, Any]: ...
    @property
    def shards(self) -> List[Dict[str, Any]]: ...
    @property
    def schema(self) -> List[Tuple[str, str]]: ...
    def stats(self) -> Dict[str, Any]: ...
    def verify(self) -> Dict[str, Any]: ...

class StreamingDataset(IterableDataset[Batch]):
    path: str
    batch_size: int
    model: str
    config: Dict[str, Any]
    split: str
    endless: bool
    max_batches: Optional[int]
    def __init__(
        self,
        path: str,
        batch_size: int,
        *,
        config: Optional[Dict[str, Any]] = ...,
        split: str = ...,
        endless: bool = ...,
        max_batches: Optional[int] = ...,
        rank: Optional[int] = ...,
        world_size: Optional[int] = ...,
        read_ahead: int = ...,
        samples: bool = ...,
        **options: Any,
    ) -> None: ...
    @property
    def epoch_len(self) -> int: ...
    def rank_world(self) -> Tuple[int, int]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self, num_batches: Optional[int] = ...) -> Dict[str, int]: ...
    def load_state_dict(self, state: Dict[str, int]) -> None: ...
    def batches_per_rank(self) -> Optional[int]: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def collate(self, samples: List[Batch]) -> Batch: ...

def batch_to_torch(batch: Batch, device: Optional[torch.device | str] = ...) -> Dict[str, Any]: ...
