"""Mixing several sources by weight, with either stopping rule, exact and resumable."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml
from conftest import RECORD_BYTES, record_ids, state_after, write_records

import ringload

B_FIRST = 10_000  # ids of the second source start here


@pytest.fixture
def mixed_recipe(tmp_path, tokenizer_path):
    """Source A: jsonl ids 0..479 (30 chunks); source B: csv ids 10000..10479 (30 chunks); 16 records a chunk."""

    def write(weights: tuple[float, float], stopping: str, **overrides) -> str:
        a = tmp_path / "a.jsonl"
        write_records(a, range(480), fixed=True)
        b = tmp_path / "b.csv"
        with b.open("w") as out:
            out.write("text,label\n")
            for i in range(B_FIRST, B_FIRST + 480):
                out.write("w" * (RECORD_BYTES - 2 - len(str(i))) + f",{i}\n")
        recipe = {
            "name": "mix", "tokenizer": tokenizer_path, "batch_size": 2, "producers": 2, "epochs": 1,
            "chunk_bytes": 1024, "seed": 11, "stopping_strategy": stopping,
            "sources": [
                {"paths": [str(a)], "format": "jsonl", "field": "text", "label_field": "label", "weight": weights[0]},
                {"paths": [str(b)], "format": "csv", "field": "text", "label_field": "label", "weight": weights[1]},
            ],
            "task": {"type": "classify", "seq_len": 16, "num_labels": B_FIRST + 480},
            **overrides,
        }
        path = tmp_path / f"mix-{stopping}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return str(path)

    return write


def test_first_exhausted_ends_the_epoch_when_one_source_runs_out(mixed_recipe, ring_name):
    """Weights 3:1 give A three chunks for every one of B; the epoch ends when A, drawn faster, runs out."""
    with ringload.start(mixed_recipe((3, 1), "first_exhausted"), name=ring_name) as ring:
        batches = record_ids(ring.name)
    sources = ["A" if batch[0] < B_FIRST else "B" for batch in batches[::8]]  # 8 batches a chunk
    assert "".join(sources) == "AABA" * 10  # smooth weighted round-robin, 30 A chunks and 10 of B
    ids = [i for batch in batches for i in batch]
    assert Counter(ids) == Counter([*range(480), *range(B_FIRST, B_FIRST + 160)])


def test_all_exhausted_repeats_sources_until_every_one_ran_out(mixed_recipe, ring_name):
    """all_exhausted restarts A whenever it runs out, until B has run out too: B once, A three times and the
    two chunks of its fourth lap drawn (AABA...) before B's end showed."""
    with ringload.start(mixed_recipe((3, 1), "all_exhausted"), name=ring_name) as ring:
        ids = [i for batch in record_ids(ring.name) for i in batch]
    assert Counter(ids) == Counter([*range(480)] * 3 + [*range(32)] + [*range(B_FIRST, B_FIRST + 480)])


@pytest.mark.parametrize("cut", [37, 201])
def test_resume_a_shuffled_mix(mixed_recipe, ring_name, cut):
    """A mixed, shuffled, repeating stream resumed from a state continues exactly as it would have."""
    recipe = mixed_recipe((2, 1), "all_exhausted", shuffle={"buffer": 40}, epochs=2)
    with ringload.start(recipe, name=ring_name) as ring:
        reference = record_ids(ring.name)
    state = state_after(recipe, ring_name, cut)
    with ringload.start(recipe, name=ring_name, resume=state) as ring:
        assert record_ids(ring.name) == reference[cut:]
