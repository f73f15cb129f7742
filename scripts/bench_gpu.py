"""GPU benchmark: what ringload's CUDA staging costs a training step, measured side by side.

1. Host-to-device bandwidth, the same bytes three ways: from ring slots registered with
   ``cudaHostRegister`` (what ``connect(device="cuda")`` does), from a pinned torch tensor, and
   from pageable memory. Reported as GB/s and as a ratio to the pinned tensor (target >= 0.9).
2. Step time of a small BERT masked-LM on the GPU, fed (a) by synthetic batches already on the
   device and (b) by ringload with ``device="cuda"``, in alternating rounds so that clock drift hits
   both alike; reported as a ratio (target overhead <= 2%), plus the host time spent in the
   loader's ``next()`` per step (what the training thread pays for staging).

Needs a CUDA GPU; run from the repository root::

    python scripts/bench_gpu.py [--steps 200] [--json gpu.json]

``--device cpu`` runs part 2 alone on the CPU with a tiny model and a few steps: a check of the
script itself, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch

import ringload
from ringload._housekeeping import remove_ring
from ringload._layout import Field, Geometry, Ring

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def bandwidth(repeats: int = 200) -> dict[str, float]:
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


def step_times(steps: int, rounds: int, recipe: dict, device: str) -> dict[str, float]:
    """Median step time of a small BERT MLM on synthetic device batches vs ringload device batches,
    over ``rounds`` alternating rounds of ``steps`` steps each."""
    import transformers

    small = device == "cpu"  # a check of this script, not a measurement
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64 if small else 512,
                                     num_hidden_layers=1 if small else 6, num_attention_heads=8,
                                     intermediate_size=128 if small else 2048,
                                     max_position_embeddings=recipe["task"]["seq_len"])
    model = transformers.BertForMaskedLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    in_next = [0.0]

    def step(batch: dict) -> None:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(batches, n: int) -> float:
        synchronize()
        start = time.perf_counter()
        for _ in range(n):
            before = time.perf_counter()
            batch = next(batches)
            in_next[0] += time.perf_counter() - before
            step(batch)
        synchronize()
        return (time.perf_counter() - start) / n

    name = f"bench-gpu-{uuid.uuid4().hex[:6]}"
    dtypes = {"input_ids": torch.long, "token_type_ids": torch.long}
    with ringload.start(recipe, name=name):
        with ringload.connect(name, device=device, dtypes=dtypes, prefetch=4) as loader:
            fed_batches = iter(loader)
            sample = next(fed_batches)
            synthetic = {k: v.clone() for k, v in sample.items()}

            def repeat():
                while True:
                    yield synthetic

            synthetic_batches = repeat()
            timed(synthetic_batches, 10)  # warm-up: kernels, allocator, optimizer state
            timed(fed_batches, 10)
            device_only, fed, fed_next = [], [], []
            for _ in range(rounds):
                device_only.append(timed(synthetic_batches, steps))
                in_next[0] = 0.0
                fed.append(timed(fed_batches, steps))
                fed_next.append(in_next[0] / steps)
            stager = getattr(loader, "_stager", None)
            registered = stager.registered if stager is not None else None
    synthetic_s, ringload_s = statistics.median(device_only), statistics.median(fed)
    return {"synthetic_step_s": synthetic_s, "ringload_step_s": ringload_s, "overhead": ringload_s / synthetic_s - 1,
            "synthetic_rounds_s": device_only, "ringload_rounds_s": fed,
            "next_s_per_step": statistics.median(fed_next), "registered": registered, "steps_per_round": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per round (default 100)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each feed (default 5)")
    parser.add_argument("--producers", type=int, default=max(2, min(8, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (--device cpu checks the script on the CPU)")
    from fetch_assets import fetch

    kjv, bert = fetch("kjv"), fetch("bert-wordpiece")
    recipe = {"name": "bench-gpu", "source": {"paths": [str(kjv / "kjv.jsonl")], "format": "jsonl", "field": "text"},
              "tokenizer": str(bert / "tokenizer.json"), "task": {"type": "mlm", "seq_len": 512},
              "batch_size": 32, "producers": args.producers, "seed": 0, "epochs": None}
    result: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "producers": args.producers}
    if args.device == "cuda":
        result["bandwidth_gb_s"] = bandwidth()
        pinned = result["bandwidth_gb_s"]["pinned tensor"]
        print(f"GPU: {result['device']}")
        for label, gbs in result["bandwidth_gb_s"].items():
            print(f"  host->device from {label:18s} {gbs:7.2f} GB/s  ({gbs / pinned:.2f}x pinned)")
    result.update(step_times(args.steps, args.rounds, recipe, args.device))
    print(f"  BERT step, synthetic device batches: {1e3 * result['synthetic_step_s']:.2f} ms (median of {args.rounds} "
          f"rounds of {args.steps} steps)")
    print(f"  BERT step, ringload device={args.device!r}: {1e3 * result['ringload_step_s']:.2f} ms "
          f"(overhead {100 * result['overhead']:+.2f}%, next() {1e3 * result['next_s_per_step']:.3f} ms per step, "
          f"ring registered: {result['registered']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
