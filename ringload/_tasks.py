"""Tasks: turning a chunk's texts into training batches, written straight into ring slots.

A task declares the fields of its batches (:meth:`Task.fields`) and, for one chunk, yields
:class:`PendingBatch` objects in order. Tokenization happens while the generator advances; the
producer claims a slot only once a batch is ready and then calls ``write`` with the slot's
arrays, so a batch goes from the tokenizer's output into shared memory with no copy in between.

Randomness (masking) is drawn from ``numpy.random.default_rng((seed, chunk, index))``: a pure
function of the recipe's seed and the batch's place in the stream, never of which producer ran it.

Dtypes in the ring are what the standard models accept without a cast, so CPU batches can be
zero-copy views: ``input_ids``/``token_type_ids`` int32 (embeddings take int32), ``attention_mask``
int8, ``labels`` int64 (PyTorch's cross-entropy wants int64 targets).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from tokenizers import Tokenizer

from ._errors import RecipeError
from ._layout import Field

TOKENIZE_PIECE = 512  # texts per encode_batch call: large enough for the Rust fast path, small for latency


@dataclass
class PendingBatch:
    """A batch whose rows are ready; ``write`` fills a slot's arrays with it."""

    write: Callable[[dict[str, np.ndarray]], None]
    rows: int
    tokens: int  # real (non-padding) tokens
    records_done: int  # records of the chunk fully consumed once this batch is delivered


class TokenizerInfo:
    """A tokenizer with truncation and padding off, and the special tokens a task needs."""

    ROLES = {
        "cls": ("[CLS]", "<s>", "<|startoftext|>", "<bos>"),
        "sep": ("[SEP]", "</s>", "<|endoftext|>", "<eos>"),
        "mask": ("[MASK]", "<mask>"),
        "pad": ("[PAD]", "<pad>"),
    }

    def __init__(self, path: str, overrides: dict[str, str] | None = None):
        try:
            tok = Tokenizer.from_file(path)
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
        pair = tok.post_processor is not None and any(tok.encode("a", "b").type_ids)
        self.has_token_types = bool(pair)

    def token_id(self, role: str) -> int:
        """Id of the tokenizer's ``role`` token (cls, sep, mask, pad); the recipe may name it."""
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
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]


def flatten(ids: list[list[int]], separator: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token lists (each followed by ``separator`` if given) -> (tokens, end offsets)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    if separator is None:
        return tokens, np.cumsum(lengths)
    ends = np.cumsum(lengths + 1)
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    is_sep = np.zeros(len(out), dtype=bool)
    is_sep[ends - 1] = True
    out[is_sep] = separator
    out[~is_sep] = tokens
    return out, ends


class Task(ABC):
    """A training task: the batch schema, and how a chunk's texts become batches.

    Subclasses set ``options`` (option name -> default) and implement ``fields`` and ``batches``.
    A recipe names a built-in task by ``type`` or a custom one by ``module:Class``.
    """

    options: ClassVar[dict[str, Any]] = {}
    tokens_dropped = 0  # tokens the last ``batches`` call could not place in a full batch

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        self.opts = options
        self.tok = tokenizer
        self.batch_size = batch_size
        self.seed = seed

    @abstractmethod
    def fields(self) -> list[Field]:
        """The arrays of one batch, batch dimension first."""

    @abstractmethod
    def batches(self, texts: list[str], chunk: int) -> Iterator[PendingBatch]:
        """The chunk's batches, in order. Leftovers that do not fill a batch are dropped."""

    def rng(self, chunk: int, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, chunk, index))


class MaskedLM(Task):
    """BERT-style masked-LM: packed ``[CLS] ... [SEP]`` rows, 15% of ordinary tokens chosen, 80/10/10."""

    options = {
        "seq_len": 128,
        "mask_prob": 0.15,
        "mask_token_prob": 0.8,
        "random_token_prob": 0.1,
        "pack": True,
        "special_tokens": {},
    }

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        super().__init__(options, tokenizer, batch_size, seed)
        self.seq_len = options["seq_len"]
        self.cls, self.sep = tokenizer.token_id("cls"), tokenizer.token_id("sep")
        self.mask, self.pad = tokenizer.token_id("mask"), tokenizer.token_id("pad")
        self.ordinary_ids = np.flatnonzero(~tokenizer.special).astype(np.int32)

    def fields(self) -> list[Field]:
        shape = (self.batch_size, self.seq_len)
        fields = [Field("input_ids", np.dtype("<i4"), shape), Field("attention_mask", np.dtype("|i1"), shape)]
        if self.tok.has_token_types:
            fields.append(Field("token_type_ids", np.dtype("<i4"), shape))
        fields.append(Field("labels", np.dtype("<i8"), shape))
        return fields

    def batches(self, texts: list[str], chunk: int) -> Iterator[PendingBatch]:
        if self.opts["pack"]:
            return self._packed(texts, chunk)
        return self._one_per_row(texts, chunk)

    def _packed(self, texts: list[str], chunk: int) -> Iterator[PendingBatch]:
        """Documents joined by [SEP] into one stream, cut into rows of seq_len - 2 content tokens."""
        width = self.seq_len - 2
        per_batch = self.batch_size * width
        stream = np.empty(0, dtype=np.int32)
        ends = np.empty(0, dtype=np.int64)  # end offset of every document in the chunk's stream
        consumed = 0  # stream offset of stream[0] within the chunk
        index = 0
        for start in range(0, len(texts), TOKENIZE_PIECE):
            tokens, piece_ends = flatten(self.tok.encode_ids(texts[start:start + TOKENIZE_PIECE]), self.sep)
            ends = np.concatenate([ends, piece_ends + consumed + len(stream)])
            stream = np.concatenate([stream, tokens])
            while len(stream) >= per_batch:
                rows = stream[:per_batch].reshape(self.batch_size, width)
                done = int(np.searchsorted(ends, consumed + per_batch, side="right"))
                yield PendingBatch(self._packed_writer(rows, chunk, index), self.batch_size,
                                   self.batch_size * self.seq_len, done)
                stream, consumed, index = stream[per_batch:], consumed + per_batch, index + 1
        self.tokens_dropped = len(stream)

    def _packed_writer(self, rows: np.ndarray, chunk: int, index: int) -> Callable[[dict[str, np.ndarray]], None]:
        def write(out: dict[str, np.ndarray]) -> None:
            ids = out["input_ids"]
            ids[:, 0] = self.cls
            ids[:, 1:-1] = rows
            ids[:, -1] = self.sep
            out["attention_mask"].fill(1)
            if "token_type_ids" in out:
                out["token_type_ids"].fill(0)
            self._mask(ids, out["labels"], self.rng(chunk, index))
        return write

    def _one_per_row(self, texts: list[str], chunk: int) -> Iterator[PendingBatch]:
        """One document per row: truncated to seq_len - 2 tokens, padded, attention_mask marks it."""
        width = self.seq_len - 2
        pending: list[list[int]] = []
        done, index, dropped = 0, 0, 0
        for start in range(0, len(texts), TOKENIZE_PIECE):
            for ids in self.tok.encode_ids(texts[start:start + TOKENIZE_PIECE]):
                pending.append(ids[:width])
                dropped += max(0, len(ids) - width)
                done += 1
                if len(pending) == self.batch_size:
                    tokens = sum(map(len, pending)) + 2 * self.batch_size
                    yield PendingBatch(self._row_writer(pending, chunk, index), self.batch_size, tokens, done)
                    pending, index = [], index + 1
        self.tokens_dropped = dropped + sum(map(len, pending))

    def _row_writer(self, docs: list[list[int]], chunk: int, index: int) -> Callable[[dict[str, np.ndarray]], None]:
        def write(out: dict[str, np.ndarray]) -> None:
            ids, attention = out["input_ids"], out["attention_mask"]
            ids.fill(self.pad)
            attention.fill(0)
            for row, doc in enumerate(docs):
                n = len(doc)
                ids[row, 0] = self.cls
                ids[row, 1:n + 1] = doc
                ids[row, n + 1] = self.sep
                attention[row, :n + 2] = 1
            if "token_type_ids" in out:
                out["token_type_ids"].fill(0)
            self._mask(ids, out["labels"], self.rng(chunk, index))
        return write

    def _mask(self, ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
        """Choose mask_prob of the ordinary tokens; labels keep their ids; 80% [MASK], 10% random."""
        chosen = rng.random(ids.shape, dtype=np.float32) < self.opts["mask_prob"]
        chosen &= ~self.tok.special[ids]
        labels.fill(-100)
        np.copyto(labels, ids, where=chosen)
        action = rng.random(ids.shape, dtype=np.float32)
        to_mask = chosen & (action < self.opts["mask_token_prob"])
        to_random = chosen & ~to_mask & (action < self.opts["mask_token_prob"] + self.opts["random_token_prob"])
        ids[to_mask] = self.mask
        n_random = int(to_random.sum())
        if n_random:
            ids[to_random] = self.ordinary_ids[rng.integers(0, len(self.ordinary_ids), n_random)]


TASKS: dict[str, type[Task]] = {"mlm": MaskedLM}


def task_class(type_name: str, origin: str = "recipe") -> type[Task]:
    try:
        return TASKS[type_name]
    except KeyError:
        raise RecipeError(f"{origin}: task.type: unknown task {type_name!r} (built in: {', '.join(TASKS)})") from None


def check_task_options(task: dict[str, Any], origin: str) -> dict[str, Any]:
    """Fill defaults and check the task's options; unknown options are an error naming them."""
    cls = task_class(task.pop("type"), origin)
    type_name = next(k for k, v in TASKS.items() if v is cls)
    unknown = sorted(set(task) - set(cls.options))
    if unknown:
        raise RecipeError(f"{origin}: unknown task option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join('task.' + k for k in unknown)} for type {type_name} "
                          f"(known: {', '.join(sorted(cls.options))})")
    checked: dict[str, Any] = {"type": type_name}
    for key, default in cls.options.items():
        value = task.get(key, default)
        if type(default) is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise RecipeError(f"{origin}: task.{key}: must be {type(default).__name__}, got {value!r}")
        checked[key] = value
    if "seq_len" in checked and not 8 <= checked["seq_len"] <= 65536:
        raise RecipeError(f"{origin}: task.seq_len: must be 8..65536, got {checked['seq_len']}")
    probs = [k for k in ("mask_prob", "mask_token_prob", "random_token_prob") if k in checked]
    for key in probs:
        if not 0.0 <= checked[key] <= 1.0:
            raise RecipeError(f"{origin}: task.{key}: must be within 0..1, got {checked[key]}")
    if {"mask_token_prob", "random_token_prob"} <= set(checked) and checked["mask_token_prob"] + checked["random_token_prob"] > 1.0:
        raise RecipeError(f"{origin}: task.mask_token_prob + task.random_token_prob must not exceed 1")
    return checked


def build_task(task: dict[str, Any], tokenizer_path: str, batch_size: int, seed: int) -> Task:
    """Instantiate the recipe's task with its tokenizer."""
    options = {k: v for k, v in task.items() if k != "type"}
    tokenizer = TokenizerInfo(tokenizer_path, options.get("special_tokens"))
    return task_class(task["type"])(options, tokenizer, batch_size, seed)
