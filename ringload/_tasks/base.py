"""The task interface, the tokenizer wrapper, and the packing the language-model tasks share."""

from __future__ import annotations

import bisect
import itertools
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .._errors import RecipeError
from .._layout import Field
from .._types import Records
from .engines import EngineChoice, EngineSwitch

TOKENIZE_PIECE = 512  # texts per encode_batch call: large enough for the Rust fast path, small for latency


@dataclass
class PendingBatch:
    """A batch whose rows are ready; ``write`` fills a slot's arrays with it."""

    write: Callable[[dict[str, np.ndarray]], None]
    rows: int
    tokens: int  # real (non-padding) tokens
    records_done: int  # records of the chunk fully consumed once this batch is delivered
    # Complete passes (``_complete``): the chunk's record in each row, in row order; rows after them
    # are padding. None for the batches of a training stream.
    records: np.ndarray | None = None
    width: int = 0  # columns up to the batch's longest row (what ``connect(..., trim=True)`` keeps)


class TokenLists(Sequence[np.ndarray]):
    """Documents' token ids end to end (``tokens``, int32) and each document's length: the form the
    token cache stores and serves (``_cache``). ``lists[i]`` is document i's ids, a view."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray):
        self.tokens, self.lengths = tokens, lengths
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])

    @classmethod
    def from_lists(cls, ids: list[list[int]]) -> TokenLists:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return cls(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum())), lengths)

    @classmethod
    def concatenate(cls, parts: list[TokenLists]) -> TokenLists:
        if not parts:
            return cls(np.empty(0, dtype=np.int32), np.empty(0, dtype=np.int64))
        return cls(np.concatenate([p.tokens for p in parts]), np.concatenate([p.lengths for p in parts]))

    def slice(self, start: int, stop: int) -> TokenLists:
        """Documents ``start`` to ``stop`` (views, no copy)."""
        return TokenLists(self.tokens[self.offsets[start]:self.offsets[stop]], self.lengths[start:stop])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        bounds = self.offsets.tolist()
        return (self.tokens[a:b] for a, b in itertools.pairwise(bounds))


Ids = list[int] | np.ndarray  # one document's token ids
DocumentIds = Sequence[Ids]  # the ids of a run of documents: lists from the tokenizer, TokenLists from the cache


class IdsTap(Protocol):
    """Stands between a task and the tokenizer for one chunk (``_cache.TokenTap``: records what the
    tokenizer returns, or replays a cached chunk's ids without tokenizing)."""

    def ids(self, texts: list[str], encode: Callable[[list[str]], list[list[int]]]) -> TokenLists: ...

    def words_of(self, texts: list[str], encode: Callable[[list[str]], tuple[list[list[int]], list[list[bool]]]]
                 ) -> tuple[TokenLists, list[list[bool]]]: ...


class TokenizerInfo:
    """A HuggingFace tokenizer with truncation and padding off, and the special tokens tasks need.

    ``path`` is a ``tokenizer.json``, or a folder with GPT-2 style ``vocab.json`` + ``merges.txt``
    (byte-level BPE, ``<|endoftext|>`` special). ``engine`` (the recipe's ``tokenizer_engine``)
    picks what ``encode_ids`` runs (``engines``); everything else runs HF ``tokenizers``.
    """

    ROLES = {
        "cls": ("[CLS]", "<s>", "<|startoftext|>", "<bos>"),
        "sep": ("[SEP]", "</s>", "<|endoftext|>", "<eos>"),
        "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]"),
        "mask": ("[MASK]", "<mask>"),
        "pad": ("[PAD]", "<pad>", "<|endoftext|>"),
    }

    def __init__(self, path: str, overrides: dict[str, str] | None = None, engine: str = "auto"):
        try:
            tok = _load_bpe_folder(path) if os.path.isdir(path) else Tokenizer.from_file(path)
        except Exception as exc:
            raise RecipeError(f"tokenizer: cannot load {path}: {exc}") from None
        # Files saved for inference often switch these on; packing needs raw, whole documents.
        tok.no_truncation()
        tok.no_padding()
        self.path = path
        self.tokenizer = tok
        self.ids_engine = EngineSwitch(tok, engine, path)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.overrides = overrides or {}
        self.special = np.zeros(self.vocab_size, dtype=bool)
        for token_id, added in tok.get_added_tokens_decoder().items():
            if added.special and token_id < self.vocab_size:
                self.special[token_id] = True
        self.has_token_types = tok.post_processor is not None and any(tok.encode("a", "b").type_ids)
        self.cuts_cleanly = _cuts_cleanly_at_spaces(tok)
        self.tap: IdsTap | None = None  # set by a producer with a token cache, for one chunk at a time

    def token_id(self, role: str) -> int:
        """Id of the tokenizer's ``role`` token (cls, sep, eos, mask, pad); the recipe may name it."""
        candidates = [self.overrides[role]] if role in self.overrides else self.ROLES[role]
        for token in candidates:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                self.special[token_id] = True
                return token_id
        raise RecipeError(
            f"tokenizer {self.path} has no {role} token (tried {', '.join(candidates)}); "
            f"name it in the recipe: task: {{special_tokens: {{{role}: TOKEN}}}}"
        )

    def head(self, text: str, tokens: int) -> str:
        """``text``, or a prefix of it whose tokens start exactly like ``text``'s and outnumber
        ``tokens``: truncating either to ``tokens`` keeps the same ids, and a multi-MB record costs
        the tokenizer a few KB. The prefix ends before a space that follows a non-space, where a
        tokenizer that ``cuts_cleanly`` starts a new piece whatever comes after."""
        limit = HEAD_CHARS_PER_TOKEN * (tokens + 1)
        while self.cuts_cleanly and len(text) > 2 * limit:
            cut = text.find(" ", limit)
            while cut > 0 and text[cut - 1].isspace():
                cut = text.find(" ", cut + 1)
            if cut < 0:
                break
            prefix = text[:cut]
            if len(self.tokenizer.encode(prefix, add_special_tokens=False).ids) > tokens:
                return prefix
            limit *= 4  # words longer than usual: look further
        return text

    def head_of_pair(self, first: str, second: str, tokens: int) -> tuple[str, str]:
        """Heads of a pair that truncate to ``tokens`` exactly as the whole pair does. Longest-first
        truncation depends on which text is longer, so only one long text is cut, and only to more
        tokens than the other has; two long texts are tokenized whole."""
        first_head, second_head = self.head(first, tokens), self.head(second, tokens)
        first_cut, second_cut = len(first_head) < len(first), len(second_head) < len(second)
        if first_cut == second_cut:
            return first, second
        if first_cut:
            others = len(self.tokenizer.encode(second, add_special_tokens=False).ids)
            return (self.head(first, others) if others > tokens else first_head), second
        others = len(self.tokenizer.encode(first, add_special_tokens=False).ids)
        return first, (self.head(second, others) if others > tokens else second_head)

    @property
    def engine(self) -> EngineChoice:
        """The engine ``encode_ids`` runs, and why (decided now if no call has started deciding)."""
        return self.ids_engine.choice()

    def encode_ids(self, texts: list[str]) -> DocumentIds:
        """Each text's token ids, without the tokenizer's special tokens around it (added tokens
        written in the text are matched, as HF does). Tasks that never call it (classification)
        never pay for choosing the engine."""
        if self.tap is not None:
            return self.tap.ids(texts, self.ids_engine.encode)
        return self.ids_engine.encode(texts)

    def encode_words(self, texts: list[str]) -> tuple[DocumentIds, list[list[bool]]]:
        """Token ids and, per token, whether it starts a word (for whole-word masking)."""
        if self.tap is not None:
            return self.tap.words_of(texts, self._encode_words)
        return self._encode_words(texts)

    def _encode_words(self, texts: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
        # Not encode_batch_fast: it skips the offsets that word ids come from (they would all be None).
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        starts = []
        for e in encodings:
            words = e.word_ids
            starts.append([True] + [a != b for a, b in zip(words[1:], words, strict=False)] if words else [])
        return [e.ids for e in encodings], starts


HEAD_CHARS_PER_TOKEN = 16  # a prefix of this many characters per wanted token nearly always holds them
# Pre-tokenizers that end a piece at a space whatever follows it, and normalizers that map characters
# one by one: with these, a prefix cut before a space tokenizes as the start of the whole text.
_CLEAN_PRE_TOKENIZERS = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Metaspace", "ByteLevel"}
_CLEAN_NORMALIZERS = {"BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents", "Prepend", "Strip"}


def _cuts_cleanly_at_spaces(tok: Tokenizer) -> bool:
    """True if cutting a text before a space never changes the tokens before the cut (checked on the
    tokenizer's own configuration; anything unknown says no, and texts are then tokenized whole)."""
    config = json.loads(tok.to_str())

    def parts(component: dict | None) -> list[dict]:
        if component is None:
            return []
        inner = component.get("pretokenizers") or component.get("normalizers")
        return [p for c in inner for p in parts(c)] if inner is not None else [component]

    pre = parts(config.get("pre_tokenizer"))
    if not pre or not all(p["type"] in _CLEAN_PRE_TOKENIZERS for p in pre):
        return False
    if any(p["type"] == "ByteLevel" and not p.get("use_regex", True) for p in pre):
        return False
    for norm in parts(config.get("normalizer")):
        one_char_replace = norm["type"] == "Replace" and len(norm.get("pattern", {}).get("String", "")) == 1
        if norm["type"] not in _CLEAN_NORMALIZERS and not one_char_replace:
            return False
    # An added token written with a space inside could be cut in two.
    return not any(any(c.isspace() for c in t["content"]) for t in config.get("added_tokens", []))


def _load_bpe_folder(path: str) -> Tokenizer:
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if not (os.path.exists(vocab) and os.path.exists(merges)):
        raise ValueError("a tokenizer folder must hold vocab.json and merges.txt")
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def flatten(ids: DocumentIds, separator: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token lists (each followed by ``separator`` if given) -> (tokens, end offsets)."""
    if isinstance(ids, TokenLists):
        tokens, lengths = ids.tokens, ids.lengths
    else:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    if separator is None:
        return tokens, np.cumsum(lengths)
    ends = np.cumsum(lengths + 1)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=tokens.dtype)
    is_sep = np.zeros(len(out), dtype=bool)
    is_sep[ends - 1] = True
    out[is_sep] = separator
    out[~is_sep] = tokens
    return out, ends


PACKING_MODES = ("concat", "best_fit")


@dataclass
class PackedRows:
    """One batch of packed rows before the task frames them (special tokens, padding, masks)."""

    tokens: np.ndarray  # [B, width] int32; positions from ``used`` on are padding (value 0)
    used: np.ndarray  # [B] int64: tokens before the padding (``width`` when concatenating)
    doc_starts: np.ndarray  # [B, width] bool: first token of a document, or of a piece of one, in the row
    word_starts: np.ndarray | None  # [B, width] bool, or None unless asked for
    records_done: int  # records of the chunk whose every token is in this batch or an earlier one


class Packer:
    """Documents, each followed by ``separator``, placed into rows of ``width`` tokens.

    ``best_fit=False`` (``packing: concat``): one token stream cut into full rows, so a document
    crossing a row boundary is cut there. ``best_fit=True``: whole documents are placed into rows
    by best-fit decreasing over the chunk's documents (largest first, each into the row whose free
    space fits it most tightly, else a new row) and the rest of each row is padding; a document
    longer than a row is first split into row-size pieces. ``close_cuts`` (mlm's rows end in
    ``[SEP]``) ends every piece cut from a longer stream with ``separator``: a concatenated row is
    ``width - 1`` stream tokens then ``separator``; a split document's pieces are ``width - 1``
    tokens then ``separator``.

    Rows never span chunks, so a chunk's rows that do not fill a last batch are dropped: the last
    ones when concatenating, the least filled ones under best fit. After ``batches`` is exhausted
    ``leftover`` says how many tokens that was, and ``documents_cut`` how many of the chunk's
    documents were cut across rows (concat) or split because longer than a row (best fit).
    """

    def __init__(self, tok: TokenizerInfo, separator: int, batch_size: int, width: int, word_starts: bool = False,
                 best_fit: bool = False, close_cuts: bool = False):
        self.tok, self.separator, self.batch_size, self.width = tok, separator, batch_size, width
        self.word_starts, self.best_fit, self.close_cuts = word_starts, best_fit, close_cuts
        self.leftover = 0
        self.documents_cut = 0

    def batches(self, texts: list[str]) -> Iterator[PackedRows]:
        """The chunk's batches of ``batch_size`` rows, in order."""
        return self._best_fit(texts) if self.best_fit else self._concatenated(texts)

    def _encode(self, piece: list[str]) -> tuple[DocumentIds, list[list[bool]] | None]:
        if self.word_starts:
            return self.tok.encode_words(piece)
        return self.tok.encode_ids(piece), None

    def _concatenated(self, texts: list[str]) -> Iterator[PackedRows]:
        step = self.width - 1 if self.close_cuts else self.width  # stream tokens per row
        per_batch = self.batch_size * step
        shape = (self.batch_size, step)
        stream = np.empty(0, dtype=np.int32)
        starts = np.empty(0, dtype=bool)
        ends = np.empty(0, dtype=np.int64)  # end offset of every document in the chunk's stream
        consumed = 0  # offset of stream[0] within the chunk's stream
        for begin in range(0, len(texts), TOKENIZE_PIECE):
            ids, flags = self._encode(texts[begin:begin + TOKENIZE_PIECE])
            if flags is not None:
                # Aligned with flatten's output: each document's flags, then True for its separator.
                piece_starts = np.fromiter(itertools.chain.from_iterable([*f, True] for f in flags), dtype=bool)
                starts = np.concatenate([starts, piece_starts])
            tokens, piece_ends = flatten(ids, self.separator)
            ends = np.concatenate([ends, piece_ends + consumed + len(stream)])
            stream = np.concatenate([stream, tokens])
            while len(stream) >= per_batch:
                rows = stream[:per_batch].reshape(shape)
                row_starts = starts[:per_batch].reshape(shape) if self.word_starts else None
                # A document starts where the previous one ended; every row starts a piece.
                boundaries: np.ndarray = np.zeros(per_batch, dtype=bool)
                lo, hi = np.searchsorted(ends, [consumed, consumed + per_batch])
                boundaries[ends[lo:hi] - consumed] = True
                boundaries = boundaries.reshape(shape)
                boundaries[:, 0] = True
                if self.close_cuts:
                    rows = np.hstack([rows, np.full((self.batch_size, 1), self.separator, dtype=np.int32)])
                    boundaries = np.hstack([boundaries, np.zeros((self.batch_size, 1), dtype=bool)])
                    if row_starts is not None:
                        row_starts = np.hstack([row_starts, np.ones((self.batch_size, 1), dtype=bool)])
                done = int(np.searchsorted(ends, consumed + per_batch, side="right"))
                yield PackedRows(rows, np.full(self.batch_size, self.width), boundaries, row_starts, done)
                stream, consumed = stream[per_batch:], consumed + per_batch
                if self.word_starts:
                    starts = starts[per_batch:]
        self.leftover = len(stream)
        first = np.concatenate([np.zeros(min(1, len(ends)), dtype=np.int64), ends[:-1]])
        self.documents_cut = int(np.count_nonzero(first // step != (ends - 1) // step))

    def _best_fit(self, texts: list[str]) -> Iterator[PackedRows]:
        items = self._pieces(texts)
        rows = best_fit_decreasing([len(tokens) for _, tokens, _ in items], self.width)
        # Keep whole batches; the rows left over are the least filled (the later of equals).
        filled = [sum(len(items[i][1]) for i in row) for row in rows]
        surplus = len(rows) % self.batch_size
        dropped = set(sorted(range(len(rows)), key=lambda r: (filled[r], -r))[:surplus])
        self.leftover = sum(filled[r] for r in dropped)
        kept = [row for r, row in enumerate(rows) if r not in dropped]
        # records_done: a record is done with the batch holding its last piece (never, if a piece was dropped).
        done_in = np.zeros(len(texts), dtype=np.int64)
        for position, row in enumerate(kept):
            done_in[[items[i][0] for i in row]] = position // self.batch_size
        done_in[[items[i][0] for r in dropped for i in rows[r]]] = np.iinfo(np.int64).max
        for index in range(len(kept) // self.batch_size):
            batch_rows = kept[index * self.batch_size:(index + 1) * self.batch_size]
            yield self._fill(items, batch_rows, int(np.count_nonzero(done_in <= index)))

    def _pieces(self, texts: list[str]) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
        """(document index, tokens, word starts) of every piece to place: a document with its separator,
        or the row-size pieces of one longer than a row; counts the split documents."""
        items: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        self.documents_cut = 0
        for begin in range(0, len(texts), TOKENIZE_PIECE):
            ids, flags = self._encode(texts[begin:begin + TOKENIZE_PIECE])
            tokens, ends = flatten(ids, self.separator)
            words = None
            if flags is not None:  # aligned with tokens: each document's flags, then True for its separator
                words = np.fromiter(itertools.chain.from_iterable([*f, True] for f in flags), dtype=bool)
            first = 0
            for document, end in enumerate(ends.tolist(), start=begin):
                whole = tokens[first:end], None if words is None else words[first:end]
                if end - first <= self.width:
                    items.append((document, *whole))
                else:
                    self.documents_cut += 1
                    items += [(document, *piece) for piece in self._split(*whole)]
                first = end
        return items

    def _split(self, tokens: np.ndarray, words: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Row-size pieces of a document (with its separator) longer than a row."""
        if not self.close_cuts:
            return [(tokens[at:at + self.width], None if words is None else words[at:at + self.width])
                    for at in range(0, len(tokens), self.width)]
        step, body = self.width - 1, len(tokens) - 1  # each piece: step tokens of the document, then the separator
        return [(np.append(tokens[at:min(at + step, body)], self.separator),
                 None if words is None else np.append(words[at:min(at + step, body)], True))
                for at in range(0, body, step)]

    def _fill(self, items: list[tuple[int, np.ndarray, np.ndarray | None]], rows: list[list[int]],
              records_done: int) -> PackedRows:
        width = self.width
        pieces: list[np.ndarray] = []
        words: list[np.ndarray] = []
        starts: list[int] = []  # flat offsets of the pieces
        used = np.zeros(len(rows), dtype=np.int64)
        for r, row in enumerate(rows):
            at = r * width
            for i in row:
                _, piece, piece_words = items[i]
                pieces.append(piece)
                if piece_words is not None:  # None unless self.word_starts
                    words.append(piece_words)
                starts.append(at)
                at += len(piece)
            used[r] = at - r * width
            if used[r] < width:
                pieces.append(np.zeros(width - used[r], dtype=np.int32))
                words.append(np.ones(width - used[r], dtype=bool))
        shape = (len(rows), width)
        doc_starts = np.zeros(shape, dtype=bool)
        doc_starts.flat[starts] = True
        word_starts = np.concatenate(words).reshape(shape) if self.word_starts else None
        return PackedRows(np.concatenate(pieces).reshape(shape), used, doc_starts, word_starts, records_done)


def best_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of ``capacity`` holding every item: largest first, each into the bin whose free space
    fits it most tightly (the first such bin), else a new one. Returns item indexes per bin, in the
    order the bins were opened; a pure function of ``sizes``."""
    bins: list[list[int]] = []
    free: list[int] = []  # free space << 32 | bin, of the bins with room left, sorted (plain ints compare fast)
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[item]
        k = bisect.bisect_left(free, size << 32)
        if k < len(free):
            key = free.pop(k)
            room, target = key >> 32, key & 0xFFFFFFFF
        else:
            room, target = capacity, len(bins)
            bins.append([])
        bins[target].append(item)
        if room > size:
            bisect.insort(free, (room - size) << 32 | target)
    return bins


PACKING_OPTIONS: dict[str, Any] = {"packing": "concat", "document_mask": False, "cu_seqlens": False}


def check_packing_options(options: dict[str, Any], origin: str) -> None:
    """The options of ``PACKING_OPTIONS`` (a packing task's own) hold together."""
    if options["packing"] not in PACKING_MODES:
        raise RecipeError(f"{origin}: task.packing: must be one of {', '.join(PACKING_MODES)}, "
                          f"got {options['packing']!r}")
    if options["cu_seqlens"] and not options["document_mask"]:
        raise RecipeError(f"{origin}: task.cu_seqlens: needs task.document_mask: true "
                          "(its offsets are the document boundaries)")


def segment_capacity(length: int) -> int:
    """``cu_seqlens`` entries per row: a row of ``length`` tokens has at most ``length`` segments,
    so ``B * (length + 1)`` entries hold any batch's ``segments + 1`` offsets."""
    return length + 1


def segment_field_list(options: dict[str, Any], batch_size: int, length: int) -> list[Field]:
    """The document-boundary fields the options ask for (``segment_fields`` writes them)."""
    shape = (batch_size, length)
    fields = []
    if options["document_mask"]:
        fields += [Field("position_ids", np.dtype("<i4"), shape), Field("_document_ids", np.dtype("<i4"), shape)]
    if options["cu_seqlens"]:
        fields += [Field("cu_seqlens", np.dtype("<i4"), (batch_size, segment_capacity(length))),
                   Field("max_seqlen", np.dtype("<i4"), (batch_size,))]
    return fields


def framed_starts(packed: PackedRows, length: int, lead: int) -> np.ndarray:
    """Segment starts [B, length] of rows holding ``packed``'s content after ``lead`` framing
    tokens (mlm's ``[CLS]``, which joins the row's first segment); the padding after the content
    is a segment of its own."""
    rows = len(packed.used)
    starts = np.zeros((rows, length), dtype=bool)
    starts[:, lead:lead + packed.doc_starts.shape[1]] = packed.doc_starts
    starts[:, lead] = False
    starts[:, 0] = True
    padding_at = lead + packed.used
    padded = np.flatnonzero(padding_at < length)
    starts[padded, padding_at[padded]] = True
    return starts


def segment_fields(starts: np.ndarray, out: dict[str, np.ndarray]) -> None:
    """Write the document-boundary fields present in ``out`` from ``starts`` [B, L] (True where a
    segment begins: a document, a piece of one, a row's padding; column 0 always).

    ``position_ids`` restart at 0 in every segment and ``_document_ids`` number the segments of
    each row. ``cu_seqlens`` [B, L + 1] int32, read in row-major order (``.view(-1)``), is the
    batch flattened to ``B * L`` tokens as flash-attention's varlen functions take it: offsets
    0, end of segment 1, ..., ``B * L``, then ``B * L`` repeated up to the capacity, zero-length
    sequences that the kernels skip. ``max_seqlen`` [B] is each row's longest segment.
    """
    rows, length = starts.shape
    if "position_ids" in out or "_document_ids" in out:
        columns = np.arange(length, dtype=np.int32)
        latest = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
        if "position_ids" in out:
            out["position_ids"][:] = columns - latest
        if "_document_ids" in out:
            out["_document_ids"][:] = np.cumsum(starts, axis=1, dtype=np.int32) - 1
    if "cu_seqlens" in out:
        offsets = np.append(np.flatnonzero(starts), rows * length)
        cu = np.full(out["cu_seqlens"].size, rows * length, dtype=np.int32)
        cu[:len(offsets)] = offsets
        out["cu_seqlens"][:] = cu.reshape(out["cu_seqlens"].shape)
        longest = out["max_seqlen"]
        longest.fill(0)
        np.maximum.at(longest, offsets[:-1] // length, np.diff(offsets).astype(longest.dtype))


class Task(ABC):
    """A training task: the batch schema, and how a chunk's records become batches.

    Subclasses set ``options`` (option name -> default; the recipe's ``task:`` keys) and implement
    ``fields`` and ``batches``. A recipe names a built-in task by ``type`` (mlm, clm, classify,
    multilabel, encode) or a custom one by ``module:Class``. Fields whose name starts with ``_`` are
    bookkeeping: the consumer hands them out only when asked (``connect(..., meta=True)``).
    """

    options: ClassVar[dict[str, Any]] = {}
    reads_labels: ClassVar[bool] = False  # True if batches need every record's label (source.label_field)
    tokens_dropped = 0  # tokens the last ``batches`` call could not place in a full batch
    documents_cut = 0  # documents the last ``batches`` call cut across rows, split or truncated
    examples_dropped = 0  # examples the last ``batches`` call could not place in a full batch
    labels_unknown = 0  # labels outside the recipe's label list, ignored so far (multilabel)
    # Complete passes (recipe ``mode: eval``, set by ``_complete.build_recipe_task``): ``batches``
    # keeps every record, one per row, the last batch partial, and sets each batch's ``records``;
    # ``bucket_window`` > 0 sorts the rows of each window of that many records by token length.
    keep_every_record = False
    bucket_window = 0
    # The options that change what ``batches`` asks the tokenizer for, if it tokenizes each text of a
    # chunk exactly once, in order, through ``TokenizerInfo.encode_ids`` or ``encode_words``: then a
    # chunk's ids can come from the token cache (``_cache``). None: the task tokenizes otherwise.
    token_cache_options: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        self.opts = options
        self.tok = tokenizer
        self.batch_size = batch_size
        self.seed = seed

    @classmethod  # noqa: B027 - an optional hook: a no-op unless a task has impossible option values
    def check_options(cls, options: dict[str, Any], origin: str) -> None:
        """Reject impossible option values with a RecipeError naming the option (types are checked already)."""

    @classmethod
    def complete_pass_problem(cls, options: dict[str, Any], bucketing: bool) -> str | None:
        """Why this task cannot serve a complete pass (``mode: eval``), with ``bucket_window`` if
        ``bucketing``, or None if it can."""
        return f"task {cls.__name__} keeps no record ids and drops partial batches"

    @classmethod
    def packs_documents(cls, options: dict[str, Any]) -> bool:
        """True if rows are documents packed back to back, so a document longer than a chunk may
        be read in pieces, each its own document (``_sources``: long records)."""
        return False

    @abstractmethod
    def fields(self) -> list[Field]:
        """The arrays of one batch, batch dimension first."""

    @abstractmethod
    def batches(self, records: Records, chunk: int) -> Iterator[PendingBatch]:
        """The chunk's batches, in order. Leftovers that do not fill a batch are dropped."""

    def convert_label(self, raw: Any) -> Any:
        """Turn a record's raw label into what ``batches`` stores; raise ValueError for a bad one."""
        return raw

    def describe_row(self, row: dict[str, np.ndarray]) -> str:
        """One row of a batch as a person should read it (``ringload inspect``)."""
        ids = row["input_ids"]
        if "attention_mask" in row:
            ids = ids[row["attention_mask"].astype(bool)]
        return self.tok.tokenizer.decode(ids.tolist(), skip_special_tokens=False)

    def rng(self, chunk: int, index: int) -> np.random.Generator:
        """The batch's random generator: a pure function of (seed, chunk, batch index)."""
        return np.random.default_rng((self.seed, chunk, index))
