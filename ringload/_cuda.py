"""CUDA staging: batches copied from page-locked ring memory to the GPU on a side stream.

The consumer registers its rank's slot region with ``cudaHostRegister``, so each field of a
slot is pinned host memory that the GPU's copy engine reads directly. ``prefetch`` batches
ahead, a dedicated copy stream issues ``non_blocking`` host-to-device copies (and the casts to
the dtypes the model wants, on the device) and records an event per batch. Handing a batch out
makes the caller's current stream wait on that event, and ``record_stream`` tells PyTorch's
allocator that the caller's stream uses the tensors. A slot goes back to its producer only once
the event says its copy has finished, so a producer never overwrites memory a copy still reads;
when every slot of a lane is held that way, the stager waits for the oldest copy (its producer
cannot publish until a slot comes back) rather than for a batch that cannot arrive.

If registration fails (e.g. a locked-memory limit), batches go through a pinned staging buffer
instead: one extra host memcpy per batch, announced once with a warning.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ._rank import RankReader

CUDA_HOST_REGISTER_PORTABLE = 1


class CudaStager:
    """Keeps ``prefetch`` batches in flight to the GPU for one rank.

    It takes batches through the rank's :class:`~ringload._rank.RankReader` (``next_due``,
    ``mark_delivered`` when one is handed out, ``done_with`` once its copy finished), reads a slot
    through ``host_batch(lane, seq)`` (the consumer's host tensors over the slot, trimmed as asked)
    and page-locks the rank's slots (``Ring.rank_slots``)."""

    def __init__(self, reader: RankReader, host_batch: Callable[[int, int], tuple[Any, dict[str, Any]]],
                 handed: list[str], device: Any, dtypes: dict[str, Any], prefetch: int):
        import torch

        self.torch = torch
        self.reader, self.host_batch, self.device, self.dtypes = reader, host_batch, device, dtypes
        self.prefetch = max(1, prefetch)
        self.stream = torch.cuda.Stream(self.device)
        self.in_flight: deque[tuple[int, int, dict[str, Any], Any]] = deque()  # staged, not handed out
        self.handed_out: deque[tuple[int, int, Any]] = deque()  # handed out, slot not yet released
        self.exhausted = False
        ring = reader.ring
        # This rank's lanes are contiguous (lane r * P + p), so each rank pins its own slots.
        self._region: np.ndarray | None = ring.rank_slots(reader.rank)
        self._pointer = self._region.ctypes.data
        length = self._region.nbytes
        code = self._register(self._pointer, length)
        self.registered = code == 0
        self.staging: list[dict[str, Any]] = []
        self._staging_copied: list[Any] = []  # per staging buffer: the event of the last copy out of it
        if not self.registered:
            warnings.warn(
                f"ringload: cudaHostRegister of ring {ring.name!r} ({length / 2**20:.1f} MiB) failed with CUDA error "
                f"{code}; staging through a pinned buffer instead (one extra host copy per batch). Raise the "
                "locked-memory limit (ulimit -l) to avoid it.", RuntimeWarning, stacklevel=3)
            self.staging = [
                {f.name: torch.empty(f.shape, dtype=_torch_dtype(torch, f.dtype)).pin_memory()
                 for f in ring.geometry.fields if f.name in handed}
                for _ in range(self.prefetch + 1)
            ]
            self._staging_copied = [None] * len(self.staging)
            self._staging_turn = 0

    def _register(self, pointer: int, length: int) -> int:
        """Page-lock ``length`` bytes at ``pointer`` for the GPU's copy engine; the CUDA error code (0: done)."""
        return int(self.torch.cuda.cudart().cudaHostRegister(pointer, length, CUDA_HOST_REGISTER_PORTABLE))

    def _stage_one(self, epoch: int | None) -> bool:
        """Start the copy of the next batch; False at the end of the stream (or of ``epoch``)."""
        torch = self.torch
        try:
            lane, seq = self.reader.next_due(epoch=epoch)
        except StopIteration:
            self.exhausted = True
            return False
        _, host = self.host_batch(lane, seq)  # the slot is released explicitly, after its copy
        turn = None
        if not self.registered:
            turn = self._staging_turn
            self._staging_turn = (turn + 1) % len(self.staging)
            if self._staging_copied[turn] is not None:
                self._staging_copied[turn].synchronize()  # the buffer's previous batch has left it
            buffer, staged = self.staging[turn], {}
            for name, tensor in host.items():
                target = buffer[name][tuple(slice(0, n) for n in tensor.shape)]
                target.copy_(tensor)
                staged[name] = target
            host = staged
        with torch.cuda.stream(self.stream):
            device_batch = {
                name: tensor.to(self.device, non_blocking=True).to(self.dtypes.get(name, tensor.dtype))
                for name, tensor in host.items()
            }
            event = torch.cuda.Event()
            event.record(self.stream)
        if turn is not None:
            self._staging_copied[turn] = event
        self.in_flight.append((lane, seq, device_batch, event))
        return True

    def _release_finished(self) -> None:
        """Give back the slots of handed-out batches whose copies have finished, oldest first."""
        while self.handed_out and self.handed_out[0][2].query():
            lane, seq, _ = self.handed_out.popleft()
            self.reader.done_with(lane, seq)

    def _make_room(self) -> None:
        """Release finished copies; while one of this rank's lanes has every slot held (its producer
        cannot publish the batch the stream may be waiting for), wait for the oldest copy instead of
        only asking whether it has finished."""
        self._release_finished()
        while self.handed_out and self.reader.lane_held_full():
            self.handed_out[0][2].synchronize()
            self._release_finished()

    def next(self, epoch: int | None = None) -> dict[str, Any]:
        """The next batch on the device (its copy ordered before the caller's stream's next work)."""
        while not self.exhausted and len(self.in_flight) < self.prefetch:
            self._make_room()
            if self.in_flight and self.reader.lane_held_full():
                break  # a lane's every slot is staged: hand those batches out before staging more
            if not self._stage_one(epoch):
                break
        if not self.in_flight:
            raise StopIteration
        lane, seq, batch, event = self.in_flight.popleft()
        current = self.torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for tensor in batch.values():
            tensor.record_stream(current)
        self.reader.mark_delivered(lane, seq)
        self.handed_out.append((lane, seq, event))
        return batch

    def close(self) -> None:
        """Finish every copy, give back every slot, unregister the ring memory."""
        self.stream.synchronize()
        while self.handed_out:
            lane, seq, _ = self.handed_out.popleft()
            self.reader.done_with(lane, seq)
        # Staged but never handed out: the next consumer finds them as lane heads and delivers them.
        self.in_flight.clear()
        if self.registered:
            self.torch.cuda.cudart().cudaHostUnregister(self._pointer)
        self._region = None


def _torch_dtype(torch: Any, dtype: np.dtype) -> Any:
    return torch.from_numpy(np.zeros(1, dtype=dtype)).dtype
