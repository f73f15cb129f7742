"""Causal-LM pretraining (GPT): documents joined by the end-of-text token, packed into rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._layout import Field
from .._types import Records
from .base import (
    PACKING_OPTIONS,
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


class CausalLM(Task):
    """``type: clm``. Rows of ``seq_len`` tokens, each document followed by the end-of-text token;
    ``labels`` equal ``input_ids`` (the model shifts them).

    ``packing: concat`` cuts one token stream into full rows; ``packing: best_fit`` places whole
    documents into rows (``Packer``) and pads the rest (``attention_mask`` 0, ``labels`` -100,
    the pad token). ``document_mask: true`` adds ``position_ids`` that restart at every document
    (and at each row's start and its padding) and ``_document_ids``, and sets ``labels`` to -100
    at each segment's first token, as transformers' ``DataCollatorWithFlattening`` does, so no
    token is predicted across a boundary, also when the batch is flattened into one sequence.
    ``cu_seqlens: true`` adds ``cu_seqlens`` and ``max_seqlen`` (``segment_fields``)."""

    options = {"seq_len": 1024, **PACKING_OPTIONS, "special_tokens": {}}
    token_cache_options = ()

    @classmethod
    def check_options(cls, options: dict[str, Any], origin: str) -> None:
        check_packing_options(options, origin)

    @classmethod
    def packs_documents(cls, options: dict[str, Any]) -> bool:
        return True

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        super().__init__(options, tokenizer, batch_size, seed)
        self.seq_len = options["seq_len"]
        self.eos = tokenizer.token_id("eos")
        best_fit = options["packing"] == "best_fit"
        self.pad = tokenizer.token_id("pad") if best_fit else self.eos  # concatenated rows have no padding
        self.packer = Packer(tokenizer, self.eos, batch_size, self.seq_len, best_fit=best_fit)

    def fields(self) -> list[Field]:
        shape = (self.batch_size, self.seq_len)
        return [
            Field("input_ids", np.dtype("<i4"), shape),
            Field("attention_mask", np.dtype("|i1"), shape),
            Field("labels", np.dtype("<i8"), shape),
            *segment_field_list(self.opts, self.batch_size, self.seq_len),
        ]

    def batches(self, records: Records, chunk: int) -> Iterator[PendingBatch]:
        for packed in self.packer.batches(records.texts):
            yield PendingBatch(self._writer(packed), self.batch_size, int(packed.used.sum()), packed.records_done)
        self.tokens_dropped = self.packer.leftover
        self.documents_cut = self.packer.documents_cut

    def describe_row(self, row: dict[str, np.ndarray]) -> str:
        """The row's text with each document boundary shown as a line ``--- next document ---``."""
        ids = row["input_ids"][row["attention_mask"].astype(bool)].tolist()
        pieces, start = [], 0
        for pos, token_id in enumerate(ids):
            if token_id == self.eos:
                pieces.append(self.tok.tokenizer.decode(ids[start:pos]) + " <eos>")
                start = pos + 1
        pieces.append(self.tok.tokenizer.decode(ids[start:]))
        return "\n--- next document ---\n".join(p for p in pieces if p)

    def _writer(self, packed: PackedRows) -> Callable[[dict[str, np.ndarray]], None]:
        def write(out: dict[str, np.ndarray]) -> None:
            padding = np.arange(self.seq_len) >= packed.used[:, None]
            ids = out["input_ids"]
            ids[:] = packed.tokens
            ids[padding] = self.pad
            out["attention_mask"][:] = ~padding
            labels = out["labels"]
            labels[:] = ids
            labels[padding] = -100
            if self.opts["document_mask"]:
                starts = framed_starts(packed, self.seq_len, lead=0)
                labels[starts] = -100
                segment_fields(starts, out)
        return write
