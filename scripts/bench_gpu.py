"""GPU benchmark: what ringload's CUDA staging costs a training step, measured side by side.

1. Host-to-device bandwidth, the same bytes three ways: from ring slots registered with
   ``cudaHostRegister`` (what ``connect(device="cuda")`` does), from a pinned torch tensor, and
   from pageable memory. Reported as GB/s and as a ratio to the pinned tensor (target >= 0.9).
2. Step time of a small BERT masked-LM on the GPU, fed (a) by synthetic batches already on the
   device and (b) by ringload with ``device="cuda"``; reported as a ratio (target overhead <= 2%),
   plus how long the compute stream waited on copy events (copies fully overlapped -> ~0).

Needs a CUDA GPU; run from the repository root::

    python scripts/bench_gpu.py [--steps 200] [--json gpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import ringload
from ringload._daemon import remove_ring
from ringload._layout import Field, Geometry, Ring

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def bandwidth(repeats: int = 50) -> dict[str, float]:
    """GB/s of host->device copies of 8 ring-slot-sized buffers, from three kinds of host memory."""
    shape = (64, 2048)  # a 64 x 2048 int32 field: 512 KiB, like a long-context batch
    fields = (Field("input_ids", np.dtype("<i4"), shape), Field("labels", np.dtype("<i8"), shape))
    name = f"bench-gpu-{uuid.uuid4().hex[:6]}"
    ring = Ring.create(name, Geometry(1, 8, shape[0], fields), {"bench": True})
    try:
        region = np.frombuffer(ring._mem, dtype=np.uint8, count=ring.geometry.slots * ring.slot_size,
                               offset=ring.slots_offset)
        code = torch.cuda.cudart().cudaHostRegister(region.ctypes.data, region.nbytes, 1)
        if int(code) != 0:
            raise RuntimeError(f"cudaHostRegister failed with CUDA error {int(code)}")
        sources = {
            "ring (registered)": [{k: torch.from_numpy(v) for k, v in ring.slot_arrays(0, j).items()} for j in range(8)],
            "pinned tensor": [{f.name: torch.zeros(shape, dtype=torch.from_numpy(np.zeros(1, f.dtype)).dtype).pin_memory()
                               for f in fields} for _ in range(8)],
            "pageable tensor": [{f.name: torch.zeros(shape, dtype=torch.from_numpy(np.zeros(1, f.dtype)).dtype)
                                 for f in fields} for _ in range(8)],
        }
        stream = torch.cuda.Stream()
        results = {}
        for label, slots in sources.items():
            nbytes = sum(t.numel() * t.element_size() for s in slots for t in s.values())
            for warm in (True, False):
                torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.cuda.stream(stream):
                    for _ in range(3 if warm else repeats):
                        for slot in slots:
                            for tensor in slot.values():
                                tensor.to("cuda", non_blocking=True)
                stream.synchronize()
                elapsed = time.perf_counter() - start
            results[label] = nbytes * repeats / elapsed / 1e9
        torch.cuda.cudart().cudaHostUnregister(region.ctypes.data)
        del region, sources
        return results
    finally:
        ring.close()
        remove_ring(name, 1)


def step_times(steps: int, recipe: dict) -> dict[str, float]:
    """Mean step time of a small BERT MLM on synthetic device batches vs ringload device batches."""
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                     intermediate_size=2048, max_position_embeddings=recipe["task"]["seq_len"])
    model = transformers.BertForMaskedLM(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(batch: dict) -> None:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(batches, n: int) -> float:
        for _ in range(10):
            step(next(batches))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step(next(batches))
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / n

    name = f"bench-gpu-{uuid.uuid4().hex[:6]}"
    dtypes = {"input_ids": torch.long, "token_type_ids": torch.long}
    with ringload.start(recipe, name=name):
        with ringload.connect(name, device="cuda", dtypes=dtypes, prefetch=4) as loader:
            sample = next(loader)
            synthetic = {k: v.clone() for k, v in sample.items()}

            def repeat():
                while True:
                    yield synthetic

            device_only = timed(repeat(), steps)
            fed = timed(iter(loader), steps)
            registered = loader._stager.registered
    return {"synthetic_step_s": device_only, "ringload_step_s": fed, "overhead": fed / device_only - 1,
            "registered": registered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--producers", type=int, default=max(2, min(8, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    from fetch_assets import fetch

    kjv, bert = fetch("kjv"), fetch("bert-wordpiece")
    recipe = {"name": "bench-gpu", "source": {"paths": [str(kjv / "kjv.jsonl")], "format": "jsonl", "field": "text"},
              "tokenizer": str(bert / "tokenizer.json"), "task": {"type": "mlm", "seq_len": 512},
              "batch_size": 32, "producers": args.producers, "seed": 0}
    result = {"gpu": torch.cuda.get_device_name(), "bandwidth_gb_s": bandwidth(), **step_times(args.steps, recipe)}
    pinned = result["bandwidth_gb_s"]["pinned tensor"]
    print(f"GPU: {result['gpu']}")
    for label, gbs in result["bandwidth_gb_s"].items():
        print(f"  host->device from {label:18s} {gbs:7.2f} GB/s  ({gbs / pinned:.2f}x pinned)")
    print(f"  BERT-6L step, synthetic device batches: {1e3 * result['synthetic_step_s']:.2f} ms")
    print(f"  BERT-6L step, ringload device='cuda':   {1e3 * result['ringload_step_s']:.2f} ms "
          f"(overhead {100 * result['overhead']:+.2f}%, ring registered: {result['registered']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    tempfile.gettempdir()


if __name__ == "__main__":
    main()
