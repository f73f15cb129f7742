"""Plans: the exact number of batches each rank gets per epoch of a finite stream, counted without training.

A rank's batch count is not a function of the bytes: it depends on how the tokenizer splits the
text, on packing, and on each chunk's cut to a multiple of the ranks (``_lanes``: every rank gets
``n // G`` of a chunk's ``n`` batches, ``G`` ranks in all). ``ringload plan RECIPE`` therefore reads
the stream as the daemon would (``_stream.read_stream``), tokenizes and shapes every chunk with the
recipe's task (the producers' code, in ``producers`` processes) and keeps only the counts. Every
rank gets the same number, so a plan is one count per epoch. Shuffled recipes cut different chunks
in each epoch, so every epoch is counted.

A plan is stored in the user's cache (``$RINGLOAD_PLANS``, default ``~/.cache/ringload/plans``) in a
file named after the stream's identity (``_resume.stream_identity``: every recipe key that shapes
the stream, the ranks included), with the size and modification time of every source file, so
editing a file or the recipe makes it stale rather than wrong. Files are looked at (a metadata
request for a remote one) only when a plan for the stream exists. ``ringload start`` looks the plan up and puts
the counts into the ring's header (``epoch_batches``), where ``len()`` of a Loader or a RingDataset
finds them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec

from ._errors import RecipeError
from ._recipe import Recipe
from ._resume import stream_identity
from ._sources import Chunk, Hooks, expand_paths, parse_records
from ._stream import read_stream

PLAN_FORMAT = "ringload-plan/1"
PLANS_ENV = "RINGLOAD_PLANS"


def plans_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ringload" / "plans"
    return Path(os.environ.get(PLANS_ENV) or default)


def stream_files(recipe: Recipe) -> list[list[str]]:
    """Every source's files, as the daemon reads them (finite streams read every file on every node)."""
    return [expand_paths(source) for source in recipe.sources]


def _identity(recipe: Recipe, files: list[list[str]]) -> dict[str, Any]:
    return json.loads(json.dumps(stream_identity({"recipe": recipe.to_dict(), "files": files})))  # as stored


def _file_stamps(recipe: Recipe, files: list[list[str]]) -> list[list[list[Any]]]:
    """Every source file's (size, modification time): what besides the stream's identity the counts depend on."""
    return [[file_stamp(path, source) for path in paths] for paths, source in zip(files, recipe.sources, strict=True)]


def file_stamp(path: str, source: Any) -> list[Any]:
    """(size, modification time) of a file, local or remote, as its filesystem reports them."""
    if "://" not in path:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    fs, inner = fsspec.core.url_to_fs(path, **source.storage_options)
    info = fs.info(inner)
    markers = ("mtime", "LastModified", "last_modified", "ETag", "etag", "Last-Modified")  # HTTP: fsspec's HEAD fields
    changed = next((info[k] for k in markers if k in info), None)
    return [info.get("size"), str(changed) if changed is not None else None]


def _plan_path(identity: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return plans_dir() / f"{digest}.json"


def find_plan(recipe: Recipe, files: list[list[str]]) -> list[int] | None:
    """Batches per rank of each epoch, if a plan for exactly this stream and these files exists."""
    if recipe.epochs is None:
        return None
    identity = _identity(recipe, files)
    try:
        plan = json.loads(_plan_path(identity).read_text())
    except (OSError, ValueError):
        return None
    if plan.get("format") != PLAN_FORMAT or plan.get("stream") != identity:
        return None
    if plan.get("file_stamps") != json.loads(json.dumps(_file_stamps(recipe, files))):
        return None  # a file changed since it was planned
    return [int(n) for n in plan["epoch_batches"]]


def make_plan(recipe: Recipe, processes: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> tuple[list[int], Path]:
    """Count every epoch's batches per rank by tokenizing the stream once; store and return (counts, path).

    ``progress(epoch, batches counted so far)`` is called after every chunk."""
    if recipe.epochs is None:
        raise RecipeError(f"recipe {recipe.name!r} has no `epochs`: its stream never ends, so an epoch has no "
                          "length; set epochs: N")
    files = stream_files(recipe)
    identity, stamps = _identity(recipe, files), _file_stamps(recipe, files)
    counts = [0] * recipe.epochs
    processes = processes or recipe.producers
    chunks = read_stream(recipe, files, on_error=None if recipe.on_bad_record == "fail" else _skip_broken)
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_init_worker, initargs=(recipe.to_dict(), files)) as pool:
        for epoch, batches in pool.imap(_count_chunk, chunks, chunksize=1):
            counts[epoch] += recipe.dealing.per_rank(batches)
            if progress:
                progress(epoch, counts[epoch])
    path = _plan_path(identity)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".tmp{os.getpid()}")
    plan = {"format": PLAN_FORMAT, "stream": identity, "file_stamps": stamps, "epoch_batches": counts}
    partial.write_text(json.dumps(plan, indent=1))
    partial.replace(path)
    return counts, path


def _skip_broken(error: Exception) -> None:
    """A broken file is skipped from that point, as the daemon does under on_bad_record: skip."""


_worker: dict[str, Any] = {}


def _init_worker(recipe: dict[str, Any], files: list[list[str]]) -> None:
    from ._complete import build_recipe_task
    from ._recipe import parse_recipe

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    parsed = parse_recipe(recipe)
    _worker.update(recipe=parsed, files=files, task=build_recipe_task(parsed, engine="auto"),
                   hooks=[Hooks.load(source) for source in parsed.sources])


def _count_chunk(chunk: Chunk) -> tuple[int, int]:
    """(epoch, number of batches) of one chunk, shaped by the task exactly as a producer shapes it."""
    recipe, task = _worker["recipe"], _worker["task"]
    records, bad = parse_records(chunk, recipe.sources[chunk.source], _worker["files"][chunk.source][chunk.file_index],
                                 task.convert_label, _worker["hooks"][chunk.source], id_field=recipe.id_field)
    if bad and recipe.on_bad_record == "fail":
        raise ValueError(f"bad record at {bad[0]} (set on_bad_record: skip in the recipe to skip such records)")
    return chunk.epoch, sum(1 for _ in task.batches(records, chunk.id))
