"""Shuffling: seeded windows of records and a file order per epoch, exact and resumable."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import record_ids, state_after

import ringload
from ringload._recipe import Source
from ringload._sources import parse_records
from ringload._stream import file_order, read_stream


def epoch_of(name: str) -> list[tuple[int, list[int]]]:
    with ringload.connect(name, timeout=30) as loader:
        return [(loader.epoch, batch["labels"].tolist()) for batch in loader]


def test_shuffle_is_seeded_exact_and_mixes_within_its_window(id_recipe, ring_name):
    """Same seed, same stream; another seed, another order; every record once; records move but only
    within their window of `buffer` records."""
    records, buffer = 16 * 20, 64
    streams = {}
    for seed in (1, 1, 2):
        with ringload.start(id_recipe(1, records, shuffle={"buffer": buffer}, seed=seed), name=ring_name) as ring:
            streams.setdefault(seed, []).append([i for b in record_ids(ring.name) for i in b])
    first, again, other = streams[1][0], streams[1][1], streams[2][0]
    assert first == again and first != other
    assert Counter(first) == Counter(range(records))
    assert first != sorted(first)
    for position, record in enumerate(first):
        assert record // buffer == position // buffer, "a record left its window"


def test_file_order_is_reshuffled_every_epoch(id_recipe, ring_name):
    """With shuffle on, each epoch reads the files in its own seeded order; epochs stay visible."""
    files, per_file = 6, 16 * 2
    recipe = id_recipe(files, files * per_file, shuffle={"buffer": 16}, epochs=3)
    with ringload.start(recipe, name=ring_name) as ring:
        stream = epoch_of(ring.name)
    orders = []
    for epoch in range(3):
        ids = [i for e, batch in stream if e == epoch for i in batch]
        assert Counter(ids) == Counter(range(files * per_file))
        orders.append(list(dict.fromkeys(i // per_file for i in ids)))
    assert orders == [file_order(files, 3, e, 0, 0) for e in range(3)]  # seed 3 is the recipe's; source 0, lap 0
    assert len({tuple(o) for o in orders}) > 1


@pytest.mark.parametrize("cut", [3, 9])
def test_resume_inside_a_shuffle_window(id_recipe, ring_name, cut):
    """A state taken mid-window resumes with exactly the reference stream's remaining batches."""
    recipe = id_recipe(2, 16 * 12, shuffle={"buffer": 100})
    with ringload.start(recipe, name=ring_name) as ring:
        reference = record_ids(ring.name)
    state = state_after(recipe, ring_name, cut)
    assert state["resume"]["sources"][0][5] == (cut > 8)  # the cut at 9 lies in the second part of a window
    with ringload.start(recipe, name=ring_name, resume=state) as ring:
        assert record_ids(ring.name) == reference[cut:]


@pytest.mark.parametrize("fmt", ["csv", "paragraph"])
def test_shuffled_windows_keep_every_record_whole(tmp_path, fmt):
    """Quoted multi-line csv fields and blank-line paragraphs survive the window shuffle intact, once each."""
    if fmt == "csv":
        rows = [f'{i},"line one of {i}\nline two of {i}"' for i in range(300)]
        path = tmp_path / "data.csv"
        path.write_text("id,text\n" + "\n".join(rows) + "\n")
        source = Source((str(path),), "csv", "text")
    else:
        rows = [f"paragraph {i}\nstill paragraph {i}" for i in range(300)]
        path = tmp_path / "data.txt"
        path.write_text("\n\n".join(rows) + "\n")
        source = Source((str(path),), "text", text_unit="paragraph")
    recipe = ringload.Recipe("s", (source,), "-", {"type": "mlm"}, chunk_bytes=1024, epochs=1, seed=5,
                             shuffle={"buffer": 50})
    chunks = list(read_stream(recipe, [[str(path)]]))
    texts = [t for c in chunks for t in parse_records(c, source, str(path))[0].texts]
    expected = [f"line one of {i}\nline two of {i}" for i in range(300)] if fmt == "csv" else rows
    assert sorted(texts) == sorted(expected) and texts != expected
