"""Length bucketing side by side: padding and throughput of a complete pass, bucketed or not.

Runs ``tasks/encode-kjv.yaml`` (every KJV verse once) twice on one rank, with ``bucket_window: 0``
(rows in record order) and with the recipe's window, embedding each batch trimmed to its longest
row (``connect(..., trim=True)``) with a small BERT as scripts/embed_corpus.py does. Prints, per
run, the padding among the row tokens before and after trimming (from ``ringload status``), the
token positions the model processed, and records per second. One run each: on a shared machine
the throughput ratio is indicative, the padding counts are exact.

    python scripts/bucketing_cost.py [--window 1024]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ringload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_corpus import encoder  # noqa: E402
from fetch_assets import fetch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def finished_packing(name: str, timeout: float = 30.0) -> dict:
    """The ring's padding counts once its producers have finished (they are final then)."""
    deadline = time.monotonic() + timeout
    while (status := ringload.ring_status(name))["state"] != "finished" and time.monotonic() < deadline:
        time.sleep(0.05)
    return status["packing"]


def through_model(model, loader: ringload.Loader) -> tuple[int, int]:  # noqa: ANN001 - a transformers model
    """Run every batch through the model; (records, token positions processed). The batches live only in
    this frame, so none is still held when the loader closes."""
    records = positions = 0
    for batch in loader:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              token_type_ids=batch.get("token_type_ids"))
        records += int(batch["_valid"].sum())
        positions += batch["input_ids"].numel()
    return records, positions


def run(recipe: ringload.Recipe, window: int) -> dict:
    """One complete pass with ``bucket_window: window``, through the model: counts, time and padding."""
    import torch

    torch.set_num_threads(1)
    model = encoder(ringload.TokenizerInfo(recipe.tokenizer).vocab_size, recipe.task["seq_len"])
    name = f"bucketing-{window}"
    with ringload.start(recipe.replace(bucket_window=window), name=name):
        with torch.no_grad(), ringload.connect(name, meta=True, trim=True, timeout=120) as loader:
            started = time.perf_counter()
            records, positions = through_model(model, loader)
            elapsed = time.perf_counter() - started
        packing = finished_packing(name)
    return {"window": window, "records": records, "positions": positions, "seconds": elapsed, **packing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "tasks" / "encode-kjv.yaml"))
    parser.add_argument("--window", type=int, default=None, help="bucket_window (default: the recipe's)")
    args = parser.parse_args()
    for asset in ("bert-wordpiece", "kjv"):
        fetch(asset)
    recipe = ringload.load_recipe(args.recipe)
    window = args.window or recipe.bucket_window or 1024
    results = [run(recipe, 0), run(recipe, window)]
    for r in results:
        print(f"bucket_window {r['window']:5d}: {r['records']:,} records, padding {r['padding_ratio']:.1%} of row "
              f"tokens, {r['trimmed_padding_ratio']:.1%} once trimmed; {r['positions']:,} positions through the "
              f"model; {r['records'] / r['seconds']:,.0f} records/s")
    plain, bucketed = results
    print(f"bucketing: {plain['positions'] / bucketed['positions']:.2f}x fewer positions, "
          f"{plain['seconds'] / bucketed['seconds']:.2f}x the records/s (one run each, shared CPU)")


if __name__ == "__main__":
    main()
