"""Shared fixtures: a generated corpus, a tokenizer trained on it, unique ring names, clean-up."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from ringload._housekeeping import remove_ring, ring_owner
from ringload._failures import forget_failure

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so what no out up into more about said time "
    "river mountain engine lantern harvest quietly remarkable unbelievable shipwright astronomer constellation "
    "kingdom thunder whisper morning evening journey garden silver ancient promise village window stranger"
).split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Sentences of varying length with a skewed word distribution, like real prose."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(WORDS))]
    texts = []
    for _ in range(n):
        words = rng.choices(WORDS, weights, k=rng.randint(3, 90))
        texts.append(" ".join(words).capitalize() + ".")
    return texts


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The same 6,000 examples as jsonl, jsonl.gz and text, plus a two-file split for globs."""
    root = tmp_path_factory.mktemp("corpus")
    texts = make_texts(6000)
    jsonl = root / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    with gzip.open(root / "corpus.jsonl.gz", "wt") as out:
        out.write(jsonl.read_text())
    (root / "corpus.txt").write_text("\n".join(texts) + "\n")
    (root / "parts").mkdir()
    (root / "parts" / "a.txt").write_text("\n".join(texts[:3000]) + "\n")
    (root / "parts" / "b.txt").write_text("\n".join(texts[3000:]) + "\n")
    return {"jsonl": jsonl, "gz": root / "corpus.jsonl.gz", "text": root / "corpus.txt", "parts": root / "parts"}


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory, corpus) -> str:
    """A BERT-style WordPiece tokenizer trained on the corpus, saved with truncation and padding
    switched on (as inference-oriented tokenizer.json files often are)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train([str(corpus["text"])], trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tok.enable_truncation(max_length=16)
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture
def ring_name(request):
    """A unique ring name; whatever the test leaves of that ring (its failure record too) is removed afterwards."""
    name = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    pid = ring_owner(name)
    if pid:
        os.kill(pid, signal.SIGKILL)
    remove_ring(name)
    forget_failure(name)


@pytest.fixture
def recipe_file(tmp_path, corpus, tokenizer_path):
    """Write a recipe for the generated corpus; keyword arguments override its keys."""

    def write(**overrides) -> Path:
        recipe = {
            "name": "test",
            "source": {"paths": [str(corpus["jsonl"])], "format": "jsonl", "field": "text"},
            "tokenizer": tokenizer_path,
            "task": {"type": "mlm", "seq_len": 64},
            "batch_size": 8,
            "producers": 2,
            "seed": 7,
            "epochs": 1,
            "chunk_bytes": 16384,
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(recipe.get(key), dict):
                recipe[key] = {**recipe[key], **value}
            else:
                recipe[key] = value
        path = tmp_path / f"recipe-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def drain(name: str, limit: int | None = None, timeout: float = 30.0) -> list[dict[str, np.ndarray]]:
    """Consume a ring to its end (or ``limit`` batches), copying every batch out of the ring."""
    import ringload

    batches = []
    with ringload.connect(name, timeout=timeout) as loader:
        for batch in loader:
            batches.append({k: v.numpy().copy() for k, v in batch.items()})
            if limit is not None and len(batches) >= limit:
                break
    return batches


def batch_checksum(batch: dict) -> int:
    """CRC32 of every field's bytes, in key order: a tag of a batch's contents."""
    import zlib

    crc = 0
    for key in sorted(batch):
        crc = zlib.crc32(batch[key].numpy().tobytes(), crc)
    return crc


def assert_same_stream(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> None:
    assert len(a) == len(b), f"{len(a)} batches vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            assert np.array_equal(x[key], y[key]), f"batch {i} field {key} differs"


RECORD_BYTES = 64  # fixed-width lines: a 1024-byte chunk holds exactly 16 records


def write_records(path: Path, ids: range, fixed: bool) -> None:
    """jsonl records {"text", "label": id}; fixed-width lines if ``fixed``, prose of varying length otherwise."""
    texts = make_texts(len(ids), seed=ids.start)
    with path.open("w") as out:
        for i, text in zip(ids, texts):
            if fixed:
                line = json.dumps({"text": "", "label": i})
                line = json.dumps({"text": "w" * (RECORD_BYTES - 1 - len(line)), "label": i})
                assert len(line) == RECORD_BYTES - 1
            else:
                line = json.dumps({"text": text, "label": i})
            out.write(line + "\n")


@pytest.fixture
def id_recipe(tmp_path, tokenizer_path):
    """A classify recipe whose labels are record ids (so batches say which records they hold), over
    ``files`` files, fixed-width lines (16 to a 1024-byte chunk) or prose of varying length."""

    def write(files: int, records: int, fixed: bool = True, **overrides) -> Path:
        per_file = records // files
        paths = []
        for f in range(files):
            path = tmp_path / f"part-{f}.jsonl"
            write_records(path, range(f * per_file, (f + 1) * per_file), fixed)
            paths.append(str(path))
        recipe = {
            "name": "shard", "tokenizer": tokenizer_path, "batch_size": 2, "producers": 2, "epochs": 1,
            "chunk_bytes": 1024, "seed": 3,
            "source": {"paths": paths, "format": "jsonl", "field": "text", "label_field": "label"},
            "task": {"type": "classify", "seq_len": 16, "num_labels": records},
            **overrides,
        }
        path = tmp_path / f"recipe-{files}-{records}-{fixed}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def record_ids(name: str) -> list[list[int]]:
    """The record ids (an id_recipe's labels) of every batch of the ring, in order."""
    import ringload

    with ringload.connect(name, timeout=30) as loader:
        return [batch["labels"].tolist() for batch in loader]


def state_after(recipe, name: str, cut: int) -> dict:
    """The checkpoint of a fresh run of ``recipe`` after its first ``cut`` batches."""
    import ringload

    with ringload.start(recipe, name=name) as ring, ringload.connect(ring.name) as loader:
        for _ in range(cut):
            next(loader)
        return loader.state_dict()
