"""Rings on this machine, seen from outside any one of them: who serves a ring, removing a dead
daemon's leftovers, and where a daemon started in the background writes its log. The daemon, the
CLI and the Python API's handle use these; names and listing are ``_names``'."""

from __future__ import annotations

import logging
from pathlib import Path

import posix_ipc

from ._errors import RingError
from ._lanes import unlink_semaphores
from ._layout import Ring, Word
from ._names import list_ring_names, list_semaphore_rings, pid_alive, run_dir, shm_name, validate_name

log = logging.getLogger("ringload.daemon")  # the daemon reclaims at start; its log shows it


def remove_ring(name: str, lanes: int | None = None, ranks: int = 1) -> None:
    """Unlink the ring's shared memory and semaphores (mappings that exist stay valid)."""
    try:
        posix_ipc.unlink_shared_memory(shm_name(name))
    except posix_ipc.ExistentialError:
        pass
    if lanes is not None:
        unlink_semaphores(name, lanes, ranks)
    for sem in list_semaphore_rings().get(name, []):
        try:
            posix_ipc.unlink_semaphore(sem)
        except posix_ipc.ExistentialError:
            pass


def ring_owner(name: str) -> int | None:
    """The pid of the daemon serving ``name`` if it is alive, else None."""
    try:
        ring = Ring.attach(name)
    except RingError:
        return None
    try:
        pid = ring.get(Word.DAEMON_PID)
    finally:
        ring.close()
    return pid if pid_alive(pid) else None


def reclaim_if_dead(name: str) -> bool:
    """Remove a ring whose daemon is dead; refuse if its daemon still runs. True if one was removed."""
    exists = name in list_ring_names() or name in list_semaphore_rings()
    if not exists:
        return False
    owner = ring_owner(name)
    if owner is not None:
        raise RingError(f"ring {name!r} is already served by daemon pid {owner}; "
                        f"stop it with `ringload stop {name}` or start this one with another --name")
    remove_ring(name)
    log.warning("ring %s: removed the leftovers of a dead daemon", name)
    return True


def clean_orphans() -> list[str]:
    """Remove every ring of this user whose daemon is dead; return their names."""
    removed = []
    for name in sorted(set(list_ring_names()) | set(list_semaphore_rings())):
        try:
            validate_name(name)
            if reclaim_if_dead(name):
                removed.append(name)
        except RingError:
            continue
    return removed


def log_file(name: str) -> Path:
    """Where a daemon started detached or from Python writes its log."""
    return run_dir() / f"{validate_name(name)}.log"

