"""Complete passes (``mode: eval``): every record in exactly one row of one rank, with its id.

Every row a ring hands out is checked against the source itself: the test reads the files on its
own, finds the record that the row's ``_record`` (source, file, line) names, tokenizes it with a
separate tokenizer and compares the ids, so a row that carries the wrong record, or a record cut
short, fails. Batch sizes never divide the chunks' record counts, so every chunk ends in a
partial batch, and with several ranks most chunks need padding batches.
"""

from __future__ import annotations

import csv
import io
import json
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import make_texts
from tokenizers import Tokenizer

import ringload
from ringload._errors import RecipeError
from ringload._plan import make_plan

LABELS = ["fresh", "rotten", "plot"]


# -- corpora: each writer returns the files and, per (file, line), the record as the test reads it --------
def jsonl_corpus(root: Path, count: int, seed: int) -> tuple[list[str], dict[tuple[int, int], dict[str, Any]]]:
    """Two jsonl files of prose of varying length, string ids, list labels, with blank lines between."""
    texts, rng = make_texts(count, seed=seed), random.Random(seed)
    paths, index = [], {}
    for f, part in enumerate((texts[: count // 3], texts[count // 3:])):
        lines = []
        for text in part:
            if rng.random() < 0.05:
                lines.append("")  # not a record
            record = {"text": text, "id": f"doc-{seed}-{f}-{len(lines)}", "tags": rng.sample(LABELS, rng.randint(0, 2))}
            lines.append(json.dumps(record))
            index[f, len(lines)] = record
        path = root / f"part-{seed}-{f}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return paths, index


def text_corpus(root: Path, count: int, seed: int) -> tuple[list[str], dict[tuple[int, int], dict[str, Any]]]:
    """One text file, one example per line."""
    texts = make_texts(count, seed=seed)
    path = root / f"lines-{seed}.txt"
    path.write_text("\n".join(texts) + "\n")
    return [str(path)], {(0, n): {"text": t} for n, t in enumerate(texts, 1)}


def csv_corpus(root: Path, count: int, seed: int) -> tuple[list[str], dict[tuple[int, int], dict[str, Any]]]:
    """One csv file whose quoted texts span lines and hold commas and quotes; a record's line is where it starts."""
    texts, rng = make_texts(count, seed=seed), random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text", "category"])
    for text in texts:
        words = text.split(" ")
        if rng.random() < 0.3:
            words.insert(len(words) // 2, '"quoted",\nand on')
        writer.writerow([" ".join(words), rng.choice(LABELS)])
    path = root / f"table-{seed}.csv"
    path.write_text(out.getvalue())
    index, reader, previous = {}, csv.reader(io.StringIO(out.getvalue())), 1
    next(reader)
    for row in reader:
        index[0, previous + 1] = {"text": row[0], "category": row[1]}
        previous = reader.line_num
    return [str(path)], index


def recipe_for(root: Path, tokenizer: str, sources: list[dict[str, Any]], task: dict[str, Any], **keys: Any) -> Path:
    """A complete-pass recipe file over ``sources``; small chunks, so most chunks end in a partial batch."""
    recipe = {"name": "eval", "sources": sources, "tokenizer": tokenizer, "task": task, "batch_size": 7,
              "producers": 2, "chunk_bytes": 4096, "mode": "eval", **keys}
    path = root / f"recipe-{len(list(root.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# -- running and checking a pass ----------------------------------------------------------------------------
def drain_ranks(name: str, ranks: int, limit: int | None = None,
                trim: bool = False) -> tuple[dict[int, list[dict]], dict[int, dict]]:
    """Every rank's batches (copied) and its state_dict() after them, read concurrently as DDP ranks read;
    ``limit`` batches per rank at most."""
    streams: dict[int, list[dict]] = {}
    states: dict[int, dict] = {}
    errors: list[BaseException] = []

    def drain(rank: int) -> None:
        try:
            with ringload.connect(name, rank=rank, meta=True, trim=trim, timeout=60) as loader:
                batches = []
                for batch in loader:
                    batches.append({k: v.numpy().copy() for k, v in batch.items()})
                    if len(batches) == limit:
                        break
                batch = None  # a trimmed batch is a view of its slot: let it go before closing
                streams[rank], states[rank] = batches, loader.state_dict()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    return streams, states


def finished_status(name: str, timeout: float = 20.0) -> dict:
    """The ring's status once every producer has finished (its counters are final then)."""
    deadline = time.monotonic() + timeout
    while (status := ringload.ring_status(name))["state"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert status["state"] == "finished", status["state"]
    return status


def run_pass(recipe: Path, name: str, ranks: int, **start: Any) -> dict[int, list[dict]]:
    with ringload.start(recipe, name=name, world_size=ranks, **start):
        return drain_ranks(name, ranks)[0]


class Expected:
    """What each row must hold, from the source files and a tokenizer of the test's own."""

    def __init__(self, tokenizer: str, seq_len: int, corpora: list[dict[tuple[int, int], dict[str, Any]]],
                 task: str, id_field: str | None = None, label_field: str | None = None):
        self.tok = Tokenizer.from_file(tokenizer)
        self.tok.no_padding()
        self.seq_len, self.corpora, self.task = seq_len, corpora, task
        self.id_field, self.label_field = id_field, label_field
        self.tok.no_truncation()  # the fixture's tokenizer file truncates for inference
        if task != "mlm":
            self.tok.enable_truncation(max_length=seq_len)
        self.cls, self.sep = self.tok.token_to_id("[CLS]"), self.tok.token_to_id("[SEP]")

    def every_record(self) -> Counter:
        return Counter((s, f, line) for s, corpus in enumerate(self.corpora) for f, line in corpus)

    def check_row(self, batch: dict, row: int) -> tuple[int, int, int]:
        """The row holds the record its ``_record`` names, with that record's id and label."""
        source, file_index, line = (int(v) for v in batch["_record"][row])
        record = self.corpora[source][file_index, line]
        n = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :n].tolist()
        if self.task == "mlm":
            expected = [self.cls] + self.tok.encode(record["text"], add_special_tokens=False).ids[: self.seq_len - 2]
            expected.append(self.sep)
            labels = batch["labels"][row, :n]
            assert len(expected) == n
            shown = [label if label != -100 else token for token, label in zip(ids, labels.tolist())]
            assert shown == expected, f"row {row} does not hold record {source}:{file_index}:{line}"
        else:
            assert ids == self.tok.encode(record["text"]).ids, f"row {row} does not hold record {source}:{file_index}:{line}"
            assert batch["_lengths"][row] == n
        if self.id_field:
            assert bytes(batch["_id"][row]).rstrip(b"\0").decode() == str(record[self.id_field])
        if self.task == "classify":
            assert batch["labels"][row] == LABELS.index(record[self.label_field])
        if self.task == "multilabel":
            assert [LABELS[i] for i in np.flatnonzero(batch["labels"][row])] == sorted(
                record[self.label_field], key=LABELS.index)
        return source, file_index, line

    def check(self, streams: dict[int, list[dict]], ranks: int) -> Counter:
        """Equal batch counts per rank, padding rows marked, every row's record; returns the records seen."""
        counts = {r: len(streams[r]) for r in range(ranks)}
        assert len(set(counts.values())) == 1, f"ranks got different batch counts: {counts}"
        seen: Counter = Counter()
        for r in range(ranks):
            for batch in streams[r]:
                valid = batch["_valid"].astype(bool)
                n = int(valid.sum())
                assert valid[:n].all() and not valid[n:].any(), "padding rows come after the records"
                assert not batch["attention_mask"][n:].any() and (batch["_record"][n:] == -1).all()
                if "labels" in batch:
                    assert (batch["labels"][n:] == -100).all(), "a padding row's labels are not ignored"
                if "_id" in batch:
                    assert not batch["_id"][n:].any()
                seen.update(self.check_row(batch, row) for row in range(n))
        return seen


@pytest.fixture
def pass_setup(tmp_path, tokenizer_path):
    """A folder for the test's corpora and recipes, and the session's tokenizer."""
    return tmp_path, tokenizer_path


# -- the property, per task, corpus and rank count ----------------------------------------------------------
@pytest.mark.parametrize("ranks,bucket", [(1, 0), (2, 24), (3, 0)])
def test_encode_every_jsonl_record_once_with_its_id(pass_setup, ring_name, ranks, bucket):
    """encode over two jsonl files: every record in exactly one row of one rank, its id and tokens, padding marked."""
    root, tok = pass_setup
    paths, index = jsonl_corpus(root, 700, seed=1)
    recipe = recipe_for(root, tok, [{"paths": paths, "format": "jsonl"}], {"type": "encode", "seq_len": 32},
                        id_field="id", bucket_window=bucket)
    streams = run_pass(recipe, ring_name, ranks)
    expected = Expected(tok, 32, [index], "encode", id_field="id")
    assert expected.check(streams, ranks) == expected.every_record()


def test_classify_every_multiline_csv_record_once(pass_setup, ring_name):
    """classify over csv records spanning lines, 2 ranks, batch 5: each record once, with its label and start line."""
    root, tok = pass_setup
    paths, index = csv_corpus(root, 613, seed=2)
    recipe = recipe_for(root, tok, [{"paths": paths, "format": "csv", "label_field": "category"}],
                        {"type": "classify", "seq_len": 48, "labels": LABELS}, batch_size=5)
    streams = run_pass(recipe, ring_name, 2)
    expected = Expected(tok, 48, [index], "classify", label_field="category")
    assert expected.check(streams, 2) == expected.every_record()


def test_multilabel_every_record_once_over_three_ranks(pass_setup, ring_name):
    """multilabel, 3 ranks, batch 6, bucketing: each record once with its labels; ids from id_field."""
    root, tok = pass_setup
    paths, index = jsonl_corpus(root, 500, seed=3)
    recipe = recipe_for(root, tok, [{"paths": paths, "format": "jsonl", "label_field": "tags"}],
                        {"type": "multilabel", "seq_len": 40, "labels": LABELS}, batch_size=6, id_field="id",
                        bucket_window=50)
    streams = run_pass(recipe, ring_name, 3)
    expected = Expected(tok, 40, [index], "multilabel", id_field="id", label_field="tags")
    assert expected.check(streams, 3) == expected.every_record()


def test_unpacked_mlm_reads_two_sources_completely(pass_setup, ring_name):
    """mlm (pack: false) over a text file and a jsonl source, 2 ranks, batch 9: both sources whole, each record once."""
    root, tok = pass_setup
    text_paths, text_index = text_corpus(root, 400, seed=4)
    json_paths, json_index = jsonl_corpus(root, 300, seed=5)
    sources = [{"paths": text_paths, "format": "text", "weight": 3.0}, {"paths": json_paths, "format": "jsonl"}]
    recipe = recipe_for(root, tok, sources, {"type": "mlm", "seq_len": 24, "pack": False}, batch_size=9)
    streams = run_pass(recipe, ring_name, 2)
    expected = Expected(tok, 24, [text_index, json_index], "mlm")
    assert expected.check(streams, 2) == expected.every_record()


# -- resume ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks,cut,bucket", [(1, 13, 0), (2, 1, 30), (2, 9, 30), (3, 5, 0)])
def test_resumed_pass_continues_exactly(pass_setup, ring_name, ranks, cut, bucket):
    """A pass resumed from a rank's state_dict after `cut` batches per rank gives every rank exactly the batches
    an uninterrupted pass gives it after those: no record scored twice or skipped."""
    root, tok = pass_setup
    paths, index = jsonl_corpus(root, 400, seed=6)
    recipe = recipe_for(root, tok, [{"paths": paths, "format": "jsonl"}], {"type": "encode", "seq_len": 32},
                        id_field="id", bucket_window=bucket, batch_size=4)
    reference = run_pass(recipe, ring_name, ranks)
    with ringload.start(recipe, name=ring_name, world_size=ranks):
        before, states = drain_ranks(ring_name, ranks, limit=cut)
    assert all(states[r] == states[0] for r in range(ranks)), "ranks in step give the same checkpoint"
    after = run_pass(recipe, ring_name, ranks, resume=states[0])
    for r in range(ranks):
        assert len(before[r]) == cut
        stream = before[r] + after[r]
        assert len(stream) == len(reference[r])
        for x, y in zip(stream, reference[r]):
            assert all(np.array_equal(x[k], y[k]) for k in x), f"rank {r} resumed into another stream"
    expected = Expected(tok, 32, [index], "encode", id_field="id")
    merged = {r: before[r] + after[r] for r in range(ranks)}
    assert expected.check(merged, ranks) == expected.every_record()


# -- plan, status, helper, recipe checks ----------------------------------------------------------------------
def test_plan_counts_the_padded_batches(pass_setup, ring_name, tmp_path, monkeypatch):
    """`ringload plan` counts a complete pass's batches per rank, padding batches included, as delivered (len())."""
    monkeypatch.setenv("RINGLOAD_PLANS", str(tmp_path / "plans"))
    root, tok = pass_setup
    paths, _ = jsonl_corpus(root, 300, seed=7)
    recipe = recipe_for(root, tok, [{"paths": paths, "format": "jsonl"}], {"type": "encode", "seq_len": 32},
                        world_size=3)
    counts, _ = make_plan(ringload.load_recipe(recipe), processes=1)
    with ringload.start(recipe, name=ring_name, world_size=3):
        with ringload.connect(ring_name, rank=0) as loader:
            assert len(loader) == counts[0]
        streams, _ = drain_ranks(ring_name, 3)
    assert [len(streams[r]) for r in range(3)] == [counts[0]] * 3


def test_status_reports_padding_saved_by_bucketing(pass_setup, ring_name):
    """status counts padding rows and the padding left after trimming; bucketing leaves less than record order."""
    root, tok = pass_setup
    paths, _ = jsonl_corpus(root, 400, seed=8)
    ratios = []
    for bucket in (0, 64):
        recipe = recipe_for(root, tok, [{"paths": paths, "format": "jsonl"}], {"type": "encode", "seq_len": 64},
                            bucket_window=bucket, batch_size=8, chunk_bytes=65536)
        with ringload.start(recipe, name=ring_name):
            batches = drain_ranks(ring_name, 1, trim=True)[0][0]
            packing = finished_status(ring_name)["packing"]
        valid_rows = sum(int(b["_valid"].sum()) for b in batches)
        assert packing["rows_padded"] == len(batches) * 8 - valid_rows
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        positions = sum(b["input_ids"].size for b in batches)  # trimmed by the consumer
        assert packing["trimmed_padding_ratio"] == pytest.approx(1 - tokens / positions, abs=1e-4)
        ratios.append(packing["trimmed_padding_ratio"])
    assert ratios[1] < ratios[0] / 2


def test_outputs_with_ids_pairs_valid_rows_only():
    """outputs_with_ids gives (id, output) for valid rows in row order, from tensors or arrays, ids or _record."""
    batch = {"_valid": torch.tensor([1, 1, 0], dtype=torch.int8),
             "_record": torch.tensor([[0, 2, 5], [1, 0, 9], [-1, -1, -1]]),
             "_id": torch.zeros(3, 8, dtype=torch.uint8)}
    batch["_id"][0, :3] = torch.tensor(list(b"a-1"))
    batch["_id"][1, :2] = torch.tensor(list(b"b2"))
    outputs = torch.arange(6.0).reshape(3, 2)
    pairs = ringload.outputs_with_ids(batch, outputs)
    assert [p[0] for p in pairs] == ["a-1", "b2"] and torch.equal(pairs[1][1], outputs[1])
    del batch["_id"]
    assert ringload.record_ids({k: v.numpy() for k, v in batch.items()}) == [(0, 2, 5), (1, 0, 9)]
    with pytest.raises(KeyError, match="meta=True"):
        ringload.outputs_with_ids({"input_ids": outputs}, outputs)


@pytest.mark.parametrize("change,key", [
    ({"task": {"type": "mlm", "seq_len": 32}}, "mode"),  # packed mlm has no row per record
    ({"task": {"type": "clm", "seq_len": 32}}, "mode"),
    ({"task": {"type": "mlm", "seq_len": 32, "pack": False}, "bucket_window": 64}, "mode"),
    ({"shuffle": {"buffer": 100}}, "shuffle"),
    ({"mode": "train", "id_field": "id"}, "id_field"),
    ({"mode": "train", "id_field": None, "bucket_window": 16}, "bucket_window"),
    ({"mode": "score"}, "mode"),
    ({"source": {"paths": ["PATH"], "format": "text"}, "id_field": "id"}, "id_field"),
    ({"id_bytes": 0}, "id_bytes"),
])
def test_recipe_refuses_what_a_complete_pass_cannot_do(pass_setup, change, key):
    """A recipe whose keys cannot give a complete pass is refused with an error naming the key to change."""
    root, tok = pass_setup
    path = root / "corpus.txt"
    path.write_text("a line\n")
    recipe = {"name": "x", "source": {"paths": [str(path)], "format": "jsonl"}, "tokenizer": tok,
              "task": {"type": "encode"}, "mode": "eval", "id_field": "id", **change}
    recipe["source"] = {**recipe["source"], "paths": [str(path)]}
    recipe = {k: v for k, v in recipe.items() if v is not None}
    with pytest.raises(RecipeError, match=f"recipe: {key}:"):
        ringload.parse_recipe(recipe)


def test_eval_recipe_defaults_to_one_epoch(pass_setup):
    """mode: eval without epochs is one pass, not an endless stream."""
    root, tok = pass_setup
    path = root / "c.jsonl"
    path.write_text('{"text": "a"}\n')
    recipe = ringload.parse_recipe({"name": "x", "source": {"paths": [str(path)], "format": "jsonl"},
                                    "tokenizer": tok, "task": {"type": "encode"}, "mode": "eval"})
    assert recipe.epochs == 1 and recipe.complete_pass
