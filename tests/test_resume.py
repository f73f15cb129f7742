"""Exact resume: a daemon started from a checkpoint continues with exactly the batches that follow it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_same_stream, drain

import ringload

TESTS = Path(__file__).resolve().parent


def take(name: str, n: int) -> tuple[list, dict]:
    """Consume n batches (copied) and return them with the loader's checkpoint."""
    batches = []
    with ringload.connect(name) as loader:
        for batch in loader:
            batches.append({k: v.numpy().copy() for k, v in batch.items()})
            if len(batches) == n:
                break
        state = loader.state_dict()
    return batches, state


@pytest.mark.parametrize("cut", [1, 7, 13, 30])
def test_resume_continues_the_reference_stream(recipe_file, ring_name, cut):
    """Batches before a checkpoint plus those of a daemon resumed from it equal the uninterrupted stream."""
    recipe = recipe_file(epochs=2)
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    with ringload.start(recipe, name=ring_name):
        before, state = take(ring_name, cut)
    json.dumps(state)  # a checkpoint is plain JSON
    with ringload.start(recipe, name=ring_name, producers=3, resume=state):
        after = drain(ring_name)
    assert_same_stream(reference, before + after)


def test_resume_at_a_chunk_boundary_via_the_cli(recipe_file, ring_name, tmp_path):
    """A checkpoint taken right after a chunk's last batch resumes with the next chunk (`start --resume`)."""
    recipe = recipe_file()
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    with ringload.start(recipe, name=ring_name):
        with ringload.connect(ring_name) as loader:
            before = []
            for batch in loader:
                before.append({k: v.numpy().copy() for k, v in batch.items()})
                if loader._reader.next_index == 0:  # the batch just handed out ended its chunk
                    break
            state = loader.state_dict()
    (tmp_path / "state.json").write_text(json.dumps(state))
    subprocess.run([sys.executable, "-m", "ringload", "start", str(recipe), "--name", ring_name, "--detach",
                    "--resume", str(tmp_path / "state.json")], check=True, capture_output=True, timeout=60)
    try:
        after = drain(ring_name)
    finally:
        subprocess.run([sys.executable, "-m", "ringload", "stop", ring_name], check=True, capture_output=True)
    assert_same_stream(reference, before + after)


def test_state_from_another_stream_is_refused(recipe_file, ring_name):
    """A checkpoint from a different seed or batch size is refused with a message naming what differs."""
    with ringload.start(recipe_file(), name=ring_name):
        _, state = take(ring_name, 3)
    with pytest.raises(ringload.RingError, match=r"differs in batch_size \(8 then, 4 now\); seed \(7 then, 1 now\)"):
        ringload.start(recipe_file(seed=1, batch_size=4), name=ring_name, resume=state)


def test_a_half_written_position_record_is_never_read(ring_name):
    """A consumer killed while writing its position leaves the previous record current (two records, one commit word)."""
    import numpy as np

    from ringload._housekeeping import remove_ring
    from ringload._layout import ConsumerWord, Field, Geometry, Position, Ring, read_position, write_position

    ring = Ring.create(ring_name, Geometry(1, 2, 1, (Field("x", np.dtype("<i4"), (1, 4)),)), {})
    try:
        block = ring.consumer_block(0)
        first = Position(3, 1, 40, (3, 1, 0, 7, 0) + (1, 0, 0, 123, 9, 0) * 8)
        write_position(ring.words, block, first)
        generation = ring.words[block + ConsumerWord.POSITION_GENERATION]
        idle = block + ConsumerWord.POSITION_RECORDS[(generation + 1) % 2]
        ring.words[idle] = 4  # the killed writer got as far as next_chunk of the next record
        ring.words[idle + 1] = 0
        assert read_position(ring.words, block) == first
        second = Position(4, 0, 41, (3, 2, 0, 7, 0) + (1, 0, 0, 123, 9, 0) * 8)
        write_position(ring.words, block, second)
        assert read_position(ring.words, block) == second
    finally:
        ring.close()
        remove_ring(ring_name, 1)


def test_producer_dying_on_the_resumed_chunk_keeps_its_skip(recipe_file, ring_name, tmp_path, monkeypatch, corpus):
    """A producer killed on the checkpoint's chunk before publishing: its replacement still skips the
    batches the checkpoint had delivered (not just those the dead one published)."""
    monkeypatch.syspath_prepend(str(TESTS))
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}:{os.environ.get('PYTHONPATH', '')}")
    recipe = recipe_file(epochs=1)
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    with ringload.start(recipe, name=ring_name):
        before, state = take(ring_name, 9)
    assert state["resume"]["skip"] > 0  # the checkpoint lies inside a chunk
    offset = state["resume"]["sources"][0][3]
    with corpus["jsonl"].open("rb") as f:
        f.seek(offset)
        first_id = json.loads(f.readline())["id"]  # the resumed chunk's first record
    monkeypatch.setenv("RINGLOAD_TEST_DIE_AT", str(first_id))
    monkeypatch.setenv("RINGLOAD_TEST_DIE_MARKER", str(tmp_path / "died"))
    dying = recipe_file(epochs=1, source={"map": "hooks_example:die_once_at"})
    state["stream"]["recipe"]["sources"][0]["map"] = "hooks_example:die_once_at"  # the same stream, hooked
    with ringload.start(dying, name=ring_name, resume=state):
        after = drain(ring_name)
        restarts = sum(p["restarts"] for p in ringload.ring_status(ring_name)["producers"])
    assert (tmp_path / "died").exists() and restarts == 1
    assert_same_stream(reference, before + after)


def test_a_state_older_than_a_recipe_key_still_checks_by_the_keys_default():
    """A saved stream lacking a key added later matches when the key keeps its default, and differs otherwise;
    a format-2 state (long records read whole) is refused with the reason."""
    import pytest

    from ringload._errors import RecipeError
    from ringload._resume import STATE_FORMAT, check_state

    saved = {"recipe": {"batch_size": 8, "task": {"type": "mlm", "seq_len": 64}}, "files": [["a.jsonl"]]}
    state = {"format": STATE_FORMAT, "stream": saved, "delivered": 3, "next": [1, 0],
             "resume": {"chunk": 1, "skip": 0, "epoch": 0, "pick": 1, "source": 0, "sources": [[1, 0, 0, 0, 1, 0]]}}
    now = {"recipe": {"batch_size": 8, "on_long_record": "skip", "task": {"type": "mlm", "seq_len": 64,
                                                                         "packing": "concat"}},
           "files": [["a.jsonl"]]}
    check_state(state, now)
    changed = {**now, "recipe": {**now["recipe"], "task": {**now["recipe"]["task"], "packing": "best_fit"}}}
    with pytest.raises(RecipeError, match="task.packing"):
        check_state(state, changed)
    with pytest.raises(RecipeError, match="older ringload"):
        check_state({**state, "format": "ringload-state/2"}, now)
