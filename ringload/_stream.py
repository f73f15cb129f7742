"""The stream: the numbered chunks the reader hands out, as a pure function of the recipe.

Per epoch (forever, or ``epochs`` times), every source is read in passes (*laps*): a lap reads
the source's files in order, or, with ``shuffle``, in an order drawn from ``(seed, epoch, source,
lap)``, cutting them into blocks (``_sources.read_blocks``).

Shuffling (``shuffle: {buffer: N}``): consecutive blocks of a lap are gathered into a *window*
until it holds at least N records (csv/tsv windows end with their file, whose header they share);
its records are permuted by a generator seeded with the window's start, and cut into chunks
again. A chunk names its window's start and its ``part`` of the window.

Nodes. Under ``node_sharding: chunks`` node R of N keeps every N-th chunk of each lap (chunks R,
R + N, ...), under ``files`` it reads every N-th file (``_daemon``); either way its stream is
its own, numbered from 0. Under ``batches`` (the default) every node reads the whole stream.

Mixing (``sources:`` with ``weight``): the chunk with number ``pick`` within the epoch comes from
source ``schedule[pick]``, a smooth weighted round-robin over the weights that never depends on
the data, so each source's share of chunks follows its weight exactly. When the chosen source's
lap runs out, ``stopping_strategy`` decides: ``first_exhausted`` ends the epoch;
``all_exhausted`` starts that source's next lap, until every source has run out once. A complete
pass (``mode: eval``) mixes nothing: it reads every source once, one after another.

Resuming. A :class:`~ringload._types.ResumePoint` names the chunk of the last delivered batch (id, epoch, pick,
source, batches of it delivered) and, per source, the start of the last chunk of that source in
the epoch so far. Reading restarts every source there, skips each source's already-delivered
chunk (re-reading one chunk per source), re-yields the resume chunk itself, and continues the
schedule from its pick: the chunks that follow are those of an uninterrupted run, because where
a block or window ends, and how a window is permuted, depend only on where it starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from ._http import SourceMeter
from ._recipe import Recipe, Source
from ._sources import Chunk, SourceError, read_blocks
from ._types import ResumePoint

if TYPE_CHECKING:
    from ._cache import LapCache


def read_stream(recipe: Recipe, files: list[list[str]], start: ResumePoint | None = None,
                on_error: Callable[[SourceError], None] | None = None,
                meter: SourceMeter | None = None, split_long_records: bool = False,
                first_chunks: Callable[[list[Chunk | None]], None] | None = None,
                cache: LapCache | None = None) -> Iterator[Chunk]:
    """Yield the stream's chunks, numbered from 0 (or from ``start.chunk``, which is yielded again).

    ``split_long_records``: the task packs documents, so records longer than a chunk are read as
    pieces (``_sources``). ``first_chunks``, if given, is called once before anything is yielded,
    with the chunk each source gives first (None: that source gives none); every source's first
    file is opened for it, and those chunks are then yielded in their turn, so nothing is read twice.
    ``cache``: the token cache's lap maps, through which chunks already cached are yielded unread
    (``_cache``)."""
    meter = meter or SourceMeter()
    resume = start if start is not None and start.chunk >= 0 else None  # chunk -1: nothing delivered yet
    chunk_ids = itertools.count(resume.chunk if resume else 0)
    first_epoch = resume.epoch if resume else 0
    for epoch in itertools.count(first_epoch) if recipe.epochs is None else range(first_epoch, recipe.epochs):
        point = resume if epoch == first_epoch else None
        laps: list[int] = []  # per source: the lap it is reading
        lap_chunks: list[Iterator[Chunk]] = []  # per source: the rest of that lap's chunks
        exhausted: list[bool] = []
        for j, source in enumerate(recipe.sources):
            where = point.source_start(j) if point else None
            lap = point.source_lap(j) if point else 0
            chunks = _lap_through(cache, recipe, source, j, files[j], epoch, lap, where, on_error, meter,
                                  split_long_records)
            if point and where is not None and j != point.source:
                next(chunks, None)  # that source's last chunk was delivered already
            laps.append(lap)
            lap_chunks.append(chunks)
            exhausted.append(lap > 0)
        if first_chunks is not None:
            heads = [next(chunks, None) for chunks in lap_chunks]
            for j, head in enumerate(heads):
                if head is not None:
                    lap_chunks[j] = itertools.chain([head], lap_chunks[j])
            first_chunks(heads)
            first_chunks = None
        pick = point.pick if point else 0
        if recipe.complete_pass:  # every source once, in turn: a complete pass has nothing to mix
            schedule = _in_turn(exhausted, point.source if point else 0)
        else:
            schedule = weighted_schedule([s.weight for s in recipe.sources])
            for _ in range(pick):
                next(schedule)
        for j in schedule:
            chunk = next(lap_chunks[j], None)
            if chunk is None:
                exhausted[j] = True
                if recipe.complete_pass:
                    continue  # on to the next source
                if recipe.stopping_strategy == "first_exhausted" or all(exhausted):
                    break
                laps[j] += 1
                lap_chunks[j] = _lap_through(cache, recipe, recipe.sources[j], j, files[j], epoch, laps[j], None,
                                             on_error, meter, split_long_records)
                chunk = next(lap_chunks[j], None)
                if chunk is None:
                    break  # a source with no records at all
            yield dataclasses.replace(chunk, id=next(chunk_ids), pick=pick)
            pick += 1
        if pick == 0:
            raise SourceError(f"epoch {epoch} of the sources yielded no chunk: are the files empty? (Under "
                              "node_sharding: chunks, a source needs a chunk per node: lower chunk_bytes.)")


def weighted_schedule(weights: list[float]) -> Iterator[int]:
    """Smooth weighted round-robin: source ``i`` gets ``weights[i] / sum`` of the picks, evenly spread."""
    credit, total = [0.0] * len(weights), sum(weights)
    while True:
        for i, w in enumerate(weights):
            credit[i] += w
        chosen = max(range(len(weights)), key=credit.__getitem__)
        credit[chosen] -= total
        yield chosen


def _in_turn(exhausted: list[bool], first: int) -> Iterator[int]:
    """Sources ``first``, ``first + 1``, ... each picked until it is marked exhausted."""
    for j in range(first, len(exhausted)):
        while not exhausted[j]:
            yield j


def file_order(count: int, seed: int | None, *key: int) -> list[int]:
    """The order in which a lap reads the files: as listed, or shuffled by ``(seed, *key)``."""
    order = list(range(count))
    if seed is not None:
        random.Random(f"ringload-files:{seed}:{':'.join(map(str, key))}").shuffle(order)
    return order


def chunk_at(recipe: Recipe, files: list[list[str]], chunk: Chunk, split_long_records: bool) -> Chunk:
    """``chunk`` with its payload read again from its cursor (for an unread chunk whose cache entry
    turned out missing or damaged): the first chunk of its lap resumed there, as a resume point does."""
    where = (chunk.file_index, chunk.offset, chunk.line, chunk.part)
    found = next(_lap(recipe, recipe.sources[chunk.source], chunk.source, files[chunk.source], chunk.epoch, chunk.lap,
                      where, None, SourceMeter(), split_long_records), None)
    if found is None or (found.file_index, found.offset, found.line, found.part) != where:
        raise SourceError(f"{files[chunk.source][chunk.file_index]}: no chunk starts at byte {chunk.offset} "
                          f"(line {chunk.line}) any more: did the file change while the ring ran?")
    return dataclasses.replace(chunk, payload=found.payload)


def _lap_through(cache: LapCache | None, recipe: Recipe, source: Source, index: int, files: list[str], epoch: int,
                 lap: int, where: tuple[int, int, int, int] | None, on_error: Callable[[SourceError], None] | None,
                 meter: SourceMeter, split_long_records: bool) -> Iterator[Chunk]:
    """``_lap``, through the token cache's lap map if there is a cache."""
    def read(at: tuple[int, int, int, int] | None) -> Iterator[Chunk]:
        return _lap(recipe, source, index, files, epoch, lap, at, on_error, meter, split_long_records)

    return read(where) if cache is None else cache.lap(index, epoch, lap, where, read)


def _lap(recipe: Recipe, source: Source, index: int, files: list[str], epoch: int, lap: int,
         where: tuple[int, int, int, int] | None, on_error: Callable[[SourceError], None] | None,
         meter: SourceMeter, split_long_records: bool) -> Iterator[Chunk]:
    """One pass over a source's files (this node's share of its chunks under ``node_sharding: chunks``),
    from ``where`` = (file index, offset, line, part) if given. ``part`` counts the chunks already
    cut from what starts there: a shuffle window's parts, or else a long record's pieces."""
    buffer = recipe.shuffle_buffer
    order = file_order(len(files), recipe.seed if buffer else None, epoch, index, lap)
    stamp = Chunk(-1, epoch, 0, 0, 1, b"", 0, index, lap)
    begin = order.index(where[0]) if where else 0
    # A shuffle window starts at a record's start (see _shuffled), so its `part` is the window's.
    resume = (where[1], where[2], 0 if buffer else where[3]) if where else None
    blocks = read_blocks(source, files, order[begin:], recipe.chunk_size, stamp, resume, on_error, meter,
                         split_long_records, recipe.max_record_bytes)
    if buffer:
        blocks = _shuffled(blocks, source, buffer, recipe.chunk_size, recipe.seed, where[3] if where else 0)
    if recipe.node_sharding == "chunks" and recipe.nnodes > 1:
        # Node R keeps the lap's chunks R, R + N, R + 2N...; a resumed lap starts at a chunk it kept.
        blocks = itertools.islice(blocks, 0 if where else recipe.node_rank, None, recipe.nnodes)
    return iter(blocks)


def _shuffled(blocks: Iterable[Chunk], source: Source, buffer: int, chunk_bytes: int, seed: int,
              first_part: int) -> Iterator[Chunk]:
    """Shuffle records within windows of at least ``buffer`` records and cut them into chunks again.

    The first window starts at its ``first_part``-th chunk (resuming inside it)."""
    per_file = source.format in ("csv", "tsv")
    separator = b"\n\n" if source.format == "text" and source.text_unit == "paragraph" else b"\n"
    window: list[bytes] = []
    opening = Chunk(-1, 0, 0, 0, 1, b"")
    header = b""

    def flush() -> Iterator[Chunk]:
        nonlocal first_part
        o = opening
        random.Random(f"ringload-window:{seed}:{o.epoch}:{o.source}:{o.lap}:{o.file_index}:{o.offset}").shuffle(window)
        part, pending, size = 0, [], 0
        for record in [*window, None]:
            if record is not None:
                pending.append(record)
                size += len(record) + len(separator)
            if pending and (size >= chunk_bytes or record is None):
                if part >= first_part:
                    yield dataclasses.replace(o, payload=header + separator.join(pending) + separator, part=part,
                                              continues=False)
                part, pending, size = part + 1, [], 0
        first_part = 0
        window.clear()

    for block in blocks:
        if window and per_file and block.file_index != opening.file_index:
            yield from flush()
        if not window:
            opening = block
        body = block.payload
        if per_file:
            cut = body.index(b"\n") + 1
            header, body = body[:cut], body[cut:]
        window.extend(_split_records(body, source))
        if len(window) >= buffer and not block.continues:  # a window never ends inside a long record
            yield from flush()
    if window:
        yield from flush()


_BLANK_LINES = re.compile(rb"\n[ \t\r]*\n")


def _split_records(body: bytes, source: Source) -> list[bytes]:
    """A block's records without their terminators (csv records may span lines; paragraphs do)."""
    if source.format == "text" and source.text_unit == "paragraph":
        return [p.strip(b"\n") for p in _BLANK_LINES.split(body) if p.strip()]
    lines = [line for line in body.split(b"\n") if line.strip()]
    if source.format != "csv":
        return lines
    records, pending = [], []
    for line in lines:
        pending.append(line)
        if sum(part.count(b'"') for part in pending) % 2 == 0:
            records.append(b"\n".join(pending))
            pending = []
    if pending:
        records.append(b"\n".join(pending))
    return records
