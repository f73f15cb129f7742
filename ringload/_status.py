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


def ring_status(name: str, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able snapshot of a ring: state, position, fill, rates, every producer's counters, and
    where each stage's time goes (``stages``: since the ring started, or since ``previous``, an
    earlier snapshot of the same ring). A ring that failed and was removed gives its failure record."""
    try:
        ring = Ring.attach(name)
    except RingError:
        failure = failure_instead_of(name)
        if failure is None:
            raise
        return _removed_snapshot(failure)
    try:
        snapshot = _snapshot(ring)
    finally:
        ring.close()
    snapshot["stages"] = stage_shares(snapshot, previous if previous and not previous["removed"] else None)
    return snapshot


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
            "chunk_bytes": get(ring.lane_word(p, LaneWord.CHUNK_BYTES)),
            "stage": _STAGE_NAMES.get(get(ring.lane_word(p, LaneWord.STAGE)), "starting"),
            "ready_ahead": get(ring.lane_word(p, LaneWord.AHEAD)),
            "chunk_age_s": _age_s(get(ring.lane_word(p, LaneWord.CHUNK_STARTED_NS))),
            **_stage_seconds(ring, p),
            "slots_filled": sum(filled_of(ring.rank_lanes(r)[p]) for r in range(g.ranks)),
        })
    consumers = []
    for rank in range(g.ranks):
        block = ring.consumer_block(rank)
        position = read_position(ring.words, block)
        consumers.append({"rank": rank, "pid": get(block + ConsumerWord.PID) or None, "chunk": position.next_chunk,
                          "index": position.next_index, "delivered": position.delivered,
                          "connected_s": _age_s(get(block + ConsumerWord.CONNECTED_NS)),
                          "wait_s": get(block + ConsumerWord.WAIT_NS) / 1e9})
    filled = sum(filled_of(lane) for lane in range(g.lanes))
    daemon_pid = get(Word.DAEMON_PID)
    end = get(Word.END_CHUNK)
    header_recipe = ring.recipe()
    recipe = header_recipe.get("recipe", {})
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
        "source_bytes": {"fetched": get(Word.BYTES_FETCHED), "listed": get(Word.BYTES_LISTED),
                         "from_cache": get(Word.BYTES_FROM_CACHE)},
        "reader": {"read_s": get(Word.READER_READ_NS) / 1e9, "wait_s": get(Word.READER_WAIT_NS) / 1e9},
        "tokenizer_engine": header_recipe.get("tokenizer_engine"),  # {engine, reason}; None for a ring no daemon made
        "sharding": {"ranks": g.ranks, "nnodes": recipe.get("nnodes", 1), "node_rank": recipe.get("node_rank", 0)},
        "geometry": {
            "lanes": g.lanes, "producers": g.producers, "slots_per_lane": g.slots, "batch_size": g.batch_size,
            "bytes": ring.total_size,
            "fields": [{"name": f.name, "dtype": np.dtype(f.dtype).name, "shape": list(f.shape)} for f in g.fields],
        },
        "fill": {"slots_filled": filled, "slots_total": g.lanes * g.slots,
                 "fraction": round(filled / (g.lanes * g.slots), 4)},
        "rates": {"batches_per_s": round(ring.get_float(Word.BATCHES_PER_S), 2),
                  "tokens_per_s": round(ring.get_float(Word.TOKENS_PER_S), 1)},
        "packing": _packing(producers, g),
        "producers": producers,
    }


_STAGE_WORDS = {"work_s": LaneWord.WORK_NS, "wait_chunk_s": LaneWord.WAIT_CHUNK_NS,
                "wait_slot_s": LaneWord.WAIT_SLOT_NS}
_STAGE_NAMES = {LaneWord.WORK_NS: "work", LaneWord.WAIT_CHUNK_NS: "wait_chunk", LaneWord.WAIT_SLOT_NS: "wait_slot"}
BUSY_SHARE = 0.2  # a stage that waits more than this share of its time is held up by another


def _stage_seconds(ring: Ring, lane: int) -> dict[str, float]:
    """A producer's seconds of work, waiting for a chunk and waiting for a slot, the stage it is in now included."""
    get = ring.get
    spent = {key: get(ring.lane_word(lane, word)) for key, word in _STAGE_WORDS.items()}
    current, since = get(ring.lane_word(lane, LaneWord.STAGE)), get(ring.lane_word(lane, LaneWord.STAGE_SINCE_NS))
    for key, word in _STAGE_WORDS.items():
        if word == current and since and pid_alive(get(ring.lane_word(lane, LaneWord.PID))):
            spent[key] += max(0, time.monotonic_ns() - since)
    return {key: ns / 1e9 for key, ns in spent.items()}


def _age_s(wall_ns: int) -> float | None:
    return round(time.time() - wall_ns / 1e9, 3) if wall_ns else None


def stage_shares(now: dict[str, Any], before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the producers', the reader's and each consumer's time went, as shares, and which stage
    holds the others up (``bottleneck``: a sentence naming the setting to change)."""
    def spent(snapshot: dict[str, Any] | None, key: str) -> float:
        return sum(p[key] for p in snapshot["producers"]) if snapshot else 0.0

    producer = {key[:-2]: spent(now, key) - spent(before, key) for key in _STAGE_WORDS}
    total = sum(producer.values())
    reader = {key[:-2]: now["reader"][key] - (before["reader"][key] if before else 0.0) for key in ("read_s", "wait_s")}
    reader_total = sum(reader.values())
    consumers: list[float | None] = []
    for c in now["consumers"]:
        old = before["consumers"][c["rank"]] if before else None
        if c["pid"] is None or c["connected_s"] is None:
            consumers.append(None)
            continue
        if old is not None and old["pid"] == c["pid"] and old["connected_s"] is not None:  # the same connection
            span, waited = c["connected_s"] - old["connected_s"], c["wait_s"] - old["wait_s"]
        else:
            span, waited = c["connected_s"], c["wait_s"]
        consumers.append(round(min(1.0, waited / span), 3) if span > 0 else None)
    shares = {key: round(value / total, 3) if total else None for key, value in producer.items()}
    return {
        "producers": shares,
        "reader": {key: round(value / reader_total, 3) if reader_total else None for key, value in reader.items()},
        "consumers_wait": consumers,
        "bottleneck": _bottleneck({key: share for key, share in shares.items() if share is not None},
                                  [c for c in consumers if c is not None]),
    }


def _bottleneck(producers: dict[str, float], consumers_wait: list[float]) -> str | None:
    """The stage that holds the others up, in words a user can act on (None before producers spent any time)."""
    if not producers:
        return None
    if consumers_wait and max(consumers_wait) < BUSY_SHARE:
        return "the training loop: batches are ready before it asks for them (nothing to tune in ringload)"
    if producers["wait_chunk"] > BUSY_SHARE:
        return ("reading the sources: producers wait for chunks (faster or closer storage, or larger chunk_bytes "
                "for many small remote reads)")
    if producers["wait_slot"] > BUSY_SHARE and consumers_wait:
        return ("ordered delivery: producers wait for free slots while the consumer waits for the batch due next "
                "(one chunk costs far more than the others, or slots is too small: remove slots from the recipe "
                "or raise it)")
    if producers["wait_slot"] > BUSY_SHARE:
        return ("the consumer: " + ("producers wait for free slots" if consumers_wait else
                                    "none is connected, so producers wait for free slots"))
    return "tokenization: producers are busy all the time (add producers if cores are free)"


def _packing(producers: list[dict[str, Any]], g: Any) -> dict[str, float | None]:
    """Shares over every producer: padding among the row tokens of the batches published, and
    documents cut across rows (split or truncated) among the examples read; None before any. A
    complete pass (``_complete``) adds the padding left once each batch is trimmed to its longest
    row (``trim=True``; None for other streams) and its padding rows."""
    row_tokens = sum(p["batches"] for p in producers) * g.batch_size * (
        g.fields[0].shape[1] if len(g.fields[0].shape) > 1 else 1)
    examples = sum(p["examples"] for p in producers)
    tokens, trimmed = sum(p["tokens"] for p in producers), sum(p["trimmed_positions"] for p in producers)
    return {
        "padding_ratio": round(1 - tokens / row_tokens, 4) if row_tokens else None,
        "trimmed_padding_ratio": round(1 - tokens / trimmed, 4) if trimmed else None,
        "rows_padded": sum(p["rows_padded"] for p in producers),
        "truncation_ratio": round(sum(p["documents_cut"] for p in producers) / examples, 4) if examples else None,
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
