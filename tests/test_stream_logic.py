"""The stream as a pure function of the recipe (``_stream.read_stream``), checked without a daemon:
resume from any chunk, shuffle windows, weighted mixing and epochs, on small jsonl files."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from ringload._recipe import Recipe, parse_recipe
from ringload._sources import Chunk
from ringload._stream import read_stream, weighted_schedule
from ringload._types import ResumePoint


def write_ids(path: Path, first: int, count: int) -> Path:
    """A jsonl file of records ``first .. first+count-1`` of uneven lengths (so chunks cut at varied places)."""
    path.write_text("".join(json.dumps({"id": i, "text": "word " * (3 + i * 7 % 11)}) + "\n"
                            for i in range(first, first + count)))
    return path


def ids(chunk: Chunk) -> list[int]:
    return [json.loads(line)["id"] for line in chunk.payload.splitlines()]


def make_stream(tmp_path: Path, sources: list[tuple[int, int, float]], **top) -> tuple[Recipe, list[list[str]]]:
    """A recipe of jsonl sources, each (files, records per file, weight); record ids never repeat across files."""
    listed, files, first = [], [], 0
    for s, (n_files, per_file, weight) in enumerate(sources):
        paths = [str(write_ids(tmp_path / f"s{s}-{f}.jsonl", first + f * per_file, per_file)) for f in range(n_files)]
        first += n_files * per_file
        listed.append({"paths": paths, "format": "jsonl", "weight": weight})
        files.append(paths)
    data = {"name": "s", "sources": listed, "tokenizer": "unused.json", "task": {"type": "mlm"}, "chunk_bytes": 1024,
            "epochs": 1, **top}
    return parse_recipe(data, base_dir=tmp_path), files


def resume_after(delivered: list[Chunk]) -> ResumePoint:
    """The resume point once every batch of ``delivered`` was handed out, moved chunk by chunk by the
    rule the consumer applies per batch (``ResumePoint.advance``)."""
    words = list(ResumePoint().words())
    for chunk in delivered:
        ResumePoint.advance(words, chunk.id, 0, chunk.cursor)
    return ResumePoint.from_words(words)


STREAMS = {
    "one-source-two-files-two-epochs": ([(2, 90, 1.0)], {"epochs": 2}),
    "shuffled-two-epochs": ([(3, 60, 1.0)], {"epochs": 2, "shuffle": {"buffer": 40}, "seed": 3}),
    "mixed-first-exhausted": ([(1, 400, 3.0), (2, 100, 1.0)], {}),
    "mixed-all-exhausted-shuffled": ([(1, 70, 2.0), (2, 80, 1.0)],
                                     {"stopping_strategy": "all_exhausted", "shuffle": {"buffer": 25}, "epochs": 2}),
}


@pytest.mark.parametrize("stream", list(STREAMS))
def test_resume_at_every_chunk_yields_the_rest_of_the_stream(tmp_path, stream):
    """Resuming after any delivered chunk re-yields that chunk and then exactly the chunks an uninterrupted read gives."""
    sources, top = STREAMS[stream]
    recipe, files = make_stream(tmp_path, sources, **top)
    chunks = list(read_stream(recipe, files))
    assert len(chunks) >= 20 and [c.id for c in chunks] == list(range(len(chunks)))
    for i in range(len(chunks)):
        assert list(read_stream(recipe, files, resume_after(chunks[:i + 1]))) == chunks[i:], f"resumed after chunk {i}"


def test_shuffle_is_seeded_and_permutes_records_only_within_their_window(tmp_path):
    """Same seed, same chunks; another seed, another order; the windows, in turn, each permute the next run of at
    least `buffer` records of the files in their reading order (the last run may be shorter), every record once."""
    recipe, files = make_stream(tmp_path, [(2, 150, 1.0)], shuffle={"buffer": 40}, seed=1)
    chunks = list(read_stream(recipe, files))
    assert list(read_stream(recipe, files)) == chunks
    reseeded = list(read_stream(recipe.replace(seed=2), files))
    assert [ids(c) for c in reseeded] != [ids(c) for c in chunks]

    windows: dict[tuple[int, int], list[int]] = {}  # keyed by where the window starts, in the order they come
    for chunk in chunks:
        windows.setdefault((chunk.file_index, chunk.offset), []).extend(ids(chunk))
    file_order = list(dict.fromkeys(file_index for file_index, _ in windows))
    reading_order = [i for f in file_order for i in range(f * 150, (f + 1) * 150)]
    place = {record: at for at, record in enumerate(reading_order)}
    runs = [sorted(records, key=place.__getitem__) for records in windows.values()]
    assert [i for run in runs for i in run] == reading_order
    assert all(len(run) >= 40 for run in runs[:-1])
    assert sum(records != run for records, run in zip(windows.values(), runs)) >= len(runs) - 1


@pytest.mark.parametrize("weights", [(3.0, 1.0), (1.0, 2.0, 5.0), (0.3, 0.7)])
def test_weighted_schedule_gives_each_source_its_share_in_every_prefix(weights):
    """In every prefix of the schedule, each source's count is within one pick of its weight's share."""
    total = sum(weights)
    counts = [0] * len(weights)
    for n, source in enumerate(itertools.islice(weighted_schedule(list(weights)), 2000), start=1):
        counts[source] += 1
        assert all(abs(count - n * w / total) < 1 for count, w in zip(counts, weights)), (n, counts)


def test_mixing_follows_the_weights_and_first_exhausted_ends_the_epoch(tmp_path):
    """Weights 3:1 give source 0 three chunks for every one of source 1, each source's records in file order,
    and the epoch ends when source 0, drawn faster, runs out."""
    recipe, files = make_stream(tmp_path, [(1, 150, 3.0), (1, 150, 1.0)])
    chunks = list(read_stream(recipe, files))
    alone = [list(read_stream(recipe.replace(source={**dataclasses.asdict(source), "paths": list(source.paths)}), [f])) for source, f in zip(recipe.sources, files)]
    assert [c.source for c in chunks] == list(itertools.islice(weighted_schedule([3.0, 1.0]), len(chunks)))
    drawn = Counter(c.source for c in chunks)
    assert drawn[0] == len(alone[0]) and drawn[1] < len(alone[1])
    for source in (0, 1):
        assert [c.payload for c in chunks if c.source == source] == [c.payload for c in alone[source][:drawn[source]]]
    assert [c.pick for c in chunks] == list(range(len(chunks)))


def test_all_exhausted_repeats_a_source_until_every_one_ran_out(tmp_path):
    """Under all_exhausted a short source starts lap after lap, each a full pass, until the long one has run out once."""
    recipe, files = make_stream(tmp_path, [(1, 40, 1.0), (1, 200, 1.0)], stopping_strategy="all_exhausted")
    chunks = list(read_stream(recipe, files))
    long_ids = [i for c in chunks if c.source == 1 for i in ids(c)]
    assert long_ids == list(range(40, 240))
    short = [c for c in chunks if c.source == 0]
    laps = sorted({c.lap for c in short})
    assert len(laps) >= 3 and laps == list(range(len(laps)))
    for lap in laps[:-1]:
        assert [i for c in short if c.lap == lap for i in ids(c)] == list(range(40)), f"lap {lap} is a full pass"


def test_epochs_repeat_the_data_with_a_new_shuffle_each(tmp_path):
    """Each epoch holds every record once and numbers its picks from 0 while chunk ids run on; unshuffled
    epochs are identical, shuffled ones reorder files and records anew."""
    recipe, files = make_stream(tmp_path, [(4, 60, 1.0)], epochs=3)
    plain = list(read_stream(recipe, files))
    by_epoch = [[c for c in plain if c.epoch == e] for e in range(3)]
    assert [c.id for c in plain] == list(range(len(plain))) and [c.epoch for c in plain] == sorted(c.epoch for c in plain)
    assert all([c.pick for c in epoch] == list(range(len(epoch))) for epoch in by_epoch)
    assert by_epoch[0] and all([c.payload for c in e] == [c.payload for c in by_epoch[0]] for e in by_epoch)

    shuffled = list(read_stream(recipe.replace(shuffle={"buffer": 30}), files))
    orders = []
    for epoch in range(3):
        records = [i for c in shuffled if c.epoch == epoch for i in ids(c)]
        assert sorted(records) == list(range(240))
        orders.append(records)
    assert len({tuple(o) for o in orders}) == 3
    file_orders = {tuple(dict.fromkeys(c.file_index for c in shuffled if c.epoch == e)) for e in range(3)}
    assert len(file_orders) >= 2
