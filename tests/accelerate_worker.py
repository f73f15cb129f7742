"""One accelerate process for tests/test_frameworks.py, launched by torchrun: trains a small BERT from its rank.

Usage: torchrun --nproc-per-node 2 accelerate_worker.py RING OUT_DIR STEPS. The ring serves two ranks;
each process iterates ringload.RingDataset(RING), which connects to the rank in LOCAL_RANK, and writes
OUT_DIR/rank<R>.json with its process index, a checksum of every batch it trained on and a checksum
of its weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from conftest import batch_checksum

import ringload


def main(ring: str, out_dir: str, steps: int) -> None:
    # The ring's loader is not passed to prepare(): each process already reads its own rank, so there is
    # nothing for accelerate to shard or dispatch (and it cannot shard a batch_size=None loader).
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
    torch.manual_seed(0)  # the same initial weights in every process
    config = transformers.BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = []
    with ringload.RingDataset(ring, timeout=60) as dataset:
        for _, batch in zip(range(steps), dataset):
            batches.append(batch_checksum(batch))
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
    weights = sum(float(p.detach().double().sum()) for p in model.parameters())
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(
        {"process_index": accelerator.process_index, "batches": batches, "weights": round(weights, 6)}))
    accelerator.wait_for_everyone()
    # Tear the process group down before exit: gloo's threads left running at exit abort the process.
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
