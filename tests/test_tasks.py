"""Tasks beyond MLM and the formats they need, through the daemon on generated data."""

from __future__ import annotations

import csv
import gzip
import http.server
import json
import random
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import drain, make_texts

import ringload

TESTS = Path(__file__).resolve().parent


def stream(recipe_path, name, **connect):
    """All batches of a finite ring, and its status once every producer has finished its counters."""
    with ringload.start(recipe_path, name=name):
        batches = []
        with ringload.connect(name, **connect) as loader:
            for batch in loader:
                batches.append({k: v.numpy().copy() for k, v in batch.items()})
        deadline = time.monotonic() + 10
        while (status := ringload.ring_status(name))["state"] != "finished" and time.monotonic() < deadline:
            time.sleep(0.05)
    return batches, status


def test_clm_rows_are_full_and_labels_equal_inputs(recipe_file, ring_name, tokenizer_path):
    """clm rows are exactly seq_len tokens of documents joined by the end token; labels equal input_ids."""
    recipe = recipe_file(task={"type": "clm", "seq_len": 32, "special_tokens": {"eos": "[SEP]"}})
    batches, _ = stream(recipe, ring_name)
    tok = ringload.TokenizerInfo(tokenizer_path)
    eos = tok.token_id("sep")
    expected = []
    for ids in tok.encode_ids(make_texts(400)):
        expected += ids + [eos]
    content = np.concatenate([b["input_ids"].reshape(-1) for b in batches])
    assert content[:2000].tolist() == expected[:2000]
    for b in batches:
        assert b["input_ids"].shape == (8, 32) and (b["attention_mask"] == 1).all()
        assert np.array_equal(b["labels"], b["input_ids"])
        assert set(b) == {"input_ids", "attention_mask", "labels"}


def test_clm_document_mask_restarts_positions(recipe_file, ring_name):
    """document_mask: position_ids restart after every end token and at each row; _document_ids count segments."""
    recipe = recipe_file(task={"type": "clm", "seq_len": 64, "document_mask": True, "special_tokens": {"eos": "[SEP]"}})
    with ringload.start(recipe, name=ring_name):
        default = drain(ring_name, limit=1)[0]
        assert "position_ids" in default and "_document_ids" not in default
        with ringload.connect(ring_name, meta=True) as loader:
            batch = {k: v.numpy() for k, v in next(loader).items()}
            eos = ringload.TokenizerInfo(ringload.ring_status(ring_name) and
                                         loader.ring.recipe()["recipe"]["tokenizer"]).token_id("sep")
            for ids, pos, doc in zip(batch["input_ids"], batch["position_ids"], batch["_document_ids"]):
                assert pos[0] == 0 and doc[0] == 0
                for t in range(1, len(ids)):
                    if ids[t - 1] == eos:
                        assert pos[t] == 0 and doc[t] == doc[t - 1] + 1
                    else:
                        assert pos[t] == pos[t - 1] + 1 and doc[t] == doc[t - 1]


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> None:
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def labelled_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, text in enumerate(make_texts(n, seed)):
        if i % 7 == 0:
            text = text.replace(" ", '\n "quoted", ', 2)  # newlines and quotes inside a quoted field
        rows.append({"id": i, "text": text, "category": rng.choice(["fresh", "rotten", "plot"])})
    return rows


def test_classify_csv_with_multiline_fields(recipe_file, ring_name, tmp_path):
    """csv chunks end only between records: every example, even multi-line ones, arrives once with its label."""
    rows = labelled_rows(2000)
    rows[5]["category"] = "unknown-label"
    write_csv(tmp_path / "data.csv", rows)
    recipe = recipe_file(source={"paths": [str(tmp_path / "data.csv")], "format": "csv", "label_field": "category"},
                         task={"type": "classify", "seq_len": 48, "labels": ["fresh", "rotten", "plot"]},
                         chunk_bytes=4096)
    batches, status = stream(recipe, ring_name)
    names = ["fresh", "rotten", "plot"]
    good = [r for r in rows if r["category"] in names]
    delivered = sum(len(b["labels"]) for b in batches)
    dropped = sum(p["examples_dropped"] for p in status["producers"])
    assert delivered + dropped == len(good)
    assert sum(p["bad_records"] for p in status["producers"]) == 1
    assert batches[0]["labels"].tolist() == [names.index(r["category"]) for r in good[:8]]
    for b in batches:
        assert b["input_ids"].shape == (8, 48) and "_lengths" not in b
        lengths = b["attention_mask"].sum(axis=1)
        assert (b["input_ids"][np.arange(8), lengths - 1] == 3).all()  # each row ends with [SEP] (id 3)


def test_trim_cuts_padding_columns(recipe_file, ring_name, tmp_path):
    """connect(trim=True) returns [B, longest row in the batch] views; the cut columns were all padding."""
    write_csv(tmp_path / "data.csv", labelled_rows(400))
    recipe = recipe_file(source={"paths": [str(tmp_path / "data.csv")], "format": "csv", "label_field": "category"},
                         task={"type": "classify", "seq_len": 128, "labels": ["fresh", "rotten", "plot"]})
    full, _ = stream(recipe, ring_name)
    trimmed, _ = stream(recipe, ring_name, trim=True)
    assert any(t["input_ids"].shape[1] < 128 for t in trimmed)
    for f, t in zip(full, trimmed):
        width = t["input_ids"].shape[1]
        assert width == f["attention_mask"].sum(axis=1).max()
        assert np.array_equal(f["input_ids"][:, :width], t["input_ids"]) and not f["attention_mask"][:, width:].any()


def test_classify_pairs_and_integer_labels_from_tsv(recipe_file, ring_name, tmp_path):
    """text pairs get token_type_ids 1 on the second segment; integer labels check against num_labels."""
    rows = [{"a": t, "b": t[::-1], "y": i % 4} for i, t in enumerate(make_texts(200))]
    rows[3]["y"] = 9
    write_csv(tmp_path / "pairs.tsv", rows, delimiter="\t")
    recipe = recipe_file(source={"paths": [str(tmp_path / "pairs.tsv")], "format": "tsv", "field": "a",
                                 "pair_field": "b", "label_field": "y"},
                         task={"type": "classify", "seq_len": 64, "num_labels": 4})
    batches, status = stream(recipe, ring_name)
    assert sum(p["bad_records"] for p in status["producers"]) == 1
    assert batches[0]["labels"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert all((b["token_type_ids"] == 1).any(axis=1).all() for b in batches)


@pytest.mark.parametrize("policy", ["ignore", "bad_record"])
def test_multilabel_multi_hot_and_unknown_labels(recipe_file, ring_name, tmp_path, policy):
    """multilabel: float32 multi-hot over the recipe's labels; unknown names ignored and counted, or bad records."""
    names = ["joy", "anger", "fear"]
    records = [{"text": t, "tags": [names[i % 3]] + ([names[(i + 1) % 3]] if i % 2 else [])}
               for i, t in enumerate(make_texts(400))]
    records[0]["tags"] = ["joy", "nostalgia"]
    records[1]["tags"] = []
    with gzip.open(tmp_path / "tags.jsonl.gz", "wt") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)
    recipe = recipe_file(source={"paths": [str(tmp_path / "tags.jsonl.gz")], "label_field": "tags"},
                         task={"type": "multilabel", "seq_len": 48, "labels": names, "unknown_labels": policy})
    batches, status = stream(recipe, ring_name)
    labels = batches[0]["labels"]
    assert labels.dtype == np.float32 and labels.shape == (8, 3)
    kept = records if policy == "ignore" else records[1:]
    for row, record in zip(labels, kept):
        assert row.tolist() == [float(n in record["tags"]) for n in names]
    unknown = sum(p["labels_unknown"] for p in status["producers"])
    bad = sum(p["bad_records"] for p in status["producers"])
    assert (unknown, bad) == ((1, 0) if policy == "ignore" else (0, 1))


def test_custom_task_from_module(recipe_file, ring_name, monkeypatch):
    """A recipe can name a custom Task subclass as module:Class; its fields and values reach the consumer."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.syspath_prepend(str(TESTS))
    recipe = recipe_file(task={"type": "custom_task_example:WordCount", "seq_len": 16})
    batches, _ = stream(recipe, ring_name)
    texts = make_texts(6000)
    assert batches[0]["labels"].tolist() == [len(t.split()) for t in texts[:8]]
    assert batches[0]["input_ids"].shape == (8, 16)


def test_whole_word_masking_masks_every_piece_of_a_word(tokenizer_path):
    """whole_word_mask: a word's sub-tokens are chosen all together or not at all."""
    from ringload._types import Records
    from ringload._tasks import build_task

    task = build_task({"type": "mlm", "seq_len": 64, "mask_prob": 0.3, "mask_token_prob": 0.8,
                       "random_token_prob": 0.1, "pack": True, "whole_word_mask": True, "special_tokens": {}},
                      tokenizer_path, 8, 0)
    rng = random.Random(0)
    # Made-up words split into several word pieces with this small vocabulary.
    texts = [" ".join("".join(rng.choices("abcdefghij", k=rng.randint(3, 9))) for _ in range(30)) for _ in range(100)]
    checked_words = 0
    for pending in task.batches(Records(texts), 0):
        out = {f.name: np.empty(f.shape, f.dtype) for f in task.fields()}
        pending.write(out)
        chosen = out["labels"] != -100
        original = np.where(chosen, out["labels"], out["input_ids"])
        for row in range(8):
            tokens = [task.tok.tokenizer.id_to_token(int(t)) for t in original[row]]
            for pos in range(2, 63):
                if tokens[pos].startswith("##") and not tokens[pos - 1].startswith("[") and pos > 1:
                    assert chosen[row, pos] == chosen[row, pos - 1], f"word split at {pos}: {tokens[pos - 1:pos + 1]}"
                    checked_words += 1
    assert checked_words > 100


@pytest.fixture
def http_root(tmp_path):
    """A loopback HTTP server over a temporary folder."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_cirrussearch_dump_over_http(recipe_file, ring_name, http_root, corpus):
    """A gzip CirrusSearch bulk dump over HTTP streams the same batches as the same articles in a local jsonl."""
    folder, url = http_root
    texts = [json.loads(line)["text"] for line in corpus["jsonl"].read_text().splitlines()]
    with gzip.open(folder / "dump.json.gz", "wt") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"index": {"_type": "page", "_id": str(i)}}) + "\n")
            out.write(json.dumps({"title": f"Article {i}", "namespace": 0, "text": text}) + "\n")
    remote = recipe_file(source={"paths": [f"{url}/dump.json.gz"], "format": "cirrussearch"}, chunk_bytes=1 << 24)
    local = recipe_file(chunk_bytes=1 << 24)
    remote_batches, status = stream(remote, ring_name)
    local_batches, _ = stream(local, ring_name)
    assert sum(p["bad_records"] for p in status["producers"]) == 0
    assert len(remote_batches) == len(local_batches)
    for a, b in zip(remote_batches, local_batches):
        assert np.array_equal(np.where(a["labels"] != -100, a["labels"], a["input_ids"]),
                              np.where(b["labels"] != -100, b["labels"], b["input_ids"]))


def test_every_shipped_recipe_parses():
    """Every recipe in tasks/ is valid as shipped."""
    recipes = sorted((TESTS.parent / "tasks").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        ringload.load_recipe(path)


def test_wikipedia_recipe_over_http(ring_name, http_root, tokenizer_path):
    """tasks/mlm-wikipedia.yaml, pointed at a CirrusSearch dump on a loopback server, streams its batches."""
    folder, url = http_root
    with gzip.open(folder / "simplewiki-cirrussearch-content.json.gz", "wt") as out:
        for i, text in enumerate(make_texts(600)):
            out.write(json.dumps({"index": {"_id": str(i)}}) + "\n")
            out.write(json.dumps({"title": f"Page {i}", "text": text}) + "\n")
    recipe = ringload.load_recipe(TESTS.parent / "tasks" / "mlm-wikipedia.yaml").replace(
        source={"paths": [f"{url}/simplewiki-cirrussearch-content.json.gz"], "format": "cirrussearch"},
        tokenizer=tokenizer_path, epochs=1, batch_size=4)
    assert recipe.task["whole_word_mask"] and recipe.task["seq_len"] == 512
    with ringload.start(recipe, name=ring_name):
        batches = drain(ring_name)
    assert batches and all(b["input_ids"].shape == (4, 512) for b in batches)
