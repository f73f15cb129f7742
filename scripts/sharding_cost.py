"""What dealing batches to ranks costs: the share of tokens dropped for G = nodes x ranks.

Every chunk's batches are cut to a multiple of G so that every rank gets the same number (see
``ringload/_lanes.py``). This runs one epoch of tasks/mlm-kjv.yaml (files fetched from PyPI
packages) over the KJV repeated ``--repeat`` times, as node 0 of ``G / 2`` nodes serving 2 ranks,
drains both ranks, and prints the dropped share of tokens for each G and chunk size ("default":
1 MiB times G, up to 16 MiB).

    python scripts/sharding_cost.py [--ranks 1,2,4,8,16] [--chunk-bytes default,1048576] [--repeat 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import ringload

ROOT = Path(__file__).resolve().parent.parent


def dropped_share(recipe: ringload.Recipe, global_ranks: int) -> tuple[float, int]:
    """(dropped tokens / all tokens, batches per rank) for node 0 of a G-rank run."""
    world = min(2, global_ranks)
    nodes = global_ranks // world
    with ringload.start(recipe, name="sharding-cost", world_size=world, nnodes=nodes, node_rank=0) as ring:
        counts = [0] * world

        def drain(rank: int) -> None:
            with ringload.connect(ring.name, rank=rank, timeout=60) as loader:
                counts[rank] = sum(1 for _ in loader)

        threads = [threading.Thread(target=drain, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        producers = ringload.ring_status(ring.name)["producers"]
    dropped = sum(p["tokens_dropped"] for p in producers)
    delivered = sum(counts) * nodes * recipe.batch_size * recipe.task["seq_len"]
    return dropped / (dropped + delivered), counts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4,8,16")
    parser.add_argument("--chunk-bytes", default="default,1048576")
    parser.add_argument("--repeat", type=int, default=10, help="copies of the KJV in the corpus")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_assets import fetch

    fetch("bert-wordpiece")
    verses = (fetch("kjv") / "kjv.jsonl").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "kjv-repeated.jsonl"
        corpus.write_bytes(verses * args.repeat)
        base = ringload.load_recipe(ROOT / "tasks" / "mlm-kjv.yaml").replace(
            source={"paths": [str(corpus)], "format": "jsonl", "field": "text"}, epochs=1)
        print(f"corpus: {len(verses) * args.repeat / 1e6:.0f} MB; batches {base.batch_size}x{base.task['seq_len']}")
        print(f"{'chunk bytes':>12} {'G':>4} {'dropped tokens':>15} {'batches per rank':>17}")
        for size in args.chunk_bytes.split(","):
            for ranks in map(int, args.ranks.split(",")):
                recipe = base.replace(chunk_bytes=None if size == "default" else int(size))
                share, per_rank = dropped_share(recipe.replace(world_size=min(2, ranks)), ranks)
                label = f"{recipe.replace(world_size=min(2, ranks), nnodes=max(1, ranks // 2)).chunk_size}"
                print(f"{label:>12} {ranks:>4} {share:>14.2%} {per_rank:>17}", flush=True)


if __name__ == "__main__":
    main()
