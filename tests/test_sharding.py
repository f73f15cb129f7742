"""Ranks and nodes: every record once across all ranks, every rank the same number of batches.

Records carry their id as a classification label, so a batch's ``labels`` say exactly which
records it holds. Two daemons with ``--nnodes 2`` stand in for two nodes, each serving two ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import ringload

HERE = Path(__file__).resolve().parent


def consume_ranks(names: list[str], world_size: int) -> dict[int, list[list[int]]]:
    """Drain every rank of every node's ring concurrently; global rank -> its batches' record ids."""
    streams: dict[int, list[list[int]]] = {}
    errors: list[BaseException] = []

    def drain(node: int, rank: int) -> None:
        try:
            with ringload.connect(names[node], rank=rank, timeout=30) as loader:
                streams[node * world_size + rank] = [batch["labels"].tolist() for batch in loader]
        except BaseException as exc:  # noqa: BLE001 - the main thread reports it
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(n, r)) for n in range(len(names)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return streams


def finished_status(name: str, timeout: float = 10.0) -> dict:
    """The ring's status once every producer has finished its last chunk (its counters are final then)."""
    deadline = time.monotonic() + timeout
    while (status := ringload.ring_status(name))["state"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert status["state"] == "finished", status["state"]
    return status


def run_nodes(recipe: Path, base: str, nnodes: int, world_size: int) -> tuple[dict[int, list[list[int]]], int]:
    """Start one daemon per node, drain all ranks; return the streams and the examples dropped (node 0)."""
    handles = [ringload.start(recipe, name=f"{base}-{n}", world_size=world_size, nnodes=nnodes, node_rank=n)
               for n in range(nnodes)]
    try:
        streams = consume_ranks([h.name for h in handles], world_size)
        dropped = [sum(p["examples_dropped"] for p in finished_status(h.name)["producers"]) for h in handles]
    finally:
        for h in handles:
            h.stop()
    assert len(set(dropped)) == 1, f"nodes disagree on what was dropped: {dropped}"
    return streams, dropped[0]


@pytest.mark.parametrize("files", [1, 4], ids=["single-file", "multi-file"])
def test_two_nodes_two_ranks_deliver_every_record_once(id_recipe, ring_name, files):
    """Two daemons (nodes) x two ranks: union of delivered records = the corpus, no duplicates, equal counts."""
    records = 16 * 24  # 24 chunks of 16 records: 8 batches each, 2 per global rank, nothing dropped
    streams, dropped = run_nodes(id_recipe(files, records), ring_name, nnodes=2, world_size=2)
    assert sorted(streams) == [0, 1, 2, 3]
    counts = {g: len(s) for g, s in streams.items()}
    assert len(set(counts.values())) == 1 and counts[0] == 24 * 2, counts
    seen = Counter(i for s in streams.values() for batch in s for i in batch)
    assert dropped == 0
    assert sorted(seen) == list(range(records)) and set(seen.values()) == {1}


def test_ranks_interleave_to_the_single_rank_stream(id_recipe, ring_name):
    """Dealing batch i of a chunk to global rank i % G: the ranks' streams, interleaved, are the one-rank stream."""
    recipe = id_recipe(4, 16 * 12)
    with ringload.start(recipe, name=ring_name) as ring, ringload.connect(ring.name) as loader:
        single = [batch["labels"].tolist() for batch in loader]
    streams, _ = run_nodes(recipe, ring_name, nnodes=2, world_size=2)
    interleaved = [batch for group in zip(*(streams[g] for g in range(4))) for batch in group]
    assert interleaved == single


def test_uneven_chunks_keep_ranks_even_and_count_what_is_cut(id_recipe, ring_name):
    """Prose of varying length: equal batch counts per rank, no duplicates, delivered + dropped = the corpus."""
    records = 3000
    streams, dropped = run_nodes(id_recipe(1, records, fixed=False, batch_size=3, chunk_bytes=8192), ring_name,
                                 nnodes=2, world_size=2)
    assert len({len(s) for s in streams.values()}) == 1
    seen = Counter(i for s in streams.values() for batch in s for i in batch)
    assert set(seen.values()) == {1} and set(seen) <= set(range(records))
    assert len(seen) + dropped == records, (len(seen), dropped)
    assert dropped < records * 0.25


def test_one_node_ranks_in_separate_processes_with_torchrun_environment(id_recipe, ring_name, monkeypatch):
    """connect() takes its rank from LOCAL_RANK and checks WORLD_SIZE against the ring; a mismatch names the fix."""
    recipe = id_recipe(1, 16 * 8)
    code = ("import json, sys, ringload\n"
            "with ringload.connect(sys.argv[1], timeout=30) as loader:\n"
            "    print(json.dumps([b['labels'].tolist() for b in loader]))\n")
    with ringload.start(recipe, name=ring_name, world_size=2):
        procs = [subprocess.Popen([sys.executable, "-c", code, ring_name], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "LOCAL_RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
        outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        with pytest.raises(ringload.RingError, match="serves 2 ranks"):
            ringload.connect(ring_name)
        monkeypatch.setenv("WORLD_SIZE", "4")
        with pytest.raises(ringload.RingError, match="--world-size 2 --nnodes 1"):
            ringload.connect(ring_name, rank=0)
    ids = sorted(i for out in outs for batch in out for i in batch)
    assert ids == list(range(16 * 8)) and len(outs[0]) == len(outs[1]) == 32


def test_resume_with_ranks_continues_every_rank(id_recipe, ring_name):
    """One rank's state resumes all ranks (they move in step): the rest of each rank's stream is unchanged."""
    recipe = id_recipe(2, 16 * 10)
    reference, _ = run_nodes(recipe, ring_name, nnodes=1, world_size=2)
    cut = 7
    with ringload.start(recipe, name=ring_name, world_size=2) as ring:
        loaders = [ringload.connect(ring.name, rank=r) for r in range(2)]
        for loader in loaders:
            for _ in range(cut):
                next(loader)
        state = loaders[0].state_dict()
        assert loaders[1].state_dict() == state
        for loader in loaders:
            loader.close()
    with ringload.start(recipe, name=ring_name, world_size=2, resume=state) as ring:
        rest = consume_ranks([ring.name], 2)
    for rank in range(2):
        assert rest[rank] == reference[rank][cut:]


@pytest.mark.timeout(300)
def test_torchrun_ddp_trains_two_ranks_from_one_ring(recipe_file, ring_name, tmp_path):
    """torchrun --nproc-per-node 2 (gloo, CPU): two DDP ranks train BERT from one ring, with different batches
    and identical weights after every step."""
    pytest.importorskip("transformers")
    recipe = recipe_file(epochs=None, batch_size=4, task={"type": "mlm", "seq_len": 32})
    out = tmp_path / "ddp"
    out.mkdir()
    with ringload.start(recipe, name=ring_name, world_size=2):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(HERE / "ddp_worker.py"), ring_name, str(out), "6"],
            capture_output=True, text=True, timeout=240, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["weights"] == reports[1]["weights"]  # DDP kept the replicas identical
    assert not set(reports[0]["batches"]) & set(reports[1]["batches"])  # each rank saw its own batches
    assert all(np.isfinite(r["losses"]).all() and len(r["losses"]) == 6 for r in reports)


def test_killed_producer_leaves_every_rank_stream_unchanged(id_recipe, ring_name):
    """SIGKILL of a producer that writes into two ranks' lanes: both ranks still see their reference streams."""
    import signal

    recipe = id_recipe(1, 16 * 40, slots=2)
    reference, _ = run_nodes(recipe, ring_name, nnodes=1, world_size=2)
    with ringload.start(recipe, name=ring_name, world_size=2) as ring:
        loaders = [ringload.connect(ring.name, rank=r) for r in range(2)]
        got: dict[int, list[list[int]]] = {0: [], 1: []}
        for _ in range(5):  # in step, as DDP ranks are: a rank can run ahead only as far as the lanes hold
            for r in range(2):
                got[r].append(next(loaders[r])["labels"].tolist())
        os.kill(ringload.ring_status(ring.name)["producers"][0]["pid"], signal.SIGKILL)
        for r, loader in enumerate(loaders):
            loader.close()
        rest = consume_ranks([ring.name], 2)
        restarts = ringload.ring_status(ring.name)["producers"][0]["restarts"]
    assert restarts == 1
    for r in range(2):
        assert got[r] + rest[r] == reference[r]


@pytest.mark.parametrize(("mode", "files"), [("files", 4), ("chunks", 1)])
def test_nodes_can_split_the_files_or_chunks_of_an_endless_stream(id_recipe, ring_name, mode, files):
    """node_sharding: files / chunks: each node reads every nnodes-th file, or keeps every nnodes-th chunk;
    in the first epoch the two nodes' ranks deliver every record once."""
    records = 16 * 16
    recipe = id_recipe(files, records, epochs=None, node_sharding=mode)
    handles = [ringload.start(recipe, name=f"{ring_name}-{n}", world_size=2, nnodes=2, node_rank=n) for n in range(2)]
    seen: dict[int, list[int]] = {}

    def first_epoch(node: int, rank: int) -> None:
        with ringload.connect(handles[node].name, rank=rank, timeout=30) as loader:
            ids = []
            for batch in loader:
                if loader.epoch > 0:
                    break
                ids += batch["labels"].tolist()
        seen[node * 2 + rank] = ids

    try:
        threads = [threading.Thread(target=first_epoch, args=(n, r)) for n in range(2) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for h in handles:
            h.stop()
    assert sorted(seen) == [0, 1, 2, 3]
    for node in range(2):
        # 16 records a chunk, 64 a file: node R gets files R and R + 2, or chunks R, R + 2, ...
        unit = records // files if mode == "files" else 16
        assert {i // unit % 2 for g in (2 * node, 2 * node + 1) for i in seen[g]} == {node}
    counts = Counter(i for ids in seen.values() for i in ids)
    assert sorted(counts) == list(range(records)) and set(counts.values()) == {1}


def test_a_node_splitting_chunks_resumes_its_own_stream(id_recipe, ring_name):
    """Under node_sharding: chunks a node's state resumes that node's stream exactly, and another node's is refused."""
    recipe = id_recipe(1, 16 * 16, epochs=None, node_sharding="chunks", shuffle={"buffer": 40})
    node = {"world_size": 1, "nnodes": 2, "node_rank": 1}
    with ringload.start(recipe, name=ring_name, **node) as ring, ringload.connect(ring.name) as loader:
        reference = [next(loader)["labels"].tolist() for _ in range(40)]
    with ringload.start(recipe, name=ring_name, **node) as ring, ringload.connect(ring.name) as loader:
        for _ in range(13):
            next(loader)
        state = loader.state_dict()
    with ringload.start(recipe, name=ring_name, resume=state, **node) as ring, ringload.connect(ring.name) as loader:
        assert [next(loader)["labels"].tolist() for _ in range(27)] == reference[13:]
    with pytest.raises(ringload.RingError, match="node_rank"):
        ringload.start(recipe, name=ring_name, resume=state, **{**node, "node_rank": 0})


def test_killed_rank_consumer_is_succeeded_on_its_rank(id_recipe, ring_name):
    """SIGKILL of rank 1's consumer process while it holds a batch: a new rank-1 consumer continues exactly
    where it left off, and rank 0 is unaffected."""
    import signal

    recipe = id_recipe(1, 16 * 20)
    reference, _ = run_nodes(recipe, ring_name, nnodes=1, world_size=2)
    child = ("import json, sys, time, ringload\n"
             "loader = ringload.connect(sys.argv[1], rank=1, timeout=30)\n"
             "for _ in range(7):\n"
             "    print(json.dumps(next(loader)['labels'].tolist()), flush=True)\n"
             "time.sleep(60)\n")
    with ringload.start(recipe, name=ring_name, world_size=2) as ring:
        rank0 = ringload.connect(ring.name, rank=0)
        got0 = [next(rank0)["labels"].tolist() for _ in range(7)]
        proc = subprocess.Popen([sys.executable, "-c", child, ring.name], stdout=subprocess.PIPE, text=True)
        got1 = [json.loads(proc.stdout.readline()) for _ in range(7)]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rank0.close()
        rest = consume_ranks([ring.name], 2)
    assert got0 + rest[0] == reference[0]
    assert got1 + rest[1] == reference[1]


@pytest.mark.parametrize("seed", [1, 2])
def test_random_producer_kills_under_two_ranks(id_recipe, ring_name, seed):
    """Producers SIGKILLed at random moments while two ranks consume in step: both streams stay exact."""
    import random
    import signal

    recipe = id_recipe(2, 16 * 60, slots=4, max_restarts=10)
    reference, _ = run_nodes(recipe, ring_name, nnodes=1, world_size=2)
    rng = random.Random(seed)
    got: dict[int, list[list[int]]] = {0: [], 1: []}
    kills = 0
    with ringload.start(recipe, name=ring_name, world_size=2, producers=2) as ring:
        loaders = [ringload.connect(ring.name, rank=r, timeout=30) for r in range(2)]
        kill_at = sorted(rng.sample(range(1, len(reference[0]) - 1), 4))
        for step in range(len(reference[0])):
            if kill_at and step == kill_at[0]:
                kill_at.pop(0)
                victim = ringload.ring_status(ring.name)["producers"][rng.randrange(2)]
                if victim["alive"]:
                    os.kill(victim["pid"], signal.SIGKILL)
                    kills += 1
            for r in range(2):
                got[r].append(next(loaders[r])["labels"].tolist())
        for r in range(2):
            with pytest.raises(StopIteration):
                next(loaders[r])
            loaders[r].close()
        restarts = sum(p["restarts"] for p in ringload.ring_status(ring.name)["producers"])
    assert kills >= 3 and restarts == kills
    assert got == reference
