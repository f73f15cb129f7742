"""Starting a ring from Python: the daemon runs as a child process behind a small handle."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ._errors import RingError
from ._housekeeping import log_file, remove_ring
from ._layout import Ring, State, Word
from ._names import list_ring_names, validate_name
from ._recipe import Recipe, as_recipe


class RingHandle:
    """A running ``ringload start`` daemon. ``stop()`` (or leaving the ``with`` block) ends it.

    ``log_path``: the file the daemon and its producers log to (skipped records, restarts, failures)."""

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


def launch(recipe_path: str, name: str, producers: int | None = None, log_path: Path | None = None,
           detach: bool = False, ready_timeout: float = 60.0, resume_path: str | None = None,
           sharding: dict[str, int | None] | None = None) -> subprocess.Popen:
    """Start ``ringload start`` in a child process and return once its ring is RUNNING.

    ``sharding``: ``world_size``, ``nnodes``, ``node_rank`` overriding the recipe's (None: keep)."""
    command = [sys.executable, "-m", "ringload", "start", recipe_path, "--name", name]
    if not detach:
        command += ["--stop-with", str(os.getpid())]
    if producers:
        command += ["--producers", str(producers)]
    for key, value in (sharding or {}).items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    if resume_path:
        command += ["--resume", resume_path]
    log_path = log_path or log_file(name)
    logged_before = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=detach)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            raise RingError(_why_start_ended(name, code, log_path, logged_before))
        if name in list_ring_names():
            try:
                ring = Ring.attach(name)
            except RingError:
                ring = None  # still being created
            if ring is not None:
                state, owner = ring.state, ring.get(Word.DAEMON_PID)
                ring.close()
                if owner == process.pid and state in (State.RUNNING, State.FINISHED):
                    return process
        time.sleep(0.01)
    process.kill()
    raise RingError(f"ring {name!r} was not ready within {ready_timeout:.0f} s; see {log_path}")


def _why_start_ended(name: str, code: int, log_path: Path, logged_before: int) -> str:
    """Why a `ringload start` child ended before its ring was ready: its one-line error (the CLI's
    last `ringload: ...` line), or else the end of what it wrote to the log."""
    with open(log_path, "rb") as log_stream:
        log_stream.seek(logged_before)
        lines = log_stream.read().decode(errors="replace").strip().splitlines()
    errors = [line.removeprefix("ringload: ") for line in lines if line.startswith("ringload: ")]
    if errors:
        return f"{errors[-1]} (log: {log_path})"
    return f"`ringload start` for ring {name!r} exited with code {code}:\n  " + "\n  ".join(lines[-5:])
