"""Lanes and sequencing: how a slot passes between its producer and the consumer.

``LaneWriter`` is the producer's end of a lane and ``LaneReader`` the consumer's; both sides of
every rule below are in this module.

A lane is ``S`` slots with one writer (a producer) and one reader (a consumer rank). Each producer
owns one lane per rank. Lane sequence numbers ``s = 0, 1, 2, ...`` name the batches the lane
carries, in order; batch ``s`` lives in slot ``s % S``. Four monotonically
increasing 64-bit counters in the lane's control block say where every slot stands:

=============  ========  =================================================================
counter        writer    meaning
=============  ========  =================================================================
``published``  producer  batches ``s < published`` are complete in their slots
``posted``     producer  ``filled`` has been posted for every ``s < posted``
``taken``      consumer  the consumer holds batches ``released <= s < taken``
``released``   consumer  slots of ``s < released`` are free for the producer again
=============  ========  =================================================================

Invariant: ``released <= taken <= published <= released + S``. A slot's state follows from them::

    FREE -> (producer takes a `free` token) -> WRITING -> (published += 1, post `filled`)
         -> PUBLISHED -> (consumer takes a `filled` token) -> TAKEN
         -> (released += 1, post `free`) -> FREE

Lane control block (5 cache lines; counters on separate lines so the two sides never write the
same line)::

    line 0  producer:  published | posted
    line 1  consumer:  taken | released
    line 2  producer:  batches | examples | tokens | bad_records | tokens_dropped | chunks | current_chunk
                       | labels_unknown
    line 3  daemon:    pid | restarts | exitcode;  producer: examples_dropped | documents_cut
                       | records_truncated | rows_padded | trimmed_positions (complete passes:
                       padding rows, and rows x longest row summed over batches)
    line 4  producer:  work_ns | wait_chunk_ns | wait_slot_ns (where its time went, cumulative)
                       | chunk_started_ns (wall clock) | chunk_bytes (of the current chunk)
                       | stage (which of the first three words the time since stage_since_ns
                       belongs to) | stage_since_ns (CLOCK_MONOTONIC, the same in every process)
                       | ahead (batches of its chunk tokenized and waiting for a free slot)

A producer's statistics (lines 2, 3 and 4) live in its rank-0 lane, lane ``p``.

Semaphores (POSIX, mode 0600): ``filled.L`` counts published slots not yet taken, ``free.L`` free
slots of lane L, and one ``doorbell.R`` per rank that every publish into one of rank R's lanes also
posts, so a consumer can sleep until *any* of its lanes has news. Publication is the semaphore: a
producer writes the slot, then posts; the consumer waits, then reads. ``sem_post``/``sem_wait``
order memory between processes, so no step relies on the CPU's store order.

Dealing batches to ranks. A ring may be one of ``N`` nodes (one daemon each) serving ``W`` ranks
each: ``G = N * W`` global ranks, node ``n``'s local rank ``r`` being global rank ``n * W + r``.
Every node cuts the same chunks. A chunk's batches are cut to a multiple of ``G`` (the rest is
counted as dropped) and batch ``i`` goes to global rank ``i % G``; on node ``n``, the producer
holding the chunk publishes the batches of its own ranks into their lanes, in index order. The
last ``G`` batches (one per rank) carry the chunk-end flag; a chunk with fewer than ``G`` batches
gives each rank an empty flagged batch (``rows = 0``) at index ``n * W + r``. So every rank
receives the same number of batches of every chunk, no batch goes to two ranks, and a rank's
batches of chunk ``c`` are indexes ``g, g + G, g + 2G, ...``: the consumer knows which one is due.
The rule's one implementation is ``_types.Dealing``; producer, consumer, daemon and plan ask it.
(When nodes split files or chunks instead, ``node_sharding``, each node's chunks are its own:
the rule applies with ``G = W`` and ``n = 0``.)

No lock exists that a dead process could leave held. A process killed between two steps can
lose or duplicate at most one token; whoever repairs the lane (the daemon after a producer
death, the next consumer after a consumer death) posts the tokens the counters say are missing.
A surplus token is harmless: after every wait each side re-checks the counters, and a token that
the counters do not back is simply absorbed. (Only in that repair path can a side act on a
counter it read without the matching post; the repairing process posts only after it has seen
the dead process exit, but on a weakly ordered CPU a counter read through a surplus token is
ordered by that one post alone. Normal operation never takes this path.)
"""

from __future__ import annotations

from collections.abc import Callable

import posix_ipc

from ._errors import RingError
from ._layout import FLAG_LAST_IN_CHUNK, Ring, SlotHeader, SlotWord
from ._names import doorbell_sem_name, filled_sem_name, free_sem_name
from ._types import Cursor


class LaneWord:
    PUBLISHED = 0
    POSTED = 1
    TAKEN = 8
    RELEASED = 9
    BATCHES = 16
    EXAMPLES = 17
    TOKENS = 18
    BAD_RECORDS = 19
    TOKENS_DROPPED = 20
    CHUNKS = 21
    CURRENT_CHUNK = 22
    LABELS_UNKNOWN = 23
    PID = 24
    RESTARTS = 25
    EXITCODE = 26
    EXAMPLES_DROPPED = 27
    DOCUMENTS_CUT = 28
    RECORDS_TRUNCATED = 29
    ROWS_PADDED = 30
    TRIMMED_POSITIONS = 31
    WORK_NS = 32
    WAIT_CHUNK_NS = 33
    WAIT_SLOT_NS = 34
    CHUNK_STARTED_NS = 35
    CHUNK_BYTES = 36
    STAGE = 37
    STAGE_SINCE_NS = 38
    AHEAD = 39
    CHUNKS_FROM_CACHE = 30  # chunks whose ids came from the token cache (_cache)


STAT_WORDS = {
    "batches": LaneWord.BATCHES,
    "examples": LaneWord.EXAMPLES,
    "tokens": LaneWord.TOKENS,
    "bad_records": LaneWord.BAD_RECORDS,
    "tokens_dropped": LaneWord.TOKENS_DROPPED,
    "examples_dropped": LaneWord.EXAMPLES_DROPPED,
    "labels_unknown": LaneWord.LABELS_UNKNOWN,
    "documents_cut": LaneWord.DOCUMENTS_CUT,
    "records_truncated": LaneWord.RECORDS_TRUNCATED,
    "rows_padded": LaneWord.ROWS_PADDED,
    "trimmed_positions": LaneWord.TRIMMED_POSITIONS,
    "chunks": LaneWord.CHUNKS,
    "chunks_from_cache": LaneWord.CHUNKS_FROM_CACHE,
}


class Semaphores:
    """The ring's semaphores, opened (or created, by the daemon) by name."""

    def __init__(self, ring_name: str, lanes: int, slots: int | None = None, ranks: int = 1):
        create = slots is not None
        flags = posix_ipc.O_CREX if create else 0

        def open_sem(name: str, initial: int) -> posix_ipc.Semaphore:
            try:
                return posix_ipc.Semaphore(name, flags, mode=0o600, initial_value=initial)
            except posix_ipc.PermissionsError:
                raise RingError(f"semaphore {name} of ring {ring_name!r} belongs to another user") from None
            except posix_ipc.ExistentialError:
                what = "already exists (run `ringload clean`)" if create else "is missing: the ring is being torn down"
                raise RingError(f"semaphore {name} of ring {ring_name!r} {what}") from None

        self.doorbells = [open_sem(doorbell_sem_name(ring_name, r), 0) for r in range(ranks)]
        self.filled = [open_sem(filled_sem_name(ring_name, p), 0) for p in range(lanes)]
        self.free = [open_sem(free_sem_name(ring_name, p), slots or 0) for p in range(lanes)]
        self.lanes_per_rank = lanes // ranks

    @classmethod
    def of(cls, ring: Ring) -> Semaphores:
        """Open (not create) the semaphores of an attached ring."""
        return cls(ring.name, ring.geometry.lanes, ranks=ring.geometry.ranks)

    def doorbell_of(self, lane: int) -> posix_ipc.Semaphore:
        """The doorbell of the rank that reads ``lane``."""
        return self.doorbells[lane // self.lanes_per_rank]

    def ring_all(self) -> None:
        """Wake every rank's consumer (the ring's state changed)."""
        for doorbell in self.doorbells:
            doorbell.release()

    def close(self) -> None:
        for sem in (*self.doorbells, *self.filled, *self.free):
            sem.close()


def unlink_semaphores(ring_name: str, lanes: int, ranks: int = 1) -> None:
    names = [doorbell_sem_name(ring_name, r) for r in range(ranks)]
    names += [filled_sem_name(ring_name, p) for p in range(lanes)]
    names += [free_sem_name(ring_name, p) for p in range(lanes)]
    for name in names:
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            pass


def acquire(sem: posix_ipc.Semaphore, timeout: float) -> bool:
    """Take one token, waiting up to ``timeout`` seconds (0 = don't wait). False if none came, or if a
    signal cut the wait short (e.g. the SIGCHLD handler a DataLoader with workers installs in the
    training process): every caller re-checks and waits again."""
    try:
        sem.acquire(timeout)
        return True
    except (posix_ipc.BusyError, posix_ipc.SignalError):
        return False


class LaneWriter:
    """The producer's end of its lane: claim a free slot, fill it, publish it."""

    def __init__(self, ring: Ring, sems: Semaphores, lane: int):
        self.ring, self.lane = ring, lane
        self.words = ring.words
        self.slots = ring.geometry.slots
        self._free, self._filled, self._doorbell = sems.free[lane], sems.filled[lane], sems.doorbell_of(lane)
        self._published = ring.lane_word(lane, LaneWord.PUBLISHED)
        self._posted = ring.lane_word(lane, LaneWord.POSTED)
        self._released = ring.lane_word(lane, LaneWord.RELEASED)
        self.views = [ring.slot_arrays(lane, j) for j in range(self.slots)]

    @property
    def next_seq(self) -> int:
        return self.words[self._published]

    def try_claim(self) -> int | None:
        """The next sequence number if its slot is free now, else None (never waits)."""
        while acquire(self._free, 0):
            seq = self.words[self._published]
            if seq - self.words[self._released] < self.slots:
                return seq
            # a surplus token left by a repair: absorb it and look again
        return None

    def claim(self, keep_waiting: Callable[[], bool], poll: float = 0.2) -> int:
        """Wait for a free slot for the next sequence number and return that sequence number.

        ``keep_waiting`` is asked every ``poll`` seconds while the lane is full; when it says no
        the wait ends with ``InterruptedError``.
        """
        seq = self.words[self._published]
        while True:
            if acquire(self._free, poll):
                # The consumer stored `released` before posting, so this read is current.
                if seq - self.words[self._released] < self.slots:
                    return seq
                continue  # a surplus token left by a repair: absorb it
            if not keep_waiting():
                raise InterruptedError("lane wait abandoned")

    def publish(self, seq: int, chunk: int, index: int, rows: int, last: bool, cursor: Cursor,
                records_done: int, tokens: int, checksum: int = 0) -> None:
        """Stamp the slot header, then make the slot visible: published, post filled, post doorbell."""
        header = SlotHeader(seq, chunk, index, rows, FLAG_LAST_IN_CHUNK if last else 0, records_done, tokens,
                            checksum, cursor)
        header.store(self.words, self.ring.slot_word(self.lane, seq % self.slots, 0))
        w = self.words
        w[self._published] = seq + 1
        self._filled.release()
        w[self._posted] = seq + 1
        self._doorbell.release()


class LaneReader:
    """The consumer's end of one lane: take published batches in order, give their slots back in
    order, and, for a consumer taking over from a dead one, restore the lane's tokens.

    Only this reader writes ``taken`` and ``released``, so it keeps them in Python ints and stores
    each change to the lane block (where a successor and ``ringload status`` read them)."""

    def __init__(self, ring: Ring, sems: Semaphores, lane: int):
        self.ring, self.lane = ring, lane
        self.words = w = ring.words
        self.slots = ring.geometry.slots
        self._batch_size = ring.geometry.batch_size
        self._filled, self._free = sems.filled[lane], sems.free[lane]
        self._published = ring.lane_word(lane, LaneWord.PUBLISHED)
        self._taken_word = ring.lane_word(lane, LaneWord.TAKEN)
        self._released_word = ring.lane_word(lane, LaneWord.RELEASED)
        self.taken = w[self._taken_word]  # batches s < taken have been taken
        self.released = w[self._released_word]  # slots of s < released are free again
        self.absorbed = 0  # surplus `filled` tokens the counters did not back (only a repair leaves them)

    @property
    def held(self) -> int:
        """Batches taken and not yet released (at most ``slots``)."""
        return self.taken - self.released

    def header_word(self, seq: int, word: int) -> int:
        """Word ``word`` (a ``SlotWord``) of the header of batch ``seq``'s slot."""
        return self.words[self.ring.slot_word(self.lane, seq % self.slots, word)]

    def header(self, seq: int) -> SlotHeader:
        return SlotHeader.of(self.words, self.ring.slot_word(self.lane, seq % self.slots, 0))

    def take(self, timeout: float = 0.0) -> int | None:
        """Take the next published batch and return its sequence number, or None if none is announced
        within ``timeout`` seconds (the consumer passes 0 and sleeps on its rank's doorbell instead).
        Raises RingError if the slot's stamp says it does not hold that batch."""
        w = self.words
        while acquire(self._filled, timeout):
            seq = self.taken
            if w[self._published] <= seq:
                self.absorbed += 1  # a surplus token left by a repair: absorb it and look again
                timeout = 0.0
                continue
            stamp, rows = self.header_word(seq, SlotWord.SEQ), self.header_word(seq, SlotWord.ROWS)
            if stamp != seq or not 0 <= rows <= self._batch_size:
                raise RingError(f"ring {self.ring.name!r}: lane {self.lane} slot {seq % self.slots} holds a torn batch "
                                f"(stamp {stamp}, expected {seq})")
            self.taken = seq + 1
            w[self._taken_word] = seq + 1
            return seq
        return None

    def release(self, seq: int) -> None:
        """Give the slot of batch ``seq`` back to the producer; slots go back in sequence order."""
        if seq != self.released:
            raise RingError(f"ring {self.ring.name!r}: lane {self.lane} released out of order "
                            f"({seq} != {self.released})")
        self.released = seq + 1
        self.words[self._released_word] = seq + 1
        self._free.release()

    def repair_after_consumer_death(self) -> None:
        """Restore the tokens a consumer killed mid-step may have lost (its successor calls this,
        after taking over the counters): a ``filled`` token per published batch not taken, a ``free``
        token per slot not in use. A surplus is absorbed later by both sides."""
        published = self.words[self._published]
        for _ in range(published - self.taken - self._filled.value):
            self._filled.release()
        for _ in range(self.slots - (published - self.released) - self._free.value):
            self._free.release()


def last_published(ring: Ring, lane: int) -> SlotHeader | None:
    """The header of the lane's newest published batch, or None if it has none."""
    published = ring.words[ring.lane_word(lane, LaneWord.PUBLISHED)]
    if published == 0:
        return None
    return SlotHeader.of(ring.words, ring.slot_word(lane, (published - 1) % ring.geometry.slots, 0))


def repair_after_producer_death(ring: Ring, sems: Semaphores, lane: int) -> None:
    """Restore the tokens a producer killed mid-step may have lost (the daemon calls this).

    ``filled``: a death between ``published += 1`` and its post leaves a published batch with no
    token, so post it. ``free``: a death while holding a free token (or between taking it and
    writing) leaves the lane short; the count the counters imply is ``S - (published - released)``.
    """
    w = ring.words
    published = w[ring.lane_word(lane, LaneWord.PUBLISHED)]
    if w[ring.lane_word(lane, LaneWord.POSTED)] < published:
        sems.filled[lane].release()
        sems.doorbell_of(lane).release()
        w[ring.lane_word(lane, LaneWord.POSTED)] = published
    missing = ring.geometry.slots - (published - w[ring.lane_word(lane, LaneWord.RELEASED)]) - sems.free[lane].value
    for _ in range(max(0, missing)):
        sems.free[lane].release()
