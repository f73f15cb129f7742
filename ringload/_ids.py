"""Record ids on the consumer side: a complete pass's batch outputs back to the records they belong to.

A batch of a complete pass (``mode: eval``, see ``_complete``) handed out with
``connect(..., meta=True)`` marks its valid rows in ``_valid`` and names each row's record in
``_record`` (source, file index, line) and, with a recipe ``id_field``, in ``_id`` (UTF-8 bytes,
zero-filled). This module reads them; it imports numpy only, so a training process can use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RecordId = tuple[int, int, int] | str


def record_ids(batch: dict[str, Any]) -> list[RecordId]:
    """The ids of a batch's valid rows, in row order: the ``_id`` text if the recipe has an
    ``id_field``, else ``_record`` as (source, file index, line). The batch must come from a
    complete pass (``mode: eval``) and be handed out with ``connect(..., meta=True)``."""
    return [record_id for record_id, _ in _valid_rows(batch)]


def outputs_with_ids(batch: dict[str, Any], outputs: Any) -> list[tuple[RecordId, Any]]:
    """``(id, output)`` for every valid row of ``batch``, padding rows left out; ``outputs`` is
    indexed by row (a tensor or array with the batch's rows first, or a list)."""
    return [(record_id, outputs[row]) for record_id, row in _valid_rows(batch)]


def _valid_rows(batch: dict[str, Any]) -> list[tuple[RecordId, int]]:
    """(id, row) of every valid row of a complete pass's batch."""
    missing = [name for name in ("_valid", "_record") if name not in batch]
    if missing:
        raise KeyError(f"the batch has no {', '.join(missing)}: connect(..., meta=True) to a ring whose recipe "
                       "has mode: eval")
    valid = np.flatnonzero(_numpy(batch["_valid"])).tolist()
    if "_id" in batch:
        ids = _numpy(batch["_id"])
        return [(bytes(ids[row]).rstrip(b"\0").decode(), row) for row in valid]
    stamps = _numpy(batch["_record"])
    return [((int(stamps[row, 0]), int(stamps[row, 1]), int(stamps[row, 2])), row) for row in valid]


def _numpy(value: Any) -> np.ndarray:
    """A tensor (any device) or array as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
