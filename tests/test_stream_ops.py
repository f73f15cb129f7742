"""Stream operations: skip/max batches, epochs visible to the consumer, paragraphs, hooks, archives."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from conftest import assert_same_stream, drain, make_texts

import ringload
from ringload._recipe import Source
from ringload._sources import Chunk, Hooks, parse_records

TESTS = Path(__file__).resolve().parent


def test_skip_and_max_batches_cut_the_stream(recipe_file, ring_name):
    """skip_batches and max_batches select exactly that window of the uninterrupted stream."""
    with ringload.start(recipe_file(), name=ring_name):
        reference = drain(ring_name)
    with ringload.start(recipe_file(skip_batches=5, max_batches=17), name=ring_name):
        window = drain(ring_name)
    assert_same_stream(reference[5:22], window)


def test_epoch_boundaries_are_visible(recipe_file, ring_name):
    """loader.epoch tells which pass over the sources the last batch came from."""
    with ringload.start(recipe_file(epochs=2), name=ring_name), ringload.connect(ring_name) as loader:
        epochs = [loader.epoch for _ in loader]
    assert epochs[0] == 0 and epochs[-1] == 1 and epochs == sorted(epochs)


def test_paragraph_text_unit(tmp_path):
    """text_unit: paragraph makes each blank-line-separated block one example, never split across chunks."""
    from ringload._stream import read_stream

    paragraphs = ["\n".join(make_texts(3, seed=i)) for i in range(300)]
    path = tmp_path / "p.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    source = Source((str(path),), "text", text_unit="paragraph")
    texts = []
    recipe = ringload.Recipe("p", (source,), "-", {"type": "mlm"}, chunk_bytes=2048, epochs=1)
    for chunk in read_stream(recipe, [[str(path)]]):
        texts += parse_records(chunk, source, str(path))[0].texts
    assert texts == paragraphs


def test_filter_and_map_hooks(monkeypatch):
    """source.filter drops records, source.map rewrites them; a hook that raises makes that record bad."""
    monkeypatch.syspath_prepend(str(TESTS))
    source = Source(("x",), "jsonl", filter="hooks_example:long_enough", map="hooks_example:shout")
    texts = make_texts(50)
    lines = [json.dumps({"text": t}) for t in texts] + [json.dumps({"text": " ".join(["w"] * 30), "explode": 1})]
    chunk = Chunk(0, 0, 0, 0, 1, ("\n".join(lines) + "\n").encode())
    records, bad = parse_records(chunk, source, "x", hooks=Hooks.load(source))
    assert records.texts == [t.upper() for t in texts if len(t.split()) >= 20]
    assert len(bad) == 1 and "raised ValueError: boom" in bad[0].reason and bad[0].line == 51


def test_member_of_a_zip_archive(recipe_file, ring_name, corpus, tmp_path):
    """A chained fsspec URL (zip://member::archive) streams the member like the plain file."""
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
        archive.write(corpus["jsonl"], "inner/corpus.jsonl")
    with ringload.start(recipe_file(), name=ring_name):
        reference = drain(ring_name)
    url = f"zip://inner/corpus.jsonl::{tmp_path / 'data.zip'}"
    with ringload.start(recipe_file(source={"paths": [url]}), name=ring_name):
        assert_same_stream(reference, drain(ring_name))


def test_truncated_gzip_is_skipped_or_fails_by_policy(recipe_file, ring_name, corpus, tmp_path):
    """A truncated .gz is skipped and counted under on_bad_record: skip, and fails the ring under fail."""
    whole = corpus["gz"].read_bytes()
    (tmp_path / "a.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "b.jsonl.gz").write_bytes(whole)
    paths = {"paths": [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl.gz")]}
    with ringload.start(recipe_file(source=paths, chunk_bytes=1 << 24), name=ring_name):
        got = drain(ring_name)
        assert ringload.ring_status(ring_name)["source_errors"] == 1
    with ringload.start(recipe_file(chunk_bytes=1 << 24), name=ring_name):
        assert_same_stream(drain(ring_name), got)  # the broken file yielded no whole chunk; b is complete
    with ringload.start(recipe_file(source=paths, on_bad_record="fail"), name=ring_name):
        with pytest.raises(ringload.ProducerFailed, match=r"a\.jsonl\.gz: unreadable after byte \d+: EOFError"):
            drain(ring_name)


def test_parquet_rows_stream_like_jsonl(recipe_file, ring_name, corpus, tmp_path):
    """A parquet file (several row groups) streams the same batches as the same rows in jsonl, and resumes by row."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in corpus["jsonl"].read_text().splitlines()]
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), tmp_path / "c.parquet", row_group_size=700)
    whole = 1 << 24
    with ringload.start(recipe_file(chunk_bytes=whole), name=ring_name):
        reference = drain(ring_name)
    recipe = recipe_file(chunk_bytes=whole, source={"paths": [str(tmp_path / "c.parquet")], "format": "parquet"})
    with ringload.start(recipe, name=ring_name):
        assert_same_stream(reference, drain(ring_name))
    small = recipe_file(chunk_bytes=20_000, source={"paths": [str(tmp_path / "c.parquet")], "format": "parquet"})
    with ringload.start(small, name=ring_name):
        full = drain(ring_name)
    with ringload.start(small, name=ring_name), ringload.connect(ring_name) as loader:
        before = [{k: v.numpy().copy() for k, v in next(loader).items()} for _ in range(23)]
        state = loader.state_dict()
    with ringload.start(small, name=ring_name, resume=state):
        assert_same_stream(full, before + drain(ring_name))
