"""Checkpoints: what identifies a stream, and checking a saved state against a new run.

A state (``Loader.state_dict()``) holds the resume point (``_types.ResumePoint``: the chunk of
the last delivered batch, how many of its batches were delivered, where each source stands). A
daemon started with it reads the sources from there, gives the first chunk's producer that many
batches to skip, and sets every rank's position, so the batches after the checkpoint are those of
an uninterrupted run. Only recipe keys that change the stream are compared; ring name, producers, slots and
restarts may differ.
"""

from __future__ import annotations

from typing import Any

from ._errors import RecipeError
from ._types import ResumePoint

# Format 3: records longer than a chunk are read in pieces by packing tasks, so a format-2 state of
# such a corpus would resume into another stream; a format-2 state is refused with that reason.
STATE_FORMAT = "ringload-state/3"
# Engines give the same ids, and the token cache serves the ids the tokenizer would give.
_NOT_STREAM = ("name", "producers", "slots", "max_restarts", "tokenizer_engine", "token_cache")


def stream_identity(header_recipe: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ring's recipe (as stored in its header) that determine the stream. Nodes that
    split batches share one stream (a state serves every node); nodes that split files do not."""
    recipe = {k: v for k, v in header_recipe.get("recipe", {}).items() if k not in _NOT_STREAM}
    if recipe.get("node_sharding", "batches") == "batches":
        recipe.pop("node_rank", None)
    return {"recipe": recipe, "files": header_recipe.get("files", [])}


def check_state(state: Any, identity: dict[str, Any]) -> tuple[ResumePoint, list[int], int]:
    """Validate a state against this run; return (resume point, next position, batches delivered)."""
    if isinstance(state, dict) and state.get("format") == "ringload-state/2":
        raise RecipeError("--resume: the state comes from an older ringload (format ringload-state/2), which read "
                          "records longer than a chunk whole; this one reads them in pieces, so the stream after "
                          "that state may differ. Start the run from the beginning, or resume with that version")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RecipeError(f"--resume: not a ringload state (expected format {STATE_FORMAT!r})")
    saved = state.get("stream", {})
    differences = ([f"files ({len(saved.get('files', []))} then, {len(identity['files'])} now)"]
                   if saved.get("files") != identity["files"] else [])
    new = identity["recipe"]
    differences += _differences(saved.get("recipe", {}), new, _recipe_defaults(new.get("task", {}).get("type")))
    if differences:
        raise RecipeError("--resume: the state comes from a different stream; it differs in "
                          + "; ".join(differences))
    try:
        resume = ResumePoint.from_json(state["resume"])
    except KeyError:
        raise RecipeError("--resume: the state is incomplete (needs resume, next, delivered)") from None
    except ValueError as exc:
        raise RecipeError(f"--resume: {exc}") from None
    try:
        position = [int(v) for v in state["next"]]
        delivered = int(state["delivered"])
    except (KeyError, TypeError, ValueError):
        raise RecipeError("--resume: the state is incomplete (needs resume, next, delivered)") from None
    if len(position) != 2:
        raise RecipeError("--resume: the state is malformed")
    return resume, position, delivered


def _recipe_defaults(task_type: str | None) -> dict[str, Any]:
    """Every recipe key's default, the task's options included: what a key meant before it existed."""
    import dataclasses

    from ._recipe import Recipe
    from ._tasks import task_class

    defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Recipe)
                                if f.default is not dataclasses.MISSING}
    defaults["task"] = dict(task_class(task_type).options) if task_type else {}
    return defaults


def _differences(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ; a key one side lacks counts as its default (a state saved before a
    recipe key was added still resumes when the key keeps its default)."""
    found = []
    for key in sorted(set(old) | set(new)):
        then, now = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if key == "task" and isinstance(then, dict) and isinstance(now, dict):
            found += _differences(then, now, defaults.get("task", {}), "task.")
        elif then != now:
            found.append(f"{prefix}{key} ({then!r} then, {now!r} now)")
    return found
