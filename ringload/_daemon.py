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
where the consumer and ``ringload status`` read it.

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
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import posix_ipc

from ._errors import RecipeError, RingError
from ._http import SourceMeter
from ._lanes import LaneWord, Semaphores, last_published, repair_after_producer_death, unlink_semaphores
from ._layout import Field, Geometry, Position, Ring, State, Word, write_position
from ._names import list_ring_names, list_semaphore_rings, pid_alive, shm_name, validate_name
from ._plan import find_plan
from ._producer import ERROR, WANT, encode_chunk, producer_main
from ._recipe import Recipe
from ._resume import check_state, stream_identity
from ._sources import Chunk, Hooks, expand_paths
from ._stream import ResumePoint, read_stream
from ._tasks import build_task

HEARTBEAT_S = 0.25
TOKENS_PER_BYTE_ESTIMATE = 0.3  # WordPiece/BPE on English prose; only sizes the default lanes
log = logging.getLogger("ringload.daemon")


@dataclass
class ProducerSlot:
    """The daemon's view of one lane's producer."""

    lane: int
    process: Any = None
    conn: Connection | None = None
    chunk: Chunk | None = None  # the chunk it is working on (at most one)
    skip: int = 0  # batches of that chunk it was told to skip
    idle: bool = False
    restarts: int = 0
    redo: list[tuple[Chunk, int]] = field(default_factory=list)  # (chunk, skip) to give first


def batches_per_chunk(recipe: Recipe, fields: list[Field]) -> float:
    """A rough count of a chunk's batches (all ranks), from bytes at about 0.3 tokens per byte."""
    row_tokens = fields[0].shape[1] if len(fields[0].shape) > 1 else 1
    return recipe.chunk_size * TOKENS_PER_BYTE_ESTIMATE / (recipe.batch_size * row_tokens)


def default_slots(recipe: Recipe, fields: list[Field]) -> int:
    """Slots per lane to hold about two chunks of a rank's batches, so ordered delivery never convoys."""
    return int(min(4096, max(8, math.ceil(2 * batches_per_chunk(recipe, fields) / recipe.dealt_ranks))))


def geometry_for(recipe: Recipe) -> Geometry:
    fields = build_task(recipe.task, recipe.tokenizer, recipe.batch_size, recipe.seed).fields()
    suggested = default_slots(recipe, fields)
    ranks, per_chunk = recipe.dealt_ranks, batches_per_chunk(recipe, fields)
    cut = (ranks - 1) / 2 / max(per_chunk, 1)  # on average half a group of one batch per rank
    if cut > 0.03:
        log.warning("chunks of %d bytes give about %.0f batches each, cut to a multiple of %d ranks: about %.0f%% "
                    "of batches dropped; set chunk_bytes to %d or more to drop under 3%%", recipe.chunk_size,
                    per_chunk, ranks, 100 * cut, int(recipe.chunk_size * cut / 0.03))
    if recipe.slots is not None and recipe.slots < suggested // 2:
        log.warning("slots: %d per producer holds less than one chunk of batches (about %d); producers will wait "
                    "on each other to keep the stream in order: raise slots or lower chunk_bytes",
                    recipe.slots, suggested // 2)
    return Geometry(recipe.producers * recipe.world_size, recipe.slots or suggested, recipe.batch_size, tuple(fields),
                    recipe.world_size)


class Daemon:
    """Serves one ring until stopped. ``run`` blocks; it returns the process exit code."""

    def __init__(self, recipe: Recipe, name: str | None = None, resume: dict[str, Any] | None = None,
                 stop_with: int | None = None):
        self.recipe = recipe
        self.stop_with = stop_with  # a process whose end stops this daemon (the Python API's caller)
        self.resume_state = resume
        self.first_skip = (-1, 0)  # (chunk, batches already delivered) when resuming mid-stream
        self.name = validate_name(name or recipe.name)
        self.stop_requested = threading.Event()
        # Enough read-ahead to keep every producer busy, bounded to about 256 MiB for large chunks.
        ahead = min(2 * recipe.producers + 2, max(recipe.producers + 2, (256 << 20) // recipe.chunk_size))
        self.chunks: queue.Queue[Chunk | None] = queue.Queue(maxsize=ahead)
        self.reader_error: str | None = None
        self.chunks_read: int | None = None  # total number of chunks, once the sources are exhausted
        self.sources_done = False  # the reader's end marker has been taken from the queue
        self.wake_r, self.wake_w = os.pipe()
        self.producers: list[ProducerSlot] = []
        self.files: list[list[str]] = []  # per source
        self.context = multiprocessing.get_context("spawn")
        self.ring: Ring | None = None
        self.sems: Semaphores | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def run(self) -> int:
        files = [self._node_files(expand_paths(source), j) for j, source in enumerate(self.recipe.sources)]
        for source in self.recipe.sources:
            Hooks.load(source)  # a hook that does not import fails here, before any producer runs
        geometry = geometry_for(self.recipe)
        header_recipe = {"recipe": self.recipe.to_dict(), "files": files}
        plan = find_plan(self.recipe, files)
        if plan is not None:
            header_recipe["epoch_batches"] = plan  # batches per rank of each epoch, for the consumers' len()
        start = None
        if self.resume_state is not None:
            start, position, delivered = check_state(self.resume_state, stream_identity(header_recipe))
            if start.chunk >= 0:
                self.first_skip = (start.chunk, start.skip)
        reclaim_if_dead(self.name)
        self.ring = Ring.create(self.name, geometry, header_recipe)
        for rank in range(geometry.ranks):
            # Rank r's first batch of a chunk is index g (its global rank). A state is rank-independent:
            # its `next` holds the due chunk and the index due for global rank 0.
            first = self.recipe.first_dealt_rank + rank
            due = (Position(0, first) if start is None else
                   Position(position[0], position[1] + first, delivered, start.words()))
            write_position(self.ring.words, self.ring.consumer_block(rank), due)
        try:
            self.sems = Semaphores(self.name, geometry.lanes, geometry.slots, geometry.ranks)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._request_stop())
            threading.Thread(target=self._read, args=(files, start), name="ringload-reader", daemon=True).start()
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per producer; no fork-after-threads
            self.files = files
            self.producers = [ProducerSlot(p) for p in range(geometry.producers)]
            for slot in self.producers:
                self._spawn(slot)
            self.ring.set_state(State.RUNNING)
            log.info("ring %s: %d producers x %d ranks x %d slots of %d x %s, %.1f MiB in /dev/shm%s", self.name,
                     geometry.producers, geometry.ranks, geometry.slots, geometry.batch_size,
                     [f.name for f in geometry.fields], self.ring.total_size / 2**20,
                     f"; node {self.recipe.node_rank} of {self.recipe.nnodes}" if self.recipe.nnodes > 1 else "")
            self._serve()
        finally:
            failed = self.ring.state == State.FAILED
            self._teardown()
        return 1 if failed else 0

    def _node_files(self, files: list[str], source: int) -> list[str]:
        """The source's files this node reads: all of them, or every nnodes-th under node_sharding: files."""
        recipe = self.recipe
        if recipe.node_sharding != "files" or recipe.nnodes == 1:
            return files
        if len(files) < recipe.nnodes:
            raise RecipeError(f"node_sharding: files needs at least one file per node, but source {source} has "
                              f"{len(files)} for {recipe.nnodes} nodes; use node_sharding: batches")
        return files[recipe.node_rank::recipe.nnodes]

    def _request_stop(self) -> None:
        self.stop_requested.set()
        os.write(self.wake_w, b"s")

    def _spawn(self, slot: ProducerSlot) -> None:
        parent, child = self.context.Pipe()
        process = self.context.Process(
            target=producer_main, name=f"ringload-producer-{slot.lane}",
            args=(self.name, slot.lane, child, self.recipe.to_dict(), self.files, os.getpid()), daemon=True,
        )
        process.start()
        child.close()
        self.ring.set(self.ring.lane_word(slot.lane, LaneWord.PID), process.pid)
        slot.process, slot.conn, slot.idle, slot.chunk = process, parent, False, None

    def _teardown(self) -> None:
        ring = self.ring
        if ring.state != State.FAILED:
            ring.set_state(State.STOPPING)
        if self.sems:
            self.sems.ring_all()  # wake waiting consumers so they see the new state
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
        if self.sems:
            self.sems.close()
        remove_ring(self.name, ring.geometry.lanes, ring.geometry.ranks)
        ring.close()
        log.info("ring %s: stopped and removed", self.name)

    # -- the reader thread -------------------------------------------------------------------
    def _read(self, files: list[list[str]], start: ResumePoint | None) -> None:
        count = max(start.chunk, 0) if start else 0
        meter = SourceMeter()
        try:
            skip_broken = self._count_source_error if self.recipe.on_bad_record == "skip" else None
            for chunk in read_stream(self.recipe, files, start, skip_broken, meter):
                self.ring.set(Word.BYTES_FETCHED, meter.fetched)
                self.ring.set(Word.BYTES_LISTED, meter.listed)
                while not self.stop_requested.is_set():
                    try:
                        self.chunks.put(chunk, timeout=HEARTBEAT_S)
                        break
                    except queue.Full:
                        continue
                if self.stop_requested.is_set():
                    return
                count += 1
                os.write(self.wake_w, b"c")
        except Exception as exc:  # any other failure to read a source fails the ring with its cause
            self.reader_error = f"reading the sources failed after chunk {count - 1}: {exc}"
        self.chunks_read = count
        self.chunks.put(None)
        os.write(self.wake_w, b"e")

    def _count_source_error(self, error: Exception) -> None:
        self.ring.set(Word.SOURCE_ERRORS, self.ring.get(Word.SOURCE_ERRORS) + 1)
        log.warning("ring %s: %s; skipped the rest of that file (on_bad_record: skip)", self.name, error)

    # -- the main loop -----------------------------------------------------------------------
    def _serve(self) -> None:
        ring = self.ring
        last_rate_t, last_totals = time.monotonic(), self._totals()
        while not self.stop_requested.is_set():
            waitables = [self.wake_r]
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
            slot.chunk, slot.idle = None, True
        elif message.startswith(ERROR):
            self.ring.fail(message[len(ERROR):].decode(errors="replace"))

    def _dispatch(self) -> None:
        """Give every idle producer its next chunk: first any chunk a dead predecessor left, else the next one read."""
        for slot in self.producers:
            if not slot.idle:
                continue
            if slot.redo:
                chunk, skip = slot.redo.pop(0)
            elif self.sources_done:
                continue
            else:
                try:
                    chunk = self.chunks.get_nowait()
                except queue.Empty:
                    continue
                if chunk is None:
                    self._end_of_sources()
                    continue
                skip = self.first_skip[1] if chunk.id == self.first_skip[0] else 0
            try:
                slot.conn.send_bytes(encode_chunk(chunk, skip))
            except OSError:
                slot.redo.insert(0, (chunk, skip))  # it died meanwhile; its replacement gets it
                continue
            slot.chunk, slot.skip, slot.idle = chunk, skip, False
        if self.sources_done and self.ring.state == State.RUNNING and all(s.idle and not s.redo for s in self.producers):
            self.ring.set_state(State.FINISHED)

    def _end_of_sources(self) -> None:
        self.sources_done = True
        if self.reader_error:
            self.ring.fail(self.reader_error)
            return
        self.ring.set(Word.END_CHUNK, self.chunks_read)
        self.sems.ring_all()
        log.info("ring %s: all %d chunks read", self.name, self.chunks_read)

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
            ring.fail(f"producer {slot.lane} died (exit code {code}) {slot.restarts + 1} times; "
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
        return max((n[1] + 1 for n in newest if n and n[0] == chunk_id), default=0)

    def _finished(self, lanes: list[int], chunk_id: int) -> bool:
        """True if every rank's lane has published its flagged last batch of the chunk."""
        newest = [last_published(self.ring, lane) for lane in lanes]
        return all(n and n[0] == chunk_id and n[2] for n in newest)


# -- ring housekeeping, used by the daemon and the CLI -----------------------------------------
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


def launch(recipe_path: str, name: str, producers: int | None = None, log_path: Path | None = None,
           detach: bool = False, ready_timeout: float = 60.0, resume_path: str | None = None,
           sharding: dict[str, int | None] | None = None) -> subprocess.Popen:
    """Start ``ringload start`` in a child process and return once its ring is RUNNING.

    ``sharding``: ``world_size``, ``nnodes``, ``node_rank`` overriding the recipe's (None: keep)."""
    command = [sys.executable, "-m", "ringload", "start", recipe_path, "--name", name]
    if not detach:
        command += ["--stop-with", str(os.getpid())]
    if producers:
        command += ["--producers", str(producers)]
    for key, value in (sharding or {}).items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    if resume_path:
        command += ["--resume", resume_path]
    log_path = log_path or log_file(name)
    with open(log_path, "ab") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=detach)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        code = process.poll()
        if code is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise RingError(f"`ringload start` for ring {name!r} exited with code {code}:\n  " + "\n  ".join(tail))
        if name in list_ring_names():
            try:
                ring = Ring.attach(name)
            except RingError:
                ring = None  # still being created
            if ring is not None:
                state, owner = ring.state, ring.get(Word.DAEMON_PID)
                ring.close()
                if owner == process.pid and state in (State.RUNNING, State.FINISHED):
                    return process
        time.sleep(0.01)
    process.kill()
    raise RingError(f"ring {name!r} was not ready within {ready_timeout:.0f} s; see {log_path}")


def log_file(name: str) -> Path:
    directory = Path(tempfile.gettempdir()) / f"ringload-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory / f"{validate_name(name)}.log"

