"""The consumer: the in-process handle that hands one rank's batches to the training loop.

Which batch is due, from which lane, and where the rank stands are the rank reader's
(``_rank.RankReader``); this module decides what the caller gets and when a slot may go back.

On CPU a batch is a dict of tensors that are views of the slot itself, and a slot goes back to its
producer only when nothing in the process references its memory any more. Each hand-out builds new
objects: one numpy array over the slot's bytes (its *base*), the fields as numpy views of it, and
``torch.from_numpy`` of each; a torch storage keeps its numpy array alive, which keeps the base
alive, and so does every view derived from a field (slices, ``.view``, tensors autograd saved for
the backward pass). A ``weakref.finalize`` on the base only appends ``(lane, seq)`` to a deque (it
may run in any thread, e.g. a pin-memory thread, or inside the garbage collector); the consumer's
own thread drains that deque (in ``next``, on every poll while it waits, in ``close``) and releases
slots in lane order, since ``released`` must move in order: a slot freed early waits for the older
ones of its lane. So a framework that fetches batches ahead, or a caller that keeps the previous
batch, never reads a rewritten slot; a caller that keeps many batches holds that many slots, and
once a lane's slots are all held the oldest one moves to private memory. ``connect(..., copy=True)``
hands out copies instead and releases each slot at once. On CUDA the stager releases a slot
explicitly, once the event of its copy has completed (``_cuda``).
"""

from __future__ import annotations

import gc
import os
import warnings
import weakref
from collections import deque
from typing import Any

from ._errors import RingError
from ._failures import attach_or_explain
from ._lanes import Semaphores
from ._layout import Word
from ._lengths import batches_in, length_unknown
from ._rank import RankReader
from ._resume import STATE_FORMAT, stream_identity
from ._types import Dealing, ResumePoint

COLLECT_AFTER_S = 0.5  # waiting this long on a lane full of held batches: look for reference cycles holding them
# The open loaders of this process, by (ring, its creation time, rank): a rank's consumer pid alone
# cannot tell a second connect() in the same process from a loader that was dropped without close().
_OPEN: weakref.WeakValueDictionary[tuple[str, int, int], Loader] = weakref.WeakValueDictionary()


class Loader:
    """Iterator over a ring's batches. Create it with :func:`ringload.connect`."""

    def __init__(self, name: str, device: Any = "cpu", timeout: float = 30.0, dtypes: dict[str, Any] | None = None,
                 prefetch: int = 2, trim: bool = False, meta: bool = False, rank: int | None = None,
                 copy: bool = False):
        import torch

        self._torch = torch
        self.name = name
        self.timeout = timeout
        self.ring = ring = attach_or_explain(name)
        self.sems: Semaphores | None = None
        self._claimed = False
        header = ring.recipe()
        recipe = header.get("recipe", {})
        self._sources = len(header.get("files", [[]]))
        self._stream = stream_identity(header)
        self._epoch_batches: list[int] | None = header.get("epoch_batches")  # per rank, from `ringload plan`
        try:
            self.rank = resolve_rank(name, rank, ring.geometry.ranks, recipe.get("nnodes", 1),
                                     recipe.get("node_rank", 0))
            self.sems = Semaphores.of(ring)
        except RingError:
            ring.close()
            raise
        # Recipe.dealing, as the daemon stored it; a ring made by hand (protocol tests) deals to its own ranks.
        dealing = Dealing(**header.get("dealing", {"ranks": ring.geometry.ranks}))
        self._reader = RankReader(ring, self.sems, self.rank, dealing, timeout)
        self._slots = ring.geometry.slots
        # Handed-out batches whose slot memory may still be referenced: (lane, seq) -> (finalizer of the
        # slot's base array, weak references to the handed-out tensors that view the ring).
        self._outstanding: dict[tuple[int, int], tuple[weakref.finalize, list[weakref.ref]]] = {}
        self._freed: deque[tuple[int, int]] = deque()  # appended by finalizers, from any thread
        self._copied: set[tuple[int, int]] = set()  # handed-out batches switched to private copies
        self._copy = copy
        self._collected = False  # gc.collect() has run during the current wait
        self._stager = None
        self._skip_batches, self._max_batches = recipe.get("skip_batches", 0), recipe.get("max_batches")
        self._epoch_only: int | None = None  # if set, the iteration ends before the first batch of another epoch
        fields = ring.geometry.fields
        self._handed = [f.name for f in fields if meta or not f.name.startswith("_")]
        seq_len = fields[0].shape[1] if len(fields[0].shape) > 1 else 0
        has_lengths = any(f.name == "_lengths" for f in fields)
        # Token columns only: a bookkeeping field (a complete pass's _id) may have as many columns by chance.
        self._trimmed = [f.name for f in fields if trim and has_lengths and len(f.shape) == 2 and f.shape[1] == seq_len
                         and not f.name.startswith("_")]
        self._viewed = frozenset(self._handed + (["_lengths"] if self._trimmed else []))
        first_slot = ring.slot_buffer(0, 0).ctypes.data
        self._slot_bytes = (first_slot, first_slot + ring.geometry.lanes * self._slots * ring.slot_size)
        self._claim()
        self.device = torch.device(device)
        self.dtypes = {k: v for k, v in (dtypes or {}).items()}
        if self.device.type == "cuda":
            from ._cuda import CudaStager

            self._stager = CudaStager(self._reader, self._host_batch, self._handed, self.device, self.dtypes,
                                      prefetch)

    @property
    def delivered(self) -> int:
        """Batches delivered on this rank since the stream began (skipped ones included)."""
        return self._reader.delivered

    @property
    def epoch(self) -> int:
        """The epoch of the last batch handed out."""
        return self._reader.epoch

    def _claim(self) -> None:
        """Become the rank's consumer (one per rank, also within this process)."""
        key = (self.name, self.ring.words[Word.CREATED_NS], self.rank)
        if key in _OPEN:
            self.close()
            raise RingError(f"rank {self.rank} of ring {self.name!r} already has a consumer in this process (a "
                            "connect() not yet closed); close that one first (loader.close() or a with block): "
                            "a rank has one consumer (start the ring with --world-size for more ranks)")
        try:
            self._reader.claim()
        except RingError:
            self.close()
            raise
        _OPEN[key] = self
        self._claimed = True
        self._delivered_at_connect = self.delivered

    def _drain_freed(self) -> None:
        """Release the slots whose handed-out batches the finalizers report unreferenced."""
        freed = self._freed
        while freed:
            key = freed.popleft()
            self._outstanding.pop(key, None)
            self._copied.discard(key)
            self._reader.done_with(*key)

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Loader:
        return self

    def __len__(self) -> int:
        """The batches this loader hands out from where it connected to the end of a finite stream,
        if ``ringload plan`` counted them before the ring started; else TypeError, as for any
        iterator without a length."""
        if self._epoch_batches is None:
            raise TypeError(length_unknown(self.name, self.ring.recipe()["recipe"]))
        return batches_in(self._epoch_batches, self._skip_batches, self._max_batches, after=self._delivered_at_connect)

    def __next__(self) -> dict[str, Any]:
        while True:
            if self._max_batches is not None and self.delivered >= self._skip_batches + self._max_batches:
                raise StopIteration
            if self._stager is not None:
                batch = self._stager.next(self._epoch_only)
                if self.delivered > self._skip_batches:  # the recipe's skip_batches are consumed unseen
                    return batch
                continue
            self._drain_freed()
            lane, seq = self._reader.next_due(epoch=self._epoch_only, while_waiting=self._free_held_slots,
                                              timeout_hint=self._held_slots_hint)
            self._reader.mark_delivered(lane, seq)
            if self.delivered > self._skip_batches:
                return self._hand_out(lane, seq)
            self._reader.done_with(lane, seq)

    def _due_epoch(self) -> int | None:
        """The epoch of the next batch (waiting for it; it stays due), or None at the end of the stream."""
        if self._max_batches is not None and self.delivered >= self._skip_batches + self._max_batches:
            return None
        return self._reader.due_epoch()

    def _free_held_slots(self, waited: float) -> None:
        """While the due batch is late: release what finalizers freed, and if the caller holds every slot
        of a lane (its producer cannot write), move the batch that holds up the lane to private memory,
        unless a view derived from it (a slice) still points into the slot; that one the caller must let
        go of, or the gc, run once per wait after COLLECT_AFTER_S, finds it in a reference cycle."""
        if waited == 0.0:
            self._collected = False
        self._drain_freed()
        if self._reader.lane_held_full():
            self._copy_out_oldest()
            if waited > COLLECT_AFTER_S and not self._collected and self._reader.lane_held_full():
                self._collected = True
                gc.collect()
                self._drain_freed()

    def _copy_out_oldest(self) -> None:
        """In every lane the consumer holds full, switch the oldest batch still handed out (the one its
        ``released`` counter waits for) to a private copy, once; its tensors keep their values."""
        for lane, reader in self._reader.readers.items():
            key = (lane, reader.released)
            if reader.held >= self._slots and key in self._outstanding and key not in self._copied:
                self._copied.add(key)
                self._switch_to_copies(self._outstanding[key][1])
        self._drain_freed()

    def _switch_to_copies(self, views: list[weakref.ref]) -> None:
        """Point each handed-out tensor still alive at a private copy of its contents."""
        with self._torch.no_grad():
            for ref in views:
                tensor = ref()
                if tensor is not None:
                    tensor.set_(tensor.clone())

    def _held_slots_hint(self) -> str:
        """What the batches the caller still references hold, for a timeout message."""
        if not self._outstanding:
            return ""
        per_lane: dict[int, int] = {}
        for lane, _ in self._outstanding:
            per_lane[lane] = per_lane.get(lane, 0) + 1
        full = [lane for lane, held in per_lane.items() if held >= self._slots]
        return (f". {len(self._outstanding)} batches handed out earlier are still referenced, and each holds its "
                f"ring slot ({self._slots} per producer lane)"
                + (f"; every slot of lane {full[0]} is held, so its producer cannot write the next batch"
                   if full else "")
                + ": .clone() the tensors you keep, or connect(..., copy=True) to get batches that hold no slot")

    def _host_batch(self, lane: int, seq: int) -> tuple[Any, dict[str, Any]]:
        """(the slot's new base array, the fields handed out as tensors over views of it), trimmed to
        the longest row if asked."""
        buffer = self.ring.slot_buffer(lane, seq % self._slots)
        arrays = self.ring.field_views(buffer, self._viewed)
        from_numpy = self._torch.from_numpy
        batch = {k: from_numpy(arrays[k]) for k in self._handed}
        if self._trimmed:
            longest = max(1, int(arrays["_lengths"].max()))  # a complete pass's padding batch keeps one column
            for k in self._trimmed:
                batch[k] = batch[k][:, :longest]
        return buffer, batch

    def _hand_out(self, lane: int, seq: int) -> dict[str, Any]:
        """Batch ``seq`` of ``lane`` for the caller; its slot is released once nothing references it."""
        buffer, batch = self._host_batch(lane, seq)
        if self.dtypes or self._copy:
            batch = {k: v.to(self.dtypes.get(k, v.dtype), copy=self._copy) for k, v in batch.items()}
        if self._copy:
            self._reader.done_with(lane, seq)
            return batch
        low, high = self._slot_bytes
        views = [weakref.ref(t) for t in batch.values() if low <= t.data_ptr() < high]
        finalizer = weakref.finalize(buffer, self._freed.append, (lane, seq))
        finalizer.atexit = False
        self._outstanding[lane, seq] = (finalizer, views)
        return batch

    # -- checkpoints and teardown ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able checkpoint: ``ringload start RECIPE --resume STATE`` (or
        ``ringload.start(recipe, resume=state)``) continues with exactly the batch after the last one
        this loader handed out."""
        return stream_state(self._stream, self._sources, self._reader.position())

    def close(self) -> None:
        """Give back every slot and detach; the ring and its daemon go on.

        Handed-out tensors that still view the ring are switched to private copies first, so they keep
        their contents; a view the caller derived from one (a slice, ``.view``) cannot be switched and
        would see the slot rewritten, which a warning reports."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self._claimed:
            self._hand_back_all()
            self._reader.unclaim()
            _OPEN.pop((self.name, self.ring.words[Word.CREATED_NS], self.rank), None)
            self._claimed = False
        if self.sems is not None:
            self.sems.close()
            self.sems = None
        self.ring.close()

    def _hand_back_all(self) -> None:
        """Release the slots of every handed-out batch, copying out the ones still referenced."""
        self._drain_freed()
        if not self._outstanding:
            return
        for _, views in self._outstanding.values():
            self._switch_to_copies(views)
        self._drain_freed()  # the bases that only those tensors kept alive
        still_viewed = len(self._outstanding)
        for (lane, seq), (finalizer, _) in sorted(self._outstanding.items()):
            finalizer.detach()
            self._reader.done_with(lane, seq)
        self._outstanding.clear()
        self._copied.clear()
        if still_viewed:
            warnings.warn(
                f"ringload: ring {self.name!r} was closed while {still_viewed} batches were still referenced through "
                "views derived from their tensors (slices, .view, ...); those views now see memory the producers "
                "rewrite. .clone() what you keep, or connect(..., copy=True).", RuntimeWarning, stacklevel=3)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream_state(stream: dict[str, Any], sources: int, position: tuple[int, ...]) -> dict[str, Any]:
    """The checkpoint of a stream (``stream_identity``, number of sources) at ``RankReader.position()``."""
    delivered, next_chunk, next_index, *resume = position
    return {
        "format": STATE_FORMAT,
        "stream": stream,
        "delivered": delivered,
        "next": [next_chunk, next_index],  # the same for every rank
        "resume": ResumePoint.from_words(resume).to_json(sources),
    }


def connect(name: str, device: Any = "cpu", timeout: float = 30.0, dtypes: dict[str, Any] | None = None,
            prefetch: int = 2, trim: bool = False, meta: bool = False, rank: int | None = None,
            copy: bool = False) -> Loader:
    """Attach to the ring ``name`` and iterate over its batches (``dict[str, torch.Tensor]``).

    ``rank``: which of the ring's ranks this process is (``ringload start --world-size W``); by
    default ``LOCAL_RANK`` as torchrun sets it, or 0 for a one-rank ring. ``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK``, when set, are checked against the ring.

    ``device``: "cpu" (zero-copy views of the ring) or a CUDA device (batches staged from pinned
    ring memory by asynchronous copies, ``prefetch`` batches ahead). On CPU a batch's slot goes back
    to its producer once nothing references the batch's memory; ``copy=True`` hands out copies
    instead, which hold no slot (for callers that keep many batches). ``dtypes`` casts fields, e.g.
    ``{"input_ids": torch.long}``. ``timeout``: seconds to wait for a batch before raising.
    ``trim``: cut padding columns beyond the batch's longest row (classification tasks).
    ``meta``: also hand out bookkeeping fields (names starting with ``_``, e.g. ``_document_ids``).
    """
    return Loader(name, device=device, timeout=timeout, dtypes=dtypes, prefetch=prefetch, trim=trim, meta=meta,
                  rank=rank, copy=copy)


def resolve_rank(name: str, rank: int | None, ranks: int, nnodes: int, node_rank: int) -> int:
    """This process's local rank on the ring, from the argument or torchrun's environment, checked."""
    env = {key: os.environ[key] for key in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
           if os.environ.get(key, "").isdigit()}
    if rank is None:
        if "LOCAL_RANK" in env:
            rank = int(env["LOCAL_RANK"])
        elif ranks == 1:
            rank = 0
        else:
            raise RingError(f"ring {name!r} serves {ranks} ranks: pass connect(..., rank=R) or run under torchrun "
                            "(which sets LOCAL_RANK)")
    if not 0 <= rank < ranks:
        raise RingError(f"rank {rank} is not served by ring {name!r}, which serves ranks 0..{ranks - 1}; "
                        f"start it with `ringload start RECIPE --world-size {rank + 1}` or more")
    expected = {"WORLD_SIZE": ranks * nnodes, "LOCAL_WORLD_SIZE": ranks, "GROUP_RANK": node_rank}
    for key, value in expected.items():
        if key in env and int(env[key]) != value:
            fix = {"WORLD_SIZE": f"--world-size {ranks} --nnodes {nnodes}", "LOCAL_WORLD_SIZE": f"--world-size {ranks}",
                   "GROUP_RANK": f"--node-rank {node_rank}"}[key]
            raise RingError(f"{key}={env[key]} in the environment, but ring {name!r} was started with {fix}; "
                            f"start the ring with settings that match the launcher (expected {key}={value})")
    return rank
