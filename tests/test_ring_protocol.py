"""The shared-memory ring and its lane protocol (``ringload._layout``, ``ringload._lanes``).

Each test proves one rule of the protocol documented in ``ringload/_lanes.py`` with the real
classes: ``Ring.create``/``Ring.attach``, ``Semaphores``, ``LaneWriter``, ``repair_after_producer_death``
and, for the consumer-side rules, the real ``Loader``. Producer processes are started with the
``spawn`` context and run ``_ringtools.produce``. Every ring gets a unique name and the ``rings``
fixture unlinks its shared memory and semaphores, then asserts that nothing of it is left in /dev/shm.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import _ringtools as rt  # pytest puts tests/ on sys.path; spawned producers inherit it

import ringload
from ringload._lanes import LaneWord, LaneWriter, acquire, repair_after_producer_death
from ringload._layout import LANE_BLOCK, LINE, SLOT_HEADER_SIZE, ConsumerWord, Field, Geometry, Ring, SlotWord, Word
from ringload._names import SHM_DIR, list_semaphore_rings


@pytest.fixture
def rings():
    ring_set = rt.RingSet()
    yield ring_set
    left = ring_set.cleanup()
    assert not left, f"objects left in /dev/shm: {left}"


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def _assert_tokens_exact(ring: Ring, sems, lane: int, surplus_filled: int = 0) -> None:
    released, taken, published, posted = rt.counters(ring, lane)
    slots = ring.geometry.slots
    assert posted == published
    assert sems.filled[lane].value == published - taken + surplus_filled
    assert sems.free[lane].value == slots - (published - released)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


MIXED_GEOMETRY = Geometry(2, 3, 4, (
    Field("input_ids", np.dtype("<i4"), (4, 16)),
    Field("labels", np.dtype("<i8"), (4, 16)),
    Field("mask", np.dtype("|b1"), (4, 16)),
    Field("weight", np.dtype("<f2"), (4,)),
    Field("pos", np.dtype("<u2"), (4, 3, 5)),
))


# -- objects, attachment, layout -------------------------------------------------------------

def test_created_objects_are_private(rings):
    """The ring's shm object and every one of its semaphores are mode 0600 and owned by us, whatever the umask."""
    old = os.umask(0)  # a umask cannot hide a mode wider than 0600 requested by the code
    try:
        name, ring, sems = rings.create(lanes=3, slots=2)
    finally:
        os.umask(old)
    entries = rt.shm_entries(name)
    sem_entries = [e for e in entries if e.startswith("sem.ringload.")]
    assert f"ringload.{name}" in entries
    assert len(sem_entries) == 1 + 2 * 3  # doorbell.0 + filled.L + free.L for 3 lanes
    assert sorted(list_semaphore_rings()[name]) == sorted("/" + e[len("sem."):] for e in sem_entries)
    for entry in entries:
        st_ = os.stat(os.path.join(SHM_DIR, entry))
        assert stat.S_IMODE(st_.st_mode) == 0o600, f"{entry} has mode {stat.S_IMODE(st_.st_mode):o}"
        assert st_.st_uid == os.getuid(), f"{entry} belongs to uid {st_.st_uid}"
    assert ring.get(Word.OWNER_UID) == os.getuid()


def test_attach_rebuilds_the_same_geometry(rings):
    """Ring.attach validates the header and rebuilds exactly the geometry, offsets and recipe of the creator."""
    name, made, _ = rings.create(geometry=MIXED_GEOMETRY, recipe={"k": [1, 2, 3], "s": "x" * 300})
    ring, _ = rings.attach(name)
    assert ring.geometry == MIXED_GEOMETRY
    assert [f.dtype for f in ring.geometry.fields] == [f.dtype for f in MIXED_GEOMETRY.fields]
    for attr in ("header_size", "total_size", "slot_size", "lanes_offset", "slots_offset", "field_offsets"):
        assert getattr(ring, attr) == getattr(made, attr), attr
    recipe_json = b'{"k": [1, 2, 3], "s": "' + b"x" * 300 + b'"}'
    assert ring.total_size == len(ring._mem) == MIXED_GEOMETRY.total_size(recipe_json)
    assert ring.recipe() == made.recipe() == {"k": [1, 2, 3], "s": "x" * 300}


def test_field_views_are_aligned_and_disjoint(rings):
    """Every field view is 64-byte aligned, inside its own slot after the slot header, and no two views overlap."""
    name, _, _ = rings.create(geometry=MIXED_GEOMETRY)
    ring, _ = rings.attach(name)
    base, size = rt.mapping_address(ring)
    g = ring.geometry
    lanes_end = ring.lanes_offset + g.lanes * LANE_BLOCK
    assert ring.header_size <= ring.lanes_offset and lanes_end <= ring.slots_offset
    assert ring.slots_offset % 4096 == 0 and ring.slot_size % LINE == 0
    spans = []
    for lane in range(g.lanes):
        for slot in range(g.slots):
            lo, hi = rt.slot_bounds(ring, lane, slot)
            arrays = ring.slot_arrays(lane, slot)
            assert list(arrays) == [f.name for f in g.fields]
            for f, (_key, arr) in zip(g.fields, arrays.items()):
                assert arr.shape == f.shape and arr.dtype == f.dtype and arr.flags.c_contiguous and arr.flags.writeable
            for start, end, what in rt.field_spans(ring, lane, slot, arrays, base):
                assert (base + start) % LINE == 0, f"{what} at {start} is not 64-byte aligned"
                assert lo + SLOT_HEADER_SIZE <= start < end <= hi, f"{what} [{start}, {end}) leaves slot [{lo}, {hi})"
                spans.append((start, end, what))
            del arrays
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        assert end_a <= start_b, f"{a} overlaps {b}"
    assert spans[0][0] >= lanes_end and spans[-1][1] <= size
    # Header words, lane control blocks and slot headers all lie before the slots / inside their slot.
    assert (ring.lane_word(g.lanes - 1, LANE_BLOCK // 8 - 1) + 1) * 8 <= ring.slots_offset
    assert (ring.slot_word(g.lanes - 1, g.slots - 1, SLOT_HEADER_SIZE // 8 - 1) + 1) * 8 <= size


def test_slot_arrays_do_not_alias(rings):
    """Writing one slot's arrays (through the creator) never changes another slot's or lane's (seen by an attacher)."""
    name, made, _ = rings.create(geometry=MIXED_GEOMETRY)
    ring, _ = rings.attach(name)
    g = made.geometry
    keys = [(lane, slot) for lane in range(g.lanes) for slot in range(g.slots)]
    views = {k: ring.slot_arrays(*k) for k in keys}
    flat = [(k, name_, arr) for k in keys for name_, arr in views[k].items()]
    for i, (ka, na, a) in enumerate(flat):
        for kb, nb, b in flat[i + 1:]:
            assert not np.may_share_memory(a, b), f"{ka} {na} may alias {kb} {nb}"
    for n, k in enumerate(keys):
        for j, arr in enumerate(made.slot_arrays(*k).values()):
            arr[...] = (n * 8 + j + 1) % 2 if arr.dtype == np.bool_ else n * 8 + j + 1
        made.words[made.slot_word(*k, SlotWord.SEQ)] = 1000 + n
    for n, k in enumerate(keys):
        for j, arr in enumerate(views[k].values()):
            want = (n * 8 + j + 1) % 2 if arr.dtype == np.bool_ else n * 8 + j + 1
            assert np.all(arr == want), f"lane/slot {k} field {j} was overwritten"
        assert ring.words[ring.slot_word(*k, SlotWord.SEQ)] == 1000 + n
    del views, flat


# -- the protocol across processes -----------------------------------------------------------

def test_wraparound_many_laps(rings):
    """5000 batches through a 4-slot lane (1250 laps) arrive once each, in order, with payload, checksum, SEQ stamp."""
    total, slots = 5000, 4
    name, ring, sems = rings.create(lanes=1, slots=slots)
    reader = rt.LaneReader(ring, sems, 0)
    proc = rings.spawn(rt.produce, name, 0, total)
    deadline = time.monotonic() + 60
    expected = 0
    while expected < total:
        seq = reader.take(0.5)
        if seq is None:
            assert time.monotonic() < deadline, f"stalled at {expected}"
            assert proc.is_alive() or proc.exitcode == 0, f"producer died with exit code {proc.exitcode}"
            continue
        assert seq == expected
        assert reader.header_word(seq, SlotWord.SEQ) == seq
        reader.verify(seq)
        reader.release(seq)
        expected += 1
    proc.join(30)
    assert proc.exitcode == 0
    assert rt.counters(ring, 0)[:3] == (total, total, total)
    _assert_tokens_exact(ring, sems, 0)
    assert reader.absorbed == 0


def test_stress_two_lanes_checksummed(rings):
    """100k checksummed batches from two producer processes on two lanes: no torn, repeated or missing slot."""
    per_lane, slots = 50_000, 8
    name, ring, sems = rings.create(lanes=2, slots=slots)
    readers = [rt.LaneReader(ring, sems, lane) for lane in (0, 1)]
    started = time.monotonic()
    procs = [rings.spawn(rt.produce, name, lane, per_lane) for lane in (0, 1)]
    expected = [0, 0]
    deadline = started + 55
    while expected[0] < per_lane or expected[1] < per_lane:
        progress = False
        for lane, reader in enumerate(readers):
            while (seq := reader.take(0)) is not None:
                assert seq == expected[lane], f"lane {lane}: got {seq}, expected {expected[lane]}"
                reader.verify(seq)
                reader.release(seq)
                expected[lane] += 1
                progress = True
        if not progress:
            assert time.monotonic() < deadline, f"stalled at {expected}"
            for proc in procs:
                assert proc.is_alive() or proc.exitcode == 0, f"producer died with exit code {proc.exitcode}"
            acquire(sems.doorbells[0], 0.2)  # sleep until any lane publishes
    elapsed = time.monotonic() - started
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    for lane in (0, 1):
        assert rt.counters(ring, lane)[:3] == (per_lane, per_lane, per_lane)
        _assert_tokens_exact(ring, sems, lane)
    assert sems.doorbells[0].value <= 2 * per_lane
    assert elapsed < 30, f"100k batches took {elapsed:.1f} s"


class LaneMachine(RuleBasedStateMachine):
    """Random interleavings of producer and consumer steps on two lanes, with simulated crashes and repairs."""

    def __init__(self):
        super().__init__()
        self.rs = rt.RingSet()
        self.slots = 3
        self.name, self.ring, self.sems = self.rs.create(lanes=2, slots=self.slots)
        self.writers = [LaneWriter(self.ring, self.sems, lane) for lane in (0, 1)]
        self.readers = [rt.LaneReader(self.ring, self.sems, lane) for lane in (0, 1)]
        self.surplus = [0, 0]  # surplus filled tokens posted by repairs

    def teardown(self):
        left = self.rs.cleanup()
        assert not left, left

    @rule(lane=st.integers(0, 1))
    def produce(self, lane):
        released, _, published, _ = rt.counters(self.ring, lane)
        writer = self.writers[lane]
        if published - released < self.slots:
            seq = writer.claim(lambda: False, poll=0)
            assert seq == published
            rt.fill_and_publish(writer, seq)
        else:
            with pytest.raises(InterruptedError):
                writer.claim(lambda: False, poll=0)  # full lane: no token, no slot
            assert rt.counters(self.ring, lane)[2] == published

    @rule(lane=st.integers(0, 1))
    def take(self, lane):
        reader = self.readers[lane]
        before = reader.taken
        seq = reader.take(0)
        assert seq is None or seq == before

    @rule(lane=st.integers(0, 1))
    def release(self, lane):
        reader = self.readers[lane]
        if reader.released < reader.taken:
            seq = reader.released
            reader.verify(seq)  # a batch not yet released was never overwritten
            reader.release(seq)

    @rule(lane=st.integers(0, 1), phase=st.sampled_from(["holding_free", "before_filled_post", "after_filled_post"]))
    def producer_dies_and_is_repaired(self, lane, phase):
        released, _, published, _ = rt.counters(self.ring, lane)
        if published - released >= self.slots:
            return
        writer = self.writers[lane]
        seq = writer.claim(lambda: False, poll=0)
        if phase == "holding_free":
            for arr in writer.views[seq % self.slots].values():
                arr[...] = -1  # it was half-way through writing the (free) slot
        else:
            class Crash(Exception):
                pass

            real = writer._filled

            class Dying:
                value = property(lambda _: real.value)

                def release(_):
                    if phase == "before_filled_post":
                        raise Crash
                    real.release()
                    raise Crash

            writer._filled = Dying()
            with pytest.raises(Crash):
                rt.fill_and_publish(writer, seq)
            self.surplus[lane] += phase == "after_filled_post"
        repair_after_producer_death(self.ring, self.sems, lane)
        self.writers[lane] = LaneWriter(self.ring, self.sems, lane)  # the replacement producer

    @invariant()
    def counters_and_tokens_agree(self):
        for lane in (0, 1):
            assert rt.invariant_holds(self.ring, lane), rt.counters(self.ring, lane)
            _assert_tokens_exact(self.ring, self.sems, lane, self.surplus[lane] - self.readers[lane].absorbed)


def test_counters_invariant_random_interleavings():
    """released <= taken <= published <= released + slots, and the semaphores match the counters, after every step."""
    run_state_machine_as_test(LaneMachine, settings=settings(
        max_examples=60, stateful_step_count=40, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow]))


def test_claim_blocks_on_full_lane_and_keep_waiting_false_interrupts(rings):
    """On a full lane claim waits, asking keep_waiting every poll; False raises InterruptedError and takes nothing."""
    name, ring, sems = rings.create(lanes=1, slots=4)
    writer = LaneWriter(ring, sems, 0)
    for seq in range(4):
        assert writer.claim(lambda: False, poll=0) == seq
        rt.fill_and_publish(writer, seq)
    asked = []

    def keep_waiting():
        asked.append(time.monotonic())
        return len(asked) < 5

    started = time.monotonic()
    with pytest.raises(InterruptedError):
        writer.claim(keep_waiting, poll=0.03)
    assert len(asked) == 5 and asked[-1] - started >= 5 * 0.03 * 0.9
    assert rt.counters(ring, 0) == (0, 0, 4, 4) and sems.free[0].value == 0
    _assert_tokens_exact(ring, sems, 0)


def test_claim_resumes_after_a_release(rings):
    """A producer waiting on a full lane gets the next sequence number once the consumer releases a slot."""
    name, ring, sems = rings.create(lanes=1, slots=4)
    writer = LaneWriter(ring, sems, 0)
    reader = rt.LaneReader(ring, sems, 0)
    for seq in range(4):
        rt.fill_and_publish(writer, writer.claim(lambda: False, poll=0))
    assert reader.take(0) == 0

    def consumer():
        time.sleep(0.2)
        reader.verify(0)
        reader.release(0)

    thread = threading.Thread(target=consumer)
    started = time.monotonic()
    thread.start()
    seq = writer.claim(lambda: True, poll=0.05)
    waited = time.monotonic() - started
    thread.join()
    assert seq == 4 and waited >= 0.15
    rt.fill_and_publish(writer, seq)
    assert rt.counters(ring, 0) == (1, 1, 5, 5)
    _assert_tokens_exact(ring, sems, 0)


def test_producer_process_blocks_when_full_then_resumes(rings):
    """A producer process stops at published = released + slots while nothing is consumed; a release resumes it."""
    name, ring, sems = rings.create(lanes=1, slots=4)
    reader = rt.LaneReader(ring, sems, 0)
    proc = rings.spawn(rt.produce, name, 0, 10)
    _wait_until(lambda: reader.published == 4, 30, "the lane to fill")
    time.sleep(0.3)
    assert reader.published == 4 and proc.is_alive() and sems.free[0].value == 0
    assert reader.take(1) == 0
    time.sleep(0.2)
    assert reader.published == 4, "taking a batch must not free its slot"
    reader.release(0)
    _wait_until(lambda: reader.published == 5, 10, "the producer to resume")
    for expected in range(1, 10):
        seq = reader.take(5)
        assert seq == expected
        reader.verify(seq)
        reader.release(seq)
    proc.join(10)
    assert proc.exitcode == 0
    _assert_tokens_exact(ring, sems, 0)


# -- repair rules ----------------------------------------------------------------------------

def test_repair_posts_filled_for_a_published_but_unposted_batch(rings):
    """Death between published += 1 and the filled post: repair posts one filled token + doorbell, sets posted."""
    name, ring, sems = rings.create(lanes=1, slots=4)
    writer = LaneWriter(ring, sems, 0)
    reader = rt.LaneReader(ring, sems, 0)
    for seq in range(2):
        rt.fill_and_publish(writer, writer.claim(lambda: False, poll=0))
    while sems.doorbells[0].value:
        sems.doorbells[0].acquire(0)
    # Batch 2 written and published, but its producer died before posting `filled`.
    seq = writer.claim(lambda: False, poll=0)
    writer.views[seq % 4]["x"][...] = rt.payload(0, seq)
    writer.views[seq % 4]["tag"][...] = seq
    base = ring.slot_word(0, seq % 4, 0)
    ring.words[base + SlotWord.SEQ], ring.words[base + SlotWord.INDEX], ring.words[base + SlotWord.CHUNK] = seq, seq, 0
    ring.words[base + SlotWord.CHECKSUM] = rt.checksum(seq, rt.payload(0, seq))
    ring.words[ring.lane_word(0, LaneWord.PUBLISHED)] = seq + 1
    assert [reader.take(0), reader.take(0), reader.take(0)] == [0, 1, None]  # batch 2 is stuck without repair
    assert sems.filled[0].value == 0 and rt.counters(ring, 0) == (0, 2, 3, 2)
    repair_after_producer_death(ring, sems, 0)
    assert rt.counters(ring, 0)[3] == 3 and sems.filled[0].value == 1 and sems.doorbells[0].value == 1
    repair_after_producer_death(ring, sems, 0)  # idempotent
    assert sems.filled[0].value == 1 and sems.doorbells[0].value == 1
    assert reader.take(0) == 2
    reader.verify(2)
    for s in range(3):
        reader.release(s)
    _assert_tokens_exact(ring, sems, 0)


def _take_and_release(reader: rt.LaneReader) -> None:
    if reader.taken == reader.released:
        assert reader.take(0) == reader.released
    reader.verify(reader.released)
    reader.release(reader.released)


@pytest.mark.parametrize("published,released", [(0, 0), (3, 1), (6, 3), (7, 4)])
def test_repair_restores_a_lost_free_token(rings, published, released):
    """Death while holding a free token: repair restores free to slots - (published - released), once."""
    slots = 4
    name, ring, sems = rings.create(lanes=1, slots=slots)
    writer = LaneWriter(ring, sems, 0)
    reader = rt.LaneReader(ring, sems, 0)
    for _ in range(published):
        if reader.published - reader.released == slots:
            _take_and_release(reader)
        rt.fill_and_publish(writer, writer.claim(lambda: False, poll=0))
    while reader.released < released:
        _take_and_release(reader)
    assert rt.counters(ring, 0)[::2] == (released, published)
    writer.claim(lambda: False, poll=0)  # takes a free token, then the producer "dies"
    assert sems.free[0].value == slots - (published - released) - 1
    repair_after_producer_death(ring, sems, 0)
    assert sems.free[0].value == slots - (published - released)
    repair_after_producer_death(ring, sems, 0)
    assert sems.free[0].value == slots - (published - released)
    _assert_tokens_exact(ring, sems, 0)
    # The replacement producer fills the lane exactly to released + slots, not one batch more.
    replacement = LaneWriter(ring, sems, 0)
    while rt.counters(ring, 0)[2] < reader.released + slots:
        rt.fill_and_publish(replacement, replacement.claim(lambda: False, poll=0))
    with pytest.raises(InterruptedError):
        replacement.claim(lambda: False, poll=0)


def test_surplus_filled_token_is_absorbed_by_the_consumer_check(rings):
    """A filled token not backed by published > taken is absorbed: the consumer takes nothing and loses nothing."""
    name, ring, sems = rings.create(lanes=1, slots=4)
    writer = LaneWriter(ring, sems, 0)
    reader = rt.LaneReader(ring, sems, 0)
    rt.fill_and_publish(writer, writer.claim(lambda: False, poll=0))
    assert reader.take(0) == 0
    sems.filled[0].release()  # surplus, e.g. a repair after a death between the filled post and `posted`
    assert reader.take(0) is None and reader.absorbed == 1
    assert rt.counters(ring, 0)[:3] == (0, 1, 1) and sems.filled[0].value == 0
    # A surplus left while the next batch is being published is used for it; the real token is absorbed.
    sems.filled[0].release()
    rt.fill_and_publish(writer, writer.claim(lambda: False, poll=0))
    assert reader.take(0) == 1 and reader.take(0) is None and reader.absorbed == 2
    reader.verify(1)
    reader.release(0)
    reader.release(1)
    _assert_tokens_exact(ring, sems, 0)


def test_surplus_free_token_is_absorbed_by_claim(rings):
    """A surplus free token on a full lane never lets claim overwrite an unreleased slot: claim absorbs it, waits."""
    name, ring, sems = rings.create(lanes=1, slots=4)
    writer = LaneWriter(ring, sems, 0)
    reader = rt.LaneReader(ring, sems, 0)
    sems.free[0].release()  # surplus from the start: 5 tokens for 4 slots
    for seq in range(4):
        rt.fill_and_publish(writer, writer.claim(lambda: False, poll=0))
    assert sems.free[0].value == 1
    with pytest.raises(InterruptedError):
        writer.claim(lambda: False, poll=0)  # takes the surplus token, sees seq - released >= slots, re-waits
    assert sems.free[0].value == 0 and rt.counters(ring, 0)[2] == 4
    for seq in range(4):
        assert reader.take(0) == seq
        reader.verify(seq)  # nothing was overwritten
    reader.release(0)
    assert writer.claim(lambda: False, poll=0) == 4
    rt.fill_and_publish(writer, 4)
    assert rt.counters(ring, 0)[:3] == (1, 4, 5)
    _assert_tokens_exact(ring, sems, 0)


def test_loader_absorbs_a_surplus_filled_token(rings):
    """The real consumer (Loader._find) absorbs a surplus filled token and still delivers every batch in order."""
    name, ring, sems = rings.create(lanes=1, slots=4)
    writer = LaneWriter(ring, sems, 0)
    total = 6

    def producer():
        # Publish only once the loader has met the surplus token with nothing published.
        _wait_until(lambda: sems.filled[0].value == 0, 10, "the loader to take the surplus token")
        for _ in range(total):
            rt.fill_and_publish(writer, writer.claim(lambda: True, poll=0.05))

    with ringload.connect(name, timeout=10) as loader:
        sems.filled[0].release()
        sems.doorbells[0].release()
        thread = threading.Thread(target=producer)
        thread.start()
        try:
            got = []
            for _ in range(total):
                batch = next(loader)
                got.append(int(batch["tag"][0]))
                assert np.array_equal(batch["x"].numpy(), rt.payload(0, got[-1]))
                ring.heartbeat()
        finally:
            thread.join()
    assert got == list(range(total))
    assert rt.counters(ring, 0)[:3] == (total, total, total)
    _assert_tokens_exact(ring, sems, 0)


@pytest.mark.parametrize("lost", ["filled", "free"])
def test_loader_claim_recovers_a_dead_consumer(rings, lost):
    """A new Loader returns a dead consumer's held slot, restores the token it lost, and goes on with the next batch."""
    slots = 4
    name, ring, sems = rings.create(lanes=1, slots=slots)
    writer = LaneWriter(ring, sems, 0)
    for _ in range(3):
        rt.fill_and_publish(writer, writer.claim(lambda: False, poll=0))
    dead = ringload.connect(name, timeout=5)
    assert int(next(dead)["tag"][0]) == 0
    assert int(next(dead)["tag"][0]) == 1  # holds seq 1; next_index = 2
    assert rt.counters(ring, 0)[:3] == (1, 2, 3)
    if lost == "filled":
        sems.filled[0].acquire(0)  # killed after taking the filled token of seq 2, before taken += 1
    else:
        dead._reader.readers[0].release(1)  # released seq 1 ...
        sems.free[0].acquire(0)  # ... but died before its free post
    ring.set(ring.consumer_block(0) + ConsumerWord.PID, _dead_pid())
    del dead
    with ringload.connect(name, timeout=5) as loader:
        assert rt.counters(ring, 0)[0] == 2  # the held batch went back to the producer
        assert sems.filled[0].value == 1 and sems.free[0].value == slots - 1
        batch = next(loader)
        assert int(batch["tag"][0]) == 2 and np.array_equal(batch["x"].numpy(), rt.payload(0, 2))
        rt.fill_and_publish(writer, writer.claim(lambda: False, poll=0))
        assert int(next(loader)["tag"][0]) == 3
        assert loader.state_dict()["next"][1] == 4 and loader.delivered == 4
    _assert_tokens_exact(ring, sems, 0)
    assert rt.counters(ring, 0)[:3] == (4, 4, 4)


# -- producers killed for real ---------------------------------------------------------------

def _consume_until_dead(reader: rt.LaneReader, proc, got: list[int]) -> None:
    deadline = time.monotonic() + 30
    while True:
        alive = proc.is_alive()
        seq = reader.take(0.05)
        if seq is not None:
            assert seq == len(got)
            reader.verify(seq)
            reader.release(seq)
            got.append(seq)
        elif not alive and reader.sems.filled[reader.lane].value == 0:
            return
        assert time.monotonic() < deadline, "the producer never died"


@pytest.mark.parametrize("phase", ["holding_free", "before_filled_post", "after_filled_post"])
def test_producer_sigkilled_in_each_window_is_repaired(rings, phase):
    """A producer SIGKILLed in each token-losing/duplicating window: repair lets a replacement finish the stream."""
    slots, total, die_at = 4, 40, 13
    name, ring, sems = rings.create(lanes=1, slots=slots)
    reader = rt.LaneReader(ring, sems, 0)
    got: list[int] = []
    proc = rings.spawn(rt.produce, name, 0, total, die_at=die_at, die_phase=phase)
    _consume_until_dead(reader, proc, got)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    released, taken, published, posted = rt.counters(ring, 0)
    if phase == "holding_free":
        assert (released, taken, published, posted) == (13, 13, 13, 13)
        assert sems.free[0].value == slots - 1 and sems.filled[0].value == 0  # one free token lost
    elif phase == "before_filled_post":
        assert (released, taken, published, posted) == (13, 13, 14, 13)
        assert sems.free[0].value == slots - 1 and sems.filled[0].value == 0  # batch 13 has no token: stuck
        assert reader.take(0.1) is None
    else:
        assert (released, taken, published, posted) == (14, 14, 14, 13)
        assert sems.free[0].value == slots and sems.filled[0].value == 0
    repair_after_producer_death(ring, sems, 0)
    _assert_tokens_exact(ring, sems, 0, surplus_filled=int(phase == "after_filled_post"))
    proc = rings.spawn(rt.produce, name, 0, total)
    _consume_until_dead(reader, proc, got)
    proc.join()
    assert proc.exitcode == 0
    while sems.filled[0].value:
        assert reader.take(0) is None  # only surplus tokens may remain
    assert got == list(range(total))
    assert reader.absorbed == int(phase == "after_filled_post")
    _assert_tokens_exact(ring, sems, 0)


def test_producer_sigkilled_mid_stream_never_wedges(rings):
    """SIGKILLed producers never wedge the lane: after repair a new one resumes; every seq arrives once, in order."""
    slots, total, work_s = 4, 12_000, 100e-6
    rng = random.Random(1234)
    kill_at = sorted(rng.sample(range(500, total // 2), 6))
    name, ring, sems = rings.create(lanes=1, slots=slots)
    reader = rt.LaneReader(ring, sems, 0)
    proc = rings.spawn(rt.produce, name, 0, total, work_s=work_s)
    got: list[int] = []
    kills, mid_batch, surplus_filled = 0, 0, 0
    deadline = time.monotonic() + 60
    while len(got) < total:
        if kill_at and len(got) >= kill_at[0]:
            kill_at.pop(0)
            rt.spin(rng.uniform(0, 1.5 * work_s))  # land anywhere in claim / write / publish
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            assert proc.exitcode == -signal.SIGKILL
            kills += 1
            released, taken, published, posted = rt.counters(ring, 0)
            # Caught mid-batch: holding a free token, or between `published += 1` and `posted`.
            mid_batch += sems.free[0].value < slots - (published - released) or posted < published
            repair_after_producer_death(ring, sems, 0)
            assert rt.invariant_holds(ring, 0) and rt.counters(ring, 0)[3] == published
            assert sems.free[0].value == slots - (published - released)
            assert sems.filled[0].value - (published - taken) in (0, 1)  # at most one surplus token
            surplus_filled += sems.filled[0].value - (published - taken)
            if not kill_at and not mid_batch and kills < 20:
                kill_at.append(len(got) + 200)  # not one kill caught the producer mid-batch yet: try again
            proc = rings.spawn(rt.produce, name, 0, total, work_s=work_s)
        seq = reader.take(0.5)
        if seq is None:
            assert time.monotonic() < deadline, f"wedged at {len(got)}: counters {rt.counters(ring, 0)}"
            assert proc.is_alive() or proc.exitcode == 0, f"producer exit code {proc.exitcode}"
            continue
        assert seq == len(got), f"got {seq}, expected {len(got)}"
        reader.verify(seq)
        reader.release(seq)
        got.append(seq)
    proc.join(30)
    assert proc.exitcode == 0 and kills >= 6
    assert mid_batch >= 1, "no kill landed while the producer was in the middle of a batch"
    while sems.filled[0].value:
        assert reader.take(0) is None  # only surplus tokens may remain
    assert got == list(range(total))
    assert reader.absorbed == surplus_filled
    _assert_tokens_exact(ring, sems, 0)
