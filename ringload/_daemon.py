"""The daemon: owns the ring, reads the sources, hands chunks to producers, supervises them.

One process per ring. Its main thread waits on every producer's pipe and process sentinel at once
(``multiprocessing.connection.wait``) and, at least every ``HEARTBEAT_S``, writes the heartbeat
and the throughput into the ring header. A reader thread cuts the sources into chunks ahead of
demand (a bounded queue), and a producer that asks for work gets the next chunk in order.

A producer that dies without reporting an error is replaced, up to ``max_restarts`` times: the
daemon restores the lane's semaphore tokens (``_lanes.repair_after_producer_death``) and gives the
replacement the chunk the dead one held, with the number of batches it had already published,
so the stream the consumer sees is the same as if nothing had happened. A producer that reports
an error, or a source that cannot be read (under ``on_bad_record: fail``; under ``skip`` the rest
of a broken file is skipped and counted), fails the ring: the message goes into the header,
where the consumer and ``ringload status`` read it, and into the log; when the failed ring is
removed, a failure record (``_failures``) keeps it for ``status`` and ``connect``.

Failing early. The ring is reported ready (RUNNING) only once the reader has opened every source
and the first chunk of each holds a usable record, so an empty file, a URL that answers 404 or a
source whose records are all bad (wrong format or field) fails ``ringload start`` itself, with the
reason. (The records of a source with ``filter``/``map`` hooks are not checked there: hooks are
user code, and only producers run it.) And once the first whole pass over the sources is done,
if not a single batch came out of it, the ring fails with the counts instead of ending with an
empty epoch or reading the same useless records forever; the end of a finite stream is published,
and the next pass's first chunk handed out, only after that check (``_next_chunk``).

On SIGTERM, SIGINT, ``ringload stop``, or the end of the process that started it from Python
(``--stop-with``), the daemon stops the producers and removes every shared object of the ring.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from . import _cache as token_cache
from ._complete import batch_fields, build_recipe_task
from ._errors import ProducerFailed, RecipeError, RingError
from ._failures import forget_failure, record_failure
from ._housekeeping import reclaim_if_dead, remove_ring
from ._http import SourceMeter
from ._lanes import STAT_WORDS, LaneWord, Semaphores, last_published, repair_after_producer_death
from ._layout import Field, Geometry, Position, Ring, State, Word, write_position
from ._names import pid_alive, validate_name
from ._plan import find_plan
from ._producer import ERROR, WANT, encode_chunk, producer_main
from ._recipe import Recipe
from ._resume import check_state, stream_identity
from ._sources import Chunk, Hooks, bad_record_stop, expand_paths, parse_records, record_origin
from ._stream import read_stream
from ._tasks import Task
from ._types import ResumePoint

HEARTBEAT_S = 0.25
TOKENS_PER_BYTE_ESTIMATE = 0.3  # WordPiece/BPE on English prose; only sizes the default lanes
log = logging.getLogger("ringload.daemon")


@dataclass
class ProducerSlot:
    """The daemon's view of one lane's producer."""

    lane: int
    process: Any = None
    conn: Connection = field(init=False)  # set by Daemon._spawn, right after the slot is made
    chunk: Chunk | None = None  # the chunk it is working on (at most one)
    skip: int = 0  # batches of that chunk it was told to skip
    idle: bool = False
    restarts: int = 0
    redo: list[tuple[Chunk, int]] = field(default_factory=list)  # (chunk, skip) to give first


@dataclass
class FirstPass:
    """The first whole pass over the sources that this daemon reads: epoch 0, or after a resume
    point the next epoch (the resumed one is partly delivered already)."""

    epoch: int | None  # None once checked
    outstanding: set[int] = field(default_factory=set)  # its chunks handed out and not finished yet
    read: bool = False  # the reader has no more of its chunks
    chunks: int = 0


def batches_per_chunk(recipe: Recipe, fields: list[Field]) -> float:
    """A rough count of a chunk's batches (all ranks), from bytes at about 0.3 tokens per byte."""
    row_tokens = fields[0].shape[1] if len(fields[0].shape) > 1 else 1
    return recipe.chunk_size * TOKENS_PER_BYTE_ESTIMATE / (recipe.batch_size * row_tokens)


def default_slots(recipe: Recipe, fields: list[Field]) -> int:
    """Slots per lane to hold about two chunks of a rank's batches. Producers tokenize ahead of a full
    lane (``_producer``), so fewer slots cost no throughput, only the consumer's read-ahead."""
    return int(min(4096, max(8, math.ceil(2 * batches_per_chunk(recipe, fields) / recipe.dealt_ranks))))


def geometry_for(recipe: Recipe, task: Task) -> Geometry:
    fields = batch_fields(recipe, task)
    ranks, per_chunk = recipe.dealt_ranks, batches_per_chunk(recipe, fields)
    cut = (ranks - 1) / 2 / max(per_chunk, 1)  # on average half a group of one batch per rank
    if cut > 0.03 and not recipe.complete_pass:  # a complete pass pads instead of dropping (_complete)
        log.warning("chunks of %d bytes give about %.0f batches each, cut to a multiple of %d ranks: about %.0f%% "
                    "of batches dropped; set chunk_bytes to %d or more to drop under 3%%", recipe.chunk_size,
                    per_chunk, ranks, 100 * cut, int(recipe.chunk_size * cut / 0.03))
    return Geometry(recipe.producers * recipe.world_size, recipe.slots or default_slots(recipe, fields),
                    recipe.batch_size, tuple(fields), recipe.world_size)


class Daemon:
    """Serves one ring until stopped. ``run`` blocks; it returns 0 once stopped, or raises RingError
    (the ring could not start) or ProducerFailed (it failed) with the reason, after removing it."""

    def __init__(self, recipe: Recipe, name: str | None = None, resume: dict[str, Any] | None = None,
                 stop_with: int | None = None):
        self.recipe = recipe
        self.stop_with = stop_with  # a process whose end stops this daemon (the Python API's caller)
        self.resume_state = resume
        self.first_skip = (-1, 0)  # (chunk, batches already delivered) when resuming mid-stream
        self.name = validate_name(name if name is not None else recipe.name)
        self.stop_requested = threading.Event()
        # Enough read-ahead to keep every producer busy, bounded to about 256 MiB for large chunks.
        ahead = min(2 * recipe.producers + 2, max(recipe.producers + 2, (256 << 20) // recipe.chunk_size))
        self.chunks: queue.Queue[Chunk | None] = queue.Queue(maxsize=ahead)
        self.reader_error: str | None = None
        self.chunks_read = 0  # total number of chunks, set by the reader before its end marker
        self.sources_done = False  # the reader's end marker has been taken from the queue
        self.held: Chunk | None = None  # taken from the reader, not yet handed out (see _next_chunk)
        self.wake_r, self.wake_w = os.pipe()
        self.producers: list[ProducerSlot] = []
        self.files: list[list[str]] = []  # per source
        self.context = multiprocessing.get_context("spawn")
        # Made by run(): ring, sems and task read them once made.
        self._ring: Ring | None = None
        self._sems: Semaphores | None = None
        self._task: Task | None = None  # the daemon's own copy: it checks the first chunks' labels
        self.start: ResumePoint | None = None
        self.first_chunks_checked = threading.Event()  # set by the reader (also when it failed first)
        self.start_problem: str | None = None  # why the ring cannot start, found before it is RUNNING
        self.first_pass = FirstPass(epoch=0)
        self.failure: str | None = None  # the ring's first failure, whole (the header keeps ERROR_CAPACITY bytes)
        self.cache_keys: token_cache.CacheKeys | None = None

    @property
    def ring(self) -> Ring:
        assert self._ring is not None, "run() creates the ring first"
        return self._ring

    @property
    def sems(self) -> Semaphores:
        assert self._sems is not None, "run() opens the semaphores first"
        return self._sems

    @property
    def task(self) -> Task:
        assert self._task is not None, "run() builds the task first"
        return self._task

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> int:
        files = [self._node_files(expand_paths(source), j) for j, source in enumerate(self.recipe.sources)]
        for source in self.recipe.sources:
            Hooks.load(source)  # a hook that does not import fails here, before any producer runs
        self.files = files
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per producer; no fork-after-threads
        # Producers start first: their interpreter start, imports and tokenizer load (about half the
        # time to the first batch) overlap the ring's creation; each attaches once the ring exists.
        self.producers = [ProducerSlot(p) for p in range(self.recipe.producers)]
        for slot in self.producers:
            self._spawn(slot)
        try:
            self._task = task = build_recipe_task(self.recipe)
            geometry = geometry_for(self.recipe, task)
            # The engine the producers encode with (they make the same choice from the same files).
            header_recipe: dict[str, Any] = {"recipe": self.recipe.to_dict(), "files": files,
                                             "dealing": self.recipe.dealing.to_dict(),
                                             "tokenizer_engine": task.tok.engine.to_dict()}
            self.cache_keys = token_cache.setup(self.recipe, files, type(task), log.warning)
            if self.cache_keys is not None:
                header_recipe[token_cache.HEADER_KEY] = self.cache_keys.to_dict()  # the producers' cache
            plan = find_plan(self.recipe, files)
            if plan is not None:
                header_recipe["epoch_batches"] = plan  # batches per rank of each epoch, for the consumers' len()
            start = None
            if self.resume_state is not None:
                start, position, delivered = check_state(self.resume_state, stream_identity(header_recipe))
                if start.chunk >= 0:
                    self.first_skip = (start.chunk, start.skip)
                    self.first_pass = FirstPass(epoch=start.epoch + 1)
            self.start = start
            reclaim_if_dead(self.name)
            self._ring = Ring.create(self.name, geometry, header_recipe)
        except BaseException:
            self._stop_producers()
            raise
        for rank in range(geometry.ranks):
            # Rank r's first batch of a chunk is index g (its global rank). A state is rank-independent:
            # its `next` holds the due chunk and the index due for global rank 0.
            first = self.recipe.dealing.first_index(rank)
            due = (Position(0, first) if start is None else
                   Position(position[0], position[1] + first, delivered, start.words()))
            write_position(self.ring.words, self.ring.consumer_block(rank), due)
        for slot in self.producers:
            self.ring.set(self.ring.lane_word(slot.lane, LaneWord.PID), slot.process.pid)
        problem = None
        try:
            self._sems = Semaphores(self.name, geometry.lanes, geometry.slots, geometry.ranks)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._request_stop())
            threading.Thread(target=self._read, args=(files, start), name="ringload-reader", daemon=True).start()
            problem = self._wait_for_first_chunks()
            if problem is not None:
                self._fail(problem)
            elif not self.stop_requested.is_set():
                self.ring.set_state(State.RUNNING)
                forget_failure(self.name)  # an earlier failure of this name is history now
                log.info("ring %s: %d producers x %d ranks x %d slots of %d x %s, %.1f MiB in /dev/shm%s", self.name,
                         geometry.producers, geometry.ranks, geometry.slots, geometry.batch_size,
                         [f.name for f in geometry.fields], self.ring.total_size / 2**20,
                         f"; node {self.recipe.node_rank} of {self.recipe.nnodes}" if self.recipe.nnodes > 1 else "")
                self._serve()
        finally:
            failure = self.failure if self.ring.state == State.FAILED else None
            self._teardown(failure)
        if failure is None:
            return 0
        if problem is not None:
            raise RingError(f"ring {self.name!r} did not start: {failure}")
        raise ProducerFailed(f"ring {self.name!r} failed: {failure}")

    def _node_files(self, files: list[str], source: int) -> list[str]:
        """The source's files this node reads: all of them, or every nnodes-th under node_sharding: files."""
        recipe = self.recipe
        if recipe.node_sharding != "files" or recipe.nnodes == 1:
            return files
        if len(files) < recipe.nnodes:
            raise RecipeError(f"node_sharding: files needs at least one file per node, but source {source} has "
                              f"{len(files)} for {recipe.nnodes} nodes; use node_sharding: batches")
        return files[recipe.node_rank::recipe.nnodes]

    def _wait_for_first_chunks(self) -> str | None:
        """Wait (heartbeating) until the reader has checked every source's first chunk; return why the
        ring cannot start, or None."""
        while not self.first_chunks_checked.wait(HEARTBEAT_S):
            self.ring.heartbeat()
            if self.stop_requested.is_set():
                return None
        return self.start_problem

    def _check_first_chunks(self, heads: list[Chunk | None]) -> None:
        """In the reader thread, before anything is handed out: every source must give a usable record."""
        for j, head in enumerate(heads):
            self.start_problem = self._first_chunk_problem(j, head)
            if self.start_problem is not None:
                break
        self.first_chunks_checked.set()

    def _first_chunk_problem(self, j: int, head: Chunk | None) -> str | None:
        """Why source ``j``, whose first chunk is ``head``, cannot feed the ring; None if it can."""
        source, recipe = self.recipe.sources[j], self.recipe
        if head is None:
            if self.start is not None and self.start.sources[j][0]:
                return None  # resumed at the end of this source's pass: nothing left is expected
            files = self.files[j]
            broken = self.ring.get(Word.SOURCE_ERRORS)
            return (f"source {j} gave no records: {_listing(files)} {'is' if len(files) == 1 else 'are'} empty"
                    + (f" (and {broken} file(s) broke off and were skipped: see the log)" if broken else "")
                    + ("; under node_sharding: chunks each node needs a chunk of every source: lower chunk_bytes"
                       if recipe.node_sharding == "chunks" and recipe.nnodes > 1 else ""))
        if source.filter or source.map:
            return None  # hooks are user code, run by producers only: the first-pass check covers this source
        if token_cache.is_unread(head):
            return None  # its ids are cached, so it passed this check when it was read
        path, numbered = record_origin(head, self.files, bool(recipe.shuffle))
        try:
            records, bad = parse_records(numbered, source, path, self.task.convert_label, Hooks(),
                                         recipe.max_record_bytes, recipe.on_long_record, recipe.id_field)
        except ValueError as exc:
            return str(exc)
        if bad and recipe.on_bad_record == "fail":
            return str(bad_record_stop(bad[0]))
        if bad and not records:
            fields = ", ".join(f"source.{key} ({getattr(source, key)!r})" for key in ("format", "field", "pair_field",
                                                                                      "label_field")
                               if getattr(source, key) is not None)
            return (f"source {j}: none of the {len(bad):,} records in its first {len(head.payload):,} bytes is "
                    f"usable, e.g. {bad[0]}; check {fields} against the data")
        return None

    def _request_stop(self) -> None:
        self.stop_requested.set()
        os.write(self.wake_w, b"s")

    def _spawn(self, slot: ProducerSlot) -> None:
        parent, child = self.context.Pipe()
        process = self.context.Process(
            target=producer_main, name=f"ringload-producer-{slot.lane}",
            args=(self.name, slot.lane, child, self.recipe.to_dict(), self.files, os.getpid()), daemon=True,
        )
        # Ctrl-C on a foreground `ringload start` reaches the whole process group, and the daemon stops
        # the producers itself. A process started with SIGINT ignored keeps it ignored (Python installs
        # its KeyboardInterrupt handler only over the default), so even one still importing is safe.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, previous)
        child.close()
        slot.process, slot.conn, slot.idle, slot.chunk = process, parent, False, None
        if self._ring is not None:  # the first producers start before the ring exists; run() records them
            self._ring.set(self._ring.lane_word(slot.lane, LaneWord.PID), slot.process.pid)

    def _fail(self, message: str) -> None:
        """Fail the ring: the first failure's message goes into the header and the log (and, at teardown,
        into the failure record)."""
        if self.failure is None:
            self.failure = message
            log.error("ring %s failed: %s", self.name, message)
        self.ring.fail(message)

    def _teardown(self, failure: str | None) -> None:
        ring = self.ring
        if ring.state != State.FAILED:
            ring.set_state(State.STOPPING)
        if self._sems:
            self._sems.ring_all()  # wake waiting consumers so they see the new state
        self._stop_producers()
        if self._sems:
            self._sems.close()
        if failure is not None:  # written before the ring goes, so one of them always tells
            record_failure(self.name, failure, os.getpid(), _log_destination())
        remove_ring(self.name, ring.geometry.lanes, ring.geometry.ranks)
        ring.close()
        log.info("ring %s: stopped and removed", self.name)

    def _stop_producers(self) -> None:
        """Close their pipes (a producer waiting for a chunk then exits); kill any still running after 2 s."""
        for slot in self.producers:
            if slot.conn:
                slot.conn.close()
        deadline = time.monotonic() + 2.0
        for slot in self.producers:
            if slot.process and slot.process.is_alive():
                slot.process.join(max(0.0, deadline - time.monotonic()))
                if slot.process.is_alive():
                    slot.process.kill()
                    slot.process.join()

    # -- the reader thread -------------------------------------------------------------------
    def _read(self, files: list[list[str]], start: ResumePoint | None) -> None:
        count = max(start.chunk, 0) if start else 0
        last: int | None = None
        meter = SourceMeter()
        ring = self.ring
        try:
            skip_broken = self._count_source_error if self.recipe.on_bad_record == "skip" else None
            split = self.task.packs_documents(self.recipe.task)
            mark = time.monotonic_ns()
            laps = token_cache.LapCache(self.cache_keys, log.warning) if self.cache_keys else None
            for chunk in read_stream(self.recipe, files, start, skip_broken, meter, split, self._check_first_chunks,
                                     laps):
                ring.set(Word.BYTES_FETCHED, meter.fetched)
                ring.set(Word.BYTES_LISTED, meter.listed)
                ring.set(Word.BYTES_FROM_CACHE, laps.served if laps else 0)
                mark = self._count(Word.READER_READ_NS, mark)
                while not self.stop_requested.is_set():
                    try:
                        self.chunks.put(chunk, timeout=HEARTBEAT_S)
                        break
                    except queue.Full:
                        continue
                    finally:  # counted as it goes, so that status sees a long wait while it lasts
                        mark = self._count(Word.READER_WAIT_NS, mark)
                if self.stop_requested.is_set():
                    return
                count, last = count + 1, chunk.id
                os.write(self.wake_w, b"c")
        except Exception as exc:  # any other failure to read a source fails the ring with its cause
            where = "before the first chunk" if last is None else f"after chunk {last}"
            self.reader_error = f"reading the sources failed {where}: {exc}"
            if not self.first_chunks_checked.is_set():
                self.start_problem = self.reader_error
        self.first_chunks_checked.set()
        self.chunks_read = count
        self.chunks.put(None)
        os.write(self.wake_w, b"e")

    def _count(self, word: int, since: int) -> int:
        """Add the nanoseconds since ``since`` to the reader's time counter ``word``; return now."""
        now = time.monotonic_ns()
        self.ring.set(word, self.ring.get(word) + now - since)
        return now

    def _count_source_error(self, error: Exception) -> None:
        self.ring.set(Word.SOURCE_ERRORS, self.ring.get(Word.SOURCE_ERRORS) + 1)
        log.warning("ring %s: %s; skipped the rest of that file (on_bad_record: skip)", self.name, error)

    # -- the main loop -----------------------------------------------------------------------
    def _serve(self) -> None:
        ring = self.ring
        last_rate_t, last_totals = time.monotonic(), self._totals()
        while not self.stop_requested.is_set():
            waitables: list[Connection | int] = [self.wake_r]
            for slot in self.producers:
                waitables += [slot.conn, slot.process.sentinel]
            ready = set(wait(waitables, timeout=HEARTBEAT_S))
            ring.heartbeat()
            if self.stop_with and not pid_alive(self.stop_with):
                log.info("ring %s: process %d that started it has ended; stopping", self.name, self.stop_with)
                return
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            for slot in self.producers:
                if slot.conn in ready:
                    self._receive(slot)
                if slot.process.sentinel in ready and not self.stop_requested.is_set():
                    self._on_exit(slot)
            if ring.state == State.FAILED:
                self.sems.ring_all()
                return
            self._dispatch()
            now = time.monotonic()
            if now - last_rate_t >= 1.0:
                totals = self._totals()
                ring.set_float(Word.BATCHES_PER_S, (totals[0] - last_totals[0]) / (now - last_rate_t))
                ring.set_float(Word.TOKENS_PER_S, (totals[1] - last_totals[1]) / (now - last_rate_t))
                last_rate_t, last_totals = now, totals

    def _totals(self) -> tuple[int, int]:
        w, ring = self.ring.words, self.ring
        lanes = range(ring.geometry.producers)  # a producer's statistics live in its rank-0 lane
        return (sum(w[ring.lane_word(p, LaneWord.BATCHES)] for p in lanes),
                sum(w[ring.lane_word(p, LaneWord.TOKENS)] for p in lanes))

    def _receive(self, slot: ProducerSlot) -> None:
        try:
            message = slot.conn.recv_bytes()
        except (EOFError, OSError):
            return  # it died; its sentinel reports that
        if message == WANT:
            if slot.chunk is not None:
                self._chunk_done(slot.chunk)
            slot.chunk, slot.idle = None, True
        elif message.startswith(ERROR):
            self._fail(message[len(ERROR):].decode(errors="replace"))

    def _dispatch(self) -> None:
        """Give every idle producer its next chunk: first any chunk a dead predecessor left, else the next one read."""
        self._check_first_pass()
        chunk: Chunk | None  # a Chunk wherever a slot gets one
        for slot in self.producers:
            if not slot.idle:
                continue
            if slot.redo:
                chunk, skip = slot.redo.pop(0)
            else:
                chunk = self._next_chunk()
                if chunk is None:
                    continue
                skip = self.first_skip[1] if chunk.id == self.first_skip[0] else 0
            try:
                slot.conn.send_bytes(encode_chunk(chunk, skip))
            except OSError:
                slot.redo.insert(0, (chunk, skip))  # it died meanwhile; its replacement gets it
                continue
            slot.chunk, slot.skip, slot.idle = chunk, skip, False
        self._check_first_pass()
        if (self.sources_done and self.first_pass.epoch is None and self.ring.state == State.RUNNING
                and all(s.idle and not s.redo for s in self.producers)):
            self.ring.set_state(State.FINISHED)

    def _next_chunk(self) -> Chunk | None:
        """The next chunk read, if there is one now. A chunk after the first pass waits until that pass is
        checked, so that the producers' counters at the check are the first pass's alone (a one-time wait
        of at most one chunk's work, at the end of the first pass)."""
        if self.held is None and not self.sources_done:
            try:
                chunk = self.chunks.get_nowait()
            except queue.Empty:
                return None
            self._took(chunk)
            if chunk is None:
                self._end_of_sources()
                return None
            self.held = chunk
        chunk = self.held
        if chunk is None or (self.first_pass.epoch is not None and chunk.epoch > self.first_pass.epoch):
            return None
        self.held = None
        return chunk

    def _end_of_sources(self) -> None:
        self.sources_done = True
        if self.reader_error:
            self._fail(self.reader_error)
        elif self.first_pass.epoch is None:
            self._publish_end()
        # else the end is published once the first pass is checked: no consumer may see an empty pass end

    def _publish_end(self) -> None:
        self.ring.set(Word.END_CHUNK, self.chunks_read)
        self.sems.ring_all()
        log.info("ring %s: all %d chunks read", self.name, self.chunks_read)

    # -- the first-pass check ----------------------------------------------------------------
    def _took(self, chunk: Chunk | None) -> None:
        """Note a chunk taken from the reader (None: the end of the sources)."""
        check = self.first_pass
        if check.epoch is None:
            return
        if chunk is None or chunk.epoch > check.epoch:
            check.read = True
        elif chunk.epoch == check.epoch:
            check.outstanding.add(chunk.id)
            check.chunks += 1

    def _chunk_done(self, chunk: Chunk) -> None:
        """Note a chunk whose batches are all published (or that its producer finished before dying)."""
        self.first_pass.outstanding.discard(chunk.id)

    def _check_first_pass(self) -> None:
        """Once every chunk of the first pass is done: fail if not one batch came out of it."""
        check = self.first_pass
        if check.epoch is None or not check.read or check.outstanding:
            return
        check.epoch = None
        if check.chunks and self._totals()[0] == 0:
            self._fail(self._no_batch_message(check.chunks))
        elif self.sources_done:
            self._publish_end()

    def _no_batch_message(self, chunks: int) -> str:
        ring, recipe = self.ring, self.recipe
        total = {key: sum(ring.get(ring.lane_word(p, word)) for p in range(ring.geometry.producers))
                 for key, word in STAT_WORDS.items()}
        return (f"no batch came out of the first pass over the sources ({'; '.join(map(_listing, self.files))}): "
                f"its {_count(chunks, 'chunk')} held {_count(total['examples'], 'usable record')} and "
                f"{_count(total['bad_records'], 'bad record')} (the first bad ones are in the log); the rows of a "
                f"chunk that do not fill whole batches of {recipe.batch_size} for each of {recipe.dealt_ranks} "
                f"rank(s) are dropped: {total['tokens_dropped']:,} tokens, {total['examples_dropped']:,} examples. "
                "Fix the source (format, field), add data, lower batch_size or raise chunk_bytes")

    def _on_exit(self, slot: ProducerSlot) -> None:
        slot.process.join()
        code = slot.process.exitcode
        ring = self.ring
        ring.set(ring.lane_word(slot.lane, LaneWord.EXITCODE), code if code is not None else -1)
        if ring.state == State.FAILED:
            return
        if code == 0 and slot.chunk is None:
            return
        if slot.restarts >= self.recipe.max_restarts:
            self._fail(f"producer {slot.lane} died (exit code {code}) {slot.restarts + 1} times; "
                       f"giving up (max_restarts: {self.recipe.max_restarts}); see the daemon's log")
            return
        slot.restarts += 1
        ring.set(ring.lane_word(slot.lane, LaneWord.RESTARTS), slot.restarts)
        lanes = self._lanes_of(slot.lane)
        for lane in lanes:
            repair_after_producer_death(ring, self.sems, lane)
        if slot.chunk is not None and not self._finished(lanes, slot.chunk.id):
            # Past what it published, and never before what it was told to skip (a resumed chunk).
            slot.redo.insert(0, (slot.chunk, max(slot.skip, self._published_of(lanes, slot.chunk.id))))
        elif slot.chunk is not None:
            self._chunk_done(slot.chunk)
        log.warning("ring %s: producer %d died (exit code %s); restarting it (%d/%d)%s", self.name, slot.lane, code,
                    slot.restarts, self.recipe.max_restarts,
                    f", redoing chunk {slot.chunk.id}" if slot.chunk else "")
        slot.conn.close()
        self._spawn(slot)

    def _lanes_of(self, producer: int) -> list[int]:
        return [self.ring.rank_lanes(rank)[producer] for rank in range(self.ring.geometry.ranks)]

    def _published_of(self, lanes: list[int], chunk_id: int) -> int:
        """Where a replacement resumes ``chunk_id``: past the highest index the producer's lanes published
        (it publishes in index order, so every lower index of its ranks is out too)."""
        newest = [last_published(self.ring, lane) for lane in lanes]
        return max((n.batch_index + 1 for n in newest if n and n.chunk == chunk_id), default=0)

    def _finished(self, lanes: list[int], chunk_id: int) -> bool:
        """True if every rank's lane has published its flagged last batch of the chunk."""
        newest = [last_published(self.ring, lane) for lane in lanes]
        return all(n and n.chunk == chunk_id and n.last_in_chunk for n in newest)


def _listing(files: list[str], shown: int = 3) -> str:
    """A source's files for a message: the first few, and how many more."""
    return ", ".join(files[:shown]) + (f" and {len(files) - shown} more" if len(files) > shown else "")


def _count(n: int, thing: str) -> str:
    return f"{n:,} {thing}{'' if n == 1 else 's'}"


def _log_destination() -> str | None:
    """The file this process's stderr goes to (the daemon's log when started detached or from Python)."""
    try:
        target = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return target if os.path.isfile(target) else None
