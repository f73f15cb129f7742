"""ringload: a streaming data loader for NLP training over a lock-free shared-memory ring.

Producer processes read raw text, tokenize it and write fixed-size batches straight into a
POSIX shared-memory ring; the training process iterates over them as torch tensors that are
views of the ring. Start a ring with ``ringload start RECIPE`` (or :func:`start`), consume it
with :func:`connect`, or as a torch ``IterableDataset`` with :class:`RingDataset`.

The package loads lazily: ``import ringload`` imports nothing heavy, and each name below
imports only the module that defines it when first used, so a training process that only
connects never loads the producer stack (tokenizers, fsspec), and producers never load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "Loader": "_consumer",
    "connect": "_consumer",
    "DaemonGone": "_errors",
    "LoaderTimeout": "_errors",
    "ProducerFailed": "_errors",
    "RecipeError": "_errors",
    "RingError": "_errors",
    "RingloadError": "_errors",
    "RingDataset": "_dataset",
    "RingHandle": "_handle",
    "start": "_handle",
    "Field": "_layout",
    "flatten_packed": "_flatten",
    "Recipe": "_recipe",
    "load_recipe": "_recipe",
    "parse_recipe": "_recipe",
    "outputs_with_ids": "_ids",
    "record_ids": "_ids",
    "list_rings": "_status",
    "ring_status": "_status",
    "CausalLM": "_tasks",
    "Classify": "_tasks",
    "Encode": "_tasks",
    "MaskedLM": "_tasks",
    "MultiLabel": "_tasks",
    "PendingBatch": "_tasks",
    "Task": "_tasks",
    "TokenizerInfo": "_tasks",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'ringload' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    # `X as X`: an explicit re-export, for type checkers (the names are bound lazily by __getattr__).
    from ._consumer import Loader as Loader, connect as connect
    from ._dataset import RingDataset as RingDataset
    from ._errors import (
        DaemonGone as DaemonGone,
        LoaderTimeout as LoaderTimeout,
        ProducerFailed as ProducerFailed,
        RecipeError as RecipeError,
        RingError as RingError,
        RingloadError as RingloadError,
    )
    from ._flatten import flatten_packed as flatten_packed
    from ._handle import RingHandle as RingHandle, start as start
    from ._ids import outputs_with_ids as outputs_with_ids, record_ids as record_ids
    from ._layout import Field as Field
    from ._recipe import Recipe as Recipe, load_recipe as load_recipe, parse_recipe as parse_recipe
    from ._status import list_rings as list_rings, ring_status as ring_status
    from ._tasks import (
        CausalLM as CausalLM,
        Classify as Classify,
        Encode as Encode,
        MaskedLM as MaskedLM,
        MultiLabel as MultiLabel,
        PendingBatch as PendingBatch,
        Task as Task,
        TokenizerInfo as TokenizerInfo,
    )
