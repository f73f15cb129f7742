"""How many batches a rank is handed, from a plan's per-epoch counts (``_plan`` makes plans; the
daemon puts the counts into the ring's header, where the consumer side reads them without loading
the tokenizing stack)."""

from __future__ import annotations

import itertools
from typing import Any


def batches_in(epoch_batches: list[int], skip: int, most: int | None, epoch: int | None = None,
               after: int = 0) -> int:
    """Batches a rank is handed, by a plan's counts and the recipe's ``skip_batches``/``max_batches``:
    all of epoch ``epoch``, or (``epoch`` None) all those after the rank's first ``after``."""
    ends = list(itertools.accumulate(epoch_batches))
    stop = ends[-1] if most is None else min(ends[-1], skip + most)
    if epoch is None:
        return max(0, stop - max(after, skip))
    begin = ends[epoch - 1] if epoch else 0
    return max(0, min(ends[epoch], stop) - max(begin, skip))


def epoch_after(epoch_batches: list[int], delivered: int) -> int | None:
    """The epoch of a rank's batch number ``delivered + 1``, or None past the end of the stream."""
    return next((e for e, end in enumerate(itertools.accumulate(epoch_batches)) if end > delivered), None)


def length_unknown(ring: str, recipe: dict[str, Any]) -> str:
    """Why a ring's loaders have no len(), and what to run for one (raised as TypeError, which frameworks
    read as "no length")."""
    if recipe.get("epochs") is None:
        return f"ring {ring!r} streams endlessly (its recipe has no `epochs`), so it has no length"
    ranks = "".join(f" --{key.replace('_', '-')} {recipe[key]}" for key in ("world_size", "nnodes")
                    if recipe.get(key, 1) > 1)
    return (f"the number of batches per epoch of ring {ring!r} is not known: run `ringload plan RECIPE{ranks}` once "
            "(it tokenizes the stream to count them), then restart the ring")
