"""One consumer rank's side of the ring: its batches in stream order, and its position.

A ring serves ``ranks`` consumers, one per local rank (``_types.Dealing`` says which batches each
gets); each reads only its own lanes, one per producer, through a ``LaneReader`` per lane. A
rank's stream order is chunk order, and within a chunk, index order. Producers finish chunks in
whatever order their speed allows, so the rank reorders: it keeps the batches it has taken from
a lane but that are not yet due (its *heads*: at most one per lane while it searches) and hands
out the batch ``(next_chunk, next_index)`` from whichever lane has it. A lane's batches come out
in the order it published them, which is chunk order, so the due batch is always at the front of
some lane: no batch can be stuck behind another, and the lanes' slots are the reorder window.

Slots go back in lane order (``released`` moves in order): :meth:`RankReader.done_with` a batch
releases its slot once every older batch of its lane is done with too.

The rank records its position (in its consumer block: the next batch due, batches delivered,
the resume point) after every batch it delivers, so if its process dies, the next one to claim
the rank gives back the slot it held, restores any semaphore token it lost and goes on with the
next unread batch.

Both ways of handing batches out use this interface: the CPU ``Loader`` (``_consumer``) and the
CUDA stager (``_cuda``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable

from ._errors import DaemonGone, LoaderTimeout, ProducerFailed, RingError
from ._lanes import LaneReader, Semaphores, acquire
from ._layout import ConsumerWord, Ring, SlotHeader, SlotWord, State, Word, read_position, write_position_words
from ._names import pid_alive
from ._types import Cursor, Dealing, ResumePoint

POLL_S = 0.1
HEARTBEAT_TIMEOUT_S = 5.0


class RankReader:
    """Rank ``rank``'s reader of ``ring``: claim the rank, then :meth:`next_due`, :meth:`mark_delivered`
    and :meth:`done_with` each batch, in that order."""

    def __init__(self, ring: Ring, sems: Semaphores, rank: int, dealing: Dealing, timeout: float):
        self.ring, self.sems, self.rank, self.dealing, self.timeout = ring, sems, rank, dealing, timeout
        self.lanes = list(ring.rank_lanes(rank))
        self.slots = ring.geometry.slots
        self.readers: dict[int, LaneReader] = {}  # per lane, once claimed
        self._words = ring.words
        self._block = ring.consumer_block(rank)
        self._doorbell = sems.doorbells[rank]
        self._heads: dict[int, deque[tuple[int, int, int]]] = {}  # lane -> (seq, chunk, index) taken, not yet due
        self._done: dict[int, set[int]] = {lane: set() for lane in self.lanes}  # done with, waiting for older ones
        self._last_lane = 0  # position in ``lanes`` where the last due batch was found
        self.next_chunk = self.next_index = self.delivered = 0
        self.epoch = 0  # the epoch of the last batch delivered
        self._resume: list[int] = []  # ResumePoint.words(), updated in place per batch
        self._search = (0, 0)  # the next batch to look for
        self._due: tuple[int, int, SlotHeader] = (-1, -1, SlotHeader(*(0,) * 8, Cursor()))  # the last one found

    # -- claiming the rank -------------------------------------------------------------------
    def claim(self) -> None:
        """Become the rank's consumer; take over the position (and the held slots) of a dead predecessor.
        RingError if a live process holds the rank."""
        w = self._words
        pid_word = self._block + ConsumerWord.PID
        holder = w[pid_word]
        if holder and holder != os.getpid() and pid_alive(holder):
            raise RingError(f"rank {self.rank} of ring {self.ring.name!r} already has a consumer (pid {holder}); "
                            "a rank has one consumer (start the ring with --world-size for more ranks)")
        w[pid_word] = os.getpid()
        w[self._block + ConsumerWord.CONNECTED_NS] = time.time_ns()
        w[self._block + ConsumerWord.WAIT_NS] = 0
        position = read_position(w, self._block)
        self._resume = list(position.resume)
        self.next_chunk, self.next_index, self.delivered = position.next_chunk, position.next_index, position.delivered
        self._search = (self.next_chunk, self.next_index)
        for lane in self.lanes:
            reader = self.readers[lane] = LaneReader(self.ring, self.sems, lane)
            for seq in range(reader.released, reader.taken):
                chunk, index = reader.header_word(seq, SlotWord.CHUNK), reader.header_word(seq, SlotWord.INDEX)
                if (chunk, index) < (self.next_chunk, self.next_index):
                    reader.release(seq)  # the batch a dead consumer held
                else:
                    self._heads.setdefault(lane, deque()).append((seq, chunk, index))
            reader.repair_after_consumer_death()

    def unclaim(self) -> None:
        """Let another process claim the rank (the position stays in the ring)."""
        if self._words[self._block + ConsumerWord.PID] == os.getpid():
            self._words[self._block + ConsumerWord.PID] = 0

    # -- the due batch -----------------------------------------------------------------------
    def next_due(self, take: bool = True, epoch: int | None = None,
                 while_waiting: Callable[[float], None] | None = None,
                 timeout_hint: Callable[[], str] | None = None) -> tuple[int, int]:
        """Wait for the due batch, move the search past it and return its (lane, seq).

        ``take=False``: the batch stays due (it goes back to the front of its lane's heads).
        ``epoch``: StopIteration, the batch staying due, if it belongs to another epoch. StopIteration
        at the end of a finite stream. ``while_waiting(waited)`` is called on every poll while the due
        batch is late, with the seconds waited so far (0.0 on a wait's first poll): the caller frees
        what it can. ``timeout_hint()`` adds to a timeout's message."""
        deadline = waiting_since = None
        while True:
            found = self._find()
            if waiting_since is not None:  # the due batch is late: the consumer waits on the producers
                now_ns = time.monotonic_ns()
                self._words[self._block + ConsumerWord.WAIT_NS] += now_ns - waiting_since
                waiting_since = now_ns
            if found is not None:
                lane, seq = found
                header = self.readers[lane].header(seq)
                empty = header.rows == 0
                other_epoch = epoch is not None and header.cursor.epoch != epoch
                if not empty and (not take or other_epoch):
                    still_due = (seq, header.chunk, header.batch_index)
                    self._heads.setdefault(lane, deque()).appendleft(still_due)
                    if take:
                        raise StopIteration
                    return lane, seq
                self._search = self.dealing.due_after(header.chunk, header.batch_index, header.last_in_chunk, self.rank)
                self._due = (lane, seq, header)
                if empty:
                    self.mark_delivered(lane, seq)
                    self.done_with(lane, seq)  # an empty chunk's end marker
                    continue
                return lane, seq
            end = self._words[Word.END_CHUNK]
            if 0 <= end <= self._search[0]:
                raise StopIteration
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.timeout
                waiting_since = time.monotonic_ns()
            if while_waiting is not None:
                while_waiting(now - (deadline - self.timeout))
            self._check_health(deadline, timeout_hint)
            acquire(self._doorbell, POLL_S)

    def due_epoch(self) -> int | None:
        """The epoch of the next batch (waiting for it; it stays due), or None at the end of the stream."""
        try:
            lane, seq = self.next_due(take=False)
        except StopIteration:
            return None
        return self.readers[lane].header_word(seq, SlotWord.EPOCH)

    def mark_delivered(self, lane: int, seq: int) -> None:
        """Record in the ring that this batch has been handed out: the rank's position and resume point."""
        due_lane, due_seq, header = self._due
        if (due_lane, due_seq) != (lane, seq):  # the header next_due read is that of this batch, usually
            header = self.readers[lane].header(seq)
        chunk, index = header.chunk, header.batch_index
        self.next_chunk, self.next_index = self.dealing.due_after(chunk, index, header.last_in_chunk, self.rank)
        if header.rows:
            self.delivered += 1
            self.epoch = header.cursor.epoch
        ResumePoint.advance(self._resume, chunk, self.dealing.delivered_through(index), header.cursor)
        write_position_words(self._words, self._block, (self.next_chunk, self.next_index, self.delivered,
                                                        *self._resume))

    def done_with(self, lane: int, seq: int) -> None:
        """Nothing needs batch ``seq`` of ``lane`` any more: release it, and every later one already
        done with, once the older batches of its lane are released."""
        done, reader = self._done[lane], self.readers[lane]
        done.add(seq)
        while reader.released in done:
            done.remove(reader.released)
            reader.release(reader.released)

    def lane_held_full(self) -> bool:
        """True if this rank holds every slot of one of its lanes (that lane's producer cannot write)."""
        return any(reader.held >= self.slots for reader in self.readers.values())

    def position(self) -> tuple[int, ...]:
        """Where the rank's stream stands after the last batch delivered, rank-independent (the index is
        the one due for dealt rank 0), as ``_consumer.stream_state`` takes it."""
        return (self.delivered, self.next_chunk, self.next_index - self.dealing.first_index(self.rank),
                *self._resume)

    # -- internals ---------------------------------------------------------------------------
    def _find(self) -> tuple[int, int] | None:
        """Take lane heads until the due batch turns up; return its (lane, seq) or None."""
        want_chunk, want_index = self._search
        for lane, heads in self._heads.items():
            if heads and heads[0][1] == want_chunk:
                head_seq, chunk, index = heads.popleft()
                self._check_index(lane, chunk, index, want_index)
                return lane, head_seq
        lanes = self.lanes
        for step in range(len(lanes)):
            at = (self._last_lane + step) % len(lanes)
            lane = lanes[at]
            if self._heads.get(lane):
                continue
            reader = self.readers[lane]
            seq = reader.take()
            if seq is None:
                continue
            chunk, index = reader.header_word(seq, SlotWord.CHUNK), reader.header_word(seq, SlotWord.INDEX)
            if chunk == want_chunk:
                self._check_index(lane, chunk, index, want_index)
                self._last_lane = at
                return lane, seq
            if chunk < want_chunk:
                raise RingError(f"ring {self.ring.name!r}: lane {lane} published chunk {chunk} after the consumer "
                                f"had moved on to chunk {want_chunk}")
            self._heads.setdefault(lane, deque()).append((seq, chunk, index))
        return None

    def _check_index(self, lane: int, chunk: int, index: int, want_index: int) -> None:
        if index != want_index:
            raise RingError(f"ring {self.ring.name!r}: lane {lane} delivered batch {index} of chunk {chunk} "
                            f"where batch {want_index} was due: a batch was lost")

    def _check_health(self, deadline: float, timeout_hint: Callable[[], str] | None) -> None:
        """Raise if waiting longer is pointless: ring failed or stopped, daemon gone, timeout."""
        w, name = self._words, self.ring.name
        state = State(w[Word.STATE])
        if state == State.FAILED:
            raise ProducerFailed(f"ring {name!r} failed: {self.ring.error}")
        if state == State.STOPPING:
            raise DaemonGone(f"ring {name!r} was stopped while the consumer waited for a batch")
        pid = w[Word.DAEMON_PID]
        if not pid_alive(pid):
            raise DaemonGone(f"the daemon of ring {name!r} (pid {pid}) is gone; restart it with "
                             f"`ringload start RECIPE --name {name}` (it reclaims the dead ring)")
        silent = time.time() - w[Word.HEARTBEAT_NS] / 1e9
        if silent > HEARTBEAT_TIMEOUT_S:
            raise DaemonGone(f"the daemon of ring {name!r} (pid {pid}) has not sent a heartbeat for {silent:.1f} s")
        if time.monotonic() > deadline:
            raise LoaderTimeout(
                f"no batch from ring {name!r} within {self.timeout:.0f} s (waiting for chunk {self._search[0]} "
                f"batch {self._search[1]}); the daemon is alive: see `ringload status {name}`, "
                "or pass a larger timeout to connect()" + (timeout_hint() if timeout_hint else "")
            )
