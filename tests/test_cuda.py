"""CUDA staging (pinned ring memory, side-stream copies). Runs only where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import drain

import ringload
from ringload._cuda import CudaStager

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


def _host(batches: list[dict]) -> list[dict[str, np.ndarray]]:
    return [{k: v.cpu().numpy() for k, v in b.items()} for b in batches]


def _same_stream(reference: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> bool:
    return len(got) == len(reference) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k].astype(a[k].dtype)) for k in a)
        for a, b in zip(reference, got))


def test_slow_copies_keep_their_slots_until_their_event(recipe_file, ring_name, monkeypatch):
    """While a batch's copy is still queued on the copy stream its slot stays held, so producers never
    overwrite memory a copy still reads: with 2 slots and copies held back on the GPU, the stream is exact."""
    recipe = recipe_file(slots=2)
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    stage = CudaStager._stage_one

    def held_back(stager: CudaStager, epoch: int | None) -> bool:
        with torch.cuda.stream(stager.stream):
            torch.cuda._sleep(5_000_000)  # a few ms of GPU time ahead of this batch's copy
        return stage(stager, epoch)

    monkeypatch.setattr(CudaStager, "_stage_one", held_back)
    pending_seen = 0
    with ringload.start(recipe, name=ring_name):
        with ringload.connect(ring_name, device="cuda", prefetch=3) as loader:
            got = []
            for batch in loader:
                for lane, seq, event in loader._stager.handed_out:  # before .cpu() waits for the copies
                    if not event.query():
                        pending_seen += 1
                        assert loader._reader.readers[lane].released <= seq, "a slot went back before its copy finished"
                got.append({k: v.cpu().numpy() for k, v in batch.items()})
    assert pending_seen, "no copy was ever still pending: the test did not hold copies back"
    assert _same_stream(reference, got)


def test_pinned_buffer_fallback_when_registration_fails(recipe_file, ring_name, monkeypatch):
    """If cudaHostRegister fails, batches go through pinned staging buffers, with a warning, and the
    stream is unchanged, with copies held back so that staging buffers are reused while copies queue."""
    recipe = recipe_file(slots=2)
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    monkeypatch.setattr(CudaStager, "_register", lambda self, pointer, length: 2)  # cudaErrorMemoryAllocation
    stage = CudaStager._stage_one

    def held_back(stager: CudaStager, epoch: int | None) -> bool:
        with torch.cuda.stream(stager.stream):
            torch.cuda._sleep(2_000_000)
        return stage(stager, epoch)

    monkeypatch.setattr(CudaStager, "_stage_one", held_back)
    with ringload.start(recipe, name=ring_name):
        with pytest.warns(RuntimeWarning, match="pinned buffer"):
            loader = ringload.connect(ring_name, device="cuda", dtypes={"input_ids": torch.long}, prefetch=2)
        with loader:
            assert not loader._stager.registered
            got = _host(list(loader))
    assert _same_stream(reference, got)


def test_cuda_checkpoint_resumes_exactly(recipe_file, ring_name):
    """state_dict() of a CUDA consumer resumes with exactly the batch after the last one it handed out."""
    recipe = recipe_file()
    with ringload.start(recipe, name=ring_name):
        reference = drain(ring_name)
    with ringload.start(recipe, name=ring_name):
        with ringload.connect(ring_name, device="cuda", prefetch=4) as loader:
            first = _host([next(loader) for _ in range(7)])
            state = loader.state_dict()
    with ringload.start(recipe, name=ring_name, resume=state):
        rest = drain(ring_name)
    assert _same_stream(reference, first + rest)
