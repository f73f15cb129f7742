"""Masked-LM (BERT): packed ``[CLS] ... [SEP]`` rows, 15% of ordinary tokens chosen, 80/10/10."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._errors import RecipeError
from .._layout import Field
from .._sources import Records
from .base import TOKENIZE_PIECE, Packer, PendingBatch, Task, TokenizerInfo


class MaskedLM(Task):
    """``type: mlm``. Rows of exactly ``seq_len`` tokens with documents packed back to back and
    joined by [SEP] (``pack: false``: one truncated, padded document per row). ``whole_word_mask``
    chooses all sub-tokens of a word together."""

    options = {
        "seq_len": 128,
        "mask_prob": 0.15,
        "mask_token_prob": 0.8,
        "random_token_prob": 0.1,
        "pack": True,
        "whole_word_mask": False,
        "special_tokens": {},
    }

    @classmethod
    def check_options(cls, options: dict[str, Any], origin: str) -> None:
        for key in ("mask_prob", "mask_token_prob", "random_token_prob"):
            if not 0.0 <= options[key] <= 1.0:
                raise RecipeError(f"{origin}: task.{key}: must be within 0..1, got {options[key]}")
        if options["mask_token_prob"] + options["random_token_prob"] > 1.0:
            raise RecipeError(f"{origin}: task.mask_token_prob + task.random_token_prob must not exceed 1")

    @classmethod
    def packs_documents(cls, options: dict[str, Any]) -> bool:
        return bool(options["pack"])

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        super().__init__(options, tokenizer, batch_size, seed)
        self.seq_len = options["seq_len"]
        self.cls, self.sep = tokenizer.token_id("cls"), tokenizer.token_id("sep")
        self.mask, self.pad = tokenizer.token_id("mask"), tokenizer.token_id("pad")
        self.ordinary_ids = np.flatnonzero(~tokenizer.special).astype(np.int32)
        self.packer = Packer(tokenizer, self.sep, batch_size, self.seq_len - 2, options["whole_word_mask"])

    def fields(self) -> list[Field]:
        shape = (self.batch_size, self.seq_len)
        fields = [Field("input_ids", np.dtype("<i4"), shape), Field("attention_mask", np.dtype("|i1"), shape)]
        if self.tok.has_token_types:
            fields.append(Field("token_type_ids", np.dtype("<i4"), shape))
        fields.append(Field("labels", np.dtype("<i8"), shape))
        return fields

    def batches(self, records: Records, chunk: int) -> Iterator[PendingBatch]:
        if self.opts["pack"]:
            return self._packed(records.texts, chunk)
        return self._one_per_row(records.texts, chunk)

    def _packed(self, texts: list[str], chunk: int) -> Iterator[PendingBatch]:
        for index, (rows, starts, done) in enumerate(self.packer.batches(texts)):
            yield PendingBatch(self._packed_writer(rows, starts, chunk, index), self.batch_size,
                               self.batch_size * self.seq_len, done)
        self.tokens_dropped = self.packer.leftover

    def _packed_writer(self, rows: np.ndarray, starts: np.ndarray | None, chunk: int,
                       index: int) -> Callable[[dict[str, np.ndarray]], None]:
        def write(out: dict[str, np.ndarray]) -> None:
            ids = out["input_ids"]
            ids[:, 0] = self.cls
            ids[:, 1:-1] = rows
            ids[:, -1] = self.sep
            out["attention_mask"].fill(1)
            if "token_type_ids" in out:
                out["token_type_ids"].fill(0)
            word_starts = None
            if starts is not None:
                word_starts = np.ones(ids.shape, dtype=bool)
                word_starts[:, 1:-1] = starts
            self._mask(ids, out["labels"], self.rng(chunk, index), word_starts)
        return write

    def _one_per_row(self, texts: list[str], chunk: int) -> Iterator[PendingBatch]:
        """One document per row: truncated to seq_len - 2 tokens, padded, attention_mask marks it."""
        width = self.seq_len - 2
        pending: list[list[int]] = []
        pending_starts: list[list[bool]] = []
        done, index, dropped = 0, 0, 0
        whole_words = self.opts["whole_word_mask"]
        for begin in range(0, len(texts), TOKENIZE_PIECE):
            piece = texts[begin:begin + TOKENIZE_PIECE]
            ids_list, starts_list = self.tok.encode_words(piece) if whole_words else (self.tok.encode_ids(piece), None)
            for i, ids in enumerate(ids_list):
                pending.append(ids[:width])
                if starts_list is not None:
                    pending_starts.append(starts_list[i][:width])
                dropped += max(0, len(ids) - width)
                done += 1
                if len(pending) == self.batch_size:
                    tokens = sum(map(len, pending)) + 2 * self.batch_size
                    yield PendingBatch(self._row_writer(pending, pending_starts, chunk, index), self.batch_size,
                                       tokens, done)
                    pending, pending_starts, index = [], [], index + 1
        self.tokens_dropped = dropped + sum(map(len, pending))

    def _row_writer(self, docs: list[list[int]], doc_starts: list[list[bool]], chunk: int,
                    index: int) -> Callable[[dict[str, np.ndarray]], None]:
        def write(out: dict[str, np.ndarray]) -> None:
            ids, attention = out["input_ids"], out["attention_mask"]
            ids.fill(self.pad)
            attention.fill(0)
            word_starts = np.ones(ids.shape, dtype=bool) if doc_starts else None
            for row, doc in enumerate(docs):
                n = len(doc)
                ids[row, 0] = self.cls
                ids[row, 1:n + 1] = doc
                ids[row, n + 1] = self.sep
                attention[row, :n + 2] = 1
                if word_starts is not None:
                    word_starts[row, 1:n + 1] = doc_starts[row]
            if "token_type_ids" in out:
                out["token_type_ids"].fill(0)
            self._mask(ids, out["labels"], self.rng(chunk, index), word_starts)
        return write

    def describe_row(self, row: dict[str, np.ndarray]) -> str:
        """Tokens with every chosen position shown as [input->label]; padding summarised."""
        tokenizer, words = self.tok.tokenizer, []
        for pos, token_id in enumerate(row["input_ids"].tolist()):
            if not row["attention_mask"][pos]:
                words.append(f"[PAD]x{len(row['input_ids']) - pos}")
                break
            token = tokenizer.id_to_token(token_id) or f"<{token_id}>"
            if row["labels"][pos] != -100:
                token = f"[{token}->{tokenizer.id_to_token(int(row['labels'][pos]))}]"
            words.append(token)
        return " ".join(words).replace(" ##", "")

    def _mask(self, ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
              word_starts: np.ndarray | None) -> None:
        """Choose mask_prob of the ordinary tokens (or words); labels keep their ids; 80% [MASK], 10% random."""
        chosen = rng.random(ids.shape, dtype=np.float32) < self.opts["mask_prob"]
        ordinary = ~self.tok.special[ids]
        if word_starts is not None:
            # A word's pieces share the draw of its first piece: index of the latest start, per row.
            columns = np.arange(ids.shape[1])
            latest_start = np.maximum.accumulate(np.where(word_starts | ~ordinary, columns, 0), axis=1)
            chosen = np.take_along_axis(chosen & word_starts, latest_start, axis=1)
        chosen &= ordinary
        labels.fill(-100)
        np.copyto(labels, ids, where=chosen)
        action = rng.random(ids.shape, dtype=np.float32)
        to_mask = chosen & (action < self.opts["mask_token_prob"])
        to_random = chosen & ~to_mask & (action < self.opts["mask_token_prob"] + self.opts["random_token_prob"])
        ids[to_mask] = self.mask
        n_random = int(to_random.sum())
        if n_random:
            ids[to_random] = self.ordinary_ids[rng.integers(0, len(self.ordinary_ids), n_random)]
