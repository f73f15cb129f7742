"""What handing out batches safely costs: consumer ``next()`` of the current Loader against an older one.

The older Loader is loaded from git (``--old REV``, default ``b226a7d``: the version that cached one
torch view per slot and gave a slot back when the next batch was requested). Both run against the
same ring (``tasks/mlm-kjv.yaml``, 32 x 128 masked-LM, endless, default lanes of two chunks), in alternating
rounds: a round connects, waits until the producers have filled every lane, then times each
``next()`` of a bare ``for batch in loader`` loop while data is waiting (as many batches as the lanes
hold, less two), and disconnects; the next round goes on where it stopped. It prints p50, p90 and
the mean per version and their ratios; the mean leaves out calls over 1 ms (a wait for a producer,
which depends on the machine's load, not on the consumer) and says how many there were.

    python scripts/bench_consumer.py [--rounds 10] [--old REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ringload

WAITED_S = 1e-3  # a next() this long waited for a producer to publish


def load_old_loader(rev: str) -> type:
    """The Loader class of ``ringload/_consumer.py`` at git revision ``rev``, importable next to the current package."""
    source = subprocess.run(["git", "show", f"{rev}:ringload/_consumer.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "_consumer_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ringload._consumer_old", path)  # relative imports: ringload's
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Loader


def wait_until_full(name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fill = ringload.ring_status(name)["fill"]
        if fill["slots_filled"] >= fill["slots_total"]:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the lanes of ring {name} did not fill within {timeout:.0f} s")


def time_round(loader_class: type, name: str, batches: int) -> list[float]:
    """Seconds per next() call for ``batches`` calls of a bare loop, with every lane full when it starts."""
    loader = loader_class(name, timeout=60)
    try:
        wait_until_full(name)
        times = []
        iterator = iter(loader)
        batch = None
        for _ in range(batches):
            start = time.perf_counter()
            batch = next(iterator)
            times.append(time.perf_counter() - start)
        del batch
        return times
    finally:
        loader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="b226a7d", help="git revision of the Loader to compare with")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per version, alternating")
    args = parser.parse_args()
    versions = {"old": load_old_loader(args.old), "new": ringload.Loader}
    recipe = ringload.load_recipe(ROOT / "tasks" / "mlm-kjv.yaml").replace(epochs=None)
    times: dict[str, list[float]] = {v: [] for v in versions}
    with ringload.start(recipe, name="bench-consumer") as ring:
        geometry = ringload.ring_status(ring.name)["geometry"]
        batches = geometry["producers"] * geometry["slots_per_lane"] - 2
        for _ in range(args.rounds):
            for version, loader_class in versions.items():
                times[version] += time_round(loader_class, ring.name, batches)
    print(f"{args.rounds} rounds x {batches} next() calls per version, data waiting, KJV 32x128 masked-LM")
    summary = {}
    for version, values in times.items():
        values = sorted(values)
        served = [v for v in values if v < WAITED_S]
        summary[version] = (statistics.median(values), values[int(0.9 * len(values))], statistics.fmean(served))
        p50, p90, mean = (v * 1e6 for v in summary[version])
        print(f"{version:>4}: p50 {p50:6.1f} us  p90 {p90:6.1f} us  mean {mean:6.1f} us "
              f"({len(values) - len(served)} of {len(values)} calls waited for a producer and are left out of the mean)")
    ratio = [new / old for new, old in zip(summary["new"], summary["old"])]
    print(f"new / old: p50 {ratio[0]:.2f}x  p90 {ratio[1]:.2f}x  mean {ratio[2]:.2f}x")


if __name__ == "__main__":
    main()
