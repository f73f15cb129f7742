"""Complete passes (recipe ``mode: eval``): every record in exactly one row of one rank, with its id.

A training stream drops each chunk's partial last batch and cuts a chunk to a multiple of the
``G`` ranks it is dealt to (``_lanes``). A complete pass keeps everything instead:

* the task keeps every record of a chunk, one per row (``Task.keep_every_record``): the chunk's
  last batch is partial and its rows after the last record are *padding rows*;
* the chunk's batch count is padded up to a multiple of ``G`` with *padding batches* (every row
  padding), so the ranks still get the same number of batches of every chunk, which DDP needs;
* every row carries bookkeeping fields (handed out with ``connect(..., meta=True)``):
  ``_valid`` [B] int8 (1: a record, 0: padding), ``_record`` [B, 3] int64 (source, file index in
  the source's file list, the record's 1-based line in that file; parquet: row + 1; -1 in
  padding rows) and, with a recipe ``id_field``, ``_id`` [B, id_bytes] uint8 (the field's value,
  UTF-8, zero-filled; empty in padding rows).

Padding rows hold the pad token with ``attention_mask`` 0, ``_lengths`` 0, and ``labels`` -100
(what cross-entropy ignores; a multi-hot row is -100 throughout, so a loss that forgets
``_valid`` shows it). :func:`outputs_with_ids` pairs a batch's outputs with the ids of its valid
rows. The sources of a complete pass are read one after another (``_stream``), each once.

Length bucketing (``bucket_window: N``): the task sorts each window of N records (rounded up to
whole batches) of a chunk by token length before cutting it into batches, so rows of a batch have
about one length and ``trim=True`` cuts most padding columns. The order depends only on the data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import RecipeError
from ._layout import Field
from ._recipe import MODES

if TYPE_CHECKING:
    from ._recipe import Recipe
    from ._tasks import PendingBatch, Task
    from ._types import Dealing, Records

IGNORED_LABEL = -100  # the label of a padding row: cross-entropy's ignore_index
RECORD_COLUMNS = 3  # source | file index | line


def check_complete_pass(recipe: Recipe, origin: str) -> None:
    """The keys of a complete pass hold together with the rest of the recipe."""
    from ._tasks import task_class

    def fail(key: str, why: str) -> RecipeError:
        return RecipeError(f"{origin}: {key}: {why}")

    if recipe.mode not in MODES:
        raise fail("mode", f"must be {' or '.join(MODES)}, got {recipe.mode!r}")
    if recipe.mode == "train":
        asked = [key for key in ("id_field", "bucket_window") if getattr(recipe, key)]
        if asked:
            raise fail(asked[0], "applies to complete passes only: add mode: eval")
        return
    problem = task_class(recipe.task["type"], origin).complete_pass_problem(recipe.task, recipe.bucket_window > 0)
    if problem is not None:
        raise fail("mode", f"eval needs one record per row: {problem}")
    if recipe.shuffle:
        raise fail("shuffle", "a complete pass reads records in file order, so ids name their lines: remove shuffle")
    if recipe.bucket_window < 0:
        raise fail("bucket_window", f"must be a number of records >= 0, got {recipe.bucket_window}")
    if not 1 <= recipe.id_bytes <= 4096:
        raise fail("id_bytes", f"must be 1..4096 bytes, got {recipe.id_bytes}")
    if recipe.id_field is not None and any(source.format == "text" for source in recipe.sources):
        raise fail("id_field", "text sources hold bare lines with no fields: use jsonl, csv, tsv or parquet, "
                               "or leave id_field out (every row still carries _record)")


def build_recipe_task(recipe: Recipe, engine: str | None = None) -> Task:
    """The recipe's task, set up for a complete pass if the recipe is one (producers, the daemon and
    ``ringload plan`` all shape chunks with it)."""
    from ._tasks import build_task

    task = build_task(recipe.task, recipe.tokenizer, recipe.batch_size, recipe.seed,
                      recipe.tokenizer_engine if engine is None else engine)
    if recipe.complete_pass:
        task.keep_every_record = True
        task.bucket_window = recipe.bucket_window
    return task


def batch_fields(recipe: Recipe, task: Task) -> list[Field]:
    """The fields of the ring's batches: the task's, and a complete pass's bookkeeping fields."""
    fields = task.fields()
    if not recipe.complete_pass:
        return fields
    size = recipe.batch_size
    fields += [Field("_valid", np.dtype("|i1"), (size,)), Field("_record", np.dtype("<i8"), (size, RECORD_COLUMNS))]
    if recipe.id_field is not None:
        fields.append(Field("_id", np.dtype("|u1"), (size, recipe.id_bytes)))
    return fields


def complete_batches(task: Task, batches: Iterator[PendingBatch], records: Records, source: int, file_index: int,
                     path: str, dealing: Dealing) -> Iterator[PendingBatch]:
    """A chunk's batches for a complete pass: the task's, each row stamped with its record, then the
    padding batches ``dealing`` asks for, so that every rank gets as many."""
    from ._tasks import PendingBatch

    pad = task.tok.token_id("pad")
    count = 0
    for batch in batches:
        if batch.records is None:
            raise RuntimeError(f"task {type(task).__name__} gave a batch without its records in a complete pass")
        yield PendingBatch(_stamped(batch, batch.records, records, source, file_index, path, pad), batch.rows,
                           batch.tokens, batch.records_done, batch.records, batch.width)
        count += 1
    for _ in range(dealing.padding(count)):
        yield PendingBatch(lambda out: blank_rows(out, 0, pad), task.batch_size, 0, len(records),
                           np.empty(0, dtype=np.int64), 1)


def _stamped(batch: PendingBatch, rows: np.ndarray, records: Records, source: int, file_index: int, path: str,
             pad: int) -> Any:
    """The write function of ``batch``, whose rows hold ``records`` at indexes ``rows``, stamped with
    where each record comes from."""
    ids = None
    if records.ids is not None:
        ids = [records.ids[i].encode() for i in rows]

    def write(out: dict[str, np.ndarray]) -> None:
        batch.write(out)
        n = len(rows)
        blank_rows(out, n, pad)
        out["_valid"][:n] = 1
        stamp = out["_record"][:n]
        stamp[:, 0], stamp[:, 1] = source, file_index
        stamp[:, 2] = [records.lines[i] for i in rows]
        if ids is not None:
            room = out["_id"]
            room[:n] = 0  # the slot holds an earlier batch's ids
            for row, value in enumerate(ids):
                if len(value) > room.shape[1]:
                    shown = value[:40].decode(errors="replace")
                    raise ValueError(f"{path}:{records.lines[rows[row]]}: the id {shown!r}... is {len(value)} bytes"
                                     f", more than id_bytes ({room.shape[1]}): "
                                     "raise id_bytes in the recipe")
                room[row, :len(value)] = np.frombuffer(value, dtype=np.uint8)
    return write


def blank_rows(out: dict[str, np.ndarray], start: int, pad: int) -> None:
    """Make rows ``start`` and after padding rows: pad tokens, labels ignored, no record."""
    for name, array in out.items():
        rows = array[start:]
        if name == "input_ids":
            rows.fill(pad)
        elif name == "labels":
            rows.fill(IGNORED_LABEL)
        elif name == "_record":
            rows.fill(-1)
        else:
            rows.fill(0)
