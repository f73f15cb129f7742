"""Masked-LM (BERT): packed ``[CLS] ... [SEP]`` rows, 15% of ordinary tokens chosen, 80/10/10."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._errors import RecipeError
from .._layout import Field
from .._types import Records
from .base import (
    PACKING_OPTIONS,
    TOKENIZE_PIECE,
    Ids,
    PackedRows,
    Packer,
    PendingBatch,
    Task,
    TokenizerInfo,
    check_packing_options,
    framed_starts,
    segment_field_list,
    segment_fields,
)


class MaskedLM(Task):
    """``type: mlm``. Rows of ``seq_len`` tokens, ``[CLS]`` then documents each followed by
    ``[SEP]`` (``pack: false``: one truncated, padded document per row). ``whole_word_mask``
    chooses all sub-tokens of a word together.

    Packed rows: ``packing: concat`` cuts one stream into rows ``[CLS]`` + ``seq_len - 2`` tokens
    + ``[SEP]``; ``packing: best_fit`` places whole documents into rows (``Packer``; a document
    longer than a row is split into pieces that end in ``[SEP]``) and pads the rest.
    ``document_mask`` adds ``position_ids`` restarting at every document (the row's ``[CLS]``
    belongs to its first one; padding is a segment of its own) and ``_document_ids``;
    ``cu_seqlens`` adds ``cu_seqlens`` and ``max_seqlen`` (``segment_fields``)."""

    options = {
        "seq_len": 128,
        "mask_prob": 0.15,
        "mask_token_prob": 0.8,
        "random_token_prob": 0.1,
        "pack": True,
        "whole_word_mask": False,
        **PACKING_OPTIONS,
        "special_tokens": {},
    }
    token_cache_options = ("whole_word_mask",)  # word starts are cached along with the ids

    @classmethod
    def check_options(cls, options: dict[str, Any], origin: str) -> None:
        for key in ("mask_prob", "mask_token_prob", "random_token_prob"):
            if not 0.0 <= options[key] <= 1.0:
                raise RecipeError(f"{origin}: task.{key}: must be within 0..1, got {options[key]}")
        if options["mask_token_prob"] + options["random_token_prob"] > 1.0:
            raise RecipeError(f"{origin}: task.mask_token_prob + task.random_token_prob must not exceed 1")
        check_packing_options(options, origin)
        if not options["pack"]:
            asked = [f"task.{key}" for key in ("document_mask", "cu_seqlens") if options[key]]
            asked += ["task.packing: best_fit"] if options["packing"] == "best_fit" else []
            if asked:
                raise RecipeError(f"{origin}: {', '.join(asked)} need packed rows (task.pack: true); "
                                  "with pack: false each row holds one document already")

    @classmethod
    def complete_pass_problem(cls, options: dict[str, Any], bucketing: bool) -> str | None:
        if options["pack"]:
            return "mlm with pack: true packs documents across rows; set task.pack: false for one record per row"
        if bucketing:
            return "mlm keeps its rows in record order; bucket_window sorts rows for classify, multilabel and encode"
        return None

    @classmethod
    def packs_documents(cls, options: dict[str, Any]) -> bool:
        return bool(options["pack"])

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        super().__init__(options, tokenizer, batch_size, seed)
        self.seq_len = options["seq_len"]
        self.cls, self.sep = tokenizer.token_id("cls"), tokenizer.token_id("sep")
        self.mask, self.pad = tokenizer.token_id("mask"), tokenizer.token_id("pad")
        self.ordinary_ids = np.flatnonzero(~tokenizer.special).astype(np.int32)
        # Content after [CLS]: seq_len - 1 tokens; every piece cut from a longer stream ends in [SEP].
        self.packer = Packer(tokenizer, self.sep, batch_size, self.seq_len - 1, options["whole_word_mask"],
                             best_fit=options["packing"] == "best_fit", close_cuts=True)

    def fields(self) -> list[Field]:
        shape = (self.batch_size, self.seq_len)
        fields = [Field("input_ids", np.dtype("<i4"), shape), Field("attention_mask", np.dtype("|i1"), shape)]
        if self.tok.has_token_types:
            fields.append(Field("token_type_ids", np.dtype("<i4"), shape))
        fields.append(Field("labels", np.dtype("<i8"), shape))
        return fields + segment_field_list(self.opts, self.batch_size, self.seq_len)

    def batches(self, records: Records, chunk: int) -> Iterator[PendingBatch]:
        if self.opts["pack"]:
            return self._packed(records.texts, chunk)
        return self._one_per_row(records.texts, chunk)

    def _packed(self, texts: list[str], chunk: int) -> Iterator[PendingBatch]:
        for index, packed in enumerate(self.packer.batches(texts)):
            tokens = self.batch_size + int(packed.used.sum())  # [CLS] and the content, not the padding
            yield PendingBatch(self._packed_writer(packed, chunk, index), self.batch_size, tokens,
                               packed.records_done)
        self.tokens_dropped = self.packer.leftover
        self.documents_cut = self.packer.documents_cut

    def _packed_writer(self, packed: PackedRows, chunk: int, index: int) -> Callable[[dict[str, np.ndarray]], None]:
        def write(out: dict[str, np.ndarray]) -> None:
            padding = np.arange(self.seq_len) >= 1 + packed.used[:, None]
            ids = out["input_ids"]
            ids[:, 0] = self.cls
            ids[:, 1:] = packed.tokens
            ids[padding] = self.pad  # a special token: never chosen for masking
            out["attention_mask"][:] = ~padding
            if "token_type_ids" in out:
                out["token_type_ids"].fill(0)
            word_starts = None
            if packed.word_starts is not None:
                word_starts = np.ones(ids.shape, dtype=bool)
                word_starts[:, 1:] = packed.word_starts
            self._mask(ids, out["labels"], self.rng(chunk, index), word_starts)
            if self.opts["document_mask"]:
                segment_fields(framed_starts(packed, self.seq_len, lead=1), out)
        return write

    def _one_per_row(self, texts: list[str], chunk: int) -> Iterator[PendingBatch]:
        """One document per row: truncated to seq_len - 2 tokens, padded, attention_mask marks it."""
        width = self.seq_len - 2
        pending: list[Ids] = []
        pending_starts: list[list[bool]] = []
        done, index, dropped, truncated = 0, 0, 0, 0
        whole_words = self.opts["whole_word_mask"]
        for begin in range(0, len(texts), TOKENIZE_PIECE):
            piece = texts[begin:begin + TOKENIZE_PIECE]
            ids_list, starts_list = self.tok.encode_words(piece) if whole_words else (self.tok.encode_ids(piece), None)
            for i, ids in enumerate(ids_list):
                pending.append(ids[:width])
                if starts_list is not None:
                    pending_starts.append(starts_list[i][:width])
                dropped += max(0, len(ids) - width)
                truncated += len(ids) > width
                done += 1
                if len(pending) == self.batch_size:
                    yield self._rows_batch(pending, pending_starts, chunk, index, done)
                    pending, pending_starts, index = [], [], index + 1
        if pending and self.keep_every_record:  # a complete pass keeps the partial last batch
            yield self._rows_batch(pending, pending_starts, chunk, index, done)
            pending = []
        self.tokens_dropped = dropped + sum(map(len, pending))
        self.documents_cut = truncated

    def _rows_batch(self, docs: list[Ids], doc_starts: list[list[bool]], chunk: int, index: int,
                    done: int) -> PendingBatch:
        """The batch of one document per row ending with the chunk's record ``done - 1``."""
        lengths = [len(doc) + 2 for doc in docs]  # [CLS] doc [SEP]
        records = np.arange(done - len(docs), done) if self.keep_every_record else None
        return PendingBatch(self._row_writer(docs, doc_starts, chunk, index), self.batch_size, sum(lengths), done,
                            records, max(lengths))

    def _row_writer(self, docs: list[Ids], doc_starts: list[list[bool]], chunk: int,
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
