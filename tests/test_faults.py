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

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ringload
from ringload._names import list_ring_names, list_semaphore_rings, pid_alive

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from faults import CONSUMER_CHILD, batch_digest  # noqa: E402  (the same consumer child as the faults tool)

SEED_ENV = "RINGLOAD_FAULT_SEED"
_references: dict[str, list[str]] = {}


def trial_seeds(n: int) -> list[int]:
    base = os.environ.get(SEED_ENV)
    first = int(base) if base else random.SystemRandom().randrange(1 << 31)
    return [first + i for i in range(n)]


def replay(seed: int) -> str:
    return f"seed {seed} (replay: {SEED_ENV}={seed})"


@contextmanager
def trial(seed: int) -> Iterator[None]:
    """Name the seed in any error the trial raises (ringload's own checks raise RingError and the like)."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        raise AssertionError(f"{replay(seed)}: {type(exc).__name__}: {exc}") from exc


def consume(name: str, pace: float = 0.0, on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Digests of the ring's batches to its end; ``on_batch(count)`` runs after each one is recorded."""
    digests = []
    with ringload.connect(name, timeout=20) as loader:
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
DUE = -1  # in a kill plan: the lane whose producer holds (or last held) the chunk the consumer waits for


def producer_kill_plan(rng: random.Random, total: int, lanes: int) -> list[tuple[int, tuple[int, ...], float]]:
    """(after how many delivered batches, which lanes, pause in s) for each kill event, in order.

    Always: one lane right after start (0 batches delivered, producers still starting up), all
    lanes at once at a random point, and near the end, after a pause in which the producers run
    ahead as far as they can (lanes full, or idle at the end of the sources), the producer the
    consumer is waiting for; plus 1-3 random ones.
    """
    plan = [(0, (rng.randrange(lanes),), 0.0),
            (rng.randint(1, total - 1), tuple(range(lanes)), rng.uniform(0, 0.01)),
            (total - rng.randint(1, 12), (DUE,), rng.uniform(0.2, 0.5))]
    for _ in range(rng.randint(1, 3)):
        plan.append((rng.randint(1, total - 1), (rng.randrange(lanes),), rng.uniform(0, 0.01)))
    return sorted(plan)


def due_lane(name: str) -> int:
    """The lane working on (or last done with) the chunk the consumer waits for; lane 0 if none is."""
    status = ringload.ring_status(name)
    due = [p["lane"] for p in status["producers"] if p["current_chunk"] == status["position"]["chunk"]]
    return due[0] if due else 0


def producer_kill_trial(recipe: Path, name: str, reference: list[str], seed: int) -> None:
    rng = random.Random(seed)
    plan = producer_kill_plan(rng, len(reference), lanes=2)
    pace = rng.choice([0.0, 0.0005])  # a slow consumer keeps the lanes full, a fast one keeps them empty
    killed: list[list[int]] = [[], []]

    def kill_due(count: int) -> None:
        while plan and plan[0][0] == count:
            _, lanes, pause = plan.pop(0)
            time.sleep(pause)
            for lane in (due_lane(name) if lane == DUE else lane for lane in lanes):
                pid = running_producer(name, lane, killed[lane])
                os.kill(pid, signal.SIGKILL)
                killed[lane].append(pid)

    with ringload.start(recipe, name=name):
        kill_due(0)
        got = consume(name, pace, kill_due)
        assert not plan, f"{replay(seed)}: the stream ended before the kills at {plan}"
        kills = [len(k) for k in killed]
        wait_until(lambda: restarts_and_state(name) == (kills, "finished"), 10,
                   f"{replay(seed)}: the daemon has replaced all {kills} victims and finished")
    assert got == reference, f"{replay(seed)}: {first_difference(got, reference)}"


def test_producer_sigkills_leave_the_stream_bit_identical(recipe_file, ring_name):
    """Producers SIGKILLed at random points (start-up, both at once, near the end): same stream, restarts = kills."""
    recipe = recipe_file(slots=4, max_restarts=20)
    reference = reference_stream(recipe, ring_name)
    for seed in trial_seeds(5):
        with trial(seed):
            producer_kill_trial(recipe, ring_name, reference, seed)
    assert no_leftovers(ring_name)


# -- consumers ---------------------------------------------------------------------------------
def read_lines(path: Path) -> tuple[list[tuple[int, str]], bool]:
    """The (delivered, digest) lines a consumer child wrote, and whether it wrote END."""
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")[:-1]  # whatever follows the last newline was cut off by the kill
    ended = lines[-1:] == ["END"]
    return [(int(n), d) for n, d, *_ in (line.split() for line in lines[:len(lines) - ended])], ended


def run_consumer_child(script: Path, name: str, out: Path, rng: random.Random, kill: bool, target: int) -> int:
    """Run one consumer child; if ``kill``, SIGKILL it while it starts up (1 in 4) or once it has
    recorded ``target`` batches, after a random delay. Return its exit code."""
    child = subprocess.Popen([sys.executable, str(script), name, str(out), "0.002"])
    try:
        if kill:
            if rng.random() < 0.25:  # importing, attaching or taking over the ring
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                wait_until(lambda: child.poll() is not None or len(read_lines(out)[0]) >= target, 60,
                           f"the consumer child has recorded {target} batches")
                time.sleep(rng.uniform(0.0, 0.003))
            child.kill()
        return child.wait(60)
    finally:
        child.kill()


def consumer_kill_trial(recipe: Path, name: str, reference: list[str], seed: int, workdir: Path) -> None:
    rng = random.Random(seed)
    total, kills = len(reference), rng.randint(3, 4)
    script = workdir / "consumer_child.py"
    script.write_text(CONSUMER_CHILD)
    lost, delivered = 0, 0  # the ring's count of delivered batches when each child starts
    with ringload.start(recipe, name=name):
        for run in range(1, kills + 2):
            target = rng.randint(1, max(1, (total - delivered) // (kills - run + 2))) if run <= kills else 0
            code = run_consumer_child(script, name, workdir / f"{seed}-{run}.txt", rng, run <= kills, target)
            lines, ended = read_lines(workdir / f"{seed}-{run}.txt")
            now = ringload.ring_status(name)["position"]["delivered"]
            where = f"{replay(seed)}, consumer {run} (exit code {code})"
            positions, digests = [n for n, _ in lines], [d for _, d in lines]
            assert positions == list(range(delivered + 1, delivered + 1 + len(lines))), (
                f"{where}: recorded positions {positions[:3]}...{positions[-3:]} do not continue from {delivered}")
            assert digests == reference[delivered:delivered + len(lines)], (
                f"{where}: {first_difference(digests, reference[delivered:delivered + len(lines)])}")
            missing = now - delivered - len(lines)
            assert missing in ((0, 1) if code == -signal.SIGKILL else (0,)), (
                f"{where}: the ring counts {now} delivered, the child recorded up to {delivered + len(lines)}")
            lost, delivered = lost + missing, now
            if code != -signal.SIGKILL:
                assert code == 0 and ended and delivered == total, f"{where}: ended at {delivered} of {total} batches"
                break
    assert lost <= kills, f"{replay(seed)}: {lost} batches lost in {kills} kills"


def test_consumer_sigkills_lose_only_the_batch_in_hand(recipe_file, ring_name, tmp_path):
    """Consumers SIGKILLed at random and replaced see the reference stream, less at most the batch in hand per kill."""
    recipe = recipe_file(slots=4)
    reference = reference_stream(recipe, ring_name)
    for seed in trial_seeds(3):
        with trial(seed):
            consumer_kill_trial(recipe, ring_name, reference, seed, tmp_path)
    assert no_leftovers(ring_name)


# -- the daemon --------------------------------------------------------------------------------
def daemon_kill_trial(recipe: Path, name: str, reference: list[str], seed: int) -> None:
    rng = random.Random(seed)
    total = len(reference)
    cut = rng.choice([rng.randint(1, 10), rng.randint(1, total - 1), total - rng.randint(1, 12)])
    handle = ringload.start(recipe, name=name)
    producers = [p["pid"] for p in ringload.ring_status(name)["producers"]]
    got: list[str] = []
    try:
        with ringload.connect(name, timeout=20) as loader:
            for batch in loader:
                got.append(batch_digest(batch))
                if len(got) == cut:
                    break
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(handle.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            outcome = "end of stream"  # possible if every remaining batch was published before the kill
            try:
                for batch in loader:
                    got.append(batch_digest(batch))
            except ringload.DaemonGone:
                outcome = "DaemonGone"
            waited = time.monotonic() - killed_at
            state = loader.state_dict()
    finally:
        handle.process.kill()
        handle.process.wait()
    where = f"{replay(seed)}, daemon killed after batch {cut} of {total}"
    assert waited < 5, f"{where}: the consumer took {waited:.1f} s to notice"
    assert outcome == "DaemonGone" or len(got) == total, f"{where}: the stream ended after {len(got)} batches"
    assert state["delivered"] == len(got), f"{where}: state {state} after {len(got)} batches"
    assert name in list_ring_names(), f"{where}: the dead daemon's ring should still be there"
    wait_until(lambda: not any(pid_alive(pid) for pid in producers), 5, f"{where}: the producers followed their daemon")
    with ringload.start(recipe, name=name, resume=state):
        got += consume(name)
    assert got == reference, f"{where} ({outcome}): {first_difference(got, reference)}"
    assert no_leftovers(name), f"{where}: left in /dev/shm: {list_ring_names()} {list_semaphore_rings()}"


def test_daemon_sigkill_raises_daemongone_and_a_resumed_daemon_completes_the_stream(recipe_file, ring_name):
    """Daemon SIGKILLed at random: DaemonGone in 5 s; resuming from state_dict() completes the stream; no leftovers."""
    recipe = recipe_file(slots=4, epochs=2)
    reference = reference_stream(recipe, ring_name)
    for seed in trial_seeds(5):
        with trial(seed):
            daemon_kill_trial(recipe, ring_name, reference, seed)
