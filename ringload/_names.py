"""Names of a ring's POSIX objects and files, and which rings exist on this machine."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ._errors import RingError

PREFIX = "ringload."
SHM_DIR = "/dev/shm"
_VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


def validate_name(name: str) -> str:
    """Return ``name`` if it is safe to embed in a POSIX object name, else raise."""
    if name == "":
        raise RingError("invalid ring name '': the ring name is empty; give 1-63 characters from letters, digits, "
                        "'_', '.', '-' (or leave --name out to use the recipe's name)")
    if not isinstance(name, str) or not _VALID_NAME.match(name) or ".." in name:
        raise RingError(
            f"invalid ring name {name!r}: use 1-63 characters from letters, digits, '_', '.', '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


def run_dir() -> Path:
    """This user's folder for daemon logs and failure records (created private, mode 0700)."""
    directory = Path(tempfile.gettempdir()) / f"ringload-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def shm_name(ring: str) -> str:
    return f"/{PREFIX}{validate_name(ring)}"


def filled_sem_name(ring: str, lane: int) -> str:
    return f"/{PREFIX}{validate_name(ring)}.filled.{lane}"


def free_sem_name(ring: str, lane: int) -> str:
    return f"/{PREFIX}{validate_name(ring)}.free.{lane}"


def doorbell_sem_name(ring: str, rank: int) -> str:
    return f"/{PREFIX}{validate_name(ring)}.doorbell.{rank}"


def list_ring_names() -> list[str]:
    """Names of the rings whose shared-memory object exists in /dev/shm."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e[len(PREFIX):] for e in entries if e.startswith(PREFIX))


def list_semaphore_rings() -> dict[str, list[str]]:
    """Ring name -> the semaphore files in /dev/shm that belong to it (orphans included)."""
    found: dict[str, list[str]] = {}
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return found
    for entry in entries:
        if not entry.startswith("sem." + PREFIX):
            continue
        rest = entry[len("sem." + PREFIX):]
        for suffix in (".doorbell.", ".filled.", ".free."):
            cut = rest.find(suffix)
            if cut > 0:
                found.setdefault(rest[:cut], []).append("/" + entry[len("sem."):])
                break
    return found


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True
