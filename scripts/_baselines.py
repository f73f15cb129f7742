"""Baseline masked-LM input pipelines that ``scripts/bench.py`` compares ringload with.

Both produce batches of ``batch_size`` x ``seq_len`` token ids for BERT-style
masked-LM training (15% of non-special tokens chosen; of those 80% become
``[MASK]``, 10% a random token, 10% stay) through ``torch.utils.data.DataLoader``
worker processes:

* :func:`handmade` -- a tuned ``IterableDataset``: rows ``[CLS] ... [SEP]`` packed
  from documents joined by ``[SEP]``, exactly the task ringload runs.
* :func:`hf_streaming` -- Hugging Face ``datasets`` streaming with ``group_texts``
  and ``DataCollatorForLanguageModeling``, as the HF docs and ``run_mlm.py`` do it.

Each returns an :data:`Opener`: untimed set-up happens when it is built, and
everything that starts the pipeline (worker processes included) happens when it
is entered, so the benchmark can time it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

Batch = dict[str, torch.Tensor]
Opener = Callable[[], AbstractContextManager[Iterator[Batch]]]


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, mask_prob: float,
                mask_id: int, vocab_size: int, special_ids: Sequence[int]) -> np.ndarray:
    """Apply BERT 80/10/10 masking to ``ids`` in place and return the labels (-100 = not chosen)."""
    chosen = (rng.random(ids.shape) < mask_prob) & ~np.isin(ids, special_ids)
    labels = np.where(chosen, ids, -100)
    roll = rng.random(ids.shape)
    ids[chosen & (roll < 0.8)] = mask_id
    randomise = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[randomise] = rng.integers(vocab_size, size=int(randomise.sum()))
    return labels


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token} token")
    return token_id


class PackedMLMDataset(IterableDataset):
    """Worker ``k`` of ``P`` takes lines ``i % P == k`` and yields ready, masked batches.

    Lines are encoded ``chunk_lines`` at a time (with the ``encode`` method), documents are joined by ``[SEP]``
    into one id stream, and the stream is cut into rows ``[CLS] <seq_len-2 ids> [SEP]``
    with numpy, so the consumer receives finished tensors and does no work.
    """

    def __init__(self, path: Path, tokenizer: Tokenizer, *, encode: str, chunk_lines: int,
                 batch_size: int, seq_len: int, mask_prob: float, seed: int) -> None:
        super().__init__()
        self.path = path
        self.tokenizer = tokenizer
        self.encode = encode
        self.chunk_lines = chunk_lines
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.mask_prob = mask_prob
        self.seed = seed
        self.cls_id, self.sep_id, self.mask_id = (
            _token_id(tokenizer, t) for t in ("[CLS]", "[SEP]", "[MASK]"))
        self.vocab_size = tokenizer.get_vocab_size()

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        rank, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng((self.seed, rank))
        body = self.seq_len - 2
        per_batch = self.batch_size * body
        encode = getattr(self.tokenizer, self.encode)
        pending = np.empty(0, dtype=np.int64)
        for texts in self._chunks(rank, workers):
            encodings = encode(texts, add_special_tokens=False)
            pending = np.concatenate([pending, self._join(encodings)])
            full = len(pending) // per_batch
            for rows in pending[:full * per_batch].reshape(full, self.batch_size, body):
                yield self._batch(rows, rng)
            pending = pending[full * per_batch:]
        # The ids left over (less than one batch per worker and epoch) are dropped.

    def _chunks(self, rank: int, workers: int) -> Iterator[list[str]]:
        texts: list[str] = []
        with self.path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i % workers == rank:
                    texts.append(json.loads(line)["text"])
                    if len(texts) == self.chunk_lines:
                        yield texts
                        texts = []
        if texts:
            yield texts

    def _join(self, encodings: list[Encoding]) -> np.ndarray:
        """All ids of ``encodings``, each document followed by ``[SEP]``."""
        sep = (self.sep_id,)
        count = sum(len(e) for e in encodings) + len(encodings)
        ids = chain.from_iterable(chain.from_iterable((e.ids, sep) for e in encodings))
        return np.fromiter(ids, dtype=np.int64, count=count)

    def _batch(self, rows: np.ndarray, rng: np.random.Generator) -> Batch:
        ids = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        ids[:, 0] = self.cls_id
        ids[:, 1:-1] = rows
        ids[:, -1] = self.sep_id
        labels = mask_tokens(ids, rng, mask_prob=self.mask_prob, mask_id=self.mask_id,
                             vocab_size=self.vocab_size,
                             special_ids=(self.cls_id, self.sep_id))
        input_ids = torch.from_numpy(ids)
        return {"input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": torch.from_numpy(labels)}


def handmade(path: Path, tokenizer: Tokenizer, *, encode: str, chunk_lines: int,
             producers: int, batch_size: int, seq_len: int, mask_prob: float,
             seed: int) -> Opener:
    """The hand-written ``IterableDataset`` under a ``DataLoader`` with ``producers`` workers.

    ``encode`` names the ``Tokenizer`` method (``encode_batch`` or ``encode_batch_fast``).
    """
    dataset = PackedMLMDataset(path, tokenizer, encode=encode, chunk_lines=chunk_lines,
                               batch_size=batch_size, seq_len=seq_len, mask_prob=mask_prob,
                               seed=seed)

    @contextmanager
    def open_stream() -> Iterator[Iterator[Batch]]:
        # batch_size=None: the dataset already yields whole batches.
        yield iter(DataLoader(dataset, batch_size=None, num_workers=producers,
                              persistent_workers=False))

    return open_stream


def hf_streaming(shards: Sequence[Path], tokenizer: Tokenizer, *, producers: int,
                 batch_size: int, seq_len: int, mask_prob: float, seed: int) -> Opener:
    """HF ``datasets`` streaming + ``group_texts`` + ``DataCollatorForLanguageModeling``.

    ``datasets`` hands whole shards (files) to DataLoader workers, so ``shards``
    must hold at least ``producers`` files.
    """
    # Imported here so the other contenders' processes do not pay for them.
    from datasets import load_dataset
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    collator = DataCollatorForLanguageModeling(hf_tokenizer, mlm_probability=mask_prob,
                                               seed=seed)

    def tokenize(examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        # The special-tokens mask spares the collator from recomputing it per batch.
        return hf_tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        joined = {k: list(chain.from_iterable(v)) for k, v in examples.items()}
        usable = len(joined["input_ids"]) // seq_len * seq_len
        return {k: [v[i:i + seq_len] for i in range(0, usable, seq_len)]
                for k, v in joined.items()}

    @contextmanager
    def open_stream() -> Iterator[Iterator[Batch]]:
        dataset = load_dataset("json", data_files=[str(p) for p in shards], split="train",
                               streaming=True)
        dataset = (dataset.map(tokenize, batched=True, remove_columns=["text"])
                   .map(group_texts, batched=True))
        yield iter(DataLoader(dataset, batch_size=batch_size, collate_fn=collator,
                              num_workers=producers))

    return open_stream
