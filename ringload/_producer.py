"""The producer process: chunks in, batches written into its lane's slots.

A producer is started by the daemon with ``spawn`` and talks to it over one pipe:

* producer -> daemon: ``W`` (give me a chunk) or ``E<message>`` (I failed; the message says why);
* daemon -> producer: a chunk, as ``CHUNK_HEADER`` (id, ``Chunk.cursor``, batches to skip) followed
  by the chunk's raw lines.

It asks for a chunk only when it has finished the previous one, so the daemon always knows the
one chunk a producer holds and can hand it to a replacement if the producer dies; ``skip`` then
says how many of the chunk's batches were already published. Nothing else crosses the pipe:
batches go straight from the task into the shared-memory slots, dealt to the ranks' lanes as
``_lanes`` describes. This module never imports torch.

Working ahead. The consumer delivers chunks in order, so a producer whose chunk is not yet due
fills its lanes and would then wait. Instead, while a lane is full it keeps taking the chunk's
next batches from the task (tokenizing them into its own memory, up to ``LOOKAHEAD_BYTES``) and
publishes them as slots free up: producers tokenize side by side whatever ``slots`` is, and a
producer still holds one chunk at a time, so a replacement redoes exactly that chunk.

Where the time goes. Each producer counts, in its lane's statistics, the nanoseconds spent
working (parsing, tokenizing, shaping, writing), waiting for a chunk and waiting for a free slot
(``ringload status`` turns them into shares and names the stage that holds the others up).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from ._cache import ProducerCache, TokenTap, is_unread
from ._complete import build_recipe_task, complete_batches
from ._errors import RingError
from ._lanes import LaneWord, LaneWriter, Semaphores
from ._layout import Ring, State, Word
from ._log import log_to_stderr
from ._recipe import parse_recipe
from ._sources import BadRecord, Chunk, Hooks, bad_record_stop, parse_records, record_origin
from ._stream import chunk_at
from ._tasks import PendingBatch
from ._types import CURSOR_WORDS, Cursor, Records

CHUNK_HEADER = struct.Struct(f"<{1 + CURSOR_WORDS + 1}q")  # id | cursor | skip
WANT = b"W"
ERROR = b"E"
BAD_RECORDS_LOGGED = 5
ATTACH_POLL_S = 0.005
LOOKAHEAD_BYTES = 256 << 20  # at most this much of a chunk's batches waits in a producer's memory
PR_SET_PDEATHSIG = 1
log = logging.getLogger("ringload.producer")


def encode_chunk(chunk: Chunk, skip: int) -> bytes:
    return CHUNK_HEADER.pack(chunk.id, *chunk.cursor.words(), skip) + chunk.payload


def decode_chunk(message: bytes) -> tuple[Chunk, int]:
    chunk_id, *cursor, skip = CHUNK_HEADER.unpack_from(message)
    return Chunk.at(chunk_id, Cursor.from_words(cursor), message[CHUNK_HEADER.size:]), skip


class Producer:
    """Producer ``lane``: parses, tokenizes and shapes chunks, publishing its node's batches in
    order into its lane of each rank (``lane``, ``lane + P``, ...)."""

    def __init__(self, ring_name: str, lane: int, conn: Connection, recipe: dict[str, Any], files: list[list[str]]):
        self.lane, self.conn, self.files = lane, conn, files
        self.recipe = parse_recipe(recipe)
        self.task = build_recipe_task(self.recipe)
        self.hooks = [Hooks.load(source) for source in self.recipe.sources]
        self.daemon_pid = os.getppid()
        self.ring, self.sems = _attach_when_created(ring_name, self.daemon_pid)
        self.cache = ProducerCache.of_ring(self.ring.recipe(), lane)  # None: no token cache
        ranks = self.ring.geometry.ranks
        self.writers = [LaneWriter(self.ring, self.sems, self.ring.rank_lanes(r)[lane]) for r in range(ranks)]
        self.dealing = self.recipe.dealing
        self.bad_logged = self.truncated_logged = 0
        self.chunk: Chunk | None = None  # the chunk being worked on
        self.finished: int | None = None  # the id of the last chunk finished
        self._stage(LaneWord.WORK_NS, time.monotonic_ns())
        # Batches tokenized ahead of a full lane: enough for a whole chunk, within LOOKAHEAD_BYTES.
        self.lookahead = max(2 * self.dealing.ranks, LOOKAHEAD_BYTES // self.ring.slot_size)

    def _stat(self, word: int, value: int) -> None:
        self.ring.words[self.ring.lane_word(self.lane, word)] = value

    def _add(self, word: int, delta: int) -> None:
        index = self.ring.lane_word(self.lane, word)
        self.ring.words[index] += delta

    def _stage(self, word: int, now: int) -> None:
        """From ``now`` on, time goes to ``word``; status adds the part not yet counted."""
        self._stat(LaneWord.STAGE, word)
        self._stat(LaneWord.STAGE_SINCE_NS, now)

    def _spent(self, word: int, then: int) -> None:
        """Count the time of the stage that ends now as ``word``; the stage ``then`` begins."""
        now = time.monotonic_ns()
        self._add(word, now - self.ring.words[self.ring.lane_word(self.lane, LaneWord.STAGE_SINCE_NS)])
        self._stage(then, now)

    def _keep_waiting(self) -> bool:
        return os.getppid() == self.daemon_pid and self.ring.state in (State.STARTING, State.RUNNING)

    def run(self) -> None:
        while True:
            self._spent(LaneWord.WORK_NS, LaneWord.WAIT_CHUNK_NS)
            self.conn.send_bytes(WANT)
            try:
                message = self.conn.recv_bytes()
            except EOFError:
                return  # the daemon closed the pipe: shutting down
            self._spent(LaneWord.WAIT_CHUNK_NS, LaneWord.WORK_NS)
            chunk, skip = decode_chunk(message)
            self.chunk = chunk  # for whereabouts, should process fail
            self.process(chunk, skip)
            self.chunk, self.finished = None, chunk.id

    def whereabouts(self) -> str:
        """Where this producer stands, in words, for its failure message."""
        if self.chunk is not None:
            chunk = self.chunk
            return (f"while on chunk {chunk.id} ({self.files[chunk.source][chunk.file_index]} from line {chunk.line}"
                    f"{f', shuffle part {chunk.part}' if self.recipe.shuffle else ''})")
        if self.finished is None:
            return "before its first chunk"
        return f"after finishing chunk {self.finished}"

    def stopping(self) -> bool:
        """True once the ring is being stopped (or has failed) or the daemon is gone: then a broken pipe
        or an abandoned wait is the shutdown, not a failure of this producer."""
        return not self._keep_waiting()

    def process(self, chunk: Chunk, skip: int) -> None:
        """Publish this node's batches of the chunk from index ``skip`` on (dealt by ``_types.Dealing``)."""
        unknown_before = self.task.labels_unknown
        cache = self.cache if self.cache is not None and self.cache.cached(chunk) else None
        served = cache.lookup(chunk) if cache is not None else None
        tap: TokenTap | None = None
        if served is not None:  # the chunk's ids come from the token cache, counts as when it was tokenized
            records, tap = Records(texts=[""] * served.records), TokenTap(served)
            self._add(LaneWord.BAD_RECORDS, served.bad)
            self._add(LaneWord.RECORDS_TRUNCATED, served.truncated)
            self._add(LaneWord.CHUNKS_FROM_CACHE, 1)
        else:
            if is_unread(chunk):  # the reader trusted an entry that is gone or damaged: read the chunk now
                chunk = chunk_at(self.recipe, self.files, chunk, self.task.packs_documents(self.recipe.task))
            records, bad = self._parse(chunk)
            if cache is not None:
                tap = TokenTap()
        self.task.tok.tap = tap
        try:
            self._publish_chunk(chunk, skip, records, unknown_before)
        finally:
            self.task.tok.tap = None
        if cache is not None and tap is not None and served is None:
            cache.store(chunk, tap.recorded(records, len(bad)))

    def _parse(self, chunk: Chunk) -> tuple[Records, list[BadRecord]]:
        path, numbered = record_origin(chunk, self.files, bool(self.recipe.shuffle))
        records, bad = parse_records(numbered, self.recipe.sources[chunk.source], path, self.task.convert_label,
                                     self.hooks[chunk.source], self.recipe.max_record_bytes,
                                     self.recipe.on_long_record, self.recipe.id_field)
        if bad:
            self._report_bad(bad)
        if records.truncated:
            self._report_truncated(records.truncated)
        return records, bad

    def _publish_chunk(self, chunk: Chunk, skip: int, records: Records, unknown_before: int) -> None:
        self._stat(LaneWord.CURRENT_CHUNK, chunk.id)
        self._stat(LaneWord.CHUNK_BYTES, len(chunk.payload))
        self._stat(LaneWord.CHUNK_STARTED_NS, time.time_ns())
        # Batches go out a group of one per global rank at a time; a group is published once the
        # next one is known to be complete or not, which says whether it is the chunk's last.
        every = self.dealing.ranks
        batches = self.task.batches(records, chunk.id)
        if self.recipe.complete_pass:  # every record kept, stamped with its id; padding batches even the ranks
            path = record_origin(chunk, self.files, bool(self.recipe.shuffle))[0]
            batches = complete_batches(self.task, batches, records, chunk.source, chunk.file_index, path, self.dealing)
        ahead = _Ahead(batches, self.lookahead)
        index = records_kept = 0
        while True:
            ahead.fill(2 * every)
            if len(ahead.ready) < every:
                break
            last = ahead.exhausted and len(ahead.ready) < 2 * every
            for _ in range(every):
                batch = ahead.ready.popleft()
                rank = self.dealing.local_rank(index)
                if index >= skip and 0 <= rank < len(self.writers):
                    self._publish(chunk, index, rank, batch, last, ahead)
                records_kept, index = batch.records_done, index + 1
        tokens_cut = sum(b.tokens for b in ahead.ready)
        if index == 0:
            # A chunk too small for a batch per rank still ends: an empty, flagged slot tells each rank.
            for rank, writer in enumerate(self.writers):
                marker = self.dealing.first_index(rank)
                if marker >= skip:
                    seq = self._claim(writer, ahead)
                    writer.publish(seq, chunk.id, marker, 0, True, chunk.cursor, len(records), 0)
        if skip < max(index, every):  # not a redo of a chunk whose predecessor finished it
            # Batches cut off to keep the ranks even count as dropped, like a chunk's partial last batch.
            self._add(LaneWord.TOKENS_DROPPED, self.task.tokens_dropped + tokens_cut)
            self._add(LaneWord.EXAMPLES_DROPPED, self.task.examples_dropped + ahead.records_batched - records_kept)
            self._add(LaneWord.LABELS_UNKNOWN, self.task.labels_unknown - unknown_before)
            self._add(LaneWord.DOCUMENTS_CUT, self.task.documents_cut)
            self._add(LaneWord.EXAMPLES, len(records))
            self._add(LaneWord.CHUNKS, 1)

    def _claim(self, writer: LaneWriter, ahead: _Ahead) -> int:
        """A free slot of ``writer``'s lane. While the lane is full, tokenize the chunk's next batches
        ahead instead of waiting, so a producer whose chunk is not yet due keeps working."""
        seq = writer.try_claim()
        while seq is None and ahead.pull():
            seq = writer.try_claim()
        self._stat(LaneWord.AHEAD, len(ahead.ready))
        if seq is None:
            self._spent(LaneWord.WORK_NS, LaneWord.WAIT_SLOT_NS)
            seq = writer.claim(self._keep_waiting)
            self._spent(LaneWord.WAIT_SLOT_NS, LaneWord.WORK_NS)
        return seq

    def _publish(self, chunk: Chunk, index: int, rank: int, batch: PendingBatch, last: bool, ahead: _Ahead) -> None:
        writer = self.writers[rank]
        seq = self._claim(writer, ahead)
        batch.write(writer.views[seq % writer.slots])
        writer.publish(seq, chunk.id, index, batch.rows, last, chunk.cursor, batch.records_done, batch.tokens)
        self._add(LaneWord.BATCHES, 1)
        self._add(LaneWord.TOKENS, batch.tokens)
        if batch.records is not None:  # a complete pass: its padding, before and after trimming
            self._add(LaneWord.ROWS_PADDED, batch.rows - len(batch.records))
            self._add(LaneWord.TRIMMED_POSITIONS, batch.rows * batch.width)

    def _report_bad(self, bad: list[BadRecord]) -> None:
        self._add(LaneWord.BAD_RECORDS, len(bad))
        if self.recipe.on_bad_record == "fail":
            raise bad_record_stop(bad[0])
        for record in bad[: max(0, BAD_RECORDS_LOGGED - self.bad_logged)]:
            log.warning("producer %d: skipped bad record %s", self.lane, record)
        self.bad_logged += len(bad)

    def _report_truncated(self, truncated: list[BadRecord]) -> None:
        self._add(LaneWord.RECORDS_TRUNCATED, len(truncated))
        for record in truncated[: max(0, BAD_RECORDS_LOGGED - self.truncated_logged)]:
            log.warning("producer %d: truncated record %s", self.lane, record)
        self.truncated_logged += len(truncated)


def _attach_when_created(ring_name: str, daemon_pid: int) -> tuple[Ring, Semaphores]:
    """The ring and its semaphores, once the daemon has created them (producers start first)."""
    while True:
        try:
            ring = Ring.attach(ring_name)
        except RingError:
            ring = None  # not created yet (or a dead daemon's leftovers, about to be reclaimed)
        if ring is not None and ring.get(Word.DAEMON_PID) == daemon_pid:
            try:
                return ring, Semaphores.of(ring)
            except RingError:
                pass  # the semaphores come right after the ring
        if ring is not None:
            ring.close()
        if os.getppid() != daemon_pid:
            raise InterruptedError("the daemon ended before its ring was created")
        time.sleep(ATTACH_POLL_S)


class _Ahead:
    """A chunk's batches, taken from the task ahead of publication: up to ``limit`` wait here,
    tokenized, while the producer's lane is full (their chunk is not due yet)."""

    def __init__(self, batches: Iterator[PendingBatch], limit: int):
        self.batches, self.limit = batches, limit
        self.ready: deque[PendingBatch] = deque()
        self.exhausted = False
        self.records_batched = 0  # records of the chunk consumed by the batches taken so far

    def pull(self) -> bool:
        """Take one more batch from the task; False when the chunk has no more or the limit is reached."""
        if self.exhausted or len(self.ready) >= self.limit:
            return False
        batch = next(self.batches, None)
        if batch is None:
            self.exhausted = True
            return False
        self.ready.append(batch)
        self.records_batched = batch.records_done
        return True

    def fill(self, count: int) -> None:
        while len(self.ready) < count and self.pull():
            pass


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the daemon dies, so no producer outlives its ring."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: producers notice the dead daemon at their next wait instead
    if os.getppid() != parent:
        os._exit(1)  # the daemon died before the request took effect


def producer_main(ring_name: str, lane: int, conn: Connection, recipe: dict[str, Any], files: list[list[str]],
                  daemon_pid: int) -> None:
    """Entry point of a spawned producer process."""
    _die_with_parent(daemon_pid)
    log_to_stderr()
    producer = None
    try:
        producer = Producer(ring_name, lane, conn, recipe, files)
        producer.run()
    except InterruptedError:
        return  # the ring is stopping or the daemon is gone
    except BaseException as exc:  # report anything, even KeyboardInterrupt, before exiting non-zero
        if producer is not None and producer.stopping():
            return  # e.g. the daemon closed the pipe on its way out: a clean stop, not a failure
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
        where = producer.whereabouts() if producer is not None else "before its first chunk"
        message = f"producer {lane} (pid {os.getpid()}) failed {where}: {type(exc).__name__}: {exc}{at}"
        try:
            conn.send_bytes(ERROR + message.encode())
        except OSError:
            pass
        log.error("%s", message)
        sys.exit(1)
