"""Errors reach the user, and bad input never silently costs data (issue 16, one test per case)."""

from __future__ import annotations

import gc
import json
import os
import pty
import random
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import drain, make_texts
from test_end_to_end import cli
from test_http import server  # noqa: F401 - the loopback HTTP fixture

import ringload
from ringload._housekeeping import log_file
from ringload._names import list_ring_names
from ringload._recipe import Source
from ringload._sources import Chunk, parse_records

TESTS = Path(__file__).resolve().parent


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


# -- 1: a source that fails is reported where the user looks ---------------------------------------
def test_start_reports_an_empty_source(recipe_file, ring_name, tmp_path):
    """An empty source makes `ringload start` (with or without --detach) and ringload.start() fail, naming the file."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    recipe = recipe_file(source={"paths": [str(empty)]})
    for detach in ((), ("--detach",)):
        result = cli("start", str(recipe), "--name", ring_name, *detach, check=False)
        assert result.returncode == 2, result.stderr
        assert last_line(result.stderr).startswith("ringload: ") and "empty.jsonl" in last_line(result.stderr)
        assert "empty" in last_line(result.stderr).split("empty.jsonl")[1]
    with pytest.raises(ringload.RingError, match=r"empty\.jsonl.* empty"):
        ringload.start(recipe, name=ring_name)
    assert ring_name not in list_ring_names()


def test_start_reports_a_url_that_answers_404(recipe_file, ring_name, server):  # noqa: F811
    """A source URL answering 404 fails the start itself with the URL and the HTTP status."""
    faults, url = server
    faults.refusals, faults.refusal_status = 10**6, 404
    recipe = recipe_file(source={"paths": [url + ".jsonl"]})
    with pytest.raises(ringload.RingError, match=r"127\.0\.0\.1.*HTTP 404"):
        ringload.start(recipe, name=ring_name)
    result = cli("start", str(recipe), "--name", ring_name, "--detach", check=False)
    assert result.returncode == 2 and "HTTP 404" in last_line(result.stderr)


def test_a_failure_after_start_stays_visible(recipe_file, ring_name, server, corpus):  # noqa: F811
    """A source failing after start: the consumer raises with its message, and once the ring is gone the log, `status`
    and connect() still report it; the next successful start of that name clears it."""
    faults, url = server
    faults.refusals, faults.refusal_status = 10**6, 404
    recipe = recipe_file(source={"paths": [str(corpus["jsonl"]), url + ".jsonl"]})
    handle = ringload.start(recipe, name=ring_name)
    with pytest.raises(ringload.ProducerFailed, match="HTTP 404"):
        drain(ring_name)
    assert handle.process.wait(30) == 2
    with pytest.raises(ringload.ProducerFailed, match=r"failed.*HTTP 404"):
        ringload.connect(ring_name)
    shown = cli("status", ring_name).stdout
    assert "failed" in shown and "HTTP 404" in shown
    snapshot = json.loads(cli("status", ring_name, "--json").stdout)
    assert snapshot["state"] == "failed" and "HTTP 404" in snapshot["error"]
    assert "HTTP 404" in log_file(ring_name).read_text()
    with ringload.start(recipe_file(), name=ring_name):
        assert ringload.ring_status(ring_name)["state"] in ("running", "finished")
    with pytest.raises(ringload.RingError, match="no ring named"):
        ringload.connect(ring_name)


# -- 2: nothing usable is an error, never an empty epoch or a spinning producer --------------------
def no_text_field(path: Path) -> None:
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in make_texts(500)))


def random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(200_000))


@pytest.mark.parametrize(("write", "reason"), [(no_text_field, "field 'text' is missing"),
                                               (random_bytes, "(invalid UTF-8|malformed JSON)")])
@pytest.mark.parametrize("epochs", [1, None])
def test_a_source_without_a_usable_record_fails_at_start(recipe_file, ring_name, tmp_path, write, reason, epochs):
    """Every record bad: ringload.start() raises naming the file, a record's line and reason, and the counts."""
    path = tmp_path / "data.jsonl"
    write(path)
    with pytest.raises(ringload.RingError, match=rf"none of the [\d,]+ records.*data\.jsonl:\d+: {reason}"):
        ringload.start(recipe_file(source={"paths": [str(path)]}, epochs=epochs), name=ring_name)
    assert ring_name not in list_ring_names()


@pytest.mark.parametrize("epochs", [1, None])
def test_a_pass_without_a_batch_fails_the_ring(recipe_file, ring_name, tmp_path, epochs):
    """Too few records for one batch: the ring fails after its first pass with the counts, instead of ending
    with zero batches (epochs: 1) or tokenizing the same records forever (endless)."""
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(3)) + '{"body": 1}\n')
    recipe = recipe_file(source={"paths": [str(few)]}, epochs=epochs)
    with ringload.start(recipe, name=ring_name):
        with pytest.raises(ringload.ProducerFailed,
                           match=r"no batch.*few\.jsonl\): its 1 chunk held 3 usable records and 1 bad record \("):
            drain(ring_name, timeout=15)


# -- 3, 4: csv records are bad one at a time ----------------------------------------------------------
CSV_SOURCE = Source(("data.csv",), "csv", "text", label_field="label")


def csv_chunk(rows: list[bytes]) -> Chunk:
    """A csv chunk as the reader cuts it: the header line in front, the first record on line 2."""
    return Chunk(0, 0, 0, 0, 2, b"id,text,label\n" + b"".join(row + b"\n" for row in rows))


def test_csv_invalid_utf8_loses_only_its_row():
    """One invalid UTF-8 byte on line 12 of a 40,000-row csv chunk makes that row bad and no other."""
    texts = make_texts(40_000)
    rows = [f'{i},"{t}",{i % 3}'.encode() for i, t in enumerate(texts)]
    rows[7] = b'7,"a quoted field\nover two lines",1'  # line numbers must follow multi-line records
    rows[9] = rows[9].replace(b"e", b"\xff", 1)  # file line 2 + 9 + 1 (the record on two lines)
    records, bad = parse_records(csv_chunk(rows), CSV_SOURCE, "data.csv")
    assert [(b.line, "invalid UTF-8" in b.reason) for b in bad] == [(12, True)]
    expected = [t for i, t in enumerate(texts) if i not in (7, 9)]
    assert len(records) == 40_000 - 1 and records.texts[:7] + records.texts[8:] == expected
    assert records.texts[7] == "a quoted field\nover two lines"


def test_csv_rows_with_the_wrong_number_of_fields_are_bad():
    """A csv row with more or fewer fields than the header is a bad record naming both counts; the others stay."""
    rows = [b'0,"fine",1', b'1,"one too many",1,extra', b'2,"fine too",0', b'3,"one short"', b"4,x,2"]
    records, bad = parse_records(csv_chunk(rows), CSV_SOURCE, "data.csv")
    assert records.texts == ["fine", "fine too", "x"]
    assert [(b.line, b.reason) for b in bad] == [(3, "4 fields where the header has 3"),
                                                  (5, "2 fields where the header has 3")]


def test_an_unpaired_surrogate_is_a_bad_record():
    """A JSON text escaping half a surrogate pair, which no tokenizer accepts, is a bad record, not a producer crash."""
    lines = [b'{"text": "fine"}', b'{"text": "half a pair \\ud800 here"}', b'{"text": "\\ud83d\\ude00"}']
    chunk = Chunk(0, 0, 0, 0, 1, b"".join(line + b"\n" for line in lines))
    records, bad = parse_records(chunk, Source(("x",), "jsonl"), "data.jsonl")
    assert records.texts == ["fine", "\U0001F600"]
    assert [(b.line, b.reason) for b in bad] == [
        (2, "field 'text' holds an unpaired surrogate (\\ud800) at character 12")]


# -- 5: one consumer per rank, within a process too ----------------------------------------------------
def test_a_second_connect_for_a_rank_in_the_same_process_is_refused(recipe_file, ring_name):
    """connect() twice for one rank in one process is refused like a second process; closing (or dropping) the
    first frees the rank."""
    with ringload.start(recipe_file(epochs=None), name=ring_name):
        first = ringload.connect(ring_name)
        next(first)
        with pytest.raises(ringload.RingError, match=r"rank 0 of ring .* already has a consumer in this process"):
            ringload.connect(ring_name)
        assert next(first)["input_ids"].shape == (8, 64)  # the refusal left the first one working
        first.close()
        second = ringload.connect(ring_name)
        next(second)
        del second
        gc.collect()
        with ringload.connect(ring_name) as third:
            next(third)


# -- 6, 7: the CLI's errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("args", [("stop", "{name}"), ("status", "{name}"), ("inspect", "{name}"),
                                  ("status", "{name}", "--watch"), ("stop",), ("start", "no-such-recipe.yaml"),
                                  ("start", "{recipe}", "--producers", "0"), ("no-such-command",),
                                  ("stop", "bad/name")])
def test_every_cli_error_is_one_line_with_exit_code_2(recipe_file, ring_name, args):
    """Each CLI mistake prints one line `ringload: ...` on stderr and exits 2."""
    result = cli(*(a.format(name=ring_name, recipe=recipe_file()) for a in args), check=False)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith("ringload: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_empty_name_is_refused(recipe_file, ring_name):
    """`--name ""` and start(name="") are refused with a message, not replaced by the recipe's name."""
    recipe = recipe_file(name=ring_name, epochs=None)
    result = cli("start", str(recipe), "--name", "", "--detach", check=False)
    assert result.returncode == 2 and "ring name is empty" in result.stderr
    with pytest.raises(ringload.RingError, match="ring name is empty"):
        ringload.start(recipe, name="")
    assert ring_name not in list_ring_names()


# -- 8: a clean stop is clean ----------------------------------------------------------------------------
def test_stopping_a_busy_ring_logs_a_clean_stop(recipe_file, ring_name):
    """`ringload stop` while the consumer reads and producers write: the log says stopped, with no producer failure."""
    cli("start", str(recipe_file(epochs=None, name=ring_name)), "--detach")
    with ringload.connect(ring_name) as loader:
        for _ in range(100):
            next(loader)
        stopper = subprocess.Popen([sys.executable, "-m", "ringload", "stop", ring_name])
        with pytest.raises(ringload.DaemonGone):
            for _ in loader:
                pass
        assert stopper.wait(60) == 0
    log = log_file(ring_name).read_text()
    assert "stopped and removed" in log
    assert "failed" not in log and "Error" not in log and "Traceback" not in log, log


def test_interrupting_a_foreground_ring_logs_a_clean_stop(recipe_file, ring_name):
    """Ctrl-C on a foreground `ringload start` (SIGINT to its whole process group) stops it cleanly, exit 0."""
    daemon = subprocess.Popen([sys.executable, "-m", "ringload", "start", str(recipe_file(epochs=None)), "--name",
                               ring_name], stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_ring(ring_name)
        drain(ring_name, limit=20)
        os.killpg(daemon.pid, signal.SIGINT)
        _, err = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0 and "stopped and removed" in err
    assert "failed" not in err and "Error" not in err and "Traceback" not in err, err


def wait_for_ring(name: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if ringload.ring_status(name)["state"] == "running":
                return
        except ringload.RingError:
            pass  # not created yet
        assert time.monotonic() < deadline, f"ring {name} did not start"
        time.sleep(0.05)


# -- 9: failure messages in words ------------------------------------------------------------------------
def test_a_producer_failure_says_which_chunk_it_was_on(recipe_file, ring_name, tmp_path, corpus):
    """A producer failing on a record says which chunk and file it was on, never `chunk -1`."""
    broken = tmp_path / "broken.jsonl"
    lines = corpus["jsonl"].read_text().splitlines()
    lines[1000] = '{"text": "unterminated'
    broken.write_text("\n".join(lines) + "\n")
    with ringload.start(recipe_file(source={"paths": [str(broken)]}, on_bad_record="fail"), name=ring_name):
        with pytest.raises(ringload.ProducerFailed) as failure:
            drain(ring_name)
    assert "chunk -1" not in str(failure.value)
    assert any(f"failed while on chunk {n} (" in str(failure.value) for n in range(1, 100)), failure.value
    assert "broken.jsonl:1001: malformed JSON" in str(failure.value)


def test_a_producer_failing_before_any_chunk_says_so(recipe_file, ring_name, monkeypatch):
    """A producer that cannot even start says it failed before its first chunk, with the cause."""
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(TESTS))
    recipe = recipe_file(task={"type": "failing_task_example:FailsInProducers", "seq_len": 16}, max_restarts=0)
    with pytest.raises((ringload.ProducerFailed, ringload.RingError)) as failure:
        with ringload.start(recipe, name=ring_name):
            drain(ring_name)
    message = str(failure.value)
    assert "failed before its first chunk" in message and "vocabulary cache is missing" in message, message
    assert "chunk -1" not in message


# -- 10: status --watch ------------------------------------------------------------------------------------
def watch_output(name: str, terminal: bool, frames: int = 3) -> str:
    """What `ringload status NAME --watch` writes until it has drawn ``frames`` frames (then it is interrupted)."""
    command = [sys.executable, "-m", "ringload", "status", name, "--watch"]
    if terminal:
        reader, writer = pty.openpty()
        process = subprocess.Popen(command, stdout=writer, stderr=subprocess.PIPE)
        os.close(writer)
    else:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader = process.stdout.fileno()
    output, deadline = b"", time.monotonic() + 60
    try:
        while output.count(f"ring {name}".encode()) < frames and time.monotonic() < deadline:
            if select.select([reader], [], [], 1.0)[0]:
                try:
                    output += os.read(reader, 65536)
                except OSError:
                    break  # the pty closed: the command ended
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        if terminal:
            os.close(reader)
    return output.decode(errors="replace")


def test_status_watch_redraws_on_a_terminal_and_appends_when_piped(recipe_file, ring_name):
    """--watch redraws the frame in place on a terminal (cursor home, no full-screen clear after the first frame)
    and prints plain frames without control characters when piped."""
    with ringload.start(recipe_file(epochs=None), name=ring_name):
        piped = watch_output(ring_name, terminal=False)
        assert "\x1b" not in piped and piped.count(f"ring {ring_name}  state") >= 3
        shown = watch_output(ring_name, terminal=True)
    frames = shown.split("\x1b[H")
    assert len(frames) >= 4 and all(f"ring {ring_name}  state" in frame for frame in frames[1:])
    assert "\x1b[2J" not in "".join(frames[2:])  # later frames overwrite the screen instead of clearing it


# -- also: a cap on record size ------------------------------------------------------------------------------
def long_record_chunk() -> Chunk:
    texts = ["short one", "é" * 3000, "another short one"]  # the long text is 6,000 bytes of UTF-8
    return Chunk(0, 0, 0, 0, 1, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode())


def test_long_records_are_skipped_truncated_or_fail_by_policy():
    """max_record_bytes: a longer record is a bad record (skip), is cut to the cap at a character boundary and
    counted (truncate), or stops with file:line (fail)."""
    source = Source(("data.jsonl",), "jsonl")
    records, bad = parse_records(long_record_chunk(), source, "data.jsonl", max_record_bytes=1001)
    assert records.texts == ["short one", "another short one"]
    assert [(b.line, b.reason) for b in bad] == [(2, "record of 6,012 bytes is longer than max_record_bytes (1,001)")]
    records, bad = parse_records(long_record_chunk(), source, "data.jsonl", max_record_bytes=1001,
                                 on_long_record="truncate")
    assert not bad and records.texts[1] == "é" * 500 and len(records.texts) == 3
    assert [(t.line, t.reason) for t in records.truncated] == [
        (2, "field 'text' of 6,000 bytes cut to max_record_bytes (1,001)")]
    with pytest.raises(ValueError, match=r"data\.jsonl:2: record of 6,012 bytes .*on_long_record: fail"):
        parse_records(long_record_chunk(), source, "data.jsonl", max_record_bytes=1001, on_long_record="fail")


def test_truncated_records_are_counted_in_status(recipe_file, ring_name, tmp_path, corpus):
    """Through the daemon, truncated records reach the consumer and are counted per producer as records_truncated."""
    data = tmp_path / "long.jsonl"
    lines = corpus["jsonl"].read_text().splitlines()
    lines[5] = json.dumps({"text": " ".join(make_texts(400))})
    data.write_text("\n".join(lines) + "\n")
    recipe = recipe_file(source={"paths": [str(data)]}, max_record_bytes=4000, on_long_record="truncate")
    with ringload.start(recipe, name=ring_name):
        drain(ring_name)
        deadline = time.monotonic() + 10
        while (status := ringload.ring_status(ring_name))["state"] != "finished" and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sum(p["records_truncated"] for p in status["producers"]) == 1
    assert sum(p["bad_records"] for p in status["producers"]) == 0


def test_producer_messages_reach_the_ring_log_in_its_format(recipe_file, ring_name, tmp_path, corpus):
    """A producer's skipped and truncated records land in the ring's log file, in the daemon's line format."""
    data = tmp_path / "messy.jsonl"
    lines = corpus["jsonl"].read_text().splitlines()
    lines[5] = json.dumps({"text": " ".join(make_texts(400))})
    lines[7] = '{"text": "unterminated'
    data.write_text("\n".join(lines) + "\n")
    recipe = recipe_file(source={"paths": [str(data)]}, max_record_bytes=4000, on_long_record="truncate")
    with ringload.start(recipe, name=ring_name) as handle:
        drain(ring_name)
    log = handle.log_path.read_text()
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ringload: "
    assert re.search(stamp + r"ring \S+: \d+ producers", log, re.M), log  # the daemon's own line, same format
    assert re.search(stamp + r"producer \d: truncated record \S*messy\.jsonl:6: field 'text'", log, re.M), log
    assert re.search(stamp + r"producer \d: skipped bad record \S*messy\.jsonl:8: malformed JSON", log, re.M), log
