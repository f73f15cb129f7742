"""Causal-LM pretraining (GPT): documents joined by the end-of-text token, cut into full rows."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .._layout import Field
from .._sources import Records
from .base import Packer, PendingBatch, Task, TokenizerInfo


class CausalLM(Task):
    """``type: clm``. Rows of exactly ``seq_len`` tokens, no padding; ``labels`` equal ``input_ids``
    (the model shifts them). ``document_mask: true`` adds ``position_ids`` that restart at every
    document (and at the row's start) and ``_document_ids`` (the segment each token belongs to
    within its row), so attention need not cross documents in packed rows."""

    options = {"seq_len": 1024, "document_mask": False, "special_tokens": {}}

    @classmethod
    def packs_documents(cls, options: dict[str, Any]) -> bool:
        return True

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        super().__init__(options, tokenizer, batch_size, seed)
        self.seq_len = options["seq_len"]
        self.eos = tokenizer.token_id("eos")
        self.packer = Packer(tokenizer, self.eos, batch_size, self.seq_len)

    def fields(self) -> list[Field]:
        shape = (self.batch_size, self.seq_len)
        fields = [
            Field("input_ids", np.dtype("<i4"), shape),
            Field("attention_mask", np.dtype("|i1"), shape),
            Field("labels", np.dtype("<i8"), shape),
        ]
        if self.opts["document_mask"]:
            fields += [Field("position_ids", np.dtype("<i4"), shape), Field("_document_ids", np.dtype("<i4"), shape)]
        return fields

    def batches(self, records: Records, chunk: int) -> Iterator[PendingBatch]:
        for rows, _, done in self.packer.batches(records.texts):
            yield PendingBatch(self._writer(rows), self.batch_size, self.batch_size * self.seq_len, done)
        self.tokens_dropped = self.packer.leftover

    def describe_row(self, row: dict[str, np.ndarray]) -> str:
        """The row's text with each document boundary shown as a line ``--- next document ---``."""
        ids = row["input_ids"].tolist()
        pieces, start = [], 0
        for pos, token_id in enumerate(ids):
            if token_id == self.eos:
                pieces.append(self.tok.tokenizer.decode(ids[start:pos]) + " <eos>")
                start = pos + 1
        pieces.append(self.tok.tokenizer.decode(ids[start:]))
        return "\n--- next document ---\n".join(p for p in pieces if p)

    def _writer(self, rows: np.ndarray) -> Callable[[dict[str, np.ndarray]], None]:
        def write(out: dict[str, np.ndarray]) -> None:
            out["input_ids"][:] = rows
            out["labels"][:] = rows
            out["attention_mask"].fill(1)
            if "position_ids" in out:
                # A token after an end-of-text token starts a new document (so does each row).
                starts = np.zeros(rows.shape, dtype=bool)
                starts[:, 0] = True
                starts[:, 1:] = rows[:, :-1] == self.eos
                segment = np.cumsum(starts, axis=1, dtype=np.int32) - 1
                columns = np.arange(rows.shape[1], dtype=np.int32)
                first = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
                out["position_ids"][:] = columns - first
                out["_document_ids"][:] = segment
        return write
