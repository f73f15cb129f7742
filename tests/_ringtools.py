"""Shared helpers for tests/test_ring_protocol.py and tests/test_header_validation.py.

Everything here drives the real ringload classes (``Ring``, ``Semaphores``, ``LaneWriter``,
``LaneReader``); :class:`LaneReader` here only adds checks of the counter invariant around each
step of the shipped reader, so that the tests observe the counters between steps.

:func:`produce` is the target of the producer processes the tests start with the ``spawn``
context, so this module must stay importable in a fresh interpreter (no pytest imports).
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from uuid import uuid4

import numpy as np
import posix_ipc

from ringload import _lanes
from ringload._lanes import LaneWord, LaneWriter, Semaphores, unlink_semaphores
from ringload._layout import Field, Geometry, Ring, SlotWord
from ringload._names import PREFIX, SHM_DIR, shm_name
from ringload._types import Cursor

ROWS, COLS = 4, 8
SHAPE = (ROWS, COLS)
SEED = 0x5EED1234
_IDX = np.arange(ROWS * COLS, dtype=np.uint64)


def unique_name() -> str:
    return f"t{os.getpid()}-{uuid4().hex[:8]}"


def small_geometry(lanes: int = 1, slots: int = 4) -> Geometry:
    """One int32 field ``x`` of shape (4, 8) (the payload) and one int64 field ``tag`` of shape (4,)."""
    return Geometry(lanes, slots, ROWS, (Field("x", np.dtype("<i4"), SHAPE), Field("tag", np.dtype("<i8"), (ROWS,))))


def payload(lane: int, seq: int) -> np.ndarray:
    """A seeded, cheap, injective-in-(lane, seq) function filling a 4x8 int32 batch."""
    base = np.uint64((seq * 0x9E3779B1 + lane * 0x85EBCA77 + SEED) & 0xFFFFFFFF)
    mixed = (base ^ (_IDX * np.uint64(0x27D4EB2F))) & np.uint64(0x7FFFFFFF)
    return mixed.astype(np.int32).reshape(SHAPE)


def checksum(seq: int, arr: np.ndarray) -> int:
    """CRC32 of the batch bytes, seeded with the sequence number (so a stale slot never matches)."""
    return zlib.crc32(np.ascontiguousarray(arr), zlib.crc32(seq.to_bytes(8, "little")))


def shm_entries(name: str) -> list[str]:
    """Files in /dev/shm that belong to ring ``name`` (its shared memory and its semaphores)."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    shm, sem = f"{PREFIX}{name}", f"sem.{PREFIX}{name}."
    return sorted(e for e in entries if e == shm or e.startswith(sem))


def remove_ring(name: str, lanes: int = 256) -> None:
    try:
        posix_ipc.unlink_shared_memory(shm_name(name))
    except posix_ipc.ExistentialError:
        pass
    unlink_semaphores(name, lanes)


def counters(ring: Ring, lane: int) -> tuple[int, int, int, int]:
    """(released, taken, published, posted), read in that order.

    Reading ``released`` before ``taken`` and both before ``published`` keeps a concurrent
    observation consistent: each counter only grows, and each one read later can only have
    grown past the bound the earlier one sets.
    """
    w = ring.words
    released = w[ring.lane_word(lane, LaneWord.RELEASED)]
    taken = w[ring.lane_word(lane, LaneWord.TAKEN)]
    published = w[ring.lane_word(lane, LaneWord.PUBLISHED)]
    posted = w[ring.lane_word(lane, LaneWord.POSTED)]
    return released, taken, published, posted


def invariant_holds(ring: Ring, lane: int) -> bool:
    released, taken, published, _ = counters(ring, lane)
    return 0 <= released <= taken <= published <= released + ring.geometry.slots


class LaneReader(_lanes.LaneReader):
    """The shipped reader (``ringload._lanes.LaneReader``), checking the counter invariant before and
    after each of its steps so that tests see every state it passes through."""

    def __init__(self, ring: Ring, sems: Semaphores, lane: int):
        super().__init__(ring, sems, lane)
        self.sems = sems
        self.views = [ring.slot_arrays(lane, j) for j in range(self.slots)]
        self.observations = 0

    def check(self) -> None:
        self.observations += 1
        released, taken, published, _ = counters(self.ring, self.lane)
        assert 0 <= released <= taken <= published <= released + self.slots, (
            f"lane {self.lane}: invariant broken: released={released} taken={taken} published={published} "
            f"slots={self.slots}")

    @property
    def published(self) -> int:
        return self.words[self._published]

    def take(self, timeout: float = 0.0) -> int | None:
        self.check()
        seq = super().take(timeout)
        self.check()
        return seq

    def release(self, seq: int) -> None:
        super().release(seq)
        self.check()

    def verify(self, seq: int) -> None:
        """The slot of ``seq`` holds exactly the batch the producer wrote for ``seq``."""
        arr = self.views[seq % self.slots]["x"]
        assert self.header_word(seq, SlotWord.SEQ) == seq
        assert self.header_word(seq, SlotWord.INDEX) == seq
        assert self.header_word(seq, SlotWord.CHUNK) == self.lane
        assert np.array_equal(arr, payload(self.lane, seq)), f"lane {self.lane} seq {seq}: payload torn or stale"
        assert np.array_equal(self.views[seq % self.slots]["tag"], np.full(ROWS, seq)), f"seq {seq}: tag torn"
        got = self.header_word(seq, SlotWord.CHECKSUM)
        assert got == checksum(seq, arr), f"lane {self.lane} seq {seq}: checksum {got} does not match the slot"


def fill(writer: LaneWriter, seq: int) -> int:
    """Write batch ``seq`` into its slot; return its checksum."""
    views = writer.views[seq % writer.slots]
    arr = payload(writer.lane, seq)
    views["x"][...] = arr
    views["tag"][...] = seq
    return checksum(seq, arr)


def publish(writer: LaneWriter, seq: int, crc: int) -> None:
    """Publish batch ``seq`` (chunk = lane, index = seq) with its checksum in the slot header."""
    writer.publish(seq, writer.lane, seq, ROWS, False, Cursor(), seq, ROWS * COLS, checksum=crc)


def fill_and_publish(writer: LaneWriter, seq: int) -> None:
    publish(writer, seq, fill(writer, seq))


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _DyingSemaphore:
    """Wraps a semaphore; when armed, SIGKILLs this process right before or after its next post/wait."""

    def __init__(self, sem: posix_ipc.Semaphore):
        self.sem = sem
        self.kill_before_release = self.kill_after_release = self.kill_after_acquire = False

    @property
    def value(self) -> int:
        return self.sem.value

    def acquire(self, timeout: float | None = None) -> None:
        self.sem.acquire(timeout)
        if self.kill_after_acquire:
            os.kill(os.getpid(), signal.SIGKILL)

    def release(self) -> None:
        if self.kill_before_release:
            os.kill(os.getpid(), signal.SIGKILL)
        self.sem.release()
        if self.kill_after_release:
            os.kill(os.getpid(), signal.SIGKILL)


class InvariantBroken(AssertionError):
    pass


def produce(name: str, lane: int, total: int, die_at: int = -1, die_phase: str = "", work_s: float = 0.0,
            timeout: float = 60.0) -> None:
    """Producer process body: publish batches ``published .. total-1`` of ``lane`` through the real LaneWriter.

    It continues from the lane's ``published`` counter (so a replacement picks up where a dead
    producer stopped) and checks the counter invariant after every claim and publish (exit code 1
    with a traceback if it breaks). With ``die_at``/``die_phase`` it SIGKILLs itself at batch
    ``die_at``: ``holding_free`` (right after taking a ``free`` token), ``before_filled_post``
    (after ``published += 1``, before posting ``filled``) or ``after_filled_post`` (after posting
    ``filled``, before ``posted`` is written). ``work_s`` seconds of busy work between writing a
    slot and publishing it stand for tokenization, so the producer holds a free token most of the time.
    """
    ring = Ring.attach(name)
    sems = Semaphores(name, ring.geometry.lanes)
    writer = LaneWriter(ring, sems, lane)
    free = writer._free = _DyingSemaphore(writer._free)
    filled = writer._filled = _DyingSemaphore(writer._filled)
    ring.words[ring.lane_word(lane, LaneWord.PID)] = os.getpid()
    parent, deadline = os.getppid(), time.monotonic() + timeout

    def keep_waiting() -> bool:
        return os.getppid() == parent and time.monotonic() < deadline

    def check(where: str) -> None:
        if not invariant_holds(ring, lane):
            raise InvariantBroken(f"producer lane {lane} {where}: counters {counters(ring, lane)}")

    while writer.next_seq < total:
        seq = writer.next_seq
        free.kill_after_acquire = seq == die_at and die_phase == "holding_free"
        got = writer.claim(keep_waiting, poll=0.05)
        if got != seq:
            raise InvariantBroken(f"claim returned {got}, published is {seq}")
        check(f"after claiming {seq}")
        filled.kill_before_release = seq == die_at and die_phase == "before_filled_post"
        filled.kill_after_release = seq == die_at and die_phase == "after_filled_post"
        crc = fill(writer, seq)
        if work_s:
            spin(work_s)
        publish(writer, seq, crc)
        check(f"after publishing {seq}")
    sems.close()


class RingSet:
    """Rings (and producer processes) made by one test; :meth:`cleanup` removes every trace of them."""

    def __init__(self):
        self.names: dict[str, int] = {}  # name -> lanes
        self.objects: list = []
        self.procs: list = []

    def name(self, lanes: int = 256) -> str:
        """A fresh ring name, registered for cleanup (shared memory + ``lanes`` lanes of semaphores)."""
        name = unique_name()
        self.names[name] = lanes
        return name

    def create(self, lanes: int = 1, slots: int = 4, geometry: Geometry | None = None,
               recipe: dict | None = None) -> tuple[str, Ring, Semaphores]:
        """Create a ring the way the daemon does: shared memory, then its semaphores (free = slots)."""
        geometry = geometry or small_geometry(lanes, slots)
        name = self.name(geometry.lanes)
        ring = Ring.create(name, geometry, recipe or {"test": name})
        sems = Semaphores(name, geometry.lanes, geometry.slots)
        self.objects += [ring, sems]
        return name, ring, sems

    def attach(self, name: str) -> tuple[Ring, Semaphores]:
        ring = Ring.attach(name)
        sems = Semaphores(name, ring.geometry.lanes)
        self.objects += [ring, sems]
        return ring, sems

    def spawn(self, target, *args, **kwargs):
        import multiprocessing

        proc = multiprocessing.get_context("spawn").Process(target=target, args=args, kwargs=kwargs, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def cleanup(self) -> list[str]:
        """Kill leftover producers, unlink everything; return what is still in /dev/shm (should be [])."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(10)
        for obj in reversed(self.objects):
            try:
                obj.close()
            except Exception:
                pass
        left = []
        for name, lanes in self.names.items():
            remove_ring(name, lanes)
            left += shm_entries(name)
        return left


def slot_bounds(ring: Ring, lane: int, slot: int) -> tuple[int, int]:
    """Byte range [start, end) of one slot inside the mapping."""
    start = ring.slots_offset + (lane * ring.geometry.slots + slot) * ring.slot_size
    return start, start + ring.slot_size


def field_spans(ring: Ring, lane: int, slot: int, arrays: dict[str, np.ndarray],
                base_address: int) -> list[tuple[int, int, str]]:
    """(start, end, name) byte offsets, relative to the mapping, of the arrays of one slot."""
    spans = []
    for key, arr in arrays.items():
        start = arr.__array_interface__["data"][0] - base_address
        spans.append((start, start + arr.nbytes, f"lane {lane} slot {slot} field {key}"))
    return spans


def mapping_address(ring: Ring) -> tuple[int, int]:
    """(address, length) of the ring's mmap."""
    probe = np.frombuffer(ring._mem, dtype=np.uint8, count=1)
    address = probe.__array_interface__["data"][0]
    del probe
    return address, len(ring._mem)

