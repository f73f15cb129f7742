"""Encoding for inference: each record tokenized and padded to a row, with no labels."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._layout import Field
from .._sources import Records
from .classify import Classify


class Encode(Classify):
    """``type: encode``. One record per row with the tokenizer's special tokens, truncated and padded
    to ``seq_len`` (a ``pair_field`` makes it a pair), and ``_lengths``; no labels. For embedding,
    scoring or any batch inference, usually with ``mode: eval`` so that every record appears once
    and carries its ``_record`` (and ``_id``)."""

    options = {"seq_len": 128, "special_tokens": {}}
    reads_labels = False

    @classmethod
    def check_options(cls, options: dict[str, Any], origin: str) -> None:
        """Nothing to check beyond types: encode has no labels."""

    def __init__(self, options: dict[str, Any], tokenizer: Any, batch_size: int, seed: int):
        super().__init__({**options, "labels": [], "num_labels": 0}, tokenizer, batch_size, seed)

    def fields(self) -> list[Field]:
        return [f for f in super().fields() if f.name != "labels"]

    def convert_label(self, raw: Any) -> Any:
        return raw  # a label the source happens to have is not used

    def labels_of(self, records: Records, indexes: np.ndarray) -> list[Any] | None:
        return None

    def describe_row(self, row: dict[str, np.ndarray]) -> str:
        return super(Classify, self).describe_row(row)
