"""The token cache (``ringload/_cache.py``): later epochs and reruns read each chunk's ids from disk,
and the stream stays bit-identical to an uncached run through damage, full disks, concurrent
writers, resumes and producers killed while writing."""

from __future__ import annotations

import functools
import http.server
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_stream, drain, state_after

import ringload
from ringload._cache import (
    FORMAT,
    TEMP_SUFFIX,
    ChunkTokens,
    DamagedFile,
    ProducerCache,
    cache_keys,
    directory_usage,
)
from ringload._housekeeping import log_file
from ringload._recipe import load_recipe
from ringload._sources import Chunk
from ringload._tasks import task_class
from ringload._tasks.base import TokenLists


def run(recipe: Path, name: str) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Every batch of a run of ``recipe``, and its status snapshot at the end of the stream."""
    with ringload.start(recipe, name=name):
        batches = drain(name)
        return batches, ringload.ring_status(name)


def entries(directory: Path) -> list[Path]:
    return sorted((directory / FORMAT / "entries").rglob("*.tok"))


def intact(recipe: Path, directory: Path) -> int:
    """How many entries of ``directory`` parse as the chunks of ``recipe`` (each checked against its key)."""
    keys = _keys(recipe)
    files = {keys.entry_path(keys.chunk_key(chunk)): keys.chunk_key(chunk) for chunk in _places(recipe)}
    found = entries(directory)
    for path in found:
        ChunkTokens.parse(path.read_bytes(), files[path])
    return len(found)


def _keys(recipe: Path):
    loaded = load_recipe(recipe)
    return cache_keys(loaded, [list(s.paths) for s in loaded.sources], task_class(loaded.task["type"]))


def _places(recipe: Path) -> list[Chunk]:
    from ringload._stream import read_stream

    loaded = load_recipe(recipe)
    split = task_class(loaded.task["type"]).packs_documents(loaded.task)
    return list(read_stream(loaded, [list(s.paths) for s in loaded.sources], split_long_records=split))


def from_cache(status: dict) -> int:
    return sum(p["chunks_from_cache"] for p in status["producers"])


def chunks(status: dict) -> int:
    """Chunks of the whole stream (the producers' own count may still miss the last one)."""
    return status["end_chunk"]


@pytest.mark.parametrize("task", [
    {"type": "mlm", "seq_len": 64},
    {"type": "mlm", "seq_len": 64, "whole_word_mask": True, "packing": "best_fit", "document_mask": True},
    {"type": "mlm", "seq_len": 32, "pack": False},
    {"type": "clm", "seq_len": 64, "packing": "best_fit", "document_mask": True, "cu_seqlens": True},
])
def test_cached_epochs_and_reruns_equal_the_uncached_stream(recipe_file, ring_name, tmp_path, task):
    """With epochs: 3, every batch equals the uncached run's; epochs 2 and 3 and a whole rerun come
    from the cache, and the rerun fetches no source byte."""
    directory = tmp_path / "cache"
    reference, _ = run(recipe_file(task=task, epochs=3, token_cache=False), ring_name)
    cached = recipe_file(task=task, epochs=3, token_cache={"dir": str(directory)})
    first, status = run(cached, ring_name)
    assert_same_stream(reference, first)
    assert from_cache(status) == chunks(status) * 2 // 3  # epochs 2 and 3
    rerun, status = run(cached, ring_name)
    assert_same_stream(reference, rerun)
    assert from_cache(status) == chunks(status)
    size = os.path.getsize(load_recipe(cached).sources[0].paths[0])
    assert status["source_bytes"]["fetched"] == 0 and status["source_bytes"]["from_cache"] == 3 * size
    assert intact(cached, directory) == chunks(status) // 3


def test_shuffled_reruns_come_from_the_cache(recipe_file, ring_name, tmp_path):
    """A shuffled stream's rerun is served from the cache, batch for batch the uncached stream."""
    reference, _ = run(recipe_file(shuffle={"buffer": 300}, epochs=2), ring_name)
    cached = recipe_file(shuffle={"buffer": 300}, epochs=2, token_cache={"dir": str(tmp_path / "c")})
    assert_same_stream(reference, run(cached, ring_name)[0])
    rerun, status = run(cached, ring_name)
    assert_same_stream(reference, rerun)
    assert from_cache(status) == chunks(status) and status["source_bytes"]["fetched"] == 0


def test_a_cached_csv_source_reruns_exactly(recipe_file, ring_name, tmp_path, corpus):
    """A csv source (whose chunks carry the file's header) starts and reruns from the cache, unread,
    with the uncached batches."""
    import csv
    import json

    table = tmp_path / "corpus.csv"
    with table.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "text"])
        for i, line in enumerate(corpus["jsonl"].read_text().splitlines()):
            writer.writerow([i, json.loads(line)["text"]])
    source = {"paths": [str(table)], "format": "csv", "field": "text"}
    reference, _ = run(recipe_file(source=source), ring_name)
    cached = recipe_file(source=source, token_cache={"dir": str(tmp_path / "cache")})
    assert_same_stream(reference, run(cached, ring_name)[0])
    rerun, status = run(cached, ring_name)
    assert_same_stream(reference, rerun)
    assert status["source_bytes"]["fetched"] == 0


def test_every_truncation_and_flipped_byte_is_detected(tmp_path):
    """No prefix of an entry and no entry with one byte changed parses: damage is never served."""
    documents = TokenLists.from_lists([[5, 6, 7], [], [8] * 20])
    entry = ChunkTokens(documents, np.array([True, False] * 11 + [True], dtype=bool)[:23], 3, 1, 0)
    data = entry.file({"k": 1}).to_bytes()
    assert len(data) == entry.file({"k": 1}).size()
    parsed = ChunkTokens.parse(data, {"k": 1})
    assert parsed.documents.tokens.tolist() == documents.tokens.tolist() and parsed.bad == 1
    for cut in range(len(data)):
        with pytest.raises(DamagedFile):
            ChunkTokens.parse(data[:cut], {"k": 1})
    for at in range(len(data)):
        damaged = bytearray(data)
        damaged[at] ^= 0x40
        with pytest.raises(DamagedFile):
            ChunkTokens.parse(bytes(damaged), {"k": 1})
    with pytest.raises(DamagedFile, match="another key"):
        ChunkTokens.parse(data, {"k": 2})


def test_damaged_entries_and_maps_are_recomputed_not_served(recipe_file, ring_name, tmp_path):
    """Entries truncated, corrupted, emptied or swapped, and a corrupted lap map, are detected: the
    rerun equals the uncached stream, says so in the log and leaves every entry intact again."""
    directory = tmp_path / "cache"
    reference, _ = run(recipe_file(epochs=2), ring_name)
    cached = recipe_file(epochs=2, token_cache={"dir": str(directory)})
    run(cached, ring_name)
    found = entries(directory)
    assert len(found) >= 8
    found[0].write_bytes(found[0].read_bytes()[:-100])  # truncated
    data = bytearray(found[1].read_bytes())
    data[len(data) // 2] ^= 1  # one bit flipped in the ids
    found[1].write_bytes(bytes(data))
    found[2].write_bytes(b"")  # a crash of the machine before the data reached the disk
    swapped = found[3].read_bytes()
    found[3].write_bytes(found[4].read_bytes())  # another chunk's entry under this name
    found[4].write_bytes(swapped)
    lap_map = next((directory / FORMAT / "laps").glob("*.map"))
    lap_map.write_bytes(lap_map.read_bytes()[:-1] + b"\0")
    log_size = log_file(ring_name).stat().st_size
    rerun, status = run(cached, ring_name)
    assert_same_stream(reference, rerun)
    log = log_file(ring_name).read_bytes()[log_size:].decode()
    assert log.count("damaged entry") >= 5 and "ignoring the lap map" in log
    assert intact(cached, directory) == len(found)
    assert from_cache(status) == chunks(status) - 5  # each damaged chunk tokenized once, then served


def test_entries_removed_under_a_running_reader_are_read_again(recipe_file, ring_name, tmp_path):
    """Chunks the reader handed out unread whose entries are then gone are read from their cursor by the
    producer: the stream stays exact."""
    directory = tmp_path / "cache"
    reference, _ = run(recipe_file(), ring_name)
    cached = recipe_file(token_cache={"dir": str(directory)})
    run(cached, ring_name)
    with ringload.start(cached, name=ring_name), ringload.connect(ring_name) as loader:
        got = [{k: v.numpy().copy() for k, v in next(loader).items()}]
        for path in entries(directory):  # the reader has read ahead: its queued chunks are unread
            path.unlink()
        got += [{k: v.numpy().copy() for k, v in batch.items()} for batch in loader]
    assert_same_stream(reference, got)


def test_a_small_max_gb_stops_caching_not_the_run(recipe_file, ring_name, tmp_path):
    """A cache limited to 40 KB takes a few entries, warns once per producer, and the stream is unchanged."""
    directory = tmp_path / "cache"
    reference, _ = run(recipe_file(epochs=2), ring_name)
    cached = recipe_file(epochs=2, token_cache={"dir": str(directory), "max_gb": 40e3 / 2**30})
    got, status = run(cached, ring_name)
    assert_same_stream(reference, got)
    assert 0 < len(entries(directory)) < chunks(status) // 2
    assert directory_usage(directory / FORMAT)[0] <= 40e3 + 20e3  # one entry of slack: map written by the reader
    assert "no more chunks are cached" in log_file(ring_name).read_text()


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs, really full after a few entries (needs the right to mount, as root in a container)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_caching_not_the_run(recipe_file, ring_name, tiny_filesystem):
    """On a filesystem that fills up (ENOSPC), caching stops with a warning, the stream is unchanged,
    and no partial file is left behind under an entry's name."""
    reference, _ = run(recipe_file(epochs=2), ring_name)
    cached = recipe_file(epochs=2, token_cache={"dir": str(tiny_filesystem)})
    got, _ = run(cached, ring_name)
    assert_same_stream(reference, got)
    assert "the disk is full" in log_file(ring_name).read_text()
    assert entries(tiny_filesystem) and intact(cached, tiny_filesystem) == len(entries(tiny_filesystem))
    assert not list(tiny_filesystem.rglob(f"*{TEMP_SUFFIX}"))
    rerun, _ = run(cached, ring_name)  # a full cache still serves what it holds
    assert_same_stream(reference, rerun)


def test_rings_sharing_a_cache_at_once_get_exact_streams(recipe_file, ring_name, tmp_path):
    """Two rings over the same data and cache directory, started together, both stream the uncached
    batches, and every entry they wrote is intact."""
    directory = tmp_path / "cache"
    reference, _ = run(recipe_file(epochs=2), ring_name)
    cached = recipe_file(epochs=2, token_cache={"dir": str(directory)})
    other = f"{ring_name}b"
    results: dict[str, list] = {}
    with ringload.start(cached, name=ring_name), ringload.start(cached, name=other):
        threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, drain(n))) for n in (ring_name, other)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for name in (ring_name, other):
        assert_same_stream(reference, results[name])
    assert intact(cached, directory) == len(entries(directory)) > 0


def _write_repeatedly(keys: dict, chunk: Chunk, entry_bytes: bytes, count: int) -> None:
    cache = ProducerCache.of_ring({"token_cache": keys}, 0)
    entry = ChunkTokens.parse(entry_bytes, cache.keys.chunk_key(chunk))
    for _ in range(count):
        cache.store(chunk, entry)


def test_concurrent_writers_of_one_entry_never_expose_a_partial_file(recipe_file, tmp_path):
    """Four processes rewriting the same entry 200 times each while it is read in a loop: every read
    finds the complete entry or none."""
    cached = recipe_file(token_cache={"dir": str(tmp_path / "cache")})
    keys = _keys(cached)
    chunk = Chunk(0, 0, 0, 0, 1, b"x")
    documents = TokenLists.from_lists([list(range(i, i + 500)) for i in range(200)])
    entry = ChunkTokens(documents, None, 200, 0, 0)
    data = entry.file(keys.chunk_key(chunk)).to_bytes()
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_repeatedly, args=(keys.to_dict(), chunk, data, 200)) for _ in range(4)]
    for writer in writers:
        writer.start()
    reader, reads = ProducerCache(keys, 0), 0
    while any(w.is_alive() for w in writers):
        got = reader.lookup(chunk)
        if got is not None:
            assert got.documents.tokens.tolist() == documents.tokens.tolist()
            reads += 1
    assert all(w.exitcode == 0 for w in writers) and reads > 0
    assert not list((tmp_path / "cache").rglob(f"*{TEMP_SUFFIX}"))


def test_resume_from_a_checkpoint_taken_in_a_cached_epoch(recipe_file, ring_name, tmp_path):
    """A state saved in epoch 2, served from the cache, resumes (cached or not) with exactly the
    uninterrupted run's next batches."""
    reference, _ = run(recipe_file(epochs=3), ring_name)
    cached = recipe_file(epochs=3, token_cache={"dir": str(tmp_path / "cache")})
    cut = len(reference) // 3 + len(reference) // 5  # inside epoch 2
    state = state_after(cached, ring_name, cut)
    assert state["resume"]["epoch"] == 1
    for recipe in (cached, recipe_file(epochs=3)):
        with ringload.start(recipe, name=ring_name, resume=state):
            assert_same_stream(reference[cut:], drain(ring_name))


KILLER = """
import os, signal, sys

def _kill_once(where):
    # At most len(modes) kills in all processes: each one claims a marker file first.
    for number, mode in enumerate(os.environ["CACHE_KILLS"].split(",")):
        if mode != where:
            continue
        try:
            os.close(os.open(os.path.join(os.environ["CACHE_KILL_MARKS"], str(number)), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        return True
    return False

def _hook(event, args):
    if event == "open" and str(args[0]).endswith(".tmp") and "/entries/" in str(args[0]):
        if _kill_once("open"):
            os.kill(os.getpid(), signal.SIGKILL)  # the temporary file exists, empty
        if _kill_once("written"):
            writes = []
            def profile(frame, event, arg):
                # The 6th write call, the digest: everything before it is in the file (the ids pass the buffer).
                if event == "c_call" and getattr(arg, "__name__", "") == "write":
                    writes.append(arg)
                    if len(writes) == 6:
                        os.kill(os.getpid(), signal.SIGKILL)
            sys.setprofile(profile)
    if event == "os.rename" and str(args[0]).endswith(".tmp") and "/entries/" in str(args[0]):
        if _kill_once("rename"):
            os.kill(os.getpid(), signal.SIGKILL)  # the whole entry is written, not yet renamed

if "CACHE_KILLS" in os.environ:
    sys.addaudithook(_hook)
"""


def test_a_producer_killed_while_writing_an_entry_changes_nothing(recipe_file, ring_name, tmp_path, monkeypatch):
    """Producers SIGKILLed while writing cache entries (after creating the temporary file, with part
    of it written, and with all of it written but not renamed; the kill placed by an audit hook in
    the producer processes): the stream equals the uncached one, no partial file is ever served,
    and a rerun from that cache is exact too."""
    directory, marks, inject = tmp_path / "cache", tmp_path / "marks", tmp_path / "inject"
    marks.mkdir()
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(KILLER)
    options = {"max_restarts": 5, "epochs": 2}
    reference, _ = run(recipe_file(**options), ring_name)
    cached = recipe_file(**options, token_cache={"dir": str(directory)})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CACHE_KILLS", "open,written,rename")
    monkeypatch.setenv("CACHE_KILL_MARKS", str(marks))
    got, status = run(cached, ring_name)
    assert_same_stream(reference, got)
    assert sum(p["restarts"] for p in status["producers"]) == 3 == len(os.listdir(marks))
    leftovers = sorted(path.stat().st_size for path in directory.rglob(f"*{TEMP_SUFFIX}"))
    assert len(leftovers) == 2 and 0 < leftovers[0] < leftovers[1]  # partly and wholly written (the kill at open
    # comes before the file exists)
    assert intact(cached, directory) == len(entries(directory))
    monkeypatch.delenv("CACHE_KILLS")
    rerun, _ = run(cached, ring_name)
    assert_same_stream(reference, rerun)


def _serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_a_remote_source_is_served_from_the_cache_without_fetching(recipe_file, ring_name, corpus, tmp_path):
    """A rerun over HTTP (a server that sends Last-Modified) fetches nothing: status counts every byte
    as served from the cache, and the batches equal the local file's."""
    server, url = _serve(corpus["jsonl"].parent)
    try:
        remote = {"paths": [f"{url}/{corpus['jsonl'].name}"]}
        reference, _ = run(recipe_file(), ring_name)
        cached = recipe_file(source=remote, token_cache={"dir": str(tmp_path / "cache")})
        first, status = run(cached, ring_name)
        assert_same_stream(reference, first)
        size = corpus["jsonl"].stat().st_size
        assert status["source_bytes"]["fetched"] == size and status["source_bytes"]["from_cache"] == 0
        rerun, status = run(cached, ring_name)
        assert_same_stream(reference, rerun)
        assert status["source_bytes"]["fetched"] == 0 and status["source_bytes"]["from_cache"] == size
    finally:
        server.shutdown()


def test_cache_ls_and_clear(recipe_file, ring_name, tmp_path):
    """`ringload cache ls` shows the entries and the lap a recipe left; `cache clear` removes them all."""
    directory = tmp_path / "cache"
    cached = recipe_file(token_cache={"dir": str(directory)})
    run(cached, ring_name)
    (directory / "keep.txt").write_text("not the cache's")

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "ringload", "cache", *args, "--dir", str(directory)],
                              capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    listing = cli("ls")
    assert f"{len(entries(directory))} chunk entries, 1 lap maps" in listing
    assert load_recipe(cached).sources[0].paths[0] in listing
    assert "removed" in cli("clear")
    assert directory_usage(directory / FORMAT)[0] == 0 and (directory / "keep.txt").exists()
    assert "0 chunk entries, 0 lap maps" in cli("ls")
