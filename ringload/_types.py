"""Values every side of a ring agrees on, with one owner each and no dependency beyond the standard
library, so that any module (the consumer in a training process included) can import them cheaply.

* :class:`Cursor`: where a chunk starts in its source. The daemon's pipe to a producer, the slot
  header and the resume point carry it as :meth:`Cursor.words`; nothing else packs it.
* :class:`ResumePoint`: where a stream stands after the last delivered batch. A consumer's
  position record (``_layout``) and a checkpoint (``_resume``) carry it as :meth:`ResumePoint.words`,
  and :meth:`ResumePoint.advance` is the one rule that moves it when a batch is delivered.
* :class:`Dealing`: which rank gets which batch of a chunk (the rule ``_lanes`` describes). The
  producer, the consumer, the daemon and ``ringload plan`` all ask it.
* :class:`Records` and :class:`BadRecord`: what parsing a chunk gives the tasks (``_sources``
  parses, ``_tasks`` shape), so that tasks need no I/O module.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

CURSOR_WORDS = 8  # Cursor's fields, as the slot header and the pipe to a producer carry them

# Limits a recipe, the command line and the ring's geometry share (each written once, here):
MAX_SOURCES = 8  # sources of one recipe; the resume point has room for each one's cursor
MAX_LANES = 256  # producers times consumer ranks per node: one lane each
MAX_RANKS = 64  # consumer ranks per node
MIN_SLOTS = 2  # per lane: one being written while the consumer holds another
MAX_SLOTS = 1 << 16


class Cursor(NamedTuple):
    """Where a chunk starts: everything but its id and payload that identifies it in the stream.
    (A named tuple: the consumer reads one per batch, and a tuple is the cheapest object to make.)"""

    epoch: int = 0
    file_index: int = 0  # in its source's file list
    offset: int = 0  # byte offset of the first record in the (decompressed) file
    line: int = 1  # 1-based line number of the first record
    part: int = 0  # with shuffle: the chunk's place in its window; for a long record: its piece
    source: int = 0  # which of the recipe's sources
    lap: int = 0  # the source's pass within the epoch
    pick: int = 0  # the chunk's number within its epoch

    def words(self) -> tuple[int, ...]:
        return tuple(self)

    @classmethod
    def from_words(cls, words: Iterable[int]) -> Cursor:
        return cls(*words)


# Per source in a resume point: seen (0/1) | lap | file_index | offset | line | part of the last
# chunk of that source in the epoch so far.
SOURCE_CURSOR_WORDS = 6
_UNSEEN = (0, 0, 0, 0, 1, 0)


@dataclass(frozen=True)
class ResumePoint:
    """Where a stream stands after the last delivered batch (``chunk`` -1: before the first)."""

    chunk: int = -1
    skip: int = 0  # batches of ``chunk`` delivered (by all ranks together)
    epoch: int = 0
    pick: int = 0
    source: int = 0
    sources: tuple[tuple[int, ...], ...] = (_UNSEEN,) * MAX_SOURCES  # per source: seen, lap, file, offset, line, part

    WORDS: ClassVar[int] = 5 + MAX_SOURCES * SOURCE_CURSOR_WORDS

    def words(self) -> tuple[int, ...]:
        return (self.chunk, self.skip, self.epoch, self.pick, self.source, *itertools.chain(*self.sources))

    @classmethod
    def from_words(cls, words: Iterable[int]) -> ResumePoint:
        w = list(words)
        n = SOURCE_CURSOR_WORDS
        chunk, skip, epoch, pick, source = w[:5]
        return cls(chunk, skip, epoch, pick, source,
                   tuple(tuple(w[5 + i * n:5 + (i + 1) * n]) for i in range(MAX_SOURCES)))

    @staticmethod
    def advance(words: list[int], chunk: int, skip: int, cursor: Cursor) -> None:
        """Move the resume point held as ``words`` (a list, updated in place: the consumer does this
        per batch) past a delivered batch of chunk ``chunk`` that starts at ``cursor``, ``skip``
        batches of it delivered by all ranks together."""
        if cursor.epoch != words[2]:
            words[5:] = _UNSEEN * MAX_SOURCES  # a new epoch: no source has been seen in it yet
        words[:5] = chunk, skip, cursor.epoch, cursor.pick, cursor.source
        at = 5 + cursor.source * SOURCE_CURSOR_WORDS
        words[at:at + SOURCE_CURSOR_WORDS] = 1, cursor.lap, cursor.file_index, cursor.offset, cursor.line, cursor.part

    def source_start(self, source: int) -> tuple[int, int, int, int] | None:
        """(file_index, offset, line, part) of that source's last chunk so far in the epoch, or None."""
        seen, _, file_index, offset, line, part = self.sources[source]
        return (file_index, offset, line, part) if seen else None

    def source_lap(self, source: int) -> int:
        return self.sources[source][1]

    def to_json(self, n_sources: int) -> dict[str, Any]:
        return {"chunk": self.chunk, "skip": self.skip, "epoch": self.epoch, "pick": self.pick, "source": self.source,
                "sources": [list(s) for s in self.sources[:n_sources]]}

    @classmethod
    def from_json(cls, data: Any) -> ResumePoint:
        """The resume point of a checkpoint; ValueError if it is malformed."""
        try:
            sources = [tuple(int(v) for v in s) for s in data["sources"]]
            if not 1 <= len(sources) <= MAX_SOURCES or any(len(s) != SOURCE_CURSOR_WORDS for s in sources):
                raise ValueError
            sources += [_UNSEEN] * (MAX_SOURCES - len(sources))
            return cls(int(data["chunk"]), int(data["skip"]), int(data["epoch"]), int(data["pick"]),
                       int(data["source"]), tuple(sources))
        except (KeyError, TypeError, ValueError):
            raise ValueError("the state's resume point is malformed") from None


@dataclass(frozen=True)
class Dealing:
    """How a chunk's batches are dealt to ranks (``_lanes`` explains why): its batches are cut to a
    multiple of ``ranks`` (``pads``, a complete pass: padded up to one, ``_complete``), batch ``i``
    goes to dealt rank ``i % ranks``, and this node's local rank ``r`` is dealt rank ``first + r``.
    So a local rank's batches of a chunk are indexes ``first + r``, ``first + r + ranks``, ... and
    every rank gets as many of each chunk."""

    ranks: int = 1
    first: int = 0
    pads: bool = False

    def first_index(self, local_rank: int) -> int:
        """The index of a local rank's first batch of every chunk."""
        return self.first + local_rank

    def local_rank(self, index: int) -> int:
        """The local rank that batch ``index`` goes to (outside ``range(ranks on this node)``: another node's)."""
        return index % self.ranks - self.first

    def per_rank(self, batches: int) -> int:
        """How many of a chunk's ``batches`` each rank gets."""
        return -(-batches // self.ranks) if self.pads else batches // self.ranks

    def padding(self, batches: int) -> int:
        """Padding batches that follow a chunk's ``batches`` so that every rank gets as many."""
        return -batches % self.ranks if self.pads else 0

    def delivered_through(self, index: int) -> int:
        """Batches of a chunk delivered by all ranks together once batch ``index`` has been (ranks move
        in step: the end of its group of one batch per rank)."""
        return (index // self.ranks + 1) * self.ranks

    def due_after(self, chunk: int, index: int, last_in_chunk: bool, local_rank: int) -> tuple[int, int]:
        """(chunk, index) of a local rank's batch due after batch ``index`` of ``chunk``."""
        return (chunk + 1, self.first + local_rank) if last_in_chunk else (chunk, index + self.ranks)

    def to_dict(self) -> dict[str, int]:
        return {"ranks": self.ranks, "first": self.first, "pads": self.pads}


@dataclass(frozen=True)
class BadRecord:
    """A record that was skipped (or, in ``Records.truncated``, shortened), where it is and why."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class Records:
    """A chunk's examples: texts, optional second texts (pairs) and optional labels."""

    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list[Any] | None = None
    truncated: list[BadRecord] = field(default_factory=list)  # examples cut to max_record_bytes
    lines: list[int] = field(default_factory=list)  # each record's 1-based line in its file (parquet: row + 1)
    ids: list[str] | None = None  # each record's ``id_field`` value, as text (complete passes)

    def __len__(self) -> int:
        return len(self.texts)
