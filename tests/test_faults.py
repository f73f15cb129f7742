"""Fault injection: real SIGKILLs of producers, consumers and the daemon at random points.

Every trial draws its kill points from its own ``random.Random(seed)`` and compares the stream
the consumer sees (one SHA-256 digest per batch: every field's name, dtype, shape and bytes)
with an uninterrupted reference run of the same recipe. The seeds change from run to run and
every assertion message names its trial's seed; ``RINGLOAD_FAULT_SEED=S`` makes the first trial
use seed ``S`` (the next ones ``S+1``, ...), so a failing trial can be replayed. Timing is not
replayable, so a replay hits the same kill points in the stream, not the same instants in the
producers.

``scripts/faults.py`` is the long version (many trials, recovery times, the real assets).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ringload
from ringload._names import list_ring_names, list_semaphore_rings, pid_alive

SEED_ENV = "RINGLOAD_FAULT_SEED"
_references: dict[str, list[str]] = {}


def batch_digest(batch: dict[str, Any]) -> str:
    """SHA-256 over every field's name, dtype, shape and bytes: equal digests = bit-identical batches."""
    h = hashlib.sha256()
    for key in sorted(batch):
        array = batch[key].numpy()
        h.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        h.update(array.tobytes())
    return h.hexdigest()


# The consumer subprocess of the consumer-kill test: one line "<delivered> <digest>" per batch,
# written and flushed before it asks for the next batch, then "END" after the last one.
CONSUMER_CHILD = "from typing import Any\nimport hashlib, sys, time\nimport ringload\n\n" + textwrap.dedent(inspect.getsource(batch_digest)) + """

name, out_path, pace = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(out_path, "w") as out, ringload.connect(name, timeout=30) as loader:
    for batch in loader:
        out.write(f"{loader.delivered} {batch_digest(batch)}\\n")
        out.flush()
        time.sleep(pace)
    out.write("END\\n")
"""


def trial_seeds(n: int) -> list[int]:
    base = os.environ.get(SEED_ENV)
    first = int(base) if base else random.SystemRandom().randrange(1 << 31)
    return [first + i for i in range(n)]


def replay(seed: int) -> str:
    return f"seed {seed} (replay: {SEED_ENV}={seed})"


def consume(name: str, pace: float = 0.0, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Digests of the ring's batches to its end; ``on_batch(count)`` runs after each one is recorded."""
    digests = []
    with ringload.connect(name, timeout=30) as loader:
        for batch in loader:
            digests.append(batch_digest(batch))
            if on_batch:
                on_batch(len(digests))
            if pace:
                time.sleep(pace)
    return digests


def reference_stream(recipe: Path, name: str) -> list[str]:
    """The digests of an uninterrupted run of ``recipe`` (computed once per recipe text)."""
    key = recipe.read_text()
    if key not in _references:
        with ringload.start(recipe, name=name):
            _references[key] = consume(name)
        assert len(_references[key]) > 100, "the recipe should give a stream long enough for several kills"
    return _references[key]


def first_difference(got: list[str], want: list[str]) -> str:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"batch {i + 1} of {len(want)} differs"
    return f"{len(got)} batches instead of {len(want)}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting until {what}"
        time.sleep(0.005)


def lane_pid(name: str, lane: int) -> int:
    return ringload.ring_status(name)["producers"][lane]["pid"]


def running_producer(name: str, lane: int, victims: list[int]) -> int:
    """The pid of the lane's producer once it is alive and none of ``victims`` (a replacement may lag)."""
    deadline = time.monotonic() + 30
    while True:
        pid = lane_pid(name, lane)
        if pid not in victims and pid_alive(pid):
            return pid
        assert time.monotonic() < deadline, f"lane {lane} has no new producer 30 s after pid {victims[-1]} was killed"
        time.sleep(0.005)


def restarts_and_state(name: str) -> tuple[list[int], str]:
    status = ringload.ring_status(name)
    return [p["restarts"] for p in status["producers"]], status["state"]


def no_leftovers(name: str) -> bool:
    return name not in list_ring_names() and name not in list_semaphore_rings()


# -- producers ---------------------------------------------------------------------------------
def producer_kill_plan(rng: random.Random, total: int, lanes: int) -> list[tuple[int, tuple[int, ...], float]]:
    """(after how many delivered batches, which lanes, delay in s) for each kill event, in order.

    Always: one lane right after start (0 batches delivered, producers still starting up), all
    lanes at once at a random point, one lane a few batches before the end; plus 1-3 random ones.
    """
    plan = [(0, (rng.randrange(lanes),), 0.0),
            (rng.randint(1, total - 1), tuple(range(lanes)), rng.uniform(0, 0.01)),
            (total - rng.randint(1, 6), (rng.randrange(lanes),), rng.uniform(0, 0.002))]
    plan += [(rng.randint(1, total - 1), (rng.randrange(lanes),), rng.uniform(0, 0.01)) for _ in range(rng.randint(1, 3))]
    return sorted(plan)


def test_producer_sigkills_leave_the_stream_bit_identical(recipe_file, ring_name):
    """Producers SIGKILLed several times per trial (start-up, mid-stream, both lanes at once, near the
    end): the consumer's stream is bit-identical to the reference and each lane's restarts equal its kills."""
    recipe = recipe_file(slots=4, max_restarts=20)
    reference = reference_stream(recipe, ring_name)
    for seed in trial_seeds(3):
        rng = random.Random(seed)
        plan = producer_kill_plan(rng, len(reference), lanes=2)
        pace = rng.choice([0.0, 0.0005])  # a slow consumer keeps the lanes full, a fast one empty
        killed: dict[int, list[int]] = {0: [], 1: []}

        def kill_due(count: int) -> None:
            while plan and plan[0][0] == count:
                _, lanes, delay = plan.pop(0)
                time.sleep(delay)
                for lane in lanes:
                    pid = running_producer(ring_name, lane, killed[lane])
                    os.kill(pid, signal.SIGKILL)
                    killed[lane].append(pid)

        with ringload.start(recipe, name=ring_name):
            kill_due(0)
            got = consume(ring_name, pace, kill_due)
            assert not plan, f"{replay(seed)}: the stream ended before the kills at {plan}"
            kills = [len(killed[0]), len(killed[1])]
            wait_until(lambda: restarts_and_state(ring_name) == (kills, "finished"), 10,
                       f"{replay(seed)}: the daemon has replaced all {kills} victims and finished")
        assert got == reference, f"{replay(seed)}: {first_difference(got, reference)}"
    assert no_leftovers(ring_name)


# -- consumers ---------------------------------------------------------------------------------
def read_lines(path: Path) -> tuple[list[tuple[int, str]], bool]:
    """The (delivered, digest) lines a consumer child wrote, and whether it wrote END (a torn last line is dropped)."""
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")[:-1]  # whatever follows the last newline was cut off by the kill
    ended = lines[-1:] == ["END"]
    return [(int(n), d) for n, d in (line.split() for line in lines[:len(lines) - ended])], ended


def test_consumer_sigkills_lose_only_the_batch_in_hand(recipe_file, ring_name, tmp_path):
    """Consumer processes SIGKILLed at random points, each followed by a new one: every batch the
    children recorded is the reference batch of that position, with no repeat, reordering or gap except,
    per kill, the one batch handed out but not yet recorded, which the ring counts as delivered."""
    recipe = recipe_file(slots=4)
    reference = reference_stream(recipe, ring_name)
    total = len(reference)
    child_script = tmp_path / "consumer_child.py"
    child_script.write_text(CONSUMER_CHILD)
    for seed in trial_seeds(2):
        rng = random.Random(seed)
        kills, lost, delivered, run = rng.randint(3, 4), 0, 0, 0
        with ringload.start(recipe, name=ring_name):
            while True:
                run += 1
                out = tmp_path / f"{seed}-{run}.txt"
                child = subprocess.Popen([sys.executable, str(child_script), ring_name, str(out), "0.002"])
                try:
                    if run <= kills:
                        if rng.random() < 0.25:  # while it starts: importing, attaching or taking over
                            time.sleep(rng.uniform(0.0, 2.0))
                        else:  # after a random number of the remaining batches
                            target = delivered + rng.randint(1, max(1, (total - delivered) // (kills - run + 2)))
                            wait_until(lambda: child.poll() is not None or len(read_lines(out)[0]) >= target - delivered,
                                       60, f"{replay(seed)}: consumer {run} has recorded {target - delivered} batches")
                            time.sleep(rng.uniform(0.0, 0.003))
                        child.kill()
                    code = child.wait(60)
                finally:
                    child.kill()
                lines, ended = read_lines(out)
                now = ringload.ring_status(ring_name)["position"]["delivered"]
                where = f"{replay(seed)}, consumer {run} (exit code {code})"
                assert [n for n, _ in lines] == list(range(delivered + 1, delivered + 1 + len(lines))), (
                    f"{where}: recorded positions {[n for n, _ in lines][:5]}... do not continue from {delivered}")
                assert [d for _, d in lines] == reference[delivered:delivered + len(lines)], (
                    f"{where}: {first_difference([d for _, d in lines], reference[delivered:delivered + len(lines)])}")
                missing = now - delivered - len(lines)
                assert missing in (0, 1) and (missing == 0 or code != 0), (
                    f"{where}: the ring counts {now} delivered, the child recorded up to {delivered + len(lines)}")
                lost, delivered = lost + missing, now
                assert code == 0 or run <= kills, f"{where}: the last consumer failed"
                if code == 0:
                    assert ended and delivered == total, f"{where}: ended at {delivered} of {total} batches"
                    break
        assert lost <= kills, f"{replay(seed)}: {lost} batches lost in {kills} kills"
    assert no_leftovers(ring_name)


# -- the daemon --------------------------------------------------------------------------------
def test_daemon_sigkill_raises_daemongone_and_a_resumed_daemon_completes_the_stream(recipe_file, ring_name):
    """The daemon SIGKILLed at a random point: the consumer raises DaemonGone within seconds, its
    state_dict() resumes a new daemon on the reclaimed ring name, the concatenated stream equals the
    reference, and no shared object of the dead ring is left in /dev/shm."""
    recipe = recipe_file(slots=4, epochs=2)
    reference = reference_stream(recipe, ring_name)
    total = len(reference)
    for seed in trial_seeds(3):
        rng = random.Random(seed)
        cut = rng.choice([rng.randint(1, 10), rng.randint(1, total - 1), total - rng.randint(1, 12)])
        handle = ringload.start(recipe, name=ring_name)
        producers = [p["pid"] for p in ringload.ring_status(ring_name)["producers"]]
        got: list[str] = []
        try:
            with ringload.connect(ring_name, timeout=30) as loader:
                for batch in loader:
                    got.append(batch_digest(batch))
                    if len(got) == cut:
                        break
                time.sleep(rng.uniform(0.0, 0.05))
                os.kill(handle.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                try:
                    for batch in loader:
                        got.append(batch_digest(batch))
                    outcome = "end of stream"  # every remaining batch had been published before the kill
                except ringload.DaemonGone:
                    outcome = "DaemonGone"
                waited = time.monotonic() - killed_at
                state = loader.state_dict()
        finally:
            handle.process.kill()
            handle.process.wait()
        where = f"{replay(seed)}, daemon killed after batch {cut} of {total}"
        assert waited < 5, f"{where}: the consumer took {waited:.1f} s to notice"
        assert outcome == "DaemonGone" or len(got) == total, f"{where}: stream ended after {len(got)} batches"
        assert state["delivered"] == len(got), f"{where}: state {state} after {len(got)} batches"
        assert ring_name in list_ring_names(), f"{where}: the dead daemon's ring should still be there"
        wait_until(lambda: not any(pid_alive(pid) for pid in producers), 5, "the producers followed their daemon")
        with ringload.start(recipe, name=ring_name, resume=state):
            got += consume(ring_name)
        assert got == reference, f"{where} ({outcome}): {first_difference(got, reference)}"
        assert no_leftovers(ring_name), f"{where}: {list_ring_names()} {list_semaphore_rings()}"
