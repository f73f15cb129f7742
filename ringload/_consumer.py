"""The consumer: an in-process handle that hands out one rank's batches in stream order.

A ring serves ``ranks`` consumers, one per local rank (``_lanes`` says how batches are dealt to
ranks); each reads only its own lanes, one per producer. A rank's stream order is chunk order,
and within a chunk, index order: global rank ``g`` of ``G`` gets indexes ``g, g + G, ...``.
Producers finish chunks in whatever order their speed allows, so the consumer reorders: it keeps
the batches it has taken from a lane but that are not yet due (its *heads*: one per lane, or up
to ``prefetch`` on CUDA) and delivers the batch ``(next_chunk, next_index)`` from whichever lane
has it. A lane's batches come out in the order it published them, which is chunk order, so the
due batch is always at the front of some lane: no batch can be stuck behind another, and the
lanes' slots are the reorder window.

On CPU a batch is a dict of tensors that are views of the slot itself, and a slot goes back to its
producer only when nothing in the process references its memory any more. Each hand-out builds new
objects: one numpy array over the slot's bytes (its *base*), the fields as numpy views of it, and
``torch.from_numpy`` of each; a torch storage keeps its numpy array alive, which keeps the base
alive, and so does every view derived from a field (slices, ``.view``, tensors autograd saved for
the backward pass). A ``weakref.finalize`` on the base only appends ``(lane, seq)`` to a deque (it
may run in any thread, e.g. a pin-memory thread, or inside the garbage collector); the consumer's
own thread drains that deque (in ``next``, on every poll while it waits, in ``close``) and releases
slots in lane order, since ``released`` must move in order: a slot freed early waits for the older
ones of its lane. So a framework that fetches batches ahead, or a caller that keeps the previous
batch, never reads a rewritten slot; a caller that keeps many batches holds that many slots, and
once a lane's slots are all held its producer waits. ``connect(..., copy=True)`` hands out copies
instead and releases each slot at once. On CUDA the stager releases a slot explicitly, once the
event of its copy has completed (``_cuda``).

The consumer records its position (in its rank's consumer block) and per-lane counters in the
ring after every batch, so if it dies, the next ``connect`` for that rank returns the slot it
held, restores any semaphore token it lost and goes on with the next unread batch.
"""

from __future__ import annotations

import gc
import os
import time
import warnings
import weakref
from collections import deque
from typing import Any

from ._errors import DaemonGone, LoaderTimeout, ProducerFailed, RingError
from ._failures import attach_or_explain
from ._lanes import LaneWord, Semaphores, acquire
from ._layout import (
    FLAG_LAST_IN_CHUNK,
    SOURCE_CURSOR_WORDS,
    ConsumerWord,
    SlotWord,
    State,
    Word,
    read_position,
    write_position_words,
)
from ._names import pid_alive
from ._plan import batches_in, length_unknown
from ._resume import STATE_FORMAT, stream_identity
from ._stream import ResumePoint

POLL_S = 0.1
HEARTBEAT_TIMEOUT_S = 5.0
COLLECT_AFTER_S = 0.5  # waiting this long on a lane full of held batches: look for reference cycles holding them
_CURSOR_WORDS = (SlotWord.EPOCH, SlotWord.FILE_INDEX, SlotWord.CHUNK_OFFSET, SlotWord.CHUNK_LINE, SlotWord.PART,
                 SlotWord.SOURCE, SlotWord.LAP, SlotWord.PICK)  # Chunk's fields after the id, as stamped
_UNSEEN_SOURCES = ResumePoint().words()[5:]
# The open loaders of this process, by (ring, its creation time, rank): a rank's consumer pid alone
# cannot tell a second connect() in the same process from a loader that was dropped without close().
_OPEN: weakref.WeakValueDictionary[tuple[str, int, int], Loader] = weakref.WeakValueDictionary()


class Loader:
    """Iterator over a ring's batches. Create it with :func:`ringload.connect`."""

    def __init__(self, name: str, device: Any = "cpu", timeout: float = 30.0, dtypes: dict[str, Any] | None = None,
                 prefetch: int = 2, trim: bool = False, meta: bool = False, rank: int | None = None,
                 copy: bool = False):
        import torch

        self._torch = torch
        self.name = name
        self.timeout = timeout
        self.ring = ring = attach_or_explain(name)
        self.sems = None
        self._claimed = False
        header = ring.recipe()
        recipe = header.get("recipe", {})
        self._sources = len(header.get("files", [[]]))
        self._stream = stream_identity(header)
        self._epoch_batches: list[int] | None = header.get("epoch_batches")  # per rank, from `ringload plan`
        try:
            self.rank = resolve_rank(name, rank, ring.geometry.ranks, recipe.get("nnodes", 1),
                                     recipe.get("node_rank", 0))
            self.sems = Semaphores.of(ring)
        except RingError:
            ring.close()
            raise
        # The ranks this ring's chunks are dealt to (Recipe.dealt_ranks), and which of them this one is.
        nodes_split_batches = recipe.get("node_sharding", "batches") == "batches"
        self._dealt_ranks = ring.geometry.ranks * (recipe.get("nnodes", 1) if nodes_split_batches else 1)
        self._dealt_rank = (recipe.get("node_rank", 0) if nodes_split_batches else 0) * ring.geometry.ranks + self.rank
        self._own_lanes = list(ring.rank_lanes(self.rank))
        self._doorbell = self.sems.doorbells[self.rank]
        self._block = ring.consumer_block(self.rank)
        self._lanes = ring.geometry.lanes
        self._slots = ring.geometry.slots
        self._words = ring.words
        self._published = [ring.lane_word(p, LaneWord.PUBLISHED) for p in range(self._lanes)]
        self._taken_word = [ring.lane_word(p, LaneWord.TAKEN) for p in range(self._lanes)]
        self._released_word = [ring.lane_word(p, LaneWord.RELEASED) for p in range(self._lanes)]
        self._heads: dict[int, deque[tuple[int, int, int]]] = {}  # lane -> (seq, chunk, index) taken, not yet due
        # Handed-out batches whose slot memory may still be referenced: (lane, seq) -> (finalizer of the
        # slot's base array, weak references to the handed-out tensors that view the ring).
        self._outstanding: dict[tuple[int, int], tuple[weakref.finalize, list[weakref.ref]]] = {}
        self._freed: deque[tuple[int, int]] = deque()  # appended by finalizers, from any thread
        self._copied: set[tuple[int, int]] = set()  # handed-out batches switched to private copies
        self._done: list[set[int]] = [set() for _ in range(self._lanes)]  # seqs done with, waiting for older ones
        self._copy = copy
        self._last_lane = 0  # position in _own_lanes where the last due batch was found
        self._stager = None
        self._skip_batches, self._max_batches = recipe.get("skip_batches", 0), recipe.get("max_batches")
        self.epoch = 0  # the epoch of the last batch handed out
        self._epoch_only: int | None = None  # if set, the iteration ends before the first batch of another epoch
        fields = ring.geometry.fields
        self._handed = [f.name for f in fields if meta or not f.name.startswith("_")]
        seq_len = fields[0].shape[1] if len(fields[0].shape) > 1 else 0
        has_lengths = any(f.name == "_lengths" for f in fields)
        self._trimmed = [f.name for f in fields if trim and has_lengths and len(f.shape) == 2 and f.shape[1] == seq_len]
        self._viewed = frozenset(self._handed + (["_lengths"] if self._trimmed else []))
        first_slot = ring.slot_buffer(0, 0).ctypes.data
        self._slot_bytes = (first_slot, first_slot + self._lanes * self._slots * ring.slot_size)  # address range
        self._claim()
        self.device = torch.device(device)
        self.dtypes = {k: v for k, v in (dtypes or {}).items()}
        if self.device.type == "cuda":
            from ._cuda import CudaStager

            self._stager = CudaStager(self, prefetch)

    # -- attachment and recovery -------------------------------------------------------------
    def _claim(self) -> None:
        """Become the rank's consumer; take over the position of a dead predecessor."""
        w = self._words
        pid_word = self._block + ConsumerWord.PID
        holder = w[pid_word]
        key = (self.name, w[Word.CREATED_NS], self.rank)
        if key in _OPEN:
            self.close()
            raise RingError(f"rank {self.rank} of ring {self.name!r} already has a consumer in this process (a "
                            "connect() not yet closed); close that one first (loader.close() or a with block): "
                            "a rank has one consumer (start the ring with --world-size for more ranks)")
        if holder and holder != os.getpid() and pid_alive(holder):
            self.close()
            raise RingError(f"rank {self.rank} of ring {self.name!r} already has a consumer (pid {holder}); "
                            "a rank has one consumer (start the ring with --world-size for more ranks)")
        w[pid_word] = os.getpid()
        w[self._block + ConsumerWord.CONNECTED_NS] = time.time_ns()
        w[self._block + ConsumerWord.WAIT_NS] = 0
        _OPEN[key] = self
        self._claimed = True
        position = read_position(w, self._block)
        self._resume = list(position.resume)  # ResumePoint.words(), updated in place per batch
        self.next_chunk, self.next_index, self.delivered = position.next_chunk, position.next_index, position.delivered
        self._delivered_at_connect = self.delivered
        self._search = (self.next_chunk, self.next_index)  # the next batch to look for
        self._taken = [w[i] for i in self._taken_word]
        self._released = [w[i] for i in self._released_word]
        for lane in self._own_lanes:
            for seq in range(self._released[lane], self._taken[lane]):
                chunk, index = self._slot_word(lane, seq, SlotWord.CHUNK), self._slot_word(lane, seq, SlotWord.INDEX)
                if (chunk, index) < (self.next_chunk, self.next_index):
                    self._release(lane, seq)  # the batch a dead consumer held
                else:
                    self._heads.setdefault(lane, deque()).append((seq, chunk, index))
            # Tokens a consumer killed between two steps may have lost; a surplus is absorbed later.
            published = w[self._published[lane]]
            for _ in range(published - self._taken[lane] - self.sems.filled[lane].value):
                self.sems.filled[lane].release()
            for _ in range(self._slots - (published - self._released[lane]) - self.sems.free[lane].value):
                self.sems.free[lane].release()

    def _slot_word(self, lane: int, seq: int, word: int) -> int:
        return self._words[self.ring.slot_word(lane, seq % self._slots, word)]

    def _release(self, lane: int, seq: int) -> None:
        if seq != self._released[lane]:
            raise RingError(f"ring {self.name!r}: lane {lane} released out of order ({seq} != {self._released[lane]})")
        self._released[lane] = seq + 1
        self._words[self._released_word[lane]] = seq + 1
        self.sems.free[lane].release()

    def _done_with(self, lane: int, seq: int) -> None:
        """Nothing needs batch ``seq`` of ``lane`` any more: release it, and every later one already
        done with, once the older batches of its lane are released (``released`` moves in order)."""
        done = self._done[lane]
        done.add(seq)
        while self._released[lane] in done:
            done.remove(self._released[lane])
            self._release(lane, self._released[lane])

    def _drain_freed(self) -> None:
        """Release the slots whose handed-out batches the finalizers report unreferenced."""
        freed = self._freed
        while freed:
            key = freed.popleft()
            self._outstanding.pop(key, None)
            self._copied.discard(key)
            self._done_with(*key)

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Loader:
        return self

    def __len__(self) -> int:
        """The batches this loader hands out from where it connected to the end of a finite stream,
        if ``ringload plan`` counted them before the ring started; else TypeError, as for any
        iterator without a length."""
        if self._epoch_batches is None:
            raise TypeError(length_unknown(self.name, self.ring.recipe()["recipe"]))
        return batches_in(self._epoch_batches, self._skip_batches, self._max_batches, after=self._delivered_at_connect)

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._max_batches is not None and self.delivered >= self._skip_batches + self._max_batches:
                raise StopIteration
            if self._stager is not None:
                batch = self._stager.next()
                if self.delivered > self._skip_batches:  # the recipe's skip_batches are consumed unseen
                    return batch
                continue
            self._drain_freed()
            lane, seq = self._next_slot()
            self._mark_delivered(lane, seq)
            if self.delivered > self._skip_batches:
                return self._hand_out(lane, seq)
            self._done_with(lane, seq)

    def _next_slot(self, take: bool = True) -> tuple[int, int]:
        """Wait for the due batch, move the search past it and return its (lane, seq). With
        ``take=False`` the batch stays due: it goes back to the front of its lane's heads."""
        deadline = collect_at = waiting_since = None
        while True:
            found = self._find()
            if waiting_since is not None:  # the due batch is late: the consumer waits on the producers
                now = time.monotonic_ns()
                self._words[self._block + ConsumerWord.WAIT_NS] += now - waiting_since
                waiting_since = now
            if found is not None:
                lane, seq = found
                base = self.ring.slot_word(lane, seq % self._slots, 0)
                empty = self._words[base + SlotWord.ROWS] == 0
                other_epoch = self._epoch_only is not None and self._words[base + SlotWord.EPOCH] != self._epoch_only
                if not empty and (not take or other_epoch):
                    chunk, index = self._words[base + SlotWord.CHUNK], self._words[base + SlotWord.INDEX]
                    self._heads.setdefault(lane, deque()).appendleft((seq, chunk, index))  # still due
                    if take:
                        raise StopIteration
                    return lane, seq
                if self._words[base + SlotWord.FLAGS] & FLAG_LAST_IN_CHUNK:
                    self._search = (self._search[0] + 1, self._dealt_rank)
                else:
                    self._search = (self._search[0], self._search[1] + self._dealt_ranks)
                if empty:
                    self._mark_delivered(lane, seq)
                    self._done_with(lane, seq)  # an empty chunk's end marker
                    continue
                return lane, seq
            end = self._words[Word.END_CHUNK]
            if 0 <= end <= self._search[0]:
                raise StopIteration
            now = time.monotonic()
            if deadline is None:
                deadline, collect_at = now + self.timeout, now + COLLECT_AFTER_S
                waiting_since = time.monotonic_ns()
            self._drain_freed()
            if self._lane_held_full():
                # A lane whose every slot the caller still holds: its producer cannot write. The batch
                # that holds up the lane moves to private memory, unless a view derived from it (a slice)
                # still points into the slot; that one the caller must let go of (or wait for the gc).
                self._copy_out_oldest()
                if now > collect_at and self._lane_held_full():
                    collect_at = deadline  # once: batches kept alive only by reference cycles free their slots
                    gc.collect()
                    self._drain_freed()
            self._check_health(deadline)
            acquire(self._doorbell, POLL_S)

    def _copy_out_oldest(self) -> None:
        """In every lane the consumer holds full, switch the oldest batch still handed out (the one its
        ``released`` counter waits for) to a private copy, once; its tensors keep their values."""
        for lane in self._own_lanes:
            key = (lane, self._released[lane])
            if self._taken[lane] - self._released[lane] >= self._slots and key in self._outstanding:
                if key not in self._copied:
                    self._copied.add(key)
                    self._switch_to_copies(self._outstanding[key][1])
        self._drain_freed()

    def _switch_to_copies(self, views: list[weakref.ref]) -> None:
        """Point each handed-out tensor still alive at a private copy of its contents."""
        with self._torch.no_grad():
            for ref in views:
                tensor = ref()
                if tensor is not None:
                    tensor.set_(tensor.clone())

    def _lane_held_full(self) -> bool:
        """True if the consumer holds every slot of one of its lanes (its producer cannot write)."""
        return any(self._taken[lane] - self._released[lane] >= self._slots for lane in self._own_lanes)

    def _due_epoch(self) -> int | None:
        """The epoch of the next batch (waiting for it; it stays due), or None at the end of the stream."""
        if self._max_batches is not None and self.delivered >= self._skip_batches + self._max_batches:
            return None
        try:
            lane, seq = self._next_slot(take=False)
        except StopIteration:
            return None
        return self._slot_word(lane, seq, SlotWord.EPOCH)

    def _mark_delivered(self, lane: int, seq: int) -> None:
        """Record in the ring that the consumer has been handed this batch (the resume point)."""
        w = self._words
        base = self.ring.slot_word(lane, seq % self._slots, 0)
        chunk, index = w[base + SlotWord.CHUNK], w[base + SlotWord.INDEX]
        every = self._dealt_ranks
        if w[base + SlotWord.FLAGS] & FLAG_LAST_IN_CHUNK:
            self.next_chunk, self.next_index = chunk + 1, self._dealt_rank
        else:
            self.next_chunk, self.next_index = chunk, index + every
        if w[base + SlotWord.ROWS]:
            self.delivered += 1
            self.epoch = w[base + SlotWord.EPOCH]
        # The resume point (ResumePoint.words()): this chunk, its batches delivered by all ranks (ranks move
        # in step: the end of this batch's group), and where this chunk's source stands.
        epoch, file_index, offset, line, part, source, lap, pick = (w[base + word] for word in _CURSOR_WORDS)
        resume = self._resume
        if epoch != resume[2]:
            resume[5:] = _UNSEEN_SOURCES  # a new epoch: no source has been seen in it yet
        resume[:5] = chunk, (index // every + 1) * every, epoch, pick, source
        at = 5 + source * SOURCE_CURSOR_WORDS
        resume[at:at + SOURCE_CURSOR_WORDS] = 1, lap, file_index, offset, line, part
        write_position_words(w, self._block, (self.next_chunk, self.next_index, self.delivered, *resume))

    def _find(self) -> tuple[int, int] | None:
        """Take lane heads until the due batch turns up; return its (lane, seq) or None."""
        want_chunk, want_index = self._search
        for lane, heads in self._heads.items():
            if heads and heads[0][1] == want_chunk:
                seq, chunk, index = heads.popleft()
                self._check_index(lane, chunk, index, want_index)
                return lane, seq
        w = self._words
        own = self._own_lanes
        for step in range(len(own)):
            at = (self._last_lane + step) % len(own)
            lane = own[at]
            if self._heads.get(lane):
                continue
            while acquire(self.sems.filled[lane], 0):
                seq = self._taken[lane]
                if w[self._published[lane]] <= seq:
                    continue  # a surplus token left by a repair: absorb it
                base = self.ring.slot_word(lane, seq % self._slots, 0)
                if w[base + SlotWord.SEQ] != seq or not 0 <= w[base + SlotWord.ROWS] <= self.ring.geometry.batch_size:
                    raise RingError(f"ring {self.name!r}: lane {lane} slot {seq % self._slots} holds a torn batch "
                                    f"(stamp {w[base + SlotWord.SEQ]}, expected {seq})")
                self._taken[lane] = seq + 1
                w[self._taken_word[lane]] = seq + 1
                chunk, index = w[base + SlotWord.CHUNK], w[base + SlotWord.INDEX]
                if chunk == want_chunk:
                    self._check_index(lane, chunk, index, want_index)
                    self._last_lane = at
                    return lane, seq
                if chunk < want_chunk:
                    raise RingError(f"ring {self.name!r}: lane {lane} published chunk {chunk} after the consumer "
                                    f"had moved on to chunk {want_chunk}")
                self._heads.setdefault(lane, deque()).append((seq, chunk, index))
                break
        return None

    def _check_index(self, lane: int, chunk: int, index: int, want_index: int) -> None:
        if index != want_index:
            raise RingError(f"ring {self.name!r}: lane {lane} delivered batch {index} of chunk {chunk} "
                            f"where batch {want_index} was due: a batch was lost")

    def _check_health(self, deadline: float) -> None:
        """Raise if waiting longer is pointless: ring failed or stopped, daemon gone, timeout."""
        w = self._words
        state = State(w[Word.STATE])
        if state == State.FAILED:
            raise ProducerFailed(f"ring {self.name!r} failed: {self.ring.error}")
        if state == State.STOPPING:
            raise DaemonGone(f"ring {self.name!r} was stopped while the consumer waited for a batch")
        pid = w[Word.DAEMON_PID]
        if not pid_alive(pid):
            raise DaemonGone(f"the daemon of ring {self.name!r} (pid {pid}) is gone; restart it with "
                             f"`ringload start RECIPE --name {self.name}` (it reclaims the dead ring)")
        silent = time.time() - w[Word.HEARTBEAT_NS] / 1e9
        if silent > HEARTBEAT_TIMEOUT_S:
            raise DaemonGone(f"the daemon of ring {self.name!r} (pid {pid}) has not sent a heartbeat for {silent:.1f} s")
        if time.monotonic() > deadline:
            raise LoaderTimeout(
                f"no batch from ring {self.name!r} within {self.timeout:.0f} s (waiting for chunk {self._search[0]} "
                f"batch {self._search[1]}); the daemon is alive: see `ringload status {self.name}`, "
                "or pass a larger timeout to connect()" + self._held_slots_hint()
            )

    def _held_slots_hint(self) -> str:
        """What the batches the caller still references hold, for a timeout message."""
        if not self._outstanding:
            return ""
        per_lane: dict[int, int] = {}
        for lane, _ in self._outstanding:
            per_lane[lane] = per_lane.get(lane, 0) + 1
        full = [lane for lane, held in per_lane.items() if held >= self._slots]
        return (f". {len(self._outstanding)} batches handed out earlier are still referenced, and each holds its "
                f"ring slot ({self._slots} per producer lane)"
                + (f"; every slot of lane {full[0]} is held, so its producer cannot write the next batch" if full else "")
                + ": .clone() the tensors you keep, or connect(..., copy=True) to get batches that hold no slot")

    def _host_batch(self, lane: int, seq: int) -> tuple[Any, dict[str, Any]]:
        """(the slot's new base array, the fields handed out as tensors over views of it), trimmed to
        the longest row if asked."""
        buffer = self.ring.slot_buffer(lane, seq % self._slots)
        arrays = self.ring.field_views(buffer, self._viewed)
        from_numpy = self._torch.from_numpy
        batch = {k: from_numpy(arrays[k]) for k in self._handed}
        if self._trimmed:
            longest = int(arrays["_lengths"].max())
            for k in self._trimmed:
                batch[k] = batch[k][:, :longest]
        return buffer, batch

    def _hand_out(self, lane: int, seq: int) -> dict[str, Any]:
        """Batch ``seq`` of ``lane`` for the caller; its slot is released once nothing references it."""
        buffer, batch = self._host_batch(lane, seq)
        if self.dtypes or self._copy:
            batch = {k: v.to(self.dtypes.get(k, v.dtype), copy=self._copy) for k, v in batch.items()}
        if self._copy:
            self._done_with(lane, seq)
            return batch
        low, high = self._slot_bytes
        views = [weakref.ref(t) for t in batch.values() if low <= t.data_ptr() < high]
        finalizer = weakref.finalize(buffer, self._freed.append, (lane, seq))
        finalizer.atexit = False
        self._outstanding[lane, seq] = (finalizer, views)
        return batch

    # -- checkpoints and teardown ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able checkpoint: ``ringload start RECIPE --resume STATE`` (or
        ``ringload.start(recipe, resume=state)``) continues with exactly the batch after the last one
        this loader handed out."""
        return stream_state(self._stream, self._sources, self._position())

    def _position(self) -> tuple[int, ...]:
        """Where the stream stands after the last batch handed out, as :func:`stream_state` takes it
        (cheap enough to record per batch)."""
        return (self.delivered, self.next_chunk, self.next_index - self._dealt_rank, *self._resume)

    def close(self) -> None:
        """Give back every slot and detach; the ring and its daemon go on.

        Handed-out tensors that still view the ring are switched to private copies first, so they keep
        their contents; a view the caller derived from one (a slice, ``.view``) cannot be switched and
        would see the slot rewritten, which a warning reports."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if getattr(self, "sems", None) is not None:
            self._hand_back_all()
        if self._claimed:
            if self._words[self._block + ConsumerWord.PID] == os.getpid():
                self._words[self._block + ConsumerWord.PID] = 0
            _OPEN.pop((self.name, self._words[Word.CREATED_NS], self.rank), None)
            self._claimed = False
        if getattr(self, "sems", None) is not None:
            self.sems.close()
            self.sems = None
        self._words = None
        self.ring.close()

    def _hand_back_all(self) -> None:
        """Release the slots of every handed-out batch, copying out the ones still referenced."""
        self._drain_freed()
        if not self._outstanding:
            return
        for _, views in self._outstanding.values():
            self._switch_to_copies(views)
        self._drain_freed()  # the bases that only those tensors kept alive
        still_viewed = len(self._outstanding)
        for (lane, seq), (finalizer, _) in sorted(self._outstanding.items()):
            finalizer.detach()
            self._done_with(lane, seq)
        self._outstanding.clear()
        self._copied.clear()
        if still_viewed:
            warnings.warn(
                f"ringload: ring {self.name!r} was closed while {still_viewed} batches were still referenced through "
                "views derived from their tensors (slices, .view, ...); those views now see memory the producers "
                "rewrite. .clone() what you keep, or connect(..., copy=True).", RuntimeWarning, stacklevel=3)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_state(stream: dict[str, Any], sources: int, position: tuple[int, ...]) -> dict[str, Any]:
    """The checkpoint of a stream (``stream_identity``, number of sources) at ``Loader._position()``."""
    delivered, next_chunk, next_index, *resume = position
    return {
        "format": STATE_FORMAT,
        "stream": stream,
        "delivered": delivered,
        "next": [next_chunk, next_index],  # the same for every rank
        "resume": ResumePoint.from_words(resume).to_json(sources),
    }


def connect(name: str, device: Any = "cpu", timeout: float = 30.0, dtypes: dict[str, Any] | None = None,
            prefetch: int = 2, trim: bool = False, meta: bool = False, rank: int | None = None,
            copy: bool = False) -> Loader:
    """Attach to the ring ``name`` and iterate over its batches (``dict[str, torch.Tensor]``).

    ``rank``: which of the ring's ranks this process is (``ringload start --world-size W``); by
    default ``LOCAL_RANK`` as torchrun sets it, or 0 for a one-rank ring. ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK``, when set, are checked against the ring.

    ``device``: "cpu" (zero-copy views of the ring) or a CUDA device (batches staged from pinned
    ring memory by asynchronous copies, ``prefetch`` batches ahead). On CPU a batch's slot goes back
    to its producer once nothing references the batch's memory; ``copy=True`` hands out copies
    instead, which hold no slot (for callers that keep many batches). ``dtypes`` casts fields, e.g.
    ``{"input_ids": torch.long}``. ``timeout``: seconds to wait for a batch before raising.
    ``trim``: cut padding columns beyond the batch's longest row (classification tasks).
    ``meta``: also hand out bookkeeping fields (names starting with ``_``, e.g. ``_document_ids``).
    """
    return Loader(name, device=device, timeout=timeout, dtypes=dtypes, prefetch=prefetch, trim=trim, meta=meta,
                  rank=rank, copy=copy)


def resolve_rank(name: str, rank: int | None, ranks: int, nnodes: int, node_rank: int) -> int:
    """This process's local rank on the ring, from the argument or torchrun's environment, checked."""
    env = {key: os.environ[key] for key in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
           if os.environ.get(key, "").isdigit()}
    if rank is None:
        if "LOCAL_RANK" in env:
            rank = int(env["LOCAL_RANK"])
        elif ranks == 1:
            rank = 0
        else:
            raise RingError(f"ring {name!r} serves {ranks} ranks: pass connect(..., rank=R) or run under torchrun "
                            "(which sets LOCAL_RANK)")
    if not 0 <= rank < ranks:
        raise RingError(f"rank {rank} is not served by ring {name!r}, which serves ranks 0..{ranks - 1}; "
                        f"start it with `ringload start RECIPE --world-size {rank + 1}` or more")
    expected = {"WORLD_SIZE": ranks * nnodes, "LOCAL_WORLD_SIZE": ranks, "GROUP_RANK": node_rank}
    for key, value in expected.items():
        if key in env and int(env[key]) != value:
            fix = {"WORLD_SIZE": f"--world-size {ranks} --nnodes {nnodes}", "LOCAL_WORLD_SIZE": f"--world-size {ranks}",
                   "GROUP_RANK": f"--node-rank {node_rank}"}[key]
            raise RingError(f"{key}={env[key]} in the environment, but ring {name!r} was started with {fix}; "
                            f"start the ring with settings that match the launcher (expected {key}={value})")
    return rank
