"""Sequence classification: one (text[, text_pair]) per row, single-label or multi-label."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .._errors import RecipeError
from .._layout import Field
from .._types import Records
from .base import TOKENIZE_PIECE, PendingBatch, Task, TokenizerInfo


class Classify(Task):
    """``type: classify``. Each row holds one example with the tokenizer's own special tokens,
    truncated and padded to ``seq_len``; ``labels`` [B] int64. Labels given as strings map through
    ``labels:`` (their index); without it, labels must be integers below ``num_labels``. A label
    that cannot be mapped makes the record bad. ``_lengths`` keeps each row's true length so the
    consumer can trim padding columns (``connect(..., trim=True)``)."""

    options = {"seq_len": 128, "labels": [], "num_labels": 0, "special_tokens": {}}
    reads_labels = True

    @classmethod
    def check_options(cls, options: dict[str, Any], origin: str) -> None:
        if not options["labels"] and options["num_labels"] < 1:
            raise RecipeError(f"{origin}: task.labels: give the label names (labels: [a, b, ...]) "
                              "or task.num_labels for integer labels")
        if not all(isinstance(name, (str, int)) for name in options["labels"]):
            raise RecipeError(f"{origin}: task.labels: must be a list of names")
        if len(set(map(str, options["labels"]))) != len(options["labels"]):
            raise RecipeError(f"{origin}: task.labels: names repeat")

    def __init__(self, options: dict[str, Any], tokenizer: TokenizerInfo, batch_size: int, seed: int):
        super().__init__(options, tokenizer, batch_size, seed)
        self.seq_len = options["seq_len"]
        self.label_names = [str(name) for name in options["labels"]]
        self.label_index = {name: i for i, name in enumerate(self.label_names)}
        self.num_labels = len(self.label_names) or options["num_labels"]
        self.pad = tokenizer.token_id("pad")
        # Classification encodes one example per row, with the tokenizer's special tokens, truncated.
        # A copy: the shared tokenizer stays without truncation, which TokenizerInfo.head relies on.
        self.encoder = Tokenizer.from_str(tokenizer.tokenizer.to_str())
        self.encoder.enable_truncation(max_length=self.seq_len)

    def fields(self) -> list[Field]:
        shape = (self.batch_size, self.seq_len)
        fields = [Field("input_ids", np.dtype("<i4"), shape), Field("attention_mask", np.dtype("|i1"), shape)]
        if self.tok.has_token_types:
            fields.append(Field("token_type_ids", np.dtype("<i4"), shape))
        fields += [self.label_field(), Field("_lengths", np.dtype("<i4"), (self.batch_size,))]
        return fields

    def label_field(self) -> Field:
        return Field("labels", np.dtype("<i8"), (self.batch_size,))

    def label_text(self, labels: np.ndarray) -> str:
        value = int(labels)
        return self.label_names[value] if self.label_names else str(value)

    def describe_row(self, row: dict[str, np.ndarray]) -> str:
        return f"label: {self.label_text(row['labels'])}\n{super().describe_row(row)}"

    def convert_label(self, raw: Any) -> Any:
        if self.label_names:
            name = str(raw)
            if name not in self.label_index:
                raise ValueError(f"label {name!r} is not one of task.labels ({', '.join(self.label_names)})")
            return self.label_index[name]
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"label {raw!r} is not an integer (name the labels in task.labels)") from None
        if not 0 <= value < self.num_labels or isinstance(raw, bool):
            raise ValueError(f"label {raw!r} is outside 0..{self.num_labels - 1} (task.num_labels)")
        return value

    def write_labels(self, out: np.ndarray, labels: list[Any]) -> None:
        out[:len(labels)] = labels  # a complete pass's last batch may be partial

    @classmethod
    def complete_pass_problem(cls, options: dict[str, Any], bucketing: bool) -> str | None:
        return None

    def batches(self, records: Records, chunk: int) -> Iterator[PendingBatch]:
        size = self.batch_size
        # Training drops the chunk's last partial batch; a complete pass keeps it (padded by ``_complete``).
        full = len(records) if self.keep_every_record else len(records) - len(records) % size
        step = max(1, TOKENIZE_PIECE // size) * size
        if self.bucket_window:
            step = -(-self.bucket_window // size) * size  # a window of whole batches
        for begin in range(0, full, step):
            # Only the first seq_len tokens are kept: long records are tokenized as far as that needs.
            texts = records.texts[begin:min(full, begin + step)]
            if records.pairs is not None:
                pairs = records.pairs[begin:begin + len(texts)]
                inputs: list[Any] = [self.tok.head_of_pair(a, b, self.seq_len)
                                     for a, b in zip(texts, pairs, strict=True)]
            else:
                inputs = [self.tok.head(t, self.seq_len) for t in texts]
            encodings = self.encoder.encode_batch_fast(inputs, add_special_tokens=True)
            order = np.arange(len(encodings))
            # Shortest first; equal lengths keep record order, so the stream stays a function of the data.
            if self.bucket_window:
                order = np.argsort([len(e.ids) for e in encodings], kind="stable")
            for start in range(0, len(encodings), size):
                picked = order[start:start + size]
                rows = [encodings[i] for i in picked]
                done = begin + start + len(rows)
                if self.bucket_window:  # a window's records are all done with its last batch
                    done = begin + len(encodings) if start + size >= len(encodings) else begin
                lengths = [len(e.ids) for e in rows]
                yield PendingBatch(self._writer(rows, self.labels_of(records, begin + picked)), size, sum(lengths),
                                   done, begin + picked if self.keep_every_record else None, max(lengths))
        self.examples_dropped = len(records) - full

    def labels_of(self, records: Records, indexes: np.ndarray) -> list[Any] | None:
        """The labels of the chunk's records at ``indexes``, in that order."""
        labels = records.labels
        assert labels is not None  # parse_recipe requires a label_field of every source for such a task
        return [labels[i] for i in indexes]

    def _writer(self, rows: list[Any], labels: list[Any] | None) -> Callable[[dict[str, np.ndarray]], None]:
        def write(out: dict[str, np.ndarray]) -> None:
            ids, attention, lengths = out["input_ids"], out["attention_mask"], out["_lengths"]
            types = out.get("token_type_ids")
            ids.fill(self.pad)
            attention.fill(0)
            if types is not None:
                types.fill(0)
            for row, encoding in enumerate(rows):
                n = len(encoding.ids)
                ids[row, :n] = encoding.ids
                attention[row, :n] = 1
                lengths[row] = n
                if types is not None:
                    types[row, :n] = encoding.type_ids
            if labels is not None:
                self.write_labels(out["labels"], labels)
        return write


class MultiLabel(Classify):
    """``type: multilabel``. ``labels`` is a multi-hot float32 [B, C] over the recipe's ``labels:``
    list, from a list-valued field (or a string of names joined by ``label_separator``). Names not
    in the list are ignored and counted (``unknown_labels: bad_record`` makes such a record bad); a
    record with no known label is an all-zero row."""

    options = {"seq_len": 128, "labels": [], "unknown_labels": "ignore", "label_separator": ",", "special_tokens": {}}

    @classmethod
    def check_options(cls, options: dict[str, Any], origin: str) -> None:
        if not options["labels"]:
            raise RecipeError(f"{origin}: task.labels: a multilabel task needs its label names (labels: [a, b, ...])")
        if options["unknown_labels"] not in ("ignore", "bad_record"):
            raise RecipeError(f"{origin}: task.unknown_labels: must be ignore or bad_record")
        super().check_options({**options, "num_labels": 0}, origin)

    def label_field(self) -> Field:
        return Field("labels", np.dtype("<f4"), (self.batch_size, self.num_labels))

    def convert_label(self, raw: Any) -> Any:
        names = raw.split(self.opts["label_separator"]) if isinstance(raw, str) else raw
        if not isinstance(names, list):
            raise ValueError(f"labels {raw!r} are neither a list nor a string of names")
        known = [self.label_index[str(n).strip()] for n in names if str(n).strip() in self.label_index]
        unknown = len(names) - len(known)
        if unknown and self.opts["unknown_labels"] == "bad_record":
            raise ValueError(f"labels {raw!r} include names outside task.labels")
        self.labels_unknown += unknown
        return known

    def label_text(self, labels: np.ndarray) -> str:
        return ", ".join(self.label_names[i] for i in np.flatnonzero(labels)) or "(none)"

    def write_labels(self, out: np.ndarray, labels: list[Any]) -> None:
        out.fill(0.0)
        for row, known in enumerate(labels):
            out[row, known] = 1.0
