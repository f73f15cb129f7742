"""The ring's shared memory: byte layout, creation, validated attachment.

One POSIX shared-memory object ``/dev/shm/ringload.NAME`` (mode 0600) holds everything; the
semaphores that pass slots between processes are described in ``_lanes``. All integers are
little-endian int64 unless noted; every region starts on a 64-byte cache line.

Byte layout::

    0      identity line (written once by the daemon before anyone attaches)
           magic "RINGLOAD" | version u32 | header_size u32 | total_size | lanes u32 | slots u32
           | slot_size | lanes_offset | slots_offset | fields u16 | ranks u16 | batch_size u32
    64     daemon line (daemon writes, everyone reads)
           daemon_pid | heartbeat_ns | state | created_ns | end_chunk | batches_per_s (f64)
           | tokens_per_s (f64) | owner_uid
    128    source line (the daemon's reader thread writes)
           source_errors (files it could not read to the end) | bytes_fetched (raw bytes read from
           the sources, before decompression) | bytes_listed (sizes of the files opened so far)
           | reader_read_ns (time spent reading and cutting chunks) | reader_wait_ns (time spent
           waiting for room in the read-ahead queue, i.e. for producers) | bytes_from_cache (bytes
           of chunks handed out unread, their token ids in the token cache: ``_cache``)
    192    (unused)
    320    schema: 8 entries x 64 bytes
           name 24s | dtype 8s (numpy str, e.g. "<i4") | ndim u32 | dims 3 x u32 | offset | nbytes
    768    last error: length u32 + UTF-8 text (ERROR_CAPACITY bytes)
    1792   recipe: length u32 + JSON text of the resolved recipe (up to the header's end)
    lanes_offset   one LANE_BLOCK (5 lines) per lane, see ``_lanes``
    consumers_offset = lanes_offset + lanes * LANE_BLOCK
                   one CONSUMER_BLOCK (16 lines) per consumer rank (rank r's consumer writes it,
                   the daemon and CLI read it): consumer_pid | position_generation
                   | position record 0 (56 words) | position record 1 (56 words)
                   | connected_ns (wall clock of its connect) | wait_ns (time spent since then
                   waiting for the due batch)
                   a position record: next_chunk | next_index | delivered | resume point (53 words:
                   chunk | skip | epoch | pick | source | per source x 8: seen | lap | file_index
                   | offset | line | part; see ``_types.ResumePoint``)
    slots_offset   lanes x slots fixed-size slots; lane l, slot j at slots_offset + (l*slots+j)*slot_size

A ring serving ``ranks`` consumer ranks with ``P`` producers has ``lanes = ranks * P``: lane
``r * P + p`` carries producer ``p``'s batches for rank ``r`` (so each rank's lanes, and its slots,
are one contiguous block). Every lane keeps one writer and one reader.

Slot layout::

    0      slot header (2 lines, ``SlotHeader``): seq | chunk | index | rows | flags | records_done
           | tokens | checksum | cursor (8 words, ``_types.Cursor``: epoch | file_index | offset
           | line | part | source | lap | pick)
    128    each field's array, C-contiguous, at its schema offset (64-byte aligned)

States of the ring (``state``): STARTING -> RUNNING -> STOPPING, or FAILED with the error text set
(any time), or FINISHED once every chunk of a finite stream is published.

Attaching validates magic, version, ownership, mode and every offset and shape against the size of
the mapping before a single view is made, so a corrupt or hostile header cannot make a reader touch
memory outside the mapping.
"""

from __future__ import annotations

import enum
import json
import mmap
import os
import stat
import struct
import time
from dataclasses import dataclass
from math import prod
from typing import Any, NamedTuple

import numpy as np
import posix_ipc

from ._errors import RingError
from ._names import shm_name, validate_name
from ._types import CURSOR_WORDS, MAX_LANES, MAX_RANKS, MAX_SLOTS, MIN_SLOTS, Cursor, ResumePoint

MAGIC = b"RINGLOAD"
VERSION = 5
LINE = 64
MAX_FIELDS = 8
SCHEMA_OFFSET = 320
ERROR_OFFSET = SCHEMA_OFFSET + MAX_FIELDS * LINE
ERROR_CAPACITY = 1020
RECIPE_OFFSET = ERROR_OFFSET + 4 + ERROR_CAPACITY
LANE_BLOCK = 5 * LINE
CONSUMER_BLOCK = 16 * LINE
POSITION_WORDS = 3 + ResumePoint.WORDS
SLOT_HEADER_SIZE = 2 * LINE
ALLOWED_DTYPES = ("|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<f2", "<f4", "<f8", "|b1")

_IDENTITY = struct.Struct("<8sIIQIIQQQHHI")


class State(enum.IntEnum):
    STARTING = 0
    RUNNING = 1
    STOPPING = 2
    FAILED = 3
    FINISHED = 4


class Word:
    """Int64 word indexes (byte offset / 8) of the header's mutable fields."""

    DAEMON_PID = 8
    HEARTBEAT_NS = 9
    STATE = 10
    CREATED_NS = 11
    END_CHUNK = 12
    BATCHES_PER_S = 13  # float64 bits
    TOKENS_PER_S = 14  # float64 bits
    OWNER_UID = 15
    SOURCE_ERRORS = 16
    BYTES_FETCHED = 17
    BYTES_LISTED = 18
    READER_READ_NS = 19
    READER_WAIT_NS = 20
    BYTES_FROM_CACHE = 21


class ConsumerWord:
    """Int64 word indexes inside a rank's consumer block."""

    PID = 0
    POSITION_GENERATION = 1  # which of the two position records is current: generation % 2
    POSITION_RECORDS = (2, 2 + POSITION_WORDS)
    CONNECTED_NS = 2 + 2 * POSITION_WORDS
    WAIT_NS = CONNECTED_NS + 1


class SlotWord:
    """Int64 word indexes inside a slot header (:class:`SlotHeader`'s order), for reading one word."""

    SEQ = 0
    CHUNK = 1
    INDEX = 2
    ROWS = 3
    FLAGS = 4
    RECORDS_DONE = 5
    TOKENS = 6
    CHECKSUM = 7
    CURSOR = 8  # Cursor.words(), 8 words
    EPOCH = CURSOR  # the cursor's first word


FLAG_LAST_IN_CHUNK = 1


class SlotHeader(NamedTuple):
    """A slot's header: which batch the slot holds and where its chunk starts. The producer writes
    it whole before publishing the slot (``LaneWriter.publish``); readers read it whole (``of``) or
    one word at a time through :class:`SlotWord`. (A named tuple: the consumer reads one per batch.)"""

    seq: int  # the lane sequence number: a slot whose stamp is not the one expected is torn or stale
    chunk: int
    batch_index: int  # the batch's index within its chunk
    rows: int  # 0: an empty batch that only marks the end of a chunk too small for every rank
    flags: int
    records_done: int  # records of the chunk consumed up to the end of this batch
    tokens: int
    checksum: int
    cursor: Cursor

    @property
    def last_in_chunk(self) -> bool:
        return bool(self.flags & FLAG_LAST_IN_CHUNK)

    def words(self) -> tuple[int, ...]:
        return (self.seq, self.chunk, self.batch_index, self.rows, self.flags, self.records_done, self.tokens,
                self.checksum, *self.cursor)

    @classmethod
    def of(cls, words: memoryview, base: int) -> SlotHeader:
        """The header whose first word is ``words[base]``."""
        w = words[base:base + SLOT_HEADER_WORDS].tolist()
        seq, chunk, index, rows, flags, records_done, tokens, checksum = w[:SlotWord.CURSOR]
        return cls(seq, chunk, index, rows, flags, records_done, tokens, checksum, Cursor(*w[SlotWord.CURSOR:]))

    def store(self, words: memoryview, base: int) -> None:
        words[base:base + SLOT_HEADER_WORDS] = memoryview(_SLOT_HEADER.pack(*self.words())).cast("q")


SLOT_HEADER_WORDS = SlotWord.CURSOR + CURSOR_WORDS
_SLOT_HEADER = struct.Struct(f"<{SLOT_HEADER_WORDS}q")


@dataclass(frozen=True)
class Position:
    """Where a consumer rank stands: the next batch due, batches delivered, and the resume point
    (``ResumePoint.words()``)."""

    next_chunk: int = 0
    next_index: int = 0
    delivered: int = 0
    resume: tuple[int, ...] = ResumePoint().words()

    def words(self) -> tuple[int, ...]:
        return (self.next_chunk, self.next_index, self.delivered, *self.resume)


_POSITION = struct.Struct(f"<{POSITION_WORDS}q")


def read_position(words: memoryview, block: int) -> Position:
    """The current position record of the consumer block at word ``block``: a writer killed
    mid-update leaves the previous one current."""
    generation = words[block + ConsumerWord.POSITION_GENERATION]
    base = block + ConsumerWord.POSITION_RECORDS[generation % 2]
    values = words[base:base + POSITION_WORDS].tolist()
    return Position(values[0], values[1], values[2], tuple(values[3:]))


def write_position(words: memoryview, block: int, position: Position) -> None:
    write_position_words(words, block, position.words())


def write_position_words(words: memoryview, block: int, values: tuple[int, ...]) -> None:
    """Write the idle record, then make it current with one aligned 8-byte store."""
    generation = words[block + ConsumerWord.POSITION_GENERATION] + 1
    base = block + ConsumerWord.POSITION_RECORDS[generation % 2]
    words[base:base + POSITION_WORDS] = memoryview(_POSITION.pack(*values)).cast("q")
    words[block + ConsumerWord.POSITION_GENERATION] = generation


@dataclass(frozen=True)
class Field:
    """One array of a batch: its name, element type and full shape (batch dimension first)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * np.dtype(self.dtype).itemsize


def _align(n: int, to: int = LINE) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class Geometry:
    """Everything that fixes the ring's size: lanes, slots per lane, the batch schema, and the
    number of consumer ranks (``lanes`` is ``ranks`` times the number of producers)."""

    lanes: int
    slots: int
    batch_size: int
    fields: tuple[Field, ...]
    ranks: int = 1

    @property
    def producers(self) -> int:
        return self.lanes // self.ranks

    def field_offsets(self) -> list[int]:
        offsets, at = [], SLOT_HEADER_SIZE
        for f in self.fields:
            offsets.append(at)
            at = _align(at + f.nbytes)
        return offsets

    @property
    def slot_size(self) -> int:
        last = self.fields[-1]
        return _align(self.field_offsets()[-1] + last.nbytes)

    def header_size(self, recipe_json: bytes) -> int:
        return _align(RECIPE_OFFSET + 4 + len(recipe_json), 4096)

    def total_size(self, recipe_json: bytes) -> int:
        return self.slots_offset(self.header_size(recipe_json)) + self.lanes * self.slots * self.slot_size

    def slots_offset(self, lanes_offset: int) -> int:
        return _align(lanes_offset + self.lanes * LANE_BLOCK + self.ranks * CONSUMER_BLOCK, 4096)

    def check(self) -> None:
        if not 1 <= self.ranks <= MAX_RANKS:
            raise RingError(f"a ring serves 1..{MAX_RANKS} consumer ranks, got {self.ranks}")
        if not 1 <= self.lanes <= MAX_LANES or self.lanes % self.ranks:
            raise RingError(f"producers x ranks must be at most {MAX_LANES}, got {self.lanes} lanes for "
                            f"{self.ranks} ranks; use fewer producers")
        if not MIN_SLOTS <= self.slots <= MAX_SLOTS:
            raise RingError(f"slots must be {MIN_SLOTS}..{MAX_SLOTS} per producer, got {self.slots}")
        if not 1 <= len(self.fields) <= MAX_FIELDS:
            raise RingError(f"a batch needs 1..{MAX_FIELDS} fields, got {len(self.fields)}")
        for f in self.fields:
            if np.dtype(f.dtype).str not in ALLOWED_DTYPES or not 1 <= len(f.shape) <= 3:
                raise RingError(f"field {f.name!r}: unsupported dtype {f.dtype} or shape {f.shape}")
            if len(f.name.encode()) > 24:
                raise RingError(f"field name {f.name!r} is longer than 24 bytes")


class Ring:
    """A mapped ring: header accessors and zero-copy numpy views of slots.

    Create with :meth:`create` (the daemon) or :meth:`attach` (everyone else).
    """

    def __init__(self, name: str, mem: mmap.mmap, geometry: Geometry):
        self.name = name
        self.geometry = geometry
        self._mem = mem
        self.words = memoryview(mem).cast("q")
        ident = _IDENTITY.unpack_from(mem, 0)
        self.header_size, self.total_size = ident[2], ident[3]
        self.slot_size, self.lanes_offset, self.slots_offset = ident[6], ident[7], ident[8]
        self.consumers_offset = self.lanes_offset + geometry.lanes * LANE_BLOCK
        self.field_offsets = geometry.field_offsets()

    # -- creation and attachment -------------------------------------------------------------
    @classmethod
    def create(cls, name: str, geometry: Geometry, recipe: dict[str, Any]) -> Ring:
        """Create the shared-memory object (0600), reserve its pages, and write the header."""
        geometry.check()
        recipe_json = json.dumps(recipe, sort_keys=True).encode()
        size = geometry.total_size(recipe_json)
        _check_room(name, size)
        try:
            shm = posix_ipc.SharedMemory(shm_name(name), posix_ipc.O_CREX, mode=0o600, size=0)
        except posix_ipc.ExistentialError:
            raise RingError(f"ring {name!r} already exists; run `ringload stop {name}` first") from None
        try:
            os.ftruncate(shm.fd, size)
            # Reserve every page now: a tmpfs that fills up later would SIGBUS the writer instead.
            os.posix_fallocate(shm.fd, 0, size)
            mem = mmap.mmap(shm.fd, size)
        except OSError as exc:
            shm.close_fd()
            shm.unlink()
            raise RingError(
                f"cannot reserve {size / 2**20:.1f} MiB in /dev/shm for ring {name!r}: {exc.strerror}; "
                "lower slots, batch_size or seq_len in the recipe, or give /dev/shm more room"
            ) from None
        finally:
            if shm.fd >= 0:
                shm.close_fd()
        header_size = geometry.header_size(recipe_json)
        lanes_offset = header_size
        slots_offset = geometry.slots_offset(lanes_offset)
        for i, (f, off) in enumerate(zip(geometry.fields, geometry.field_offsets(), strict=True)):
            dims = list(f.shape) + [0] * (3 - len(f.shape))
            struct.pack_into(
                "<24s8sIIIIQQ", mem, SCHEMA_OFFSET + i * LINE, f.name.encode(),
                np.dtype(f.dtype).str.encode(), len(f.shape), *dims, off, f.nbytes,
            )
        struct.pack_into("<I", mem, RECIPE_OFFSET, len(recipe_json))
        mem[RECIPE_OFFSET + 4:RECIPE_OFFSET + 4 + len(recipe_json)] = recipe_json
        _IDENTITY.pack_into(
            mem, 0, b"\0" * 8, VERSION, header_size, size, geometry.lanes, geometry.slots,
            geometry.slot_size, lanes_offset, slots_offset, len(geometry.fields), geometry.ranks, geometry.batch_size,
        )
        ring = cls(name, mem, geometry)
        ring.words[Word.OWNER_UID] = os.getuid()
        ring.words[Word.END_CHUNK] = -1
        for rank in range(geometry.ranks):
            write_position(ring.words, ring.consumer_block(rank), Position())
        ring.words[Word.DAEMON_PID] = os.getpid()
        ring.words[Word.CREATED_NS] = ring.words[Word.HEARTBEAT_NS] = _now_ns()
        # The magic goes in last: a reader that sees it sees a complete header.
        mem[0:8] = MAGIC
        return ring

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Map an existing ring after checking owner, mode and every offset in its header."""
        validate_name(name)
        try:
            shm = posix_ipc.SharedMemory(shm_name(name))
        except posix_ipc.PermissionsError:
            raise RingError(f"ring {name!r} belongs to another user; refusing to attach") from None
        except posix_ipc.ExistentialError:
            raise RingError(
                f"no ring named {name!r} on this machine; start one with `ringload start RECIPE --name {name}` "
                "(`ringload ls` lists the rings)"
            ) from None
        try:
            st = os.fstat(shm.fd)
            if st.st_uid != os.getuid():
                raise RingError(f"ring {name!r} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
                                "refusing to attach")
            if stat.S_IMODE(st.st_mode) & 0o077:
                raise RingError(f"ring {name!r} has mode {stat.S_IMODE(st.st_mode):o}; "
                                "ringload only attaches to 0600 rings")
            if st.st_size < RECIPE_OFFSET + 4:
                raise RingError(f"ring {name!r} is too small ({st.st_size} bytes) to hold a ringload header")
            mem = mmap.mmap(shm.fd, st.st_size)
        finally:
            shm.close_fd()
        try:
            geometry = _validate_header(name, mem)
        except RingError:
            mem.close()
            raise
        return cls(name, mem, geometry)

    def close(self) -> None:
        """Drop this process's mapping; numpy views still alive keep it mapped until collected."""
        self.words.release()
        try:
            self._mem.close()
        except BufferError:
            pass  # a caller still holds a view (e.g. a kept batch tensor); the GC unmaps later

    # -- header fields -----------------------------------------------------------------------
    def get(self, word: int) -> int:
        return self.words[word]

    def set(self, word: int, value: int) -> None:
        self.words[word] = value

    def get_float(self, word: int) -> float:
        return struct.unpack_from("<d", self._mem, word * 8)[0]

    def set_float(self, word: int, value: float) -> None:
        struct.pack_into("<d", self._mem, word * 8, value)

    @property
    def state(self) -> State:
        return State(self.words[Word.STATE])

    def set_state(self, state: State) -> None:
        self.words[Word.STATE] = int(state)

    @property
    def error(self) -> str:
        (n,) = struct.unpack_from("<I", self._mem, ERROR_OFFSET)
        return bytes(self._mem[ERROR_OFFSET + 4:ERROR_OFFSET + 4 + min(n, ERROR_CAPACITY)]).decode(errors="replace")

    def fail(self, message: str) -> None:
        """Record the first failure's text and switch to FAILED (later failures keep the first text)."""
        if self.state == State.FAILED:
            return
        data = message.encode()[:ERROR_CAPACITY]
        self._mem[ERROR_OFFSET + 4:ERROR_OFFSET + 4 + len(data)] = data
        struct.pack_into("<I", self._mem, ERROR_OFFSET, len(data))
        self.set_state(State.FAILED)

    def recipe(self) -> dict[str, Any]:
        (n,) = struct.unpack_from("<I", self._mem, RECIPE_OFFSET)
        return json.loads(bytes(self._mem[RECIPE_OFFSET + 4:RECIPE_OFFSET + 4 + n]))

    def heartbeat(self) -> None:
        self.words[Word.HEARTBEAT_NS] = _now_ns()

    # -- lanes and slots ---------------------------------------------------------------------
    def lane_word(self, lane: int, word: int) -> int:
        """Index into ``words`` of word ``word`` of lane ``lane``'s control block."""
        return (self.lanes_offset + lane * LANE_BLOCK) // 8 + word

    def consumer_block(self, rank: int) -> int:
        """Index into ``words`` of the first word of rank ``rank``'s consumer block."""
        return (self.consumers_offset + rank * CONSUMER_BLOCK) // 8

    def rank_lanes(self, rank: int) -> range:
        """The lanes that carry rank ``rank``'s batches, producer 0 first."""
        producers = self.geometry.producers
        return range(rank * producers, (rank + 1) * producers)

    def rank_slots(self, rank: int) -> np.ndarray:
        """A uint8 array over every slot of rank ``rank``'s lanes (one contiguous block), e.g. to
        page-lock them for a GPU's copy engine."""
        lanes = self.rank_lanes(rank)
        per_lane = self.geometry.slots * self.slot_size
        return np.frombuffer(self._mem, dtype=np.uint8, count=len(lanes) * per_lane,
                             offset=self.slots_offset + lanes[0] * per_lane)

    def slot_word(self, lane: int, slot: int, word: int) -> int:
        """Index into ``words`` of header word ``word`` of slot ``slot`` in lane ``lane``."""
        return (self.slots_offset + (lane * self.geometry.slots + slot) * self.slot_size) // 8 + word

    def slot_arrays(self, lane: int, slot: int) -> dict[str, np.ndarray]:
        """Writable zero-copy numpy views of one slot's fields."""
        return self.field_views(self.slot_buffer(lane, slot))

    def slot_buffer(self, lane: int, slot: int) -> np.ndarray:
        """A new uint8 array over one slot's bytes. Views made from it by :meth:`field_views` keep it
        alive (numpy stops collapsing ``.base`` at the first non-array), which is how the consumer
        knows when nothing references a slot any more."""
        start = self.slots_offset + (lane * self.geometry.slots + slot) * self.slot_size
        return np.frombuffer(self._mem, dtype=np.uint8, count=self.slot_size, offset=start)

    def field_views(self, buffer: np.ndarray, names: frozenset[str] | None = None) -> dict[str, np.ndarray]:
        """The fields (all, or those in ``names``) of a :meth:`slot_buffer` as views whose base is it."""
        return {f.name: np.ndarray(f.shape, f.dtype, buffer=buffer, offset=off)
                for f, off in zip(self.geometry.fields, self.field_offsets, strict=True)
                if names is None or f.name in names}


def _now_ns() -> int:
    return time.time_ns()


def _check_room(name: str, size: int) -> None:
    try:
        vfs = os.statvfs("/dev/shm")
    except OSError:
        return
    free = vfs.f_bavail * vfs.f_frsize
    if size > free:
        raise RingError(
            f"ring {name!r} needs {size / 2**20:.1f} MiB of shared memory but /dev/shm has only "
            f"{free / 2**20:.1f} MiB free; lower slots, batch_size or seq_len in the recipe, "
            "or enlarge /dev/shm (docker: --shm-size)"
        )


def _validate_header(name: str, mem: mmap.mmap) -> Geometry:
    """Rebuild the geometry from an untrusted header, checking every number against the mapping."""
    size = len(mem)
    (magic, version, header_size, total_size, lanes, slots, slot_size, lanes_offset, slots_offset,
     n_fields, ranks, batch_size) = _IDENTITY.unpack_from(mem, 0)

    def bad(why: str) -> RingError:
        return RingError(f"ring {name!r} has a corrupt or foreign header ({why}); refusing to attach. "
                         f"If no daemon owns it, `ringload clean` removes it")

    if size % LINE:
        raise bad(f"a mapping of {size} bytes is not a whole number of cache lines")
    if magic != MAGIC:
        raise bad("bad magic: not a ringload ring, or its daemon is still creating it")
    if version != VERSION:
        raise bad(f"format version {version}, this ringload reads version {VERSION}")
    if total_size != size:
        raise bad(f"header says {total_size} bytes, mapping has {size}")
    if not (RECIPE_OFFSET + 4 <= header_size <= lanes_offset and lanes_offset % LINE == 0):
        raise bad("header size or lane offset out of range")
    if not (1 <= lanes <= MAX_LANES and MIN_SLOTS <= slots <= MAX_SLOTS and 1 <= n_fields <= MAX_FIELDS
            and batch_size >= 1
            and 1 <= ranks <= MAX_RANKS and lanes % ranks == 0):
        raise bad(f"lanes={lanes} slots={slots} fields={n_fields} batch_size={batch_size} ranks={ranks}")
    if (lanes_offset + lanes * LANE_BLOCK + ranks * CONSUMER_BLOCK > slots_offset
            or slots_offset % LINE or slot_size % LINE):
        raise bad("lane or consumer blocks overlap the slots or are misaligned")
    if slot_size < SLOT_HEADER_SIZE or slots_offset + lanes * slots * slot_size > size:
        raise bad("slots extend past the end of the mapping")
    (recipe_len,) = struct.unpack_from("<I", mem, RECIPE_OFFSET)
    if RECIPE_OFFSET + 4 + recipe_len > header_size:
        raise bad("recipe text extends past the header")
    fields: list[Field] = []
    offsets: list[int] = []
    for i in range(n_fields):
        raw_name, raw_dtype, ndim, d0, d1, d2, off, nbytes = struct.unpack_from("<24s8sIIIIQQ", mem,
                                                                               SCHEMA_OFFSET + i * LINE)
        dtype_str = raw_dtype.rstrip(b"\0").decode("ascii", "replace")
        if dtype_str not in ALLOWED_DTYPES or not 1 <= ndim <= 3:
            raise bad(f"field {i}: dtype {dtype_str!r} ndim {ndim}")
        shape = (d0, d1, d2)[:ndim]
        if any(d < 1 for d in shape) or shape[0] != batch_size:
            raise bad(f"field {i}: shape {shape} with batch_size {batch_size}")
        dtype = np.dtype(dtype_str)
        if prod(shape) * dtype.itemsize != nbytes or off % LINE or off < SLOT_HEADER_SIZE or off + nbytes > slot_size:
            raise bad(f"field {i}: offset {off} + {nbytes} bytes outside a {slot_size}-byte slot")
        try:
            field_name = raw_name.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise bad(f"field {i}: name is not ASCII") from None
        if not field_name or any(f.name == field_name for f in fields):
            raise bad(f"field {i}: empty or repeated name {field_name!r}")
        fields.append(Field(field_name, dtype, shape))
        offsets.append(off)
    spans = sorted((o, o + f.nbytes) for o, f in zip(offsets, fields, strict=True))
    if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False)):
        raise bad("field arrays overlap")
    geometry = Geometry(lanes, slots, batch_size, tuple(fields), ranks)
    if geometry.field_offsets() != offsets or geometry.slot_size != slot_size:
        raise bad("field offsets do not follow the layout rules")
    return geometry
