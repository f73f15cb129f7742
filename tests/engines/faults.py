"""Fault injection, the long version of ``tests/test_faults.py``: many trials of real SIGKILLs.

Three scenarios, ``--trials`` times each, every trial with its own ``random.Random(seed)`` (trial
``i`` of a scenario uses ``--seed + i``, so a failing trial is replayed with ``--seed`` set to its
seed and ``--trials 1``). Every batch is reduced to a SHA-256 digest of its fields' names, dtypes,
shapes and bytes and compared with an uninterrupted reference run of the same recipe.

* ``producer``: 3-6 kill events per trial: one producer right after the ring starts; all of them at
  once at a random point; 1-12 batches before the end, after a pause of 0.2-0.5 s in which the
  producers run ahead as far as they can (lanes full, or idle at the end of the sources), the one
  the consumer is waiting for; and 0-3 more at random points, each after a random delay of up to
  10 ms. Checks: the stream is bit-identical to the reference; each lane's ``restarts`` equals its
  kills; the ring finishes without error.
* ``consumer``: consumer subprocesses (each writes ``<delivered> <digest> <time>`` per batch and
  flushes before asking for the next) SIGKILLed 2-4 times per trial, either while starting up or
  after a random number of batches, each followed by a new one. Checks: every recorded batch is the
  reference batch of its position, each consumer continues right after the ring's ``delivered``
  count at its start, and per kill at most the one batch in hand (counted as delivered by the ring,
  not yet recorded) is absent.
* ``daemon``: the daemon SIGKILLed after a random number of batches (2 epochs). Checks: the
  consumer raises ``DaemonGone`` within 5 s (or reaches the end, if every remaining batch was
  already published), the producers die with their daemon, the consumer's ``state_dict()``
  resumes a new daemon on the same name (which reclaims the dead ring), the concatenated stream is
  bit-identical to the reference, and nothing of the ring is left in /dev/shm.

Recovery time: from a kill to the next batch the consumer receives (for ``consumer`` that includes
starting a new Python process with torch; for ``daemon``, noticing the death and starting the
resumed daemon).

The corpus is generated (sentences over a small vocabulary, a WordPiece tokenizer trained on them
with ``tokenizers``) unless ``--real``: the KJV verses and the bert-base-uncased WordPiece
(``kjv`` and ``bert-wordpiece`` from ``scripts/fetch_assets.py``).

Run from the repository root::

    python -m tests.engines.faults                 # 20 trials per scenario (about 3 minutes on 2 cores)
    python -m tests.engines.faults --trials 5 --json faults.json
    python -m tests.engines.faults --real --trials 3 --scenarios producer,daemon

Exit code 1 if any batch mismatched or any check failed (the failures are listed under the table).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

import ringload
from ringload._housekeeping import remove_ring, ring_owner
from ringload._names import list_ring_names, list_semaphore_rings, pid_alive

VOCABULARY = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so what no out up into more about said time "
    "harbour meadow furnace compass orchard lighthouse cartographer weaver chimney falcon glacier blacksmith "
    "kingdom thunder whisper morning evening journey garden silver ancient promise village window stranger"
).split()
DAEMON_NOTICE_S = 5.0
DUE = -1  # in a kill plan: the lane whose producer holds (or last held) the chunk the consumer waits for


def batch_digest(batch: dict[str, Any]) -> str:
    """SHA-256 over every field's name, dtype, shape and bytes: equal digests = bit-identical batches."""
    h = hashlib.sha256()
    for key in sorted(batch):
        array = batch[key].numpy()
        h.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
        h.update(array.tobytes())
    return h.hexdigest()


# The consumer subprocess of the consumer scenario: one line "<delivered> <digest> <time>" per batch,
# written and flushed before it asks for the next batch, then "END" after the last one.
_CHILD_MAIN = """
name, out_path, pace = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(out_path, "w") as out, ringload.connect(name, timeout=20) as loader:
    for batch in loader:
        out.write(f"{loader.delivered} {batch_digest(batch)} {time.time()}\\n")
        out.flush()
        time.sleep(pace)
    out.write("END\\n")
"""
CONSUMER_CHILD = ("from __future__ import annotations\nimport hashlib, sys, time\nimport ringload\n\n"
                  + textwrap.dedent(inspect.getsource(batch_digest)) + _CHILD_MAIN)


@dataclass
class Trial:
    """What one trial did and found."""

    seed: int
    kills: int = 0
    compared: int = 0
    mismatches: int = 0
    recoveries: list[float] = field(default_factory=list)  # s from each kill to the consumer's next batch
    detections: list[float] = field(default_factory=list)  # s from a daemon kill to DaemonGone
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(f"seed {self.seed}: {problem}")


@dataclass
class Setup:
    """What every trial of a scenario shares: the ring name, a work folder, the recipe and its reference stream."""

    name: str
    workdir: Path
    recipe: Path
    reference: list[str]

    @classmethod
    def prepare(cls, name: str, workdir: Path, scenario: str, recipe: dict[str, Any]) -> Setup:
        """Write the scenario's recipe and record its reference stream: the digests of an uninterrupted run."""
        path = workdir / f"recipe-{scenario}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        with ringload.start(path, name=name):
            reference = consume(name, [])
        return cls(name, workdir, path, reference)


# -- corpus ------------------------------------------------------------------------------------
def generate_corpus(workdir: Path, examples: int) -> dict[str, Any]:
    """Write a jsonl corpus of Zipf-distributed sentences and a WordPiece tokenizer trained on it (always the same)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    rng = random.Random(0)
    weights = [1.0 / (rank + 1) for rank in range(len(VOCABULARY))]
    texts = [" ".join(rng.choices(VOCABULARY, weights, k=rng.randint(3, 90))).capitalize() + "."
             for _ in range(examples)]
    corpus, plain = workdir / "corpus.jsonl", workdir / "corpus.txt"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    plain.write_text("\n".join(texts) + "\n")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train([str(plain)], trainers.WordPieceTrainer(vocab_size=400,
                                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = workdir / "tokenizer.json"
    tok.save(str(tokenizer))
    return {"source": {"paths": [str(corpus)], "format": "jsonl", "field": "text"}, "tokenizer": str(tokenizer),
            "task": {"type": "mlm", "seq_len": 64}, "batch_size": 8, "chunk_bytes": 16384}


def real_corpus() -> dict[str, Any]:
    """The KJV verses and the bert-base-uncased WordPiece, fetched (and verified) on first use."""
    from scripts.fetch_assets import fetch  # run from the repository root, which holds scripts/

    return {"source": {"paths": [str(fetch("kjv") / "kjv.jsonl")], "format": "jsonl", "field": "text"},
            "tokenizer": str(fetch("bert-wordpiece") / "tokenizer.json"),
            "task": {"type": "mlm", "seq_len": 128}, "batch_size": 16, "chunk_bytes": 65536}


# -- helpers -----------------------------------------------------------------------------------
def consume(name: str, digests: list[str], on_batch: Callable[[int], None] | None = None, pace: float = 0.0,
            arrivals: list[float] | None = None) -> list[str]:
    """Append the digests of the ring's batches to ``digests`` until the ring's end (kept if it raises).

    ``on_batch(count)`` runs after each batch; ``arrivals`` gets the time each one arrived.
    """
    with ringload.connect(name, timeout=20) as loader:
        for batch in loader:
            if arrivals is not None:
                arrivals.append(time.monotonic())
            digests.append(batch_digest(batch))
            if on_batch:
                on_batch(len(digests))
            if pace:
                time.sleep(pace)
    return digests


def mismatches(got: list[str], want: list[str]) -> int:
    """Positions that differ, plus the batches one stream has beyond the other."""
    return sum(a != b for a, b in zip(got, want)) + abs(len(got) - len(want))


def first_after(times: list[float], moment: float) -> float | None:
    later = [t for t in times if t >= moment]
    return min(later) - moment if later else None


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def running_producer(name: str, lane: int, victims: list[int]) -> int:
    """The pid of the lane's producer once it is alive and none of ``victims`` (a replacement may lag)."""
    pid = 0

    def fresh() -> bool:
        nonlocal pid
        pid = ringload.ring_status(name)["producers"][lane]["pid"]
        return pid not in victims and pid_alive(pid)

    if not wait_until(fresh, 30):
        raise RuntimeError(f"lane {lane} has no new producer 30 s after pid {victims[-1]} was killed")
    return pid


def due_lane(name: str) -> int:
    """The lane working on (or last done with) the chunk the consumer waits for; lane 0 if none is."""
    status = ringload.ring_status(name)
    due = [p["lane"] for p in status["producers"] if p["current_chunk"] == status["consumers"][0]["chunk"]]
    return due[0] if due else 0


def leftovers(name: str) -> bool:
    return name in list_ring_names() or name in list_semaphore_rings()


# -- scenarios ---------------------------------------------------------------------------------
def producer_trial(setup: Setup, trial: Trial) -> None:
    reference, total = setup.reference, len(setup.reference)
    lanes = ringload.load_recipe(setup.recipe).producers
    rng = random.Random(trial.seed)
    # (after how many delivered batches, which lanes, pause in s); see the module docstring
    plan = [(0, (rng.randrange(lanes),), 0.0),
            (rng.randint(1, total - 1), tuple(range(lanes)), rng.uniform(0, 0.01)),
            (total - rng.randint(1, 12), (DUE,), rng.uniform(0.2, 0.5))]
    for _ in range(rng.randint(0, 3)):
        plan.append((rng.randint(1, total - 1), (rng.randrange(lanes),), rng.uniform(0, 0.01)))
    plan.sort()
    pace = rng.choice([0.0, 0.0005])
    killed: list[list[int]] = [[] for _ in range(lanes)]
    kill_times: list[float] = []
    arrivals: list[float] = []

    def kill_due(count: int) -> None:
        while plan and plan[0][0] == count:
            _, victims, pause = plan.pop(0)
            time.sleep(pause)
            for lane in (due_lane(setup.name) if lane == DUE else lane for lane in victims):
                pid = running_producer(setup.name, lane, killed[lane])
                os.kill(pid, signal.SIGKILL)
                kill_times.append(time.monotonic())
                killed[lane].append(pid)
                trial.kills += 1

    got: list[str] = []
    try:
        with ringload.start(setup.recipe, name=setup.name):
            kill_due(0)
            consume(setup.name, got, kill_due, pace, arrivals)
            expected = [len(k) for k in killed]

            def restarts_and_state() -> tuple[list[int], str]:
                status = ringload.ring_status(setup.name)
                return [p["restarts"] for p in status["producers"]], status["state"]

            if not wait_until(lambda: restarts_and_state() == (expected, "finished"), 10):
                trial.check(False, f"(restarts, state) {restarts_and_state()} after kills {expected}")
    finally:  # what arrived is compared even if the stream broke off (the error is reported too)
        trial.compared, trial.mismatches = len(got), mismatches(got, reference[:len(got)])
        trial.recoveries = [r for r in (first_after(arrivals, t) for t in kill_times) if r is not None]
    trial.mismatches += max(0, total - len(got))  # a stream that ended early
    trial.check(not plan, f"the stream ended before the kills planned at {plan}")


def read_lines(path: Path) -> tuple[list[tuple[int, str, float]], bool]:
    """The (delivered, digest, time) lines a consumer child wrote, and whether it wrote END."""
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")[:-1]  # whatever follows the last newline was cut off by the kill
    ended = lines[-1:] == ["END"]
    return [(int(n), d, float(t)) for n, d, t in (line.split() for line in lines[:len(lines) - ended])], ended


def run_consumer_child(setup: Setup, script: Path, out: Path, rng: random.Random, kills_left: int,
                       remaining: int) -> tuple[int, float | None]:
    """Run one consumer child; with ``kills_left``, SIGKILL it while it starts up or after a random
    number of the ``remaining`` batches. Return its exit code and the wall-clock time of the kill."""
    child = subprocess.Popen([sys.executable, str(script), setup.name, str(out), "0.002"])
    kill_time = None
    try:
        if kills_left:
            if rng.random() < 0.25:  # while it starts: importing, attaching or taking over
                time.sleep(rng.uniform(0.0, 2.0))
            else:
                target = rng.randint(1, max(1, remaining // (kills_left + 1)))
                wait_until(lambda: child.poll() is not None or len(read_lines(out)[0]) >= target, 60)
                time.sleep(rng.uniform(0.0, 0.003))
            if child.poll() is None:
                child.kill()
                kill_time = time.time()
        return child.wait(60), kill_time
    finally:
        child.kill()


def consumer_trial(setup: Setup, trial: Trial) -> None:
    reference, total = setup.reference, len(setup.reference)
    rng = random.Random(trial.seed)
    script = setup.workdir / "consumer_child.py"
    script.write_text(CONSUMER_CHILD)
    planned, delivered, lost = rng.randint(2, 4), 0, 0
    last_kill: float | None = None  # wall clock: the children stamp their lines with time.time()
    with ringload.start(setup.recipe, name=setup.name):
        for run in itertools.count(1):
            out = setup.workdir / f"consumer-{trial.seed}-{run}.txt"
            code, kill_time = run_consumer_child(setup, script, out, rng, max(0, planned - run + 1), total - delivered)
            lines, ended = read_lines(out)
            if last_kill is not None and lines:
                trial.recoveries.append(lines[0][2] - last_kill)
                last_kill = None
            if kill_time is not None:
                trial.kills += 1
                last_kill = kill_time
            now = ringload.ring_status(setup.name)["consumers"][0]["delivered"]
            where = f"consumer {run} (exit code {code})"
            trial.compared += len(lines)
            wrong = [n for j, (n, d, _) in enumerate(lines)
                     if n != delivered + 1 + j or n > total or d != reference[n - 1]]
            trial.mismatches += len(wrong)
            trial.check(not wrong, f"{where}: positions {wrong[:5]} are not the reference batches after {delivered}")
            missing, allowed = now - delivered - len(lines), int(kill_time is not None)
            trial.check(0 <= missing <= allowed, f"{where}: the ring counts {now} delivered, the child recorded "
                                                 f"up to {delivered + len(lines)}")
            trial.mismatches += max(0, missing - allowed, -missing)
            lost, delivered = lost + max(0, missing), now
            if kill_time is None:
                trial.check(code == 0 and ended and delivered == total, f"{where}: ended at {delivered} of {total}")
                break
    trial.check(lost <= trial.kills, f"{lost} batches lost in {trial.kills} kills")


def daemon_trial(setup: Setup, trial: Trial) -> None:
    reference, total = setup.reference, len(setup.reference)
    rng = random.Random(trial.seed)
    cut = rng.choice([rng.randint(1, 10), rng.randint(1, total - 1), total - rng.randint(1, 12)])
    handle = ringload.start(setup.recipe, name=setup.name)
    producers = [p["pid"] for p in ringload.ring_status(setup.name)["producers"]]
    got: list[str] = []
    try:
        with ringload.connect(setup.name, timeout=20) as loader:
            for batch in loader:
                got.append(batch_digest(batch))
                if len(got) == cut:
                    break
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(handle.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            trial.kills += 1
            outcome = "end of stream"  # possible if every remaining batch was published before the kill
            try:
                for batch in loader:
                    got.append(batch_digest(batch))
            except ringload.DaemonGone:
                outcome = "DaemonGone"
            noticed = time.monotonic() - killed_at
            state = loader.state_dict()
    finally:
        handle.process.kill()
        handle.process.wait()
    where = f"daemon killed after batch {cut} of {total}"
    if outcome == "DaemonGone":
        trial.detections.append(noticed)
    trial.check(noticed < DAEMON_NOTICE_S, f"{where}: the consumer took {noticed:.1f} s to notice")
    trial.check(outcome == "DaemonGone" or len(got) == total, f"{where}: the stream ended after {len(got)} batches")
    trial.check(state["delivered"] == len(got), f"{where}: state {state} after {len(got)} batches")
    trial.check(setup.name in list_ring_names(), f"{where}: the dead daemon's ring should still be there")
    trial.check(wait_until(lambda: not any(pid_alive(pid) for pid in producers), 5),
                f"{where}: producers outlived their daemon")
    arrivals: list[float] = []
    try:
        with ringload.start(setup.recipe, name=setup.name, resume=state):
            consume(setup.name, got, arrivals=arrivals)
    finally:  # what arrived is compared even if the stream broke off (the error is reported too)
        trial.compared, trial.mismatches = len(got), mismatches(got, reference[:len(got)])
        if arrivals:
            trial.recoveries.append(arrivals[0] - killed_at)
    trial.mismatches += max(0, total - len(got))  # a stream that ended early
    trial.check(not leftovers(setup.name), f"{where}: shared objects left in /dev/shm")


# name -> (recipe keys on top of the corpus's, one trial)
SCENARIOS: dict[str, tuple[dict[str, Any], Callable[[Setup, Trial], None]]] = {
    "producer": ({"slots": 4, "max_restarts": 50}, producer_trial),
    "consumer": ({"slots": 4}, consumer_trial),
    "daemon": ({"slots": 4, "epochs": 2}, daemon_trial),
}


# -- running and reporting ---------------------------------------------------------------------
def run_trial(setup: Setup, scenario: str, seed: int) -> Trial:
    """One trial; an exception (a ringload error, a hang ended by the consumer's timeout) is a failed
    check, and whatever the trial left of the ring is removed so that the next trial starts clean."""
    trial, started = Trial(seed), time.monotonic()
    try:
        SCENARIOS[scenario][1](setup, trial)
    except Exception as exc:  # noqa: BLE001 - reported in the table and the exit code
        trial.check(False, f"{type(exc).__name__}: {exc}")
        owner = ring_owner(setup.name)
        if owner:
            os.kill(owner, signal.SIGKILL)
        remove_ring(setup.name)
    trial.seconds = time.monotonic() - started
    return trial


def summarize(scenario: str, trials: list[Trial]) -> dict[str, Any]:
    recoveries = [r for t in trials for r in t.recoveries]
    detections = [d for t in trials for d in t.detections]

    def stat(values: list[float], f: Callable[[list[float]], float]) -> float | None:
        return round(f(values), 4) if values else None

    return {
        "scenario": scenario,
        "trials": len(trials),
        "kills": sum(t.kills for t in trials),
        "batches_compared": sum(t.compared for t in trials),
        "mismatches": sum(t.mismatches for t in trials),
        "failed_checks": sum(len(t.problems) for t in trials),
        "recovery_mean_s": stat(recoveries, lambda v: sum(v) / len(v)),
        "recovery_max_s": stat(recoveries, max),
        "recoveries": len(recoveries),
        "detection_mean_s": stat(detections, lambda v: sum(v) / len(v)),
        "detection_max_s": stat(detections, max),
        "detections": len(detections),
        "seconds": round(sum(t.seconds for t in trials), 1),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = [("scenario", "scenario", "<9"), ("trials", "trials", ">6"), ("kills", "kills", ">6"),
               ("batches_compared", "batches compared", ">16"), ("mismatches", "mismatches", ">10"),
               ("failed_checks", "failed checks", ">13"), ("recovery_mean_s", "recovery mean s", ">15"),
               ("recovery_max_s", "recovery max s", ">14"), ("seconds", "wall s", ">7")]
    print("  ".join(f"{title:{align}}" for _, title, align in columns))
    for row in rows:
        cells = ["-" if row[key] is None else f"{row[key]:.3f}" if key.startswith("recovery") else str(row[key])
                 for key, _, _ in columns]
        print("  ".join(f"{cell:{align}}" for cell, (_, _, align) in zip(cells, columns)))
    for row in rows:
        if row["detections"]:
            mean_ms, max_ms = 1000 * row["detection_mean_s"], 1000 * row["detection_max_s"]
            ended = row["trials"] - row["detections"]
            print(f"{row['scenario']}: the consumer raised DaemonGone {mean_ms:.1f} ms after the kill on average, "
                  f"at most {max_ms:.1f} ms" + (f"; in {ended} trial(s) every remaining batch had been published "
                                                "before the kill and the stream ended normally" if ended else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials per scenario (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="seed of each scenario's first trial (default: random)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of " + ", ".join(SCENARIOS))
    parser.add_argument("--real", action="store_true",
                        help="KJV verses + bert-base-uncased WordPiece instead of generated data")
    parser.add_argument("--examples", type=int, default=6000, help="generated corpus size in sentences (default 6000)")
    parser.add_argument("--producers", type=int, default=2, help="producers (lanes) per ring (default 2)")
    parser.add_argument("--json", type=Path, help="also write the table and every trial's details here")
    args = parser.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {sorted(unknown)}; choose from {list(SCENARIOS)}")
    first_seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    name = f"faults-{os.getpid()}"
    results: dict[str, list[Trial]] = {}
    with tempfile.TemporaryDirectory(prefix="ringload-faults-") as tmp:
        workdir = Path(tmp)
        corpus = real_corpus() if args.real else generate_corpus(workdir, args.examples)
        print(f"ring {name}: {'KJV + bert-base-uncased' if args.real else f'{args.examples} generated sentences'}, "
              f"{args.producers} producers, first seed {first_seed}", flush=True)
        try:
            for scenario in scenarios:
                overrides, _ = SCENARIOS[scenario]
                started = time.monotonic()
                recipe = {"name": "faults", **corpus, "producers": args.producers, "seed": 7, "epochs": 1, **overrides}
                setup = Setup.prepare(name, workdir, scenario, recipe)
                print(f"{scenario}: reference run, {len(setup.reference)} batches in "
                      f"{time.monotonic() - started:.1f} s", flush=True)
                results[scenario] = []
                for i in range(args.trials):
                    trial = run_trial(setup, scenario, first_seed + i)
                    results[scenario].append(trial)
                    verdict = "ok" if not trial.mismatches and not trial.problems else "FAILED"
                    print(f"  trial {i + 1}/{args.trials} seed {trial.seed}: {trial.kills} kills, {trial.compared} "
                          f"batches compared, {trial.mismatches} mismatches, {trial.seconds:.1f} s, {verdict}",
                          flush=True)
        finally:
            owner = ring_owner(name)
            if owner:
                os.kill(owner, signal.SIGKILL)
            remove_ring(name)

    rows = [summarize(s, trials) for s, trials in results.items()]
    print()
    print_table(rows)
    problems = [p for trials in results.values() for t in trials for p in t.problems]
    for problem in problems:
        print("FAILED:", problem)
    if args.json:
        trials = {s: [asdict(t) for t in ts] for s, ts in results.items()}
        args.json.write_text(json.dumps({"first_seed": first_seed, "real": args.real, "table": rows, "trials": trials},
                                        indent=1))
    return 1 if problems or any(row["mismatches"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
