"""End to end through the daemon: determinism, the CLI, failures, crashes and clean-up."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import assert_same_stream, drain

import ringload
from ringload._names import list_ring_names, list_semaphore_rings


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ringload", *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"ringload {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_stream(recipe_path, name, producers=None, limit=None):
    with ringload.start(recipe_path, name=name, producers=producers):
        return drain(name, limit)


def test_stream_identical_across_runs_and_producer_counts(recipe_file, ring_name):
    """Two runs, and runs with 1, 2 and 3 producers, yield identical batches in identical order."""
    recipe = recipe_file()
    reference = run_stream(recipe, ring_name, producers=2)
    assert len(reference) > 50
    for producers in (2, 1, 3):
        assert_same_stream(reference, run_stream(recipe, ring_name, producers=producers))


def test_batches_have_the_recipe_shape_and_are_ring_views(recipe_file, ring_name):
    """CPU batches are [batch_size, seq_len] tensors that share memory with the ring, in compact dtypes."""
    import torch

    with ringload.start(recipe_file(), name=ring_name), ringload.connect(ring_name) as loader:
        batch = next(loader)
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert batch["input_ids"].shape == (8, 64) and batch["input_ids"].dtype == torch.int32
        assert batch["attention_mask"].dtype == torch.int8 and batch["labels"].dtype == torch.int64
        region = np.frombuffer(loader.ring._mem, dtype=np.uint8)
        start = region.ctypes.data
        for tensor in batch.values():
            assert start <= tensor.data_ptr() < start + len(region)


def test_finite_stream_ends_and_covers_every_chunk(recipe_file, ring_name, corpus):
    """With epochs: 2 the iteration stops by itself, after twice the batches of one epoch."""
    one = run_stream(recipe_file(), ring_name)
    two = run_stream(recipe_file(epochs=2), ring_name)
    assert len(two) == 2 * len(one)
    assert_same_stream(one, two[: len(one)])


def test_text_gzip_and_glob_sources(recipe_file, ring_name, corpus):
    """Plain text, gzip-compressed jsonl and a glob over two files all stream the same examples."""
    whole = 1 << 22  # one chunk per file, so the formats' different byte sizes cut no differently
    from_jsonl = run_stream(recipe_file(chunk_bytes=whole), ring_name)
    from_gz = run_stream(recipe_file(chunk_bytes=whole, source={"paths": [str(corpus["gz"])]}), ring_name)
    assert_same_stream(from_jsonl, from_gz)
    from_text = run_stream(recipe_file(chunk_bytes=whole, source={"paths": [str(corpus["text"])], "format": "text"}),
                           ring_name)
    assert_same_stream(from_jsonl, from_text)
    glob = {"paths": [str(corpus["parts"] / "*.txt")], "format": "text"}
    from_glob = run_stream(recipe_file(chunk_bytes=whole, source=glob), ring_name)
    assert_same_stream(from_text[:10], from_glob[:10])  # file a.txt first, then b.txt in a chunk of its own
    assert len(from_text) - 1 <= len(from_glob) <= len(from_text)


def test_cli_start_status_inspect_ls_stop(recipe_file, ring_name):
    """The CLI starts a detached ring, reports it (table and JSON), decodes a batch, and stops it cleanly."""
    cli("start", str(recipe_file(epochs=None)), "--name", ring_name, "--detach")
    try:
        status = json.loads(cli("status", ring_name, "--json").stdout)
        assert status["state"] == "running" and status["daemon_alive"]
        assert len(status["producers"]) == 2 and all(p["alive"] for p in status["producers"])
        assert {"batches", "examples", "tokens", "restarts", "bad_records"} <= set(status["producers"][0])
        table = cli("status", ring_name).stdout
        assert "lane" in table and "batches" in table and ring_name in table
        shown = cli("inspect", ring_name, "--rows", "1").stdout
        assert "[CLS]" in shown and "->" in shown  # masked positions are marked [input->label]
        assert ring_name in cli("ls").stdout
    finally:
        cli("stop", ring_name)
    assert ring_name not in list_ring_names() and ring_name not in list_semaphore_rings()


def test_shared_objects_are_private(recipe_file, ring_name):
    """The ring's shared memory and every semaphore are created with mode 0600 and owned by the user."""
    with ringload.start(recipe_file(epochs=None), name=ring_name):
        paths = [f"/dev/shm/ringload.{ring_name}"] + [f"/dev/shm/sem.{s[1:]}" for s in list_semaphore_rings()[ring_name]]
        assert len(paths) == 1 + 1 + 2 * 2
        for path in paths:
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()


def test_refuses_a_second_daemon_on_a_live_ring(recipe_file, ring_name):
    """Starting a ring whose name a live daemon serves fails with a message naming that daemon."""
    with ringload.start(recipe_file(epochs=None), name=ring_name) as running:
        result = cli("start", str(recipe_file()), "--name", ring_name, check=False)
        assert result.returncode != 0
        assert f"already served by daemon pid {running.pid}" in result.stderr


def test_consumer_raises_when_daemon_is_killed(recipe_file, ring_name):
    """After SIGKILL of the daemon, the consumer raises DaemonGone well within its timeout."""
    handle = ringload.start(recipe_file(epochs=None), name=ring_name)
    with ringload.connect(ring_name, timeout=30) as loader:
        next(loader)
        os.kill(handle.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ringload.DaemonGone, match=f"pid {handle.pid}"):
            for _ in loader:
                pass
        assert time.monotonic() - started < 10
    handle.process.wait()


def test_dead_ring_is_reclaimed_and_cleaned(recipe_file, ring_name):
    """A ring whose daemon was SIGKILLed shows as dead, is reclaimed by the next start, and `clean` removes one."""
    handle = ringload.start(recipe_file(epochs=None), name=ring_name)
    os.kill(handle.pid, signal.SIGKILL)
    handle.process.wait()
    assert "dead" in cli("ls").stdout
    with ringload.start(recipe_file(), name=ring_name):
        assert len(drain(ring_name, limit=3)) == 3
    handle = ringload.start(recipe_file(epochs=None), name=ring_name)
    os.kill(handle.pid, signal.SIGKILL)
    handle.process.wait()
    time.sleep(0.2)  # producers follow their daemon (PR_SET_PDEATHSIG)
    assert ring_name in cli("clean").stdout
    assert ring_name not in list_ring_names() and ring_name not in list_semaphore_rings()


def test_producer_error_reaches_the_consumer(recipe_file, ring_name, tmp_path, corpus):
    """With on_bad_record: fail, a malformed line stops the ring and the consumer raises with file:line."""
    broken = tmp_path / "broken.jsonl"
    lines = corpus["jsonl"].read_text().splitlines()
    lines[100] = '{"text": "unterminated'
    broken.write_text("\n".join(lines) + "\n")
    recipe = recipe_file(source={"paths": [str(broken)]}, on_bad_record="fail")
    with ringload.start(recipe, name=ring_name):
        with pytest.raises(ringload.ProducerFailed, match=r"broken\.jsonl:101: malformed JSON"):
            drain(ring_name)


def test_bad_records_are_skipped_and_counted(recipe_file, ring_name, tmp_path, corpus):
    """With on_bad_record: skip, bad lines are counted per producer and the rest of the stream flows."""
    broken = tmp_path / "broken.jsonl"
    lines = corpus["jsonl"].read_text().splitlines()
    lines[10], lines[20], lines[30] = "not json", '{"other": 1}', '{"text": ""}'
    broken.write_text("\n".join(lines) + "\n")
    with ringload.start(recipe_file(source={"paths": [str(broken)]}, epochs=None), name=ring_name):
        drain(ring_name, limit=40)
        status = ringload.ring_status(ring_name)
    assert sum(p["bad_records"] for p in status["producers"]) == 3


def test_killed_producer_is_replaced_and_the_stream_is_unchanged(recipe_file, ring_name):
    """SIGKILL of a producer mid-stream: the daemon replaces it and the consumer sees the reference stream."""
    recipe = recipe_file(slots=4)
    reference = run_stream(recipe, ring_name)
    with ringload.start(recipe, name=ring_name):
        got = drain(ring_name, limit=10)
        victim = ringload.ring_status(ring_name)["producers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        got += drain(ring_name)
        status = ringload.ring_status(ring_name)
    assert status["producers"][0]["restarts"] == 1
    assert_same_stream(reference, got)


def test_killed_consumer_is_succeeded_by_a_new_one(recipe_file, ring_name, tmp_path):
    """A consumer SIGKILLed while holding a batch leaves the ring usable; the next one goes on from the next batch."""
    recipe = recipe_file(slots=4)
    reference = run_stream(recipe, ring_name)
    done = tmp_path / "done"
    script = (
        "import sys, time, ringload\n"
        f"loader = ringload.connect({ring_name!r}, timeout=30)\n"
        "for i, b in enumerate(loader):\n"
        "    if i == 24:\n"
        f"        open({str(done)!r}, 'w').close(); time.sleep(60)\n"
    )
    with ringload.start(recipe, name=ring_name):
        child = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        child.kill()
        child.wait()
        rest = drain(ring_name)
    assert_same_stream(reference[25:], rest)


def test_consumer_timeout_names_what_it_waited_for(recipe_file, ring_name):
    """A ring that produces nothing makes the consumer raise LoaderTimeout after its timeout, not hang."""
    with ringload.start(recipe_file(epochs=None), name=ring_name) as handle:
        for lane in ringload.ring_status(ring_name)["producers"]:
            os.kill(lane["pid"], signal.SIGSTOP)
        try:
            with ringload.connect(ring_name, timeout=1.0) as loader:
                with pytest.raises(ringload.LoaderTimeout, match="within 1 s"):
                    for _ in range(10_000):
                        next(loader)
        finally:
            for lane in ringload.ring_status(ring_name)["producers"]:
                os.kill(lane["pid"], signal.SIGCONT)
        assert handle.process.poll() is None


def test_too_large_ring_fails_before_any_producer_runs(recipe_file, ring_name):
    """A geometry larger than /dev/shm's free space is refused at start with a message naming the settings."""
    free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
    slots = int(free // (4096 * 64 * 14)) + 1024
    result = cli("start", str(recipe_file(batch_size=4096, slots=min(slots, 65536))), "--name", ring_name, check=False)
    assert result.returncode != 0
    assert "/dev/shm" in result.stderr and "slots" in result.stderr
    assert ring_name not in list_ring_names()


def test_producers_do_not_load_torch(recipe_file, ring_name):
    """Producer processes never map PyTorch (start-up time and memory): it belongs to the consumer only."""
    with ringload.start(recipe_file(epochs=None), name=ring_name):
        drain(ring_name, limit=2)
        for lane in ringload.ring_status(ring_name)["producers"]:
            with open(f"/proc/{lane['pid']}/maps") as maps:
                assert "libtorch" not in maps.read()


def test_daemon_started_from_python_ends_with_its_caller(recipe_file, ring_name):
    """A daemon started by ringload.start() stops and removes its ring when the calling process dies."""
    script = (f"import ringload, os, signal\nringload.start({str(recipe_file(epochs=None))!r}, name={ring_name!r})\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", script], timeout=60)
    deadline = time.monotonic() + 10
    while ring_name in list_ring_names() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ring_name not in list_ring_names() and ring_name not in list_semaphore_rings()
