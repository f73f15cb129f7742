"""Sources: reading raw records and cutting them into numbered chunks.

The daemon's reader thread is the only reader of the sources: it cuts them, in order, into chunks
of about ``chunk_bytes`` of whole lines (a chunk never spans two files) and numbers them 0, 1, 2...
The chunk sequence is a pure function of the recipe, which is what makes the stream deterministic
whichever producer happens to process a chunk. Producers parse a chunk's lines into records
(``parse_records``), so JSON decoding runs in parallel.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from ._errors import RecipeError
from ._recipe import Source


@dataclass(frozen=True)
class Chunk:
    """A run of whole lines from one file, and where it starts (for messages and resume)."""

    id: int
    epoch: int
    file_index: int
    offset: int  # byte offset of the first line in the (decompressed) file
    line: int  # 1-based line number of the first line
    payload: bytes

    @property
    def cursor(self) -> tuple[int, int, int, int]:
        return self.epoch, self.file_index, self.offset, self.line


@dataclass(frozen=True)
class BadRecord:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def expand_paths(source: Source) -> list[str]:
    """The source's files in a fixed order: each pattern's matches sorted, patterns in recipe order."""
    files: list[str] = []
    for pattern in source.paths:
        opened = fsspec.open_files(pattern, mode="rb", **source.storage_options)
        matches = sorted(of.full_name for of in opened)
        if not matches:
            raise RecipeError(f"source.paths: {pattern!r} matches no file")
        files.extend(matches)
    return files


def read_chunks(source: Source, files: list[str], chunk_bytes: int, epochs: int | None) -> Iterator[Chunk]:
    """Yield the chunks of every file, epoch after epoch (forever if ``epochs`` is None)."""
    chunk_id = itertools.count()
    for epoch in itertools.count() if epochs is None else range(epochs):
        for file_index, path in enumerate(files):
            offset, line = 0, 1
            with fsspec.open(path, mode="rb", compression="infer", **source.storage_options) as stream:
                while True:
                    payload = stream.read(chunk_bytes)
                    if not payload:
                        break
                    if not payload.endswith(b"\n"):
                        payload += stream.readline()  # finish the last line: records never span chunks
                    yield Chunk(next(chunk_id), epoch, file_index, offset, line, payload)
                    offset += len(payload)
                    line += payload.count(b"\n")


def parse_records(chunk: Chunk, source: Source, path: str) -> tuple[list[str], list[BadRecord]]:
    """Split a chunk into example texts; lines that cannot be read become ``BadRecord``s."""
    texts: list[str] = []
    bad: list[BadRecord] = []
    lines = chunk.payload.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    jsonl = source.format == "jsonl"
    for number, raw in enumerate(lines, chunk.line):
        if not raw.strip():
            continue  # blank lines separate nothing in these formats; they are not examples
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad.append(BadRecord(path, number, f"invalid UTF-8 at byte {exc.start}"))
            continue
        if not jsonl:
            texts.append(line.rstrip("\r"))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(BadRecord(path, number, f"malformed JSON ({exc.msg} at column {exc.colno})"))
            continue
        text = obj.get(source.field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            why = "missing" if not isinstance(obj, dict) or source.field not in obj else f"a {type(text).__name__}, not text"
            bad.append(BadRecord(path, number, f"field {source.field!r} is {why}"))
        elif not text.strip():
            bad.append(BadRecord(path, number, f"field {source.field!r} is empty"))
        else:
            texts.append(text)
    return texts, bad
