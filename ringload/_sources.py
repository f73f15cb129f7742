"""Sources: opening files, cutting them into blocks of whole records, and parsing records.

The daemon's reader thread is the only reader of the sources: it cuts each file, in order, into
blocks of about ``chunk_bytes`` of whole records (a block never spans two files; where a block
ends depends only on where it starts). ``_stream`` orders, shuffles and mixes the blocks into the
numbered chunks of the stream. Producers parse a chunk into records (``parse_records``), so JSON
and CSV decoding run in parallel.

Formats: ``text`` (one example per line), ``jsonl`` (one JSON object per line, the text under
``field``), ``cirrussearch`` (Elasticsearch bulk lines as in Wikipedia's CirrusSearch dumps: action
lines ``{"index": ...}`` are skipped, documents give ``field``), ``csv``/``tsv`` (a header line
names the columns; csv fields may be quoted and span lines, so a csv chunk ends only where the
count of quote characters is even; every csv/tsv chunk carries the header line in front),
``parquet`` (read a row group at a time with pyarrow; its rows travel as JSON lines).

Long records. A chunk's cost is what keeps producers in step: the consumer delivers chunks in
order, so while one producer works on a chunk much larger than the others, the rest fill their
lanes with later chunks and then wait (a convoy). So where a task packs documents into rows
(``split_long_records``), a record longer than ``chunk_bytes`` in a line format (text, jsonl,
cirrussearch) is cut at whitespace into pieces of about ``chunk_bytes``, each its own chunk and,
for the task, its own document; packing already cuts documents across rows, so rows barely
change. A piece's cursor is the record's start (offset, line) and its ``part``, the piece's
index: the cut points depend only on the record, so reading resumes at any piece.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import fsspec.compression
import fsspec.utils

from ._errors import RecipeError
from ._http import MeteredFile, RemoteReadError, SourceMeter, open_url
from ._recipe import Source
from ._types import BadRecord, Cursor, Records


@dataclass(frozen=True)
class Chunk:
    """A run of whole records of one source, and where it starts (for messages and resume)."""

    id: int
    epoch: int
    file_index: int  # in its source's file list
    offset: int  # byte offset of the first record in the (decompressed) file
    line: int  # 1-based line number of the first record
    payload: bytes  # whole records; for csv/tsv the file's header line comes first
    part: int = 0  # with shuffle: the chunk's place among those cut from its shuffle window
    source: int = 0  # which of the recipe's sources
    lap: int = 0  # the source's pass within the epoch (all_exhausted restarts a source that ran out)
    pick: int = 0  # the chunk's number within its epoch
    continues: bool = False  # a piece of a long record that is not its last (never crosses the pipe)

    @property
    def cursor(self) -> Cursor:
        """Everything but the id and the payload, as the slot header and the pipe carry it."""
        return Cursor(self.epoch, self.file_index, self.offset, self.line, self.part, self.source, self.lap, self.pick)

    @classmethod
    def at(cls, chunk_id: int, cursor: Cursor, payload: bytes) -> Chunk:
        """The chunk ``chunk_id`` that starts at ``cursor``."""
        return cls(chunk_id, cursor.epoch, cursor.file_index, cursor.offset, cursor.line, payload, cursor.part,
                   cursor.source, cursor.lap, cursor.pick)


def bad_record_stop(record: BadRecord) -> ValueError:
    """The error that stops a ring at its first bad record (``on_bad_record: fail``)."""
    return ValueError(f"bad record at {record} (set on_bad_record: skip in the recipe to skip such records)")


def record_origin(chunk: Chunk, files: list[list[str]], shuffled: bool) -> tuple[str, Chunk]:
    """The file name and the chunk to number lines from, for messages about the chunk's records.

    Shuffled records come from a permuted window, so they are numbered within their chunk."""
    path = files[chunk.source][chunk.file_index]
    if not shuffled:
        return path, chunk
    return (f"{path} (shuffle window from line {chunk.line}, part {chunk.part}; lines of that part)",
            dataclasses.replace(chunk, line=1))


def expand_paths(source: Source) -> list[str]:
    """The source's files in a fixed order: each pattern's matches sorted, patterns in recipe order."""
    files: list[str] = []
    for pattern in source.paths:
        if "::" in pattern or not any(c in pattern for c in "*?["):
            if "://" not in pattern and not os.path.exists(pattern):
                raise RecipeError(f"source.paths: {pattern!r} matches no file")
            files.append(pattern)  # a plain path or URL, or a chained URL that globbing would cut
            continue
        opened = fsspec.open_files(pattern, mode="rb", **source.storage_options)
        matches = sorted(of.full_name for of in opened)
        if not matches:
            raise RecipeError(f"source.paths: {pattern!r} matches no file")
        files.extend(matches)
    return files


class SourceError(OSError):
    """A file could not be read to its end; the message names the file and the byte offset."""


def read_blocks(source: Source, files: list[str], order: list[int], chunk_bytes: int, stamp: Chunk,
                resume: tuple[int, int, int] | None, on_error: Callable[[SourceError], None] | None,
                meter: SourceMeter, split_long_records: bool = False,
                max_record_bytes: int | None = None) -> Iterator[Chunk]:
    """Blocks of about ``chunk_bytes`` of whole records (a block never spans two files), reading
    ``files`` in ``order``; each block copies ``stamp``'s epoch, source and lap (its id is unset).

    ``resume`` = (byte offset, line, part) where reading starts in the first file (``part``: pieces
    of a long record already read there). ``split_long_records``: cut records longer than
    ``chunk_bytes`` into pieces (see the module docstring), except those over ``max_record_bytes``,
    which stay whole for the producer's ``on_long_record`` policy (skip, truncate or fail). A file that
    breaks off (truncated or corrupt compression, unreadable) raises ``SourceError``, or, given
    ``on_error``, is reported to it and the rest of that file skipped."""

    def block(file_index: int, offset: int, line: int, payload: bytes, part: int = 0, continues: bool = False) -> Chunk:
        return dataclasses.replace(stamp, file_index=file_index, offset=offset, line=line, payload=payload, part=part,
                                   continues=continues)

    splits = split_long_records and source.format in SPLITTABLE_FORMATS
    for position, file_index in enumerate(order):
        first = resume if position == 0 else None
        offset = 0
        if source.format == "parquet":
            first_row = first[0] if first else 0
            for rows_at, payload in _parquet_payloads(files[file_index], source, chunk_bytes, first_row):
                yield block(file_index, rows_at, rows_at + 1, payload)
            continue
        try:
            with open_source(files[file_index], source, meter) as stream:
                header = stream.readline() if source.format in ("csv", "tsv") else b""
                offset, line = len(header), 1 + bool(header)
                pieces_read = 0
                if first:
                    _skip_to(stream, first[0], offset)
                    offset, line, pieces_read = first
                while True:
                    payload = stream.read(chunk_bytes)
                    if not payload:
                        break
                    payload = _complete_records(stream, payload, source)
                    at = _last_record_start(payload, source) if splits else 0
                    long = splits and (max_record_bytes is None or len(payload) - at <= max_record_bytes)
                    pieces = _record_pieces(payload[at:], source, chunk_bytes) if long else None
                    if pieces is None:
                        yield block(file_index, offset, line, header + payload)
                    else:  # the block ends before the long record, which follows as pieces
                        if at:
                            yield block(file_index, offset, line, payload[:at])
                            offset += at
                            line += payload.count(b"\n", 0, at)
                        for part, piece in enumerate(pieces[pieces_read:], pieces_read):
                            yield block(file_index, offset, line, piece, part, continues=part < len(pieces) - 1)
                        payload = payload[at:]
                    pieces_read = 0
                    offset += len(payload)
                    line += payload.count(b"\n")
        except RemoteReadError:
            raise  # the network gave out: retrying is exhausted, nothing to skip to
        except Exception as exc:  # truncated gzip, corrupt bz2, a file gone missing...
            error = SourceError(f"{files[file_index]}: unreadable after byte {offset}: {type(exc).__name__}: {exc}")
            if on_error is None:
                raise error from exc
            on_error(error)


def _parquet_payloads(path: str, source: Source, chunk_bytes: int, first_row: int) -> Iterator[tuple[int, bytes]]:
    """(first row, JSON lines) per chunk of a parquet file, read one row group at a time.

    Parquet chunks are rows re-encoded as JSON lines, so producers parse them as jsonl; a chunk's
    offset and line are its first row's index (and index + 1, for messages).
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RecipeError("source.format: parquet needs pyarrow (pip install 'ringload[parquet]')") from None
    columns = [c for c in (source.field, source.pair_field, source.label_field) if c]
    # Not the resumable HTTP reader: pyarrow seeks (the footer first, then each row group's columns), and
    # ResumableHTTPFile is forward-only by design, resuming one sequential read at its offset. fsspec's
    # file serves the seeks with range requests; a connection it cannot recover fails the ring.
    with fsspec.open(path, mode="rb", **source.storage_options) as stream:
        parquet = pq.ParquetFile(stream)
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise RecipeError(f"{path}: column {missing[0]!r} is not in the parquet schema "
                              f"({', '.join(parquet.schema_arrow.names)})")
        row, lines, size, chunk_start = 0, [], 0, first_row
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            if row + count <= first_row:
                row += count
                continue
            records = parquet.read_row_group(group, columns=columns).to_pylist()
            for record in records[max(0, first_row - row):]:
                line = json.dumps(record, ensure_ascii=False).encode() + b"\n"
                lines.append(line)
                size += len(line)
                if size >= chunk_bytes:
                    yield chunk_start, b"".join(lines)
                    chunk_start += len(lines)
                    lines, size = [], 0
            row += count
        if lines:
            yield chunk_start, b"".join(lines)


@contextlib.contextmanager
def open_source(path: str, source: Source, meter: SourceMeter | None = None) -> Iterator[Any]:
    """A binary stream of the file's (decompressed) bytes; HTTP(S) reads resume after dropped connections.

    ``meter`` counts the bytes read as stored, and the file's size."""
    meter = meter or SourceMeter()
    with contextlib.ExitStack() as stack:
        if path.startswith(("http://", "https://")):
            stream = stack.enter_context(open_url(path, source.retries, source.timeout, meter))
        else:
            opened = stack.enter_context(fsspec.open(path, mode="rb", **source.storage_options))
            meter.listed += _size_of(opened)
            stream = stack.enter_context(io.BufferedReader(MeteredFile(opened, meter), buffer_size=1 << 20))
        compression = fsspec.utils.infer_compression(path.split("::")[0])  # zip://member::archive: the member's
        if compression:
            stream = stack.enter_context(fsspec.compression.compr[compression](stream, mode="rb"))
        yield stream


def _size_of(opened: Any) -> int:
    """The stored size of an open fsspec file, or 0 if its filesystem cannot tell."""
    try:
        return int(getattr(opened, "size", None) or opened.fs.size(opened.path) or 0)
    except Exception:  # noqa: BLE001 - a size is only reported, never needed
        return 0


def _skip_to(stream: Any, offset: int, position: int) -> None:
    """Move a stream forward to ``offset``: seek where possible, else read and discard."""
    try:
        stream.seek(offset)
        return
    except (OSError, io.UnsupportedOperation):
        pass
    while position < offset:
        skipped = stream.read(min(1 << 20, offset - position))
        if not skipped:
            raise EOFError(f"the source ended at byte {position}, before the checkpoint's byte {offset}")
        position += len(skipped)


def _complete_records(stream: Any, payload: bytes, source: Source) -> bytes:
    """Extend a block to the end of its last record: records never span chunks."""
    if not payload.endswith(b"\n"):
        payload += stream.readline()
    # In csv a quoted field may hold newlines; a record ends at a newline after an even number of quotes.
    while source.format == "csv" and payload.count(b'"') % 2:
        more = stream.readline()
        if not more:
            break
        payload += more
    # A paragraph ends at a blank line.
    while source.format == "text" and source.text_unit == "paragraph" and payload.rstrip(b"\r\n").strip():
        more = stream.readline()
        payload += more
        if not more or not more.strip():
            break
    return payload


SPLITTABLE_FORMATS = ("text", "jsonl", "cirrussearch")
_PARAGRAPH_END = re.compile(rb"\n[ \t\r]*\n")
_WHITESPACE = re.compile(rb"[ \t\r\n]")


def _last_record_start(payload: bytes, source: Source) -> int:
    """Offset in ``payload`` (whole records) where its last record begins."""
    body = payload.rstrip(b"\r\n")
    if source.format == "text" and source.text_unit == "paragraph":
        ends = [m.end() for m in _PARAGRAPH_END.finditer(body)]
        return ends[-1] if ends else 0
    return body.rfind(b"\n") + 1


def _record_pieces(record: bytes, source: Source, size: int) -> list[bytes] | None:
    """A record longer than ``size`` bytes as records of about ``size`` bytes of its text, cut at
    whitespace; None if it is not that long or has no text to cut (it then stays whole)."""
    if len(record) <= size:
        return None
    terminator = record[len(record.rstrip(b"\r\n")):]
    if source.format == "text":
        texts = _cut_at_whitespace(record[:len(record) - len(terminator)], size)
        return None if texts is None else [t + (b"\n\n" if source.text_unit == "paragraph" else b"\n") for t in texts]
    try:
        obj = json.loads(record)
    except ValueError:
        return None  # a bad record: the producer reports it
    text = obj.get(source.field) if isinstance(obj, dict) else None
    texts = _cut_at_whitespace(text.encode(), size) if isinstance(text, str) else None
    if texts is None:
        return None
    # Cut at ASCII whitespace, so every piece is whole UTF-8; the record's other fields go with each piece.
    return [json.dumps({**obj, source.field: t.decode()}, ensure_ascii=False).encode() + b"\n" for t in texts]


def _cut_at_whitespace(text: bytes, size: int) -> list[bytes] | None:
    """``text`` in pieces of at most about ``size`` bytes, each ending before a whitespace byte
    (the last whitespace before ``size``, else the first after it). None if it cannot be cut."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = max(text.rfind(b" ", start + 1, start + size), text.rfind(b"\n", start + 1, start + size),
                  text.rfind(b"\t", start + 1, start + size))
        if cut <= start:
            found = _WHITESPACE.search(text, start + size)
            if found is None:
                break
            cut = found.start()
        if text[start:cut].strip():
            pieces.append(text[start:cut])
            start = cut
        else:
            start = cut + 1
    if text[start:].strip():
        pieces.append(text[start:])
    return pieces if len(pieces) > 1 else None


@dataclass(frozen=True)
class Hooks:
    """The recipe's ``source.filter`` / ``source.map`` functions (``module:function``), imported."""

    keep: Callable[[dict[str, Any]], bool] | None = None
    change: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    @classmethod
    def load(cls, source: Source) -> Hooks:
        return cls(import_hook(source.filter, "source.filter"), import_hook(source.map, "source.map"))


def import_hook(spec: str | None, key: str) -> Callable[..., Any] | None:
    """Import ``module:function``; the only way recipes run user code."""
    if spec is None:
        return None
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RecipeError(f"{key}: cannot import {spec!r}: {exc}") from None
    if not callable(function):
        raise RecipeError(f"{key}: {spec!r} is not callable")
    return function


def parse_records(chunk: Chunk, source: Source, path: str, convert_label: Callable[[Any], Any] | None = None,
                  hooks: Hooks = Hooks(), max_record_bytes: int | None = None,
                  on_long_record: str = "skip", id_field: str | None = None) -> tuple[Records, list[BadRecord]]:
    """Split a chunk into examples; records that cannot be read become ``BadRecord``s.

    ``hooks`` filter and rewrite each raw record (a dict) first. ``convert_label`` (from the task)
    turns a raw label into what the task stores, raising ``ValueError`` for a label it cannot use,
    which makes the record bad. A record (line, paragraph or csv row as stored) longer than
    ``max_record_bytes`` is bad (``on_long_record: skip``) or raises ``ValueError`` (``fail``);
    under ``truncate`` its texts are cut to that many bytes and it is listed in ``truncated``.
    ``id_field`` names the field whose value (a string or a number) is each record's id; a record
    without one is bad.
    """
    limit = max_record_bytes if on_long_record != "truncate" else None
    if source.format in ("csv", "tsv"):
        rows = _csv_rows(chunk, source, path, limit)
    else:
        rows = _line_rows(chunk, source, limit)
    if hooks.keep or hooks.change:
        rows = _hooked(rows, hooks)
    pair_field, label_field = source.pair_field, source.label_field
    # Filled below; Records holds them only if the source has the field.
    pairs: list[str] = []
    labels: list[Any] = []
    ids: list[str] = []
    records = Records(pairs=pairs if pair_field is not None else None,
                      labels=labels if label_field is not None else None, ids=ids if id_field is not None else None)
    cut_at = max_record_bytes if on_long_record == "truncate" else None
    bad: list[BadRecord] = []
    for number, row in rows:
        if isinstance(row, _TooLong):
            reason = f"record of {row.size:,} bytes is longer than max_record_bytes ({max_record_bytes:,})"
            if on_long_record == "fail":
                raise ValueError(f"{path}:{number}: {reason} (on_long_record: fail; set it to skip or truncate "
                                 "in the recipe to go on without such records)")
            row = reason
        if isinstance(row, str):  # a reason the row could not even be decoded
            bad.append(BadRecord(path, number, row))
            continue
        if row is None:
            continue  # not an example: blank line, cirrussearch action line
        try:
            text = _text_of(row, source.field)
            pair = _text_of(row, pair_field) if pair_field is not None else None
            if label_field is not None:
                if label_field not in row or row[label_field] is None:
                    raise ValueError(f"label field {label_field!r} is missing")
                label = row[label_field]
                label = convert_label(label) if convert_label else label
            if id_field is not None:
                record_id = _id_of(row, id_field)
        except ValueError as exc:
            bad.append(BadRecord(path, number, str(exc)))
            continue
        if cut_at is not None:
            text, pair, note = _truncated(text, pair, source, cut_at)
            if note:
                records.truncated.append(BadRecord(path, number, note))
        records.texts.append(text)
        records.lines.append(number)
        if id_field is not None:
            ids.append(record_id)
        if pair is not None:
            pairs.append(pair)
        if label_field is not None:
            labels.append(label)
    return records, bad


@dataclass(frozen=True)
class _TooLong:
    """A raw record longer than ``max_record_bytes``, left undecoded."""

    size: int


def _truncated(text: str, pair: str | None, source: Source, limit: int) -> tuple[str, str | None, str | None]:
    """``text`` and ``pair`` cut to at most ``limit`` bytes of UTF-8 each, at a character boundary,
    and a note saying what was cut (None if nothing was)."""
    notes: list[str] = []

    def cut(name: str | None, value: str) -> str:
        encoded = value.encode("utf-8", "surrogatepass")
        if len(encoded) <= limit:
            return value
        notes.append(f"field {name!r} of {len(encoded):,} bytes")
        return encoded[:limit].decode("utf-8", "ignore")  # drops only a character that the cut split

    text, pair = cut(source.field, text), None if pair is None else cut(source.pair_field, pair)
    return text, pair, f"{' and '.join(notes)} cut to max_record_bytes ({limit:,})" if notes else None


def _hooked(rows: Iterator[tuple[int, Any]], hooks: Hooks) -> Iterator[tuple[int, Any]]:
    for number, row in rows:
        if isinstance(row, dict):
            try:
                if hooks.keep and not hooks.keep(row):
                    row = None
                elif hooks.change:
                    row = hooks.change(row)
                    if not isinstance(row, dict):
                        row = f"source.map returned a {type(row).__name__}, not a record (dict)"
            except Exception as exc:  # user code: its failure makes this record bad, not the run
                row = f"a source hook raised {type(exc).__name__}: {exc}"
        yield number, row


def _id_of(row: dict[str, Any], key: str) -> str:
    """A record's id: its ``key`` field, a string or an integer, as text."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"id field {key!r} is missing or not a string or an integer (got {value!r})")
    return str(value)


def _text_of(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        why = "missing" if key not in row else f"a {type(value).__name__}, not text"
        raise ValueError(f"field {key!r} is {why}")
    if not value.strip():
        raise ValueError(f"field {key!r} is empty")
    if not value.isascii():
        try:
            value.encode("utf-8")  # JSON may escape half of a surrogate pair; no tokenizer takes that
        except UnicodeEncodeError as exc:
            raise ValueError(f"field {key!r} holds an unpaired surrogate (\\u{ord(value[exc.start]):04x}) at "
                             f"character {exc.start}") from None
    return value


def _line_rows(chunk: Chunk, source: Source,
               limit: int | None) -> Iterator[tuple[int, dict[str, Any] | str | _TooLong | None]]:
    """(line number, row) for line formats; a row is a dict, None to skip, or a str saying why it is bad."""
    lines = chunk.payload.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    if source.format == "text" and source.text_unit == "paragraph":
        yield from _paragraphs(lines, chunk.line, source.field, limit)
        return
    for number, raw in enumerate(lines, chunk.line):
        if not raw.strip():
            yield number, None  # blank lines separate nothing in these formats; they are not examples
            continue
        if limit is not None and len(raw) > limit:
            yield number, _TooLong(len(raw))
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, f"invalid UTF-8 at byte {exc.start}"
            continue
        if source.format == "text":
            yield number, {source.field: line.rstrip("\r")}
            continue  # jsonl, cirrussearch, and parquet rows re-encoded as JSON lines
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, f"malformed JSON ({exc.msg} at column {exc.colno})"
            continue
        if not isinstance(obj, dict):
            yield number, f"a JSON {type(obj).__name__}, not an object"
        elif source.format == "cirrussearch" and set(obj) <= {"index", "create", "update", "delete"}:
            yield number, None  # the bulk action line before each document
        else:
            yield number, obj


def _paragraphs(lines: list[bytes], first: int, field_name: str,
                limit: int | None) -> Iterator[tuple[int, dict[str, Any] | str | _TooLong | None]]:
    """Blank-line-separated paragraphs, each one example (its lines joined by newlines)."""
    start = first
    block: list[bytes] = []
    for number, raw in enumerate([*lines, b""], first):
        if raw.strip():
            if not block:
                start = number
            block.append(raw.rstrip(b"\r"))
            continue
        if block:
            paragraph = b"\n".join(block)
            block = []
            if limit is not None and len(paragraph) > limit:
                yield start, _TooLong(len(paragraph))
                continue
            try:
                yield start, {field_name: paragraph.decode("utf-8")}
            except UnicodeDecodeError as exc:
                yield start, f"invalid UTF-8 at byte {exc.start} of the paragraph"


def _csv_rows(chunk: Chunk, source: Source, path: str,
              limit: int | None) -> Iterator[tuple[int, dict[str, Any] | str | _TooLong | None]]:
    """(line number, row) of a csv/tsv chunk, whose first line is the file's header.

    The whole chunk is decoded and parsed at once; if some record is not valid UTF-8 or not valid
    csv (or records must be measured against ``limit``), it is split into records first (a record
    ends at a newline after an even number of quote characters, as chunks do) and each is decoded
    and parsed on its own, so a broken record costs only itself."""
    tsv = source.format == "tsv"
    dialect: dict[str, Any] = {"delimiter": "\t" if tsv else ",",
                               "quoting": csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL}
    header_end = chunk.payload.find(b"\n") + 1 or len(chunk.payload)
    try:
        header_line = chunk.payload[:header_end].decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:1: the header line is not valid UTF-8 (byte {exc.start})") from None
    header = next(csv.reader(io.StringIO(header_line, newline=""), **dialect), [])
    missing = [k for k in (source.field, source.pair_field, source.label_field) if k and k not in header]
    if missing:
        raise ValueError(f"{path}: column {missing[0]!r} is not in the header ({', '.join(header)}); "
                         "set source.field / pair_field / label_field to one of these")
    body = chunk.payload[header_end:]
    whole = _csv_parsed_whole(body, header, dialect, chunk.line) if limit is None else None
    if whole is not None:
        yield from whole
        return
    for offset, raw in _csv_records(body, quoted=not tsv):
        number = chunk.line + offset
        if limit is not None and len(raw) > limit:
            yield number, _TooLong(len(raw))
            continue
        try:
            fields = next(csv.reader(io.StringIO(raw.decode("utf-8"), newline=""), **dialect), [])
        except UnicodeDecodeError as exc:
            yield number, f"invalid UTF-8 at byte {exc.start} of the record"
            continue
        except csv.Error as exc:
            yield number, f"malformed {source.format} ({exc})"
            continue
        yield number, _csv_row(fields, header)


def _csv_parsed_whole(body: bytes, header: list[str], dialect: dict[str, Any],
                      first_line: int) -> list[tuple[int, dict[str, Any] | str | None]] | None:
    """The rows of a csv/tsv body decoded and parsed in one go, or None if a record is broken."""
    try:
        reader = csv.reader(io.StringIO(body.decode("utf-8"), newline=""), **dialect)
        rows, consumed = [], 0
        for fields in reader:
            rows.append((first_line + consumed, _csv_row(fields, header)))
            consumed = reader.line_num
        return rows
    except (UnicodeDecodeError, csv.Error):
        return None


def _csv_row(fields: list[str], header: list[str]) -> dict[str, Any] | str | None:
    if not any(fields):
        return None  # a blank line, or a row of empty fields: not an example
    if len(fields) != len(header):
        return f"{len(fields)} fields where the header has {len(header)}"
    return dict(zip(header, fields, strict=True))


def _csv_records(body: bytes, quoted: bool) -> Iterator[tuple[int, bytes]]:
    """(line offset, bytes) of each record of a csv/tsv body; in csv a quoted field may hold newlines."""
    lines = body.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    first, quotes = 0, 0
    pending: list[bytes] = []
    for offset, line in enumerate(lines):
        if not pending:
            first = offset
        pending.append(line)
        quotes += line.count(b'"') if quoted else 0
        if quotes % 2 == 0:
            yield first, b"\n".join(pending)
            pending, quotes = [], 0
    if pending:
        yield first, b"\n".join(pending)
