"""Time to the first batch, as a training script sees it (torch already imported).

Two settings, each in a fresh process per run, alternating so that both see the same machine:

* ``start``: ``ringload.start(recipe)`` then ``connect`` and ``next()``: daemon, producers and
  the first chunk all on the clock;
* ``prestarted``: a ring started beforehand (``ringload start --detach``) and left to fill; only
  ``connect`` and ``next()`` are on the clock.

Also prints where the ``start`` time went: the daemon ready (``start()`` returns), and the
producers' processes started and their first chunk begun (from ``/proc`` and ``ringload status``).

    python scripts/first_batch.py [--runs 5] [--recipe tasks/mlm-kjv.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, os, sys, time
import torch  # the training process has torch loaded before it asks for data
import ringload

def started_at(pid):
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")

mode, recipe, name = sys.argv[1:4]
t0 = time.time()
if mode == "start":
    with ringload.start(recipe, name=name) as ring:
        ready = time.time()
        with ringload.connect(name) as loader:
            next(loader)
            first = time.time()
            spawned = min(started_at(p["pid"]) for p in ringload.ring_status(name)["producers"])
    stages = {"ready_s": ready - t0, "producer_process_s": spawned - t0}
else:
    with ringload.connect(name) as loader:
        next(loader)
        first = time.time()
    stages = {}
print(json.dumps({"first_batch_s": first - t0, **stages}))
"""


def run_child(mode: str, recipe: str, name: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, recipe, name], capture_output=True, text=True,
                         env=env, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--recipe", default=str(ROOT / "tasks" / "mlm-kjv.yaml"))
    args = parser.parse_args()
    name = f"first-batch-{os.getpid()}"
    results: dict[str, list[dict]] = {"start": [], "prestarted": []}
    for _ in range(args.runs):
        results["start"].append(run_child("start", args.recipe, name))
        subprocess.run([sys.executable, "-m", "ringload", "start", args.recipe, "--name", name, "--detach"],
                       check=True, capture_output=True, cwd=ROOT, timeout=120)
        try:
            time.sleep(2.0)  # the producers fill the lanes, as a ring started ahead of training has
            results["prestarted"].append(run_child("prestarted", args.recipe, name))
        finally:
            subprocess.run([sys.executable, "-m", "ringload", "stop", name], capture_output=True, cwd=ROOT)
    for mode, runs in results.items():
        firsts = [r["first_batch_s"] for r in runs]
        line = f"{mode:>10}: first batch median {statistics.median(firsts):.3f} s (min {min(firsts):.3f}, " \
               f"max {max(firsts):.3f}, {len(firsts)} runs)"
        if mode == "start":
            line += (f"; ready after {statistics.median(r['ready_s'] for r in runs):.3f} s, producers' processes "
                     f"started after {statistics.median(r['producer_process_s'] for r in runs):.3f} s")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
