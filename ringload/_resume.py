"""Checkpoints: what identifies a stream, and checking a saved state against a new run.

A state (``Loader.state_dict()``) holds the resume point (``_stream.ResumePoint``: the chunk of
the last delivered batch, how many of its batches were delivered, where each source stands). A
daemon started with it reads the sources from there, gives the first chunk's producer that many
batches to skip, and sets every rank's position, so the batches after the checkpoint are those of
an uninterrupted run. Only recipe keys that change the stream are compared; ring name, producers, slots and
restarts may differ.
"""

from __future__ import annotations

from typing import Any

from ._errors import RecipeError
from ._stream import ResumePoint

STATE_FORMAT = "ringload-state/2"
_NOT_STREAM = ("name", "producers", "slots", "max_restarts", "tokenizer_engine")  # engines give the same ids


def stream_identity(header_recipe: dict[str, Any]) -> dict[str, Any]:
    """The parts of a ring's recipe (as stored in its header) that determine the stream. Nodes that
    split batches share one stream (a state serves every node); nodes that split files do not."""
    recipe = {k: v for k, v in header_recipe.get("recipe", {}).items() if k not in _NOT_STREAM}
    if recipe.get("node_sharding", "batches") == "batches":
        recipe.pop("node_rank", None)
    return {"recipe": recipe, "files": header_recipe.get("files", [])}


def check_state(state: Any, identity: dict[str, Any]) -> tuple[ResumePoint, list[int], int]:
    """Validate a state against this run; return (resume point, next position, batches delivered)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RecipeError(f"--resume: not a ringload state (expected format {STATE_FORMAT!r})")
    saved = state.get("stream", {})
    differences = [f"files ({len(saved.get('files', []))} then, {len(identity['files'])} now)"
                   if saved.get("files") != identity["files"] else None]
    old, new = saved.get("recipe", {}), identity["recipe"]
    differences += [f"{key} ({old.get(key)!r} then, {new.get(key)!r} now)"
                    for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    differences = [d for d in differences if d]
    if differences:
        raise RecipeError("--resume: the state comes from a different stream; it differs in "
                          + "; ".join(differences))
    try:
        resume = ResumePoint.from_json(state["resume"])
        position = [int(v) for v in state["next"]]
        delivered = int(state["delivered"])
    except (KeyError, TypeError, ValueError):
        raise RecipeError("--resume: the state is incomplete (needs resume, next, delivered)") from None
    if len(position) != 2:
        raise RecipeError("--resume: the state is malformed")
    return resume, position, delivered
