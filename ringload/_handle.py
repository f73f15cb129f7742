"""Starting a ring from Python: the daemon runs as a child process behind a small handle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml

from ._daemon import launch, log_file, remove_ring
from ._names import validate_name
from ._recipe import Recipe, as_recipe


class RingHandle:
    """A running ``ringload start`` daemon. ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path):
        self.name, self.process, self.log_path = name, process, log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> int:
        """Stop the daemon (SIGTERM, then SIGKILL after ``timeout``); return its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                remove_ring(self.name)
        return self.process.returncode

    def __enter__(self) -> RingHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(recipe: str | os.PathLike[str] | dict[str, Any] | Recipe, name: str | None = None,
          producers: int | None = None, ready_timeout: float = 60.0,
          resume: dict[str, Any] | None = None, world_size: int | None = None, nnodes: int | None = None,
          node_rank: int | None = None) -> RingHandle:
    """Start a daemon for ``recipe`` (a file, a mapping or a Recipe) and return once its ring is ready.

    Relative paths in a mapping are taken relative to the current directory. ``resume``: a
    ``Loader.state_dict()``; the stream continues right after the batch it was taken at.
    ``world_size`` (ranks on this node), ``nnodes`` and ``node_rank`` override the recipe's.
    """
    parsed = as_recipe(recipe).replace(world_size=world_size, nnodes=nnodes, node_rank=node_rank)
    ring_name = validate_name(name if name is not None else parsed.name)
    log_path = log_file(ring_name)
    recipe_path = log_path.with_suffix(".recipe.yaml")
    recipe_path.write_text(yaml.safe_dump(parsed.to_dict(), sort_keys=False))
    resume_path = None
    if resume is not None:
        resume_path = log_path.with_suffix(".resume.json")
        resume_path.write_text(json.dumps(resume))
    process = launch(str(recipe_path), ring_name, producers, log_path=log_path, ready_timeout=ready_timeout,
                     resume_path=str(resume_path) if resume_path else None)
    return RingHandle(ring_name, process, log_path)
