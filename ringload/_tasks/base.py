"""The task interface, the tokenizer wrapper, and the packing the language-model tasks share."""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .._errors import RecipeError
from .._layout import Field
from .._sources import Records

TOKENIZE_PIECE = 512  # texts per encode_batch call: large enough for the Rust fast path, small for latency


@dataclass
class PendingBatch:
    """A batch whose rows are ready; ``write`` fills a slot's arrays with it."""

    write: Callable[[dict[str, np.ndarray]], None]
    rows: int
    tokens: int  # real (non-padding) tokens
    records_done: int  # records of the chunk fully consumed once this batch is delivered


class TokenizerInfo:
    """A HuggingFace tokenizer with truncation and padding off, and the special tokens tasks need.

    ``path`` is a ``tokenizer.json``, or a folder with GPT-2 style ``vocab.json`` + ``merges.txt``
    (byte-level BPE, ``<|endoftext|>`` special).
    """

    ROLES = {
        "cls": ("[CLS]", "<s>", "<|startoftext|>", "<bos>"),
        "sep": ("[SEP]", "</s>", "<|endoftext|>", "<eos>"),
        "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]"),
        "mask": ("[MASK]", "<mask>"),
        "pad": ("[PAD]", "<pad>", "<|endoftext|>"),
    }

    def __init__(self, path: str, overrides: dict[str, str] | None = None):
        try:
            tok = _load_bpe_folder(path) if os.path.isdir(path) else Tokenizer.from_file(path)
        except Exception as exc:
            raise RecipeError(f"tokenizer: cannot load {path}: {exc}") from None
        # Files saved for inference often switch these on; packing needs raw, whole documents.
        tok.no_truncation()
        tok.no_padding()
        self.path = path
        self.tokenizer = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.overrides = overrides or {}
        self.special = np.zeros(self.vocab_size, dtype=bool)
        for token_id, added in tok.get_added_tokens_decoder().items():
            if added.special and token_id < self.vocab_size:
                self.special[token_id] = True
        self.has_token_types = tok.post_processor is not None and any(tok.encode("a", "b").type_ids)

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

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_words(self, texts: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
        """Token ids and, per token, whether it starts a word (for whole-word masking)."""
        # Not encode_batch_fast: it skips the offsets that word ids come from (they would all be None).
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        starts = []
        for e in encodings:
            words = e.word_ids
            starts.append([True] + [a != b for a, b in zip(words[1:], words)] if words else [])
        return [e.ids for e in encodings], starts


def _load_bpe_folder(path: str) -> Tokenizer:
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if not (os.path.exists(vocab) and os.path.exists(merges)):
        raise ValueError("a tokenizer folder must hold vocab.json and merges.txt")
    tok = Tokenizer(models.BPE.from_file(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def flatten(ids: list[list[int]], separator: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token lists (each followed by ``separator`` if given) -> (tokens, end offsets)."""
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


class Packer:
    """Documents, each followed by ``separator``, as one token stream cut into full rows of ``width``.

    Rows never span chunks, so a chunk's last partial batch is dropped; ``leftover`` says how many
    tokens that was (under one batch of rows).
    """

    def __init__(self, tok: TokenizerInfo, separator: int, batch_size: int, width: int, word_starts: bool = False):
        self.tok, self.separator, self.batch_size, self.width = tok, separator, batch_size, width
        self.word_starts = word_starts
        self.leftover = 0

    def batches(self, texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray | None, int]]:
        """Yield (rows [B, width] int32, word starts [B, width] or None, records done) per batch."""
        per_batch = self.batch_size * self.width
        stream = np.empty(0, dtype=np.int32)
        starts = np.empty(0, dtype=bool)
        ends = np.empty(0, dtype=np.int64)  # end offset of every document in the chunk's stream
        consumed = 0  # offset of stream[0] within the chunk's stream
        for begin in range(0, len(texts), TOKENIZE_PIECE):
            piece = texts[begin:begin + TOKENIZE_PIECE]
            if self.word_starts:
                ids, flags = self.tok.encode_words(piece)
                # Aligned with flatten's output: each document's flags, then True for its separator.
                piece_starts = np.fromiter(itertools.chain.from_iterable([*f, True] for f in flags), dtype=bool)
                starts = np.concatenate([starts, piece_starts])
            else:
                ids = self.tok.encode_ids(piece)
            tokens, piece_ends = flatten(ids, self.separator)
            ends = np.concatenate([ends, piece_ends + consumed + len(stream)])
            stream = np.concatenate([stream, tokens])
            while len(stream) >= per_batch:
                shape = (self.batch_size, self.width)
                rows = stream[:per_batch].reshape(shape)
                row_starts = starts[:per_batch].reshape(shape) if self.word_starts else None
                done = int(np.searchsorted(ends, consumed + per_batch, side="right"))
                yield rows, row_starts, done
                stream, consumed = stream[per_batch:], consumed + per_batch
                if self.word_starts:
                    starts = starts[per_batch:]
        self.leftover = len(stream)


class Task(ABC):
    """A training task: the batch schema, and how a chunk's records become batches.

    Subclasses set ``options`` (option name -> default; the recipe's ``task:`` keys) and implement
    ``fields`` and ``batches``. A recipe names a built-in task by ``type`` (mlm, clm, classify,
    multilabel) or a custom one by ``module:Class``. Fields whose name starts with ``_`` are
    bookkeeping: the consumer hands them out only when asked (``connect(..., meta=True)``).
    """

    options: ClassVar[dict[str, Any]] = {}
    tokens_dropped = 0  # tokens the last ``batches`` call could not place in a full batch
    examples_dropped = 0  # examples the last ``batches`` call could not place in a full batch
    labels_unknown = 0  # labels outside the recipe's label list, ignored so far (multilabel)

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        self.opts = options
        self.tok = tokenizer
        self.batch_size = batch_size
        self.seed = seed

    @classmethod
    def check_options(cls, options: dict[str, Any], origin: str) -> None:
        """Reject impossible option values with a RecipeError naming the option (types are checked already)."""

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
