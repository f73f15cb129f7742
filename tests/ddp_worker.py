"""One DDP rank for tests/test_sharding.py, launched by torchrun: trains a small BERT from a ring.

Usage: torchrun --nproc-per-node 2 ddp_worker.py RING OUT_DIR STEPS. Each rank writes
OUT_DIR/rank<R>.json with its losses, a hash of every batch it saw, and a checksum of its weights.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

import ringload


def main(ring: str, out_dir: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank
    config = transformers.BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = torch.nn.parallel.DistributedDataParallel(transformers.BertForMaskedLM(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, batches = [], []
    with ringload.connect(ring, timeout=60) as loader:  # the rank comes from LOCAL_RANK
        for _, batch in zip(range(steps), loader):
            batches.append(hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest())
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    weights = sum(float(p.detach().double().sum()) for p in model.parameters())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"losses": losses, "batches": batches, "weights": round(weights, 6)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
