"""Failure records: what a failed ring leaves behind once its shared memory is gone.

A ring that fails is torn down like any other (its shared memory can be large, and nothing can be
read from it any more), so its error would vanish with it. Before removing the ring, the daemon
writes a small record, ``NAME.failed.json`` beside the daemon logs (``_names.run_dir``): the
error, the daemon's pid, when, and the log file. ``ringload status NAME`` and ``ringload ls`` show
it and ``connect(NAME)`` raises ``ProducerFailed`` with it, instead of "no ring named NAME". The
next ``ringload start`` of that name that gets its ring running deletes it, and so do
``ringload stop NAME`` and ``ringload clean``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ._errors import ProducerFailed, RingError
from ._layout import Ring
from ._names import list_ring_names, run_dir, validate_name

SUFFIX = ".failed.json"


def failure_file(name: str) -> Path:
    return run_dir() / f"{validate_name(name)}{SUFFIX}"


def record_failure(name: str, error: str, daemon_pid: int, log: str | None) -> None:
    """Keep ``error`` for ``name`` (written whole or not at all)."""
    path = failure_file(name)
    record = {"name": name, "error": error, "daemon_pid": daemon_pid, "failed_at": time.time(), "log": log}
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(record))
    partial.replace(path)


def read_failure(name: str) -> dict[str, Any] | None:
    """The failure record of ``name``, or None if it has none (or an unreadable one)."""
    try:
        record = json.loads(failure_file(name).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("error"), str) else None


def failure_instead_of(name: str) -> dict[str, Any] | None:
    """What to report for ``name`` after attaching to it failed: its failure record, if it has one
    and no ring of that name exists (a live or dead ring says more than the record)."""
    return read_failure(name) if name not in list_ring_names() else None


def forget_failure(name: str) -> bool:
    """Delete the failure record of ``name``; True if there was one."""
    try:
        failure_file(name).unlink()
        return True
    except FileNotFoundError:
        return False


def failed_names() -> list[str]:
    """Names that have a failure record."""
    return sorted(p.name[:-len(SUFFIX)] for p in run_dir().glob(f"*{SUFFIX}"))


def attach_or_explain(name: str) -> Ring:
    """Attach to ring ``name``; if it failed and was removed, raise ``ProducerFailed`` saying why."""
    try:
        return Ring.attach(name)
    except RingError:
        failure = failure_instead_of(name)
        if failure is None:
            raise
        raise ProducerFailed(describe(failure)) from None


def describe(record: dict[str, Any]) -> str:
    """One line: which ring failed, when, why, and where its log is."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("failed_at", 0)))
    log = f"; log: {record['log']}" if record.get("log") else ""
    return (f"ring {record.get('name')!r} failed at {when} and was removed: {record['error']}{log} "
            f"(start it again with `ringload start RECIPE --name {record.get('name')}`)")
