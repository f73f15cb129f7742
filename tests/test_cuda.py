"""CUDA staging (pinned ring memory, side-stream copies). Runs only where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import drain

import ringload

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_batches_equal_cpu_batches(recipe_file, ring_name):
    """device='cuda' delivers the same stream as the CPU path, cast on the device as asked."""
    recipe = recipe_file()
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    with ringload.start(recipe, name=ring_name):
        with ringload.connect(ring_name, device="cuda", dtypes={"input_ids": torch.long}, prefetch=3) as loader:
            assert loader._stager.registered, "cudaHostRegister of the ring failed"
            got = []
            for batch in loader:
                assert batch["input_ids"].is_cuda and batch["input_ids"].dtype == torch.long
                got.append({k: v.cpu().numpy() for k, v in batch.items()})
    assert len(got) == len(reference)
    for a, b in zip(reference, got):
        assert all(np.array_equal(a[k], b[k].astype(a[k].dtype)) for k in a)


def test_cuda_tensors_stay_valid_after_their_slot_is_reused(recipe_file, ring_name):
    """Device tensors handed out earlier keep their values while the ring recycles the slots they came from."""
    with ringload.start(recipe_file(slots=2, epochs=None), name=ring_name):
        with ringload.connect(ring_name, device="cuda", prefetch=2) as loader:
            kept = [next(loader) for _ in range(12)]
            snapshot = [b["input_ids"].clone() for b in kept]
            for _ in range(20):
                next(loader)
            torch.cuda.synchronize()
            assert all(torch.equal(a["input_ids"], b) for a, b in zip(kept, snapshot))


def test_consumer_close_unregisters_and_hands_slots_back(recipe_file, ring_name):
    """Closing a CUDA consumer releases its slots; a CPU consumer then continues the same stream."""
    recipe = recipe_file()
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    with ringload.start(recipe, name=ring_name):
        with ringload.connect(ring_name, device="cuda", prefetch=4) as loader:
            first = [{k: v.cpu().numpy() for k, v in next(loader).items()} for _ in range(5)]
        rest = drain(ring_name)
    got = first + rest
    assert len(got) == len(reference)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(reference, got))
