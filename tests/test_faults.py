"""Fault injection: real SIGKILLs of producers, consumers and the daemon at random points.

The trials are those of ``tests/engines/faults.py`` (its module docstring says what each scenario kills
and checks), run here on the test corpus with fewer trials: every trial draws its kill points from
its own ``random.Random(seed)`` and compares the stream the consumer sees, batch digest by batch
digest, with an uninterrupted reference run of the same recipe. The seeds change from run to run
and every failure names its trial's seed; ``RINGLOAD_FAULT_SEED=S`` makes the first trial use seed
``S`` (the next ones ``S+1``, ...), so a failing trial can be replayed. Timing is not replayable,
so a replay hits the same kill points in the stream, not the same instants in the producers.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from ringload._names import list_ring_names, list_semaphore_rings
from tests.engines.faults import SCENARIOS, Setup, run_trial

SEED_ENV = "RINGLOAD_FAULT_SEED"


def trial_seeds(n: int) -> list[int]:
    base = os.environ.get(SEED_ENV)
    first = int(base) if base else random.SystemRandom().randrange(1 << 31)
    return [first + i for i in range(n)]


def run_scenario(scenario: str, trials: int, name: str, workdir: Path, corpus, tokenizer_path: str) -> None:
    recipe = {"name": "faults", "source": {"paths": [str(corpus["jsonl"])], "format": "jsonl", "field": "text"},
              "tokenizer": tokenizer_path, "task": {"type": "mlm", "seq_len": 64}, "batch_size": 8,
              "producers": 2, "seed": 7, "epochs": 1, "chunk_bytes": 16384, **SCENARIOS[scenario][0]}
    setup = Setup.prepare(name, workdir, scenario, recipe)
    assert len(setup.reference) > 100, "the recipe should give a stream long enough for several kills"
    for seed in trial_seeds(trials):
        trial = run_trial(setup, scenario, seed)
        replay = f"seed {seed} (replay: {SEED_ENV}={seed})"
        assert trial.kills > 0, f"{replay}: no kill happened"
        assert not trial.problems, f"{replay}: " + "; ".join(trial.problems)
        assert trial.mismatches == 0, f"{replay}: {trial.mismatches} of {trial.compared} batches differ"
    assert name not in list_ring_names() and name not in list_semaphore_rings()


@pytest.mark.parametrize(
    ("scenario", "trials"),
    [("producer", 5), ("consumer", 3), ("daemon", 5)],
    ids=["producer-sigkills-leave-the-stream-bit-identical",
         "consumer-sigkills-lose-only-the-batch-in-hand",
         "daemon-sigkill-raises-daemongone-and-a-resumed-daemon-completes-the-stream"],
)
def test_sigkills_leave_the_reference_stream(scenario, trials, ring_name, tmp_path, corpus, tokenizer_path):
    """SIGKILLs at random points (producers, consumers or the daemon) leave the stream of an uninterrupted run."""
    run_scenario(scenario, trials, ring_name, tmp_path, corpus, tokenizer_path)
