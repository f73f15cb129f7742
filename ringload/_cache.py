"""The token cache: a chunk is tokenized once, then every later epoch and rerun reads its ids from disk.

Recipe key ``token_cache`` (off by default): ``true``, or ``{dir: ..., max_gb: ...}``; ``false`` or
absent turns it off. The default directory is ``$RINGLOAD_CACHE/tokens`` (``~/.cache/ringload/tokens``),
the default size limit ``DEFAULT_MAX_GB``.

What an entry holds. For a task whose ``batches`` tokenizes each text of a chunk once, in order,
through ``TokenizerInfo.encode_ids`` or ``encode_words`` (``Task.token_cache_options`` is not None:
mlm, clm), a chunk's entry is what the tokenizer returned for each of its documents (ids, and word
starts under whole-word masking) and the counts the producer reports for the chunk (usable, bad and
truncated records). It holds nothing that packing, masking or dealing produce: a producer serving a
chunk from its entry hands the task placeholder texts and a ``TokenTap`` that returns the stored ids,
and the task packs, masks (from ``(seed, chunk, batch index)``) and deals as usual, so the batches
are bit-identical to those of an uncached run.

Keys. A chunk's content is fixed, without reading it, by:

* its source (``source_key``): the source's reading options (format, fields, text unit, hooks
  excluded: a source with ``filter``/``map`` is not cached, its user code may read anything),
  ``chunk_bytes``, whether long records are read in pieces, ``max_record_bytes``,
  ``on_long_record``, ``on_bad_record``, and every file of the source with its stamp
  (``_plan.file_stamp``: size and modification time, or the ETag / Last-Modified of a remote
  file). A file that reports no such stamp makes its source uncached (a change could not be
  seen). Any changed file makes the whole source's entries unreachable;
* under ``shuffle``, the seed, the buffer, the epoch and the lap (a window's permutation and the
  file order depend on them; such chunks are reused by reruns, not by later epochs);
* its place: file index, offset, line and part (``Chunk.cursor``), which is where reading resumes
  (``_stream``: where a chunk ends depends only on where it starts).

The ids are fixed by ``tokens_key``: the SHA-256 of the tokenizer file(s), the ``tokenizers``
version, the requested engine (and tiktoken's version unless ``tokenizers``), the task type and
the task options that change what it asks the tokenizer for. An entry's file name is the BLAKE2b
digest of (content key, tokens key).

Serving without fetching. A chunk's bytes can only be skipped if the reader knows where the next
chunk starts, which is otherwise found by reading. So the reader also keeps, per lap of a source,
a *lap map*: the cursor and byte size of every chunk of the lap, written once the reader has cut
the whole lap (keyed like a chunk, without the place, plus the node's share under
``node_sharding: chunks``). With a map, the reader walks it (from a resume point's cursor, if it
resumes inside the lap) and hands out every chunk whose entry exists as an *unread* chunk: its
cursor with an empty payload (a chunk read from a source is never empty). At the first chunk
without an entry it resumes reading the source there (``_stream``'s resume rule) for the rest of
the lap. A producer that gets an unread chunk whose entry turns out missing or damaged reads the
chunk's bytes itself from its cursor (``_stream.chunk_at``). ``ringload status`` shows the bytes
fetched from the sources and the bytes served from the cache instead.

Files and safety. Entries live in ``DIR/v1/entries/XX/<digest>.tok``, lap maps in
``DIR/v1/laps/<digest>.map``. Both are written to a temporary file in the same folder and renamed
into place, so a reader sees a complete file or none, and rings that share the directory (or two
producers that write the same entry) never see each other's partial writes: the last rename wins,
with identical content. A file is ``MAGIC``, a header (length, JSON: the full key, counts, array
lengths), the body, and a BLAKE2b digest of everything before it; a file whose digest, length,
magic or key does not match (truncated, corrupted, left by a crash of the machine before it
reached the disk) is never served: its chunk is tokenized again and the entry rewritten. A
producer killed while writing leaves only its temporary file, which nothing reads; leftovers older
than ``STALE_TEMP_S`` are removed by the next size check, and ``ringload cache clear`` removes all.
A write that fails (disk full, quota, permissions) or that would take the directory past
``max_gb`` stops that producer's caching with one warning in the daemon's log; the run goes on.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._recipe import Recipe, Source
from ._sources import Chunk
from ._tasks.base import Task, TokenLists
from ._tasks.engines import CACHE_ENV
from ._types import Records

FORMAT = "v1"
MAGIC = b"RLTOKEN1"
_LENGTH = struct.Struct("<Q")
DIGEST_BYTES = 16
DEFAULT_MAX_GB = 20.0
STALE_TEMP_S = 3600.0  # a temporary file this old belongs to a writer that died
BUDGET_RESCAN_S = 10.0  # how often a producer re-measures the directory (other writers fill it too)
ENTRY_SUFFIX, MAP_SUFFIX, TEMP_SUFFIX = ".tok", ".map", ".tmp"
log = logging.getLogger("ringload.cache")
HEADER_KEY = "token_cache"  # where the ring header's recipe JSON carries the CacheKeys, for the producers


def default_cache_dir() -> Path:
    """``tokens`` in ringload's cache directory (``$RINGLOAD_CACHE``, default ``~/.cache/ringload``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ringload") / "tokens"


def _digest(value: Any) -> str:
    return hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=DIGEST_BYTES).hexdigest()


def is_unread(chunk: Chunk) -> bool:
    """True for a chunk the reader handed out without reading it (its tokens are in the cache)."""
    return not chunk.payload


# -- the container format of entries and lap maps --------------------------------------------------
class DamagedFile(ValueError):
    """A cache file that must not be served: truncated, corrupted, of another format or another key."""


@dataclass(frozen=True)
class CacheFile:
    """A cache file to write: magic, header length and JSON, body, then a digest of all of it."""

    header: dict[str, Any]
    body: Sequence[bytes | memoryview]

    def pieces(self) -> Iterator[bytes | memoryview]:
        """The file's bytes in pieces, the digest computed as they go (one pass over the data)."""
        head = json.dumps(self.header, sort_keys=True).encode()
        digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for piece in (MAGIC, _LENGTH.pack(len(head)), head, *self.body):
            digest.update(piece)
            yield piece
        yield digest.digest()

    def size(self) -> int:
        head = len(json.dumps(self.header, sort_keys=True).encode())
        return len(MAGIC) + _LENGTH.size + head + sum(len(p) for p in self.body) + DIGEST_BYTES

    def to_bytes(self) -> bytes:
        return b"".join(bytes(p) for p in self.pieces())


def unpack_file(data: bytes, key: Any = None) -> tuple[dict[str, Any], memoryview]:
    """(header, body) of an intact cache file holding ``key`` (any key if None); DamagedFile if
    anything does not match."""
    fixed = len(MAGIC) + _LENGTH.size
    if len(data) < fixed + DIGEST_BYTES or not data.startswith(MAGIC):
        raise DamagedFile("not a token cache file, or truncated")
    if hashlib.blake2b(memoryview(data)[:-DIGEST_BYTES], digest_size=DIGEST_BYTES).digest() != data[-DIGEST_BYTES:]:
        raise DamagedFile("checksum mismatch (truncated or corrupted)")
    (size,) = _LENGTH.unpack_from(data, len(MAGIC))
    try:
        header = json.loads(data[fixed:fixed + size])
    except ValueError:
        raise DamagedFile("unreadable header") from None
    if not isinstance(header, dict) or key is not None and header.get("key") != json.loads(json.dumps(key)):
        raise DamagedFile("holds another key")
    return header, memoryview(data)[fixed + size:len(data) - DIGEST_BYTES]


def write_atomically(path: Path, file: CacheFile) -> None:
    """Write ``file`` to a temporary file next to ``path`` and rename it into place. Raises OSError
    (and leaves no temporary file) if the write fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as out:
            for piece in file.pieces():
                out.write(piece)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# -- what fixes a chunk's content and its ids --------------------------------------------------------
@dataclass(frozen=True)
class CacheKeys:
    """What the daemon works out once and the producers share: where the cache is, and the keys.

    ``sources[j]`` is source j's key (None: the source is not cached, see ``why_not``)."""

    directory: str
    max_bytes: int
    tokens: Any
    sources: tuple[Any, ...]
    shuffle: tuple[int, int] | None  # (seed, buffer)
    node_share: tuple[str, int, int]  # (node_sharding, nnodes, node_rank): which chunks of a lap a node reads
    why_not: tuple[str | None, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheKeys:
        return cls(data["directory"], data["max_bytes"], data["tokens"], tuple(data["sources"]),
                   tuple(data["shuffle"]) if data["shuffle"] else None, tuple(data["node_share"]),
                   tuple(data["why_not"]))

    def chunk_key(self, chunk: Chunk) -> Any:
        """The key of a chunk's entry (its content and its ids), from its cursor alone."""
        return {"source": self.sources[chunk.source], "shuffle": self._shuffle_part(chunk.epoch, chunk.lap),
                "place": [chunk.file_index, chunk.offset, chunk.line, chunk.part], "tokens": self.tokens}

    def lap_key(self, source: int, epoch: int, lap: int) -> Any:
        return {"source": self.sources[source], "shuffle": self._shuffle_part(epoch, lap),
                "node_share": list(self.node_share)}

    def _shuffle_part(self, epoch: int, lap: int) -> list[int] | None:
        return None if self.shuffle is None else [*self.shuffle, epoch, lap]

    def entry_path(self, key: Any) -> Path:
        name = _digest(key)
        return Path(self.directory) / FORMAT / "entries" / name[:2] / f"{name}{ENTRY_SUFFIX}"

    def map_path(self, key: Any) -> Path:
        return Path(self.directory) / FORMAT / "laps" / f"{_digest(key)}{MAP_SUFFIX}"


def cache_keys(recipe: Recipe, files: list[list[str]], task: type[Task]) -> CacheKeys | None:
    """The recipe's cache keys, or None if the recipe has no token cache or ``task`` (its task's class)
    is not cacheable. Stamps every source file (a metadata request for a remote one)."""
    from ._plan import file_stamp

    settings = recipe.token_cache
    if settings is None or task.token_cache_options is None:
        return None
    task_type_options = {"type": recipe.task["type"], **{k: recipe.task[k] for k in task.token_cache_options}}
    split_long_records = task.packs_documents(recipe.task)
    sources, why_not = [], []
    for j, (source, paths) in enumerate(zip(recipe.sources, files, strict=True)):
        key, why = _source_key(recipe, source, paths, split_long_records, file_stamp)
        sources.append(key)
        why_not.append(None if why is None else f"source {j}: {why}")
    return CacheKeys(settings["dir"], int(settings["max_gb"] * 2**30), _tokens_key(recipe, task_type_options),
                     tuple(sources), (recipe.seed, recipe.shuffle_buffer) if recipe.shuffle else None,
                     (recipe.node_sharding, recipe.nnodes, recipe.node_rank), tuple(why_not))


def _source_key(recipe: Recipe, source: Source, paths: list[str], split_long_records: bool,
                stamp: Callable[[str, Source], list[Any]]) -> tuple[Any, str | None]:
    if source.filter or source.map:
        return None, "its filter/map hooks are user code whose output the cache cannot vouch for; not cached"
    stamps = []
    for path in paths:
        try:
            size, changed = stamp(path, source)
        except Exception as exc:  # noqa: BLE001 - any failure to stamp a file only turns caching off
            return None, f"{path} could not be stamped ({type(exc).__name__}: {exc}); not cached"
        if size is None or changed is None:
            return None, f"{path} reports no size and modification time (or ETag); not cached"
        stamps.append([path, size, changed])
    reading = {key: getattr(source, key) for key in ("format", "field", "pair_field", "label_field", "text_unit")}
    return {"reading": reading, "files": stamps, "chunk_bytes": recipe.chunk_size, "pieces": split_long_records,
            "max_record_bytes": recipe.max_record_bytes, "on_long_record": recipe.on_long_record,
            "on_bad_record": recipe.on_bad_record}, None


def _tokens_key(recipe: Recipe, task_type_options: dict[str, Any]) -> Any:
    path = Path(recipe.tokenizer)
    files = [path / "vocab.json", path / "merges.txt"] if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    versions: dict[str, str | None] = {"tokenizers": importlib.metadata.version("tokenizers")}
    if recipe.tokenizer_engine != "tokenizers":
        try:
            versions["tiktoken"] = importlib.metadata.version("tiktoken")
        except importlib.metadata.PackageNotFoundError:
            versions["tiktoken"] = None
    return {"tokenizer": digest.hexdigest(), "versions": versions, "engine": recipe.tokenizer_engine,
            "task": task_type_options}


# -- entries: a chunk's ids --------------------------------------------------------------------------
@dataclass
class ChunkTokens:
    """A chunk's entry: every document's ids (and word starts), and the chunk's record counts."""

    documents: TokenLists
    word_starts: np.ndarray | None  # bool per token, aligned with documents.tokens
    records: int
    bad: int
    truncated: int

    def file(self, key: Any) -> CacheFile:
        header = {"key": key, "documents": len(self.documents), "tokens": len(self.documents.tokens),
                  "words": self.word_starts is not None, "records": self.records, "bad": self.bad,
                  "truncated": self.truncated}
        body = [np.ascontiguousarray(self.documents.lengths, dtype="<i8").data.cast("B"),
                np.ascontiguousarray(self.documents.tokens, dtype="<i4").data.cast("B")]
        if self.word_starts is not None:
            body.append(np.ascontiguousarray(self.word_starts, dtype=np.uint8).data.cast("B"))
        return CacheFile(header, body)

    @classmethod
    def parse(cls, data: bytes, key: Any) -> ChunkTokens:
        header, body = unpack_file(data, key)
        try:
            documents, tokens, words = int(header["documents"]), int(header["tokens"]), bool(header["words"])
            counts = int(header["records"]), int(header["bad"]), int(header["truncated"])
        except (KeyError, TypeError, ValueError):
            raise DamagedFile("incomplete header") from None
        if len(body) != 8 * documents + 4 * tokens + (tokens if words else 0):
            raise DamagedFile("body of the wrong length")
        lengths = np.frombuffer(body, dtype="<i8", count=documents)
        ids = np.frombuffer(body, dtype="<i4", count=tokens, offset=8 * documents)
        if int(lengths.sum()) != tokens or (lengths < 0).any():
            raise DamagedFile("document lengths do not add up")
        starts = np.frombuffer(body, dtype=np.bool_, offset=8 * documents + 4 * tokens) if words else None
        return cls(TokenLists(ids, lengths), starts, *counts)


class TokenTap:
    """What ``TokenizerInfo`` asks instead of the tokenizer while a producer works on one chunk.

    Recording (``served`` None): encodes as asked, keeps every document's ids, and returns them as
    ``TokenLists``. Replaying: returns the entry's next documents, whatever the (placeholder) texts."""

    def __init__(self, served: ChunkTokens | None = None):
        self.served = served
        self.position = 0  # documents handed out so far (replaying)
        self.pieces: list[TokenLists] = []
        self.starts: list[list[bool]] = []
        self.words: bool | None = None  # whether the task asked for word starts

    def ids(self, texts: list[str], encode: Callable[[list[str]], list[list[int]]]) -> TokenLists:
        self._asked(words=False)
        if self.served is not None:
            return self._next(len(texts))
        ids = TokenLists.from_lists(encode(texts))
        self.pieces.append(ids)
        return ids

    def words_of(self, texts: list[str], encode: Callable[[list[str]], tuple[list[list[int]], list[list[bool]]]]
                 ) -> tuple[TokenLists, list[list[bool]]]:
        self._asked(words=True)
        if self.served is not None:
            first = self.position
            ids = self._next(len(texts))
            starts = self.served.word_starts
            assert starts is not None  # _asked checked that the entry holds word starts
            at = int(self.served.documents.offsets[first])
            flat = starts[at:at + len(ids.tokens)].tolist()
            return ids, [flat[a:b] for a, b in itertools.pairwise(ids.offsets.tolist())]
        encoded, flags = encode(texts)
        lists = TokenLists.from_lists(encoded)
        self.pieces.append(lists)
        self.starts.extend(flags)
        return lists, flags

    def _asked(self, words: bool) -> None:
        if self.words is None:
            self.words = words
        elif self.words != words:
            raise RuntimeError("the task mixed encode_ids and encode_words within a chunk; it cannot be cached")
        if self.served is not None and words != (self.served.word_starts is not None):
            raise RuntimeError("the cache entry was written for another encoding (ids vs word starts)")

    def _next(self, count: int) -> TokenLists:
        assert self.served is not None
        end = self.position + count
        if end > len(self.served.documents):
            raise RuntimeError(f"the task asked for document {end} of a cached chunk of {len(self.served.documents)}")
        ids = self.served.documents.slice(self.position, end)
        self.position = end
        return ids

    def recorded(self, records: Records, bad: int) -> ChunkTokens:
        """The entry of the chunk just recorded (every one of its ``records`` tokenized once, in order)."""
        documents = TokenLists.concatenate(self.pieces)
        if len(documents) != len(records):
            raise RuntimeError(f"the task tokenized {len(documents)} texts of a chunk of {len(records)}")
        starts = None
        if self.words:
            starts = np.fromiter((s for doc in self.starts for s in doc), dtype=bool, count=len(documents.tokens))
        return ChunkTokens(documents, starts, len(records), bad, len(records.truncated))


class _Budget:
    """Whether one more entry fits under ``max_bytes``: the directory's size, re-measured every
    ``BUDGET_RESCAN_S`` (other producers and rings write too), plus what this process wrote since."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes
        self.used, self.measured = 0, -float("inf")

    def fits(self, size: int) -> bool:
        if time.monotonic() - self.measured > BUDGET_RESCAN_S:
            self.used, self.measured = directory_usage(self.root, remove_stale=True)[0], time.monotonic()
        return self.used + size <= self.max_bytes

    def spent(self, size: int) -> None:
        self.used += size


class ProducerCache:
    """A producer's side of the cache: look a chunk's entry up, store the entries it tokenized."""

    def __init__(self, keys: CacheKeys, lane: int):
        self.keys, self.lane = keys, lane
        self.budget = _Budget(Path(keys.directory) / FORMAT, keys.max_bytes)
        self.writing = True  # until a write fails or the directory is full

    @classmethod
    def of_ring(cls, header_recipe: dict[str, Any], lane: int) -> ProducerCache | None:
        """The cache the daemon set up for the ring (``HEADER_KEY`` of its header), or None."""
        keys = header_recipe.get(HEADER_KEY)
        return cls(CacheKeys.from_dict(keys), lane) if keys else None

    def cached(self, chunk: Chunk) -> bool:
        return self.keys.sources[chunk.source] is not None

    def lookup(self, chunk: Chunk) -> ChunkTokens | None:
        """The chunk's entry, if one exists and is intact (a damaged one is reported and rewritten later)."""
        key = self.keys.chunk_key(chunk)
        path = self.keys.entry_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._warn(f"cannot read {path} ({exc.strerror}); tokenizing chunk {chunk.id} instead")
            return None
        try:
            return ChunkTokens.parse(data, key)
        except DamagedFile as why:
            self._warn(f"damaged entry {path} ({why}); tokenizing chunk {chunk.id} again and rewriting it")
            return None

    def store(self, chunk: Chunk, tokens: ChunkTokens) -> None:
        if not self.writing:
            return
        key = self.keys.chunk_key(chunk)
        file = tokens.file(key)
        size = file.size()
        if not self.budget.fits(size):
            self.writing = False
            self._warn(f"{self.keys.directory} holds {self.budget.used / 2**30:.2f} GB, its max_gb is "
                       f"{self.keys.max_bytes / 2**30:g}: no more chunks are cached by this producer (the run goes on; "
                       "`ringload cache clear` frees it, or raise token_cache.max_gb)")
            return
        try:
            write_atomically(self.keys.entry_path(key), file)
            self.budget.spent(size)
        except OSError as exc:
            self.writing = False
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self._warn(f"cannot write to {self.keys.directory} ({exc.strerror or exc})"
                       f"{': the disk is full' if full else ''}; "
                       "no more chunks are cached by this producer (the run goes on)")

    def _warn(self, message: str) -> None:
        log.warning("producer %d: token cache: %s", self.lane, message)


def setup(recipe: Recipe, files: list[list[str]], task: type[Task], warn: Callable[[str], None]) -> CacheKeys | None:
    """The daemon's start: the keys (None if there is no cache), with every reason a source or the
    task is not cached, or the directory unusable, given to ``warn``."""
    if recipe.token_cache is None:
        return None
    if recipe.complete_pass:
        warn("token cache: mode: eval keeps every record with its id, which the cache does not hold; not cached")
        return None
    if task.token_cache_options is None:
        warn(f"token cache: task {recipe.task['type']!r} does not declare how it tokenizes "
             "(Task.token_cache_options); its chunks are tokenized every time")
        return None
    keys = cache_keys(recipe, files, task)
    if keys is None:
        return None
    for why in filter(None, keys.why_not):
        warn(f"token cache: {why}")
    try:
        (Path(keys.directory) / FORMAT).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        warn(f"token cache: cannot create {keys.directory} ({exc.strerror}); running without it")
        return None
    return keys


# -- lap maps: chunks served without reading ---------------------------------------------------------
class LapCache:
    """The reader's side: walks a lap's map, handing out unread chunks while their entries exist, and
    writes the map of every lap it read whole. ``served`` counts the bytes handed out unread."""

    def __init__(self, keys: CacheKeys, warn: Callable[[str], None]):
        self.keys, self.warn = keys, warn
        self.served = 0
        self.writing = True

    def lap(self, source: int, epoch: int, lap: int, where: tuple[int, int, int, int] | None,
            read: Callable[[tuple[int, int, int, int] | None], Iterator[Chunk]]) -> Iterator[Chunk]:
        """The chunks of one lap of ``source`` from ``where`` (None: its start); ``read(at)`` reads the
        source from cursor ``at`` (file index, offset, line, part)."""
        if self.keys.sources[source] is None:
            yield from read(where)
            return
        key = self.keys.lap_key(source, epoch, lap)
        known = self._load_map(key)
        seen: list[list[int]] | None = [] if where is None else None  # the lap's cursors, if read from its start
        at = where
        if known is not None:
            places = [tuple(c[:4]) for c in known]
            first = 0 if where is None else places.index(tuple(where)) if tuple(where) in places else None
            if first is not None:
                seen = [list(c) for c in known[:first]]
                stamp = Chunk(-1, epoch, 0, 0, 1, b"", 0, source, lap)
                for file_index, offset, line, part, size in known[first:]:
                    chunk = dataclasses.replace(stamp, file_index=file_index, offset=offset, line=line, part=part)
                    if not self.keys.entry_path(self.keys.chunk_key(chunk)).exists():
                        at = (file_index, offset, line, part)
                        break
                    seen.append([file_index, offset, line, part, size])
                    self.served += size
                    yield chunk
                else:
                    return
        for chunk in read(at):
            if seen is not None:
                seen.append([chunk.file_index, chunk.offset, chunk.line, chunk.part, len(chunk.payload)])
            yield chunk
        if seen is not None and seen != known:
            self._store_map(key, seen)

    def _load_map(self, key: Any) -> list[list[int]] | None:
        path = self.keys.map_path(key)
        try:
            _, body = unpack_file(path.read_bytes(), key)
            cursors = json.loads(bytes(body))
            if not all(isinstance(c, list) and len(c) == 5 and all(isinstance(v, int) for v in c) for c in cursors):
                raise DamagedFile("malformed cursors")
            return cursors
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as why:  # DamagedFile is a ValueError
            self.warn(f"token cache: ignoring the lap map {path} ({why}); reading that lap")
            return None

    def _store_map(self, key: Any, cursors: list[list[int]]) -> None:
        if not self.writing:
            return
        try:
            write_atomically(self.keys.map_path(key), CacheFile({"key": key}, [json.dumps(cursors).encode()]))
        except OSError as exc:
            self.writing = False
            self.warn(f"token cache: cannot write lap maps to {self.keys.directory} ({exc.strerror or exc}); "
                      "later laps read their sources (chunks already cached still skip the tokenizer)")


# -- ringload cache ls / clear ---------------------------------------------------------------------
def directory_usage(root: Path, remove_stale: bool = False) -> tuple[int, dict[str, int]]:
    """(bytes, counts of entries, lap maps and temporary files) under ``root``; with ``remove_stale``
    temporary files older than ``STALE_TEMP_S`` (left by killed writers) are removed first."""
    total, counts = 0, {"entries": 0, "lap_maps": 0, "temporary": 0}
    now = time.time()
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
            if name.endswith(TEMP_SUFFIX):
                if remove_stale and now - st.st_mtime > STALE_TEMP_S:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                    continue
                counts["temporary"] += 1
            elif name.endswith(ENTRY_SUFFIX):
                counts["entries"] += 1
            elif name.endswith(MAP_SUFFIX):
                counts["lap_maps"] += 1
            total += st.st_size
    return total, counts


def lap_maps(directory: Path) -> list[dict[str, Any]]:
    """What each intact lap map under ``directory`` covers: its source's files, chunks and bytes."""
    found = []
    for path in sorted((directory / FORMAT / "laps").glob(f"*{MAP_SUFFIX}")):
        try:
            header, body = unpack_file(path.read_bytes())
            key, cursors = header["key"], json.loads(bytes(body))
        except (OSError, ValueError, KeyError):
            continue  # damaged, or removed meanwhile: the reader ignores it too
        files = [f[0] for f in key["source"]["files"]]
        shuffle = key["shuffle"]
        found.append({"files": ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else ""),
                      "chunks": len(cursors), "bytes": sum(c[4] for c in cursors),
                      "epoch": shuffle[2] if shuffle else None, "lap": shuffle[3] if shuffle else None})
    return found


def clear(directory: Path) -> tuple[int, int]:
    """Remove every cache file (and nothing else) under ``directory``; (files, bytes) removed."""
    root = directory / FORMAT
    files = size = 0
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            if not name.endswith((ENTRY_SUFFIX, MAP_SUFFIX, TEMP_SUFFIX)):
                continue
            path = os.path.join(folder, name)
            try:
                size += os.stat(path).st_size
                os.unlink(path)
                files += 1
            except FileNotFoundError:
                continue
        if folder != str(root):
            try:
                os.rmdir(folder)
            except OSError:
                pass  # not empty: something else lives there
    return files, size
