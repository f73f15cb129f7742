"""Throughput on real data: long records cut into chunk-sized pieces, producers that work ahead of a
full lane, and a status that says where time goes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import assert_same_stream, drain, make_texts
from fetch_assets import fetch

import ringload
from ringload._recipe import parse_recipe
from ringload._stream import read_stream
from ringload._types import ResumePoint


CHUNK = 16384


def write_skewed(path: Path, fmt: str, giant_words: tuple[int, ...] = (40_000, 60_000)) -> list[str]:
    """Short documents with giant ones (several chunks long) first and in the middle; returns the texts."""
    texts = make_texts(1500, seed=11)
    giants = [" ".join(make_texts(giant_words[i] // 40, seed=100 + i)) for i in range(len(giant_words))]
    texts = [giants[0], *texts[:700], *giants[1:], *texts[700:]]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif fmt == "paragraph":
        path.write_text("\n\n".join(t.replace(". ", ".\n") for t in texts) + "\n")
    else:
        path.write_text("\n".join(texts) + "\n")
    return texts


def recipe_for(path: Path, fmt: str, tokenizer: str = "unused.json", **extra) -> ringload.Recipe:
    source = {"paths": [str(path)], "format": "text" if fmt == "paragraph" else fmt}
    if fmt == "paragraph":
        source["text_unit"] = "paragraph"
    return parse_recipe({"name": "skewed", "source": source, "tokenizer": tokenizer, "task": {"type": "mlm"},
                         "chunk_bytes": CHUNK, "epochs": 1, **extra})


def words_of(chunks, fmt: str) -> list[str]:
    words = []
    for chunk in chunks:
        for line in chunk.payload.decode().splitlines():
            words += (json.loads(line)["text"] if fmt == "jsonl" else line).split()
    return words


def resume_at(chunk_id: int, chunk) -> ResumePoint:
    """The resume point of a stream whose last delivered batch ended chunk ``chunk_id - 1``... at ``chunk``."""
    seen = (1, chunk.lap, chunk.file_index, chunk.offset, chunk.line, chunk.part)
    return ResumePoint(chunk=chunk_id, epoch=chunk.epoch, pick=chunk.pick, source=0,
                       sources=(seen,) + ((0, 0, 0, 0, 1, 0),) * 7)


@pytest.mark.parametrize("fmt", ["jsonl", "text", "paragraph"])
def test_long_records_become_chunk_sized_pieces_in_order(tmp_path, fmt):
    """A record several chunks long is read as pieces of about chunk_bytes, its words all kept, in order."""
    path = tmp_path / f"skewed.{fmt}"
    texts = write_skewed(path, fmt)
    chunks = list(read_stream(recipe_for(path, fmt), [[str(path)]], split_long_records=True))
    assert max(len(c.payload) for c in chunks) < 2 * CHUNK
    assert sum(c.part > 0 for c in chunks) >= 2 * len(texts[0]) // CHUNK - 4  # both giants were cut
    assert words_of(chunks, fmt) == " ".join(texts).split()


@pytest.mark.parametrize("shuffle", [False, True])
def test_reading_resumes_at_every_piece(tmp_path, shuffle):
    """Resuming at any chunk, a long record's pieces included, yields exactly the chunks that followed it."""
    path = tmp_path / "skewed.jsonl"
    write_skewed(path, "jsonl")
    recipe = recipe_for(path, "jsonl", shuffle={"buffer": 300} if shuffle else None)
    chunks = list(read_stream(recipe, [[str(path)]], split_long_records=True))
    assert any(c.part for c in chunks)
    for i, chunk in enumerate(chunks):
        again = list(read_stream(recipe, [[str(path)]], resume_at(i, chunk), split_long_records=True))
        assert [c.payload for c in again] == [c.payload for c in chunks[i:]], f"resume at chunk {i}"


def test_records_stay_whole_for_tasks_that_do_not_pack(tmp_path):
    """Without splitting (classification, unpacked mlm) a long record stays one record of one chunk."""
    path = tmp_path / "skewed.jsonl"
    texts = write_skewed(path, "jsonl")
    chunks = list(read_stream(recipe_for(path, "jsonl"), [[str(path)]]))
    assert json.loads(chunks[0].payload.splitlines()[0])["text"] == texts[0]
    assert not any(c.part for c in chunks)


@pytest.fixture
def skewed_recipe(tmp_path, tokenizer_path):
    """A masked-LM recipe over a jsonl corpus whose first record is several chunks long."""
    path = tmp_path / "skewed.jsonl"
    write_skewed(path, "jsonl")

    def write(**overrides) -> Path:
        recipe = {"name": "skewed", "source": {"paths": [str(path)], "format": "jsonl"}, "tokenizer": tokenizer_path,
                  "task": {"type": "mlm", "seq_len": 64}, "batch_size": 8, "producers": 2, "seed": 5, "epochs": 1,
                  "chunk_bytes": CHUNK, **overrides}
        out = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
        out.write_text(yaml.safe_dump(recipe))
        return out

    return write


def test_long_records_keep_the_stream_identical_across_producers_and_kills(skewed_recipe, ring_name):
    """With giant records, 1 and 3 producers, a tiny lane, and a producer SIGKILLed inside the giant
    record all yield the 2-producer stream."""
    recipe = skewed_recipe()
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    for producers in (1, 3):
        with ringload.start(recipe, name=ring_name, producers=producers):
            assert_same_stream(reference, drain(ring_name))
    with ringload.start(skewed_recipe(slots=2), name=ring_name):
        assert_same_stream(reference, drain(ring_name))
    with ringload.start(recipe, name=ring_name):
        got = drain(ring_name, limit=5)  # inside the first (giant) record's pieces
        os.kill(ringload.ring_status(ring_name)["producers"][1]["pid"], signal.SIGKILL)
        got += drain(ring_name)
        assert ringload.ring_status(ring_name)["producers"][1]["restarts"] == 1
    assert_same_stream(reference, got)


def test_resume_inside_a_long_record(skewed_recipe, ring_name):
    """A checkpoint taken among a giant record's pieces resumes with exactly the batches that followed."""
    recipe = skewed_recipe()
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    with ringload.start(recipe, name=ring_name), ringload.connect(ring_name) as loader:
        before = []
        for batch in loader:
            before.append({k: v.numpy().copy() for k, v in batch.items()})
            if loader.state_dict()["resume"]["sources"][0][5] >= 2:  # past the record's second piece
                break
        state = loader.state_dict()
    with ringload.start(recipe, name=ring_name, resume=state):
        after = drain(ring_name)
    assert_same_stream(reference, before + after)


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_status_says_where_time_goes(skewed_recipe, ring_name):
    """Stage shares add up; with nobody reading, status names the consumer; with a slow reader, the training loop."""
    with ringload.start(skewed_recipe(epochs=None), name=ring_name):
        def consumer_bound():
            stages = ringload.ring_status(ring_name)["stages"]
            return stages if (stages["bottleneck"] or "").startswith("the consumer") else None

        stages = wait_for(consumer_bound)
        table = subprocess.run([sys.executable, "-m", "ringload", "status", ring_name], capture_output=True, text=True,
                               check=True).stdout
        assert "bottleneck: the consumer" in table and "wait for a slot" in table
        assert abs(sum(stages["producers"].values()) - 1.0) < 0.01
        assert abs(sum(stages["reader"].values()) - 1.0) < 0.01
        with ringload.connect(ring_name) as loader:
            for _ in range(20):
                next(loader)
                time.sleep(0.05)  # a training step far slower than the producers
            snapshot = ringload.ring_status(ring_name)
        assert snapshot["consumers"][0]["wait_s"] < 0.5
        assert snapshot["stages"]["bottleneck"].startswith("the training loop")
        assert all(p["chunk_bytes"] > 0 and p["work_s"] > 0 for p in snapshot["producers"])


def test_a_giant_record_leaves_every_producer_working(skewed_recipe, ring_name):
    """With a giant first record, two slots per lane and no reader: each producer holds a chunk-sized piece
    and tokenizes it ahead of its full lane, instead of one holding the record while the other waits."""
    with ringload.start(skewed_recipe(slots=2, producers=2), name=ring_name):
        def all_blocked():
            producers = ringload.ring_status(ring_name)["producers"]
            return producers if all(p["stage"] == "wait_slot" for p in producers) else None

        producers = wait_for(all_blocked)
    assert [p["current_chunk"] for p in sorted(producers, key=lambda p: p["current_chunk"])] == [0, 1]
    for p in producers:
        assert p["chunk_bytes"] < 2 * CHUNK  # a piece of the giant record, not the record
        assert p["ready_ahead"] > 0  # the rest of its chunk is tokenized, waiting for a free slot


def adversarial_text(rng: random.Random, words: int) -> str:
    """Long text of words, runs of spaces and newlines, punctuation, accents, CJK, special-token strings."""
    pieces = ["hello", "world", "<|endoftext|>", "[SEP]", "naïve", "日本語", "!!!", "x" * 300, "a.b", "123456", "—",
              "\u0301e", "don't", "\t"]
    gaps = [" ", "", "  ", "\n", " \n ", "\t "]
    return "".join(rng.choice(pieces) + rng.choice(gaps) for _ in range(words))


@pytest.mark.parametrize("asset", ["conftest", "bert-wordpiece", "gpt2-bpe"])
def test_classification_reads_only_the_head_of_long_records(asset, tokenizer_path):
    """A classify batch of long records (and pairs) holds exactly the ids of tokenizing them whole, truncated."""
    import numpy as np

    from ringload._types import Records
    from ringload._tasks import build_task, check_task_options

    path = tokenizer_path if asset == "conftest" else str(fetch(asset) / ("" if asset == "gpt2-bpe" else "tokenizer.json"))
    special = {"pad": "<|endoftext|>"} if asset == "gpt2-bpe" else {}
    options = check_task_options({"type": "classify", "seq_len": 64, "num_labels": 2, "special_tokens": special}, "test")
    task = build_task(options, path, 4, 0)
    assert task.tok.cuts_cleanly
    rng = random.Random(3)
    long_texts = [adversarial_text(rng, rng.choice([5, 300, 8000])) for _ in range(16)]
    # Pairs stay shorter: the reference, truncating a long pair whole, makes every overflow combination.
    texts, pairs = ([adversarial_text(rng, rng.choice([5, 60, 300])) for _ in range(16)] for _ in range(2))
    assert sum(len(task.tok.head(t, 64)) < len(t) for t in long_texts) >= 3  # long records are cut to a head
    for records in (Records(long_texts, labels=[0] * 16), Records(texts, pairs, [1] * 16)):
        texts = records.texts
        whole = task.encoder.encode_batch(list(zip(texts, pairs)) if records.pairs else texts, add_special_tokens=True)
        for b, batch in enumerate(task.batches(records, 0)):
            out = {f.name: np.zeros(f.shape, f.dtype) for f in task.fields()}
            batch.write(out)
            for row in range(4):
                expected = whole[4 * b + row].ids
                assert out["input_ids"][row, :len(expected)].tolist() == expected
