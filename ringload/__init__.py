"""ringload: a streaming data loader for NLP training over a lock-free shared-memory ring.

Producer processes read raw text, tokenize it and write fixed-size batches straight into a
POSIX shared-memory ring; the training process iterates over them as torch tensors that are
views of the ring. Start a ring with ``ringload start RECIPE`` (or :func:`start`), consume it
with :func:`connect`, or as a torch ``IterableDataset`` with :class:`RingDataset` (imported on first
use, since it needs torch).
"""

from typing import Any

from ._consumer import Loader, connect
from ._errors import DaemonGone, LoaderTimeout, ProducerFailed, RecipeError, RingError, RingloadError
from ._handle import RingHandle, start
from ._layout import Field
from ._recipe import Recipe, load_recipe, parse_recipe
from ._status import list_rings, ring_status
from ._tasks import CausalLM, Classify, MaskedLM, MultiLabel, PendingBatch, Task, TokenizerInfo

__all__ = [
    "CausalLM",
    "Classify",
    "DaemonGone",
    "Field",
    "Loader",
    "LoaderTimeout",
    "MaskedLM",
    "MultiLabel",
    "PendingBatch",
    "ProducerFailed",
    "Recipe",
    "RecipeError",
    "RingDataset",
    "RingError",
    "RingHandle",
    "RingloadError",
    "Task",
    "TokenizerInfo",
    "connect",
    "list_rings",
    "load_recipe",
    "parse_recipe",
    "ring_status",
    "start",
]


def __getattr__(name: str) -> Any:
    if name == "RingDataset":  # subclasses torch's IterableDataset: imported only when asked for
        from ._dataset import RingDataset

        return RingDataset
    raise AttributeError(f"module 'ringload' has no attribute {name!r}")
