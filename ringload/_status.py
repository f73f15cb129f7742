"""Reading a live ring for people and scripts: status snapshots and batch peeks.

A ring that failed and was removed still has a snapshot, from its failure record (``_failures``):
``state`` "failed", ``error``, ``daemon_pid``, ``removed`` true, ``failed_at`` and ``log``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ._errors import RingError
from ._failures import attach_or_explain, failed_names, failure_instead_of, read_failure
from ._lanes import STAT_WORDS, LaneWord
from ._layout import ConsumerWord, Ring, SlotWord, State, Word, read_position
from ._names import list_ring_names, pid_alive


def ring_status(name: str) -> dict[str, Any]:
    """A JSON-able snapshot of a ring: state, position, fill, rates and every producer's counters."""
    try:
        ring = Ring.attach(name)
    except RingError:
        failure = failure_instead_of(name)
        if failure is None:
            raise
        return _removed_snapshot(failure)
    try:
        return _snapshot(ring)
    finally:
        ring.close()


def _snapshot(ring: Ring) -> dict[str, Any]:
    g, get = ring.geometry, ring.get
    def filled_of(lane: int) -> int:
        return get(ring.lane_word(lane, LaneWord.PUBLISHED)) - get(ring.lane_word(lane, LaneWord.RELEASED))

    producers = []
    for p in range(g.producers):  # a producer's statistics are in its rank-0 lane, lane p
        pid = get(ring.lane_word(p, LaneWord.PID))
        producers.append({
            "lane": p,
            "pid": pid,
            "alive": pid_alive(pid),
            **{key: get(ring.lane_word(p, word)) for key, word in STAT_WORDS.items()},
            "restarts": get(ring.lane_word(p, LaneWord.RESTARTS)),
            "current_chunk": get(ring.lane_word(p, LaneWord.CURRENT_CHUNK)),
            "slots_filled": sum(filled_of(ring.rank_lanes(r)[p]) for r in range(g.ranks)),
        })
    consumers = []
    for rank in range(g.ranks):
        block = ring.consumer_block(rank)
        position = read_position(ring.words, block)
        consumers.append({"rank": rank, "pid": get(block + ConsumerWord.PID) or None, "chunk": position.next_chunk,
                          "index": position.next_index, "delivered": position.delivered})
    filled = sum(filled_of(lane) for lane in range(g.lanes))
    daemon_pid = get(Word.DAEMON_PID)
    end = get(Word.END_CHUNK)
    recipe = ring.recipe().get("recipe", {})
    return {
        "name": ring.name,
        "state": ring.state.name.lower(),
        "error": ring.error or None,
        "removed": False,
        "daemon_pid": daemon_pid,
        "daemon_alive": pid_alive(daemon_pid),
        "heartbeat_age_s": round(time.time() - get(Word.HEARTBEAT_NS) / 1e9, 3),
        "consumers": consumers,
        "end_chunk": end if end >= 0 else None,
        "source_errors": get(Word.SOURCE_ERRORS),
        "source_bytes": {"fetched": get(Word.BYTES_FETCHED), "listed": get(Word.BYTES_LISTED)},
        "sharding": {"ranks": g.ranks, "nnodes": recipe.get("nnodes", 1), "node_rank": recipe.get("node_rank", 0)},
        "geometry": {
            "lanes": g.lanes, "producers": g.producers, "slots_per_lane": g.slots, "batch_size": g.batch_size,
            "bytes": ring.total_size,
            "fields": [{"name": f.name, "dtype": np.dtype(f.dtype).name, "shape": list(f.shape)} for f in g.fields],
        },
        "fill": {"slots_filled": filled, "slots_total": g.lanes * g.slots, "fraction": round(filled / (g.lanes * g.slots), 4)},
        "rates": {"batches_per_s": round(ring.get_float(Word.BATCHES_PER_S), 2),
                  "tokens_per_s": round(ring.get_float(Word.TOKENS_PER_S), 1)},
        "producers": producers,
    }


def _removed_snapshot(failure: dict[str, Any]) -> dict[str, Any]:
    return {"name": failure.get("name"), "state": "failed", "error": failure["error"], "removed": True,
            "daemon_pid": failure.get("daemon_pid"), "daemon_alive": False, "failed_at": failure.get("failed_at"),
            "log": failure.get("log")}


def list_rings() -> list[dict[str, Any]]:
    """Every ring in /dev/shm with its daemon pid and whether that daemon is alive, and the rings that
    failed and were removed (``removed``: true, with their ``error``)."""
    rings = []
    present = list_ring_names()
    for name in failed_names():
        failure = read_failure(name)
        if name not in present and failure is not None:
            rings.append({**_removed_snapshot(failure), "name": name, "alive": False})
    for name in present:
        try:
            ring = Ring.attach(name)
        except RingError as exc:
            rings.append({"name": name, "state": "unreadable", "daemon_pid": None, "alive": False, "detail": str(exc)})
            continue
        pid = ring.get(Word.DAEMON_PID)
        rings.append({"name": name, "state": ring.state.name.lower(), "daemon_pid": pid, "alive": pid_alive(pid),
                      "bytes": ring.total_size})
        ring.close()
    return sorted(rings, key=lambda r: r["name"])


def peek(name: str, k: int = 0, timeout: float = 10.0, rank: int = 0) -> dict[str, Any]:
    """Copy the ``k``-th published batch after rank ``rank``'s position, without consuming it."""
    ring = attach_or_explain(name)
    try:
        if not 0 <= rank < ring.geometry.ranks:
            raise RingError(f"ring {name!r} serves ranks 0..{ring.geometry.ranks - 1}, not {rank}")
        deadline = time.monotonic() + timeout
        while True:
            found = _try_peek(ring, k, rank)
            if found is not None:
                return found
            if ring.state in (State.FAILED, State.STOPPING) or time.monotonic() > deadline:
                raise RingError(f"ring {name!r} holds fewer than {k + 1} unread batches "
                                f"(state {ring.state.name.lower()}); try a smaller --batch, or wait for the producers")
            time.sleep(0.05)
    finally:
        ring.close()


def _try_peek(ring: Ring, k: int, rank: int) -> dict[str, Any] | None:
    g, get = ring.geometry, ring.get
    current = read_position(ring.words, ring.consumer_block(rank))
    position = (current.next_chunk, current.next_index)
    candidates = []
    for p in ring.rank_lanes(rank):
        published, released = get(ring.lane_word(p, LaneWord.PUBLISHED)), get(ring.lane_word(p, LaneWord.RELEASED))
        for seq in range(released, published):
            base = ring.slot_word(p, seq % g.slots, 0)
            key = (get(base + SlotWord.CHUNK), get(base + SlotWord.INDEX))
            if key >= position and get(base + SlotWord.ROWS) > 0:
                candidates.append((key, p, seq))
    candidates.sort()
    if len(candidates) <= k:
        return None
    (chunk, index), lane, seq = candidates[k]
    base = ring.slot_word(lane, seq % g.slots, 0)
    arrays = {key: array.copy() for key, array in ring.slot_arrays(lane, seq % g.slots).items()}
    # The copy is good only if the slot was not recycled while we read it.
    if get(base + SlotWord.SEQ) != seq or get(ring.lane_word(lane, LaneWord.RELEASED)) > seq:
        return None
    return {"chunk": chunk, "index": index, "lane": lane, "seq": seq, "arrays": arrays, "recipe": ring.recipe()}
