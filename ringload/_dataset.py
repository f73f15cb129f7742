"""RingDataset: a ring as a torch ``IterableDataset`` of whole batches, one recipe epoch per iteration.

``DataLoader(dataset, batch_size=None)`` accepts it (the batches are already batches), and so does
anything that iterates a dataset or a loader (Lightning's ``fit``, a plain loop, an unprepared
loader under accelerate). Each ``for`` over it connects to the ring, delivers the batches of one
recipe epoch and stops before the first batch of the next, which stays in the ring, so the next
``for`` starts with it; an iteration left early (``max_steps``) is finished by the next one.

It either attaches to a running ring by name, or owns one: given a recipe, it starts the ring on
its first iteration (``ringload.start``), keeps it across iterations, and ``load_state_dict``
restarts it from a checkpoint (``resume=``), which is what framework checkpoint resume needs. A
ring it owns serves one training process; with several (``WORLD_SIZE`` > 1) the ring is started
once per node and every process attaches to it by name.

Checkpoints. ``state_dict()`` is the stream's state after the last batch the training has
consumed. Without a framework adapter that is the last batch handed out; an adapter for a framework
that fetches batches ahead of the model (``ringload.lightning.ExactResume``) reports each batch the
model starts on, and the state is then taken after that one, from the positions recorded per
batch handed out.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import torch

from ._consumer import Loader, stream_state
from ._errors import RingError
from ._handle import RingHandle, start
from ._lengths import batches_in, epoch_after, length_unknown
from ._plan import find_plan, stream_files
from ._recipe import Recipe, as_recipe

POSITIONS_KEPT = 64  # batches a framework may fetch ahead of the model and still checkpoint exactly


class RingDataset(torch.utils.data.IterableDataset):
    """A ring's batches as an ``IterableDataset``; each iteration is one recipe epoch of this rank.

    ``RingDataset("NAME")`` attaches to a running ring; ``RingDataset(recipe=...)`` (a recipe file, a
    mapping or a :class:`~ringload.Recipe`) starts and owns one, named ``name`` (default: the
    recipe's), with ``producers`` and ``resume`` as :func:`ringload.start` takes them. The other
    keywords are :func:`ringload.connect`'s.
    """

    def __init__(self, ring: str | None = None, *,
                 recipe: str | os.PathLike[str] | dict[str, Any] | Recipe | None = None,
                 name: str | None = None, producers: int | None = None, resume: dict[str, Any] | None = None,
                 device: Any = "cpu", timeout: float = 30.0, dtypes: dict[str, Any] | None = None, prefetch: int = 2,
                 trim: bool = False, meta: bool = False, rank: int | None = None, copy: bool = False):
        if (ring is None) == (recipe is None):
            raise TypeError("RingDataset needs either the name of a running ring or recipe=... to start one, not both")
        if ring is not None and (name or producers or resume):
            raise TypeError("name, producers and resume apply to a ring the dataset starts (recipe=...); "
                            f"ring {ring!r} is already running")
        processes = os.environ.get("WORLD_SIZE", "1")
        if recipe is not None and processes.isdigit() and int(processes) > 1:
            raise RingError(
                f"RingDataset(recipe=...) starts a ring for a single training process, but WORLD_SIZE={processes}: "
                "start the ring once per node with `ringload start RECIPE --world-size N --detach` (N processes on "
                "the node; add --resume STATE.json to continue a checkpoint) and give every process its name: "
                "RingDataset('NAME')")
        self._ring, self._recipe = ring, recipe
        self._start_options: dict[str, Any] = {"name": name, "producers": producers}
        self._connect_options = {"device": device, "timeout": timeout, "dtypes": dtypes, "prefetch": prefetch,
                                 "trim": trim, "meta": meta, "rank": rank, "copy": copy}
        self._handle: RingHandle | None = None
        self._loader: Loader | None = None
        self._resume: dict[str, Any] = dict(resume or {})  # the state the stream (re)started from
        self._stream: tuple[dict[str, Any], int] | None = None  # (stream identity, sources) of the ring
        # (plan, skip_batches, max_batches, why len() is unknown) of the ring's stream, once learnt
        self._lengths: tuple[list[int] | None, int, int | None, str] | None = None
        self._delivered = int(self._resume.get("delivered", 0))  # the rank's batches so far (skipped ones too)
        self._positions: deque[tuple[int, tuple[int, ...]]] = deque(maxlen=POSITIONS_KEPT)  # (number, position)
        self._handed = 0  # batches handed out since the stream (re)started
        self._trained: int | None = None  # batches a framework adapter reported consumed (None: no adapter)

    @property
    def name(self) -> str:
        """The ring's name (for a dataset that owns its ring: once it has started)."""
        if self._ring is not None:
            return self._ring
        if self._handle is None:
            raise RingError("this RingDataset starts its ring on its first iteration; it has not started yet")
        return self._handle.name

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            raise RuntimeError(
                f"RingDataset in a DataLoader worker (num_workers={worker.num_workers}): each worker would be a "
                "consumer of the same rank, and batches would be copied through the worker's queue; the ring's "
                "producers already do the work in their own processes. Use DataLoader(dataset, batch_size=None) "
                "with num_workers=0 (the default).")
        self._close_loader()  # an iteration abandoned without being closed
        loader = self._loader = self._connect()
        try:
            epoch = loader._due_epoch()
            if epoch is None:
                return  # the end of a finite stream
            loader._epoch_only = epoch
            for batch in loader:
                self._handed += 1
                position = loader._reader.position()
                self._positions.append((self._handed, position))
                self._delivered = position[0]
                yield batch
                if self._loader is not loader:
                    return  # a newer iteration has taken over this rank
        finally:
            if self._loader is loader:
                self._close_loader()

    def _connect(self) -> Loader:
        if self._recipe is not None and self._handle is None:
            self._handle = start(self._recipe, resume=self._resume or None, **self._start_options)
        loader = Loader(self.name, **self._connect_options)
        self._stream = (loader._stream, loader._sources)
        plan = loader._epoch_batches
        unknown = "" if plan is not None else length_unknown(loader.name, loader.ring.recipe()["recipe"])
        self._lengths = (plan, loader._skip_batches, loader._max_batches, unknown)
        self._delivered = loader.delivered
        return loader

    def __len__(self) -> int:
        """The batches the next iteration delivers: a whole recipe epoch (the one that iteration
        starts in or continues), if ``ringload plan`` counted the stream; else TypeError, which
        frameworks read as "no length". A dataset that owns its ring looks the plan up as ``ringload
        start`` will; one attached by name connects once to read it from the ring."""
        if self._lengths is None and self._recipe is not None:
            recipe = as_recipe(self._recipe)
            name = self._start_options["name"] or recipe.name
            self._lengths = (find_plan(recipe, stream_files(recipe)), recipe.skip_batches, recipe.max_batches,
                             length_unknown(name, recipe.to_dict()))
        elif self._lengths is None:
            self._connect().close()
        assert self._lengths is not None  # learnt above, or by _connect
        plan, skip, most, unknown = self._lengths
        if plan is None:
            raise TypeError(unknown)
        epoch = epoch_after(plan, self._delivered)
        return 0 if epoch is None else batches_in(plan, skip, most, epoch=epoch)

    def _close_loader(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            loader.close()

    def close(self) -> None:
        """Disconnect, and stop the ring if this dataset started it."""
        self._close_loader()
        if self._handle is not None:
            self._handle.stop()
            self._handle = None

    def __enter__(self) -> RingDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- checkpoints -------------------------------------------------------------------------
    def _batch_trained(self) -> None:
        """A framework adapter reports that the model started on the next batch handed out (in order)."""
        self._trained = (self._trained or 0) + 1

    def state_dict(self) -> dict[str, Any]:
        """The stream's state after the last batch consumed (``{}`` before the first): give it to
        :meth:`load_state_dict`, ``ringload.start(recipe, resume=...)`` or ``ringload start --resume``."""
        consumed = self._handed if self._trained is None else self._trained
        if consumed == 0:
            return dict(self._resume)
        for number, position in reversed(self._positions):
            if number == consumed:
                assert self._stream is not None  # set by _connect, which every batch handed out went through
                identity, sources = self._stream
                return stream_state(identity, sources, position)
        raise RingError(f"RingDataset: the framework is {self._handed - consumed} batches ahead of the model, more "
                        f"than the {POSITIONS_KEPT} positions kept for a checkpoint")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream right after the batch ``state`` was taken at (``{}``: from the start).

        A dataset that owns its ring restarts it from ``state`` at its next iteration. One attached to
        a ring started elsewhere accepts only the state that ring already stands at (a ring started
        with ``--resume``)."""
        state = dict(state or {})
        if self._ring is not None:
            self._close_loader()
            self._delivered = self._check_attached_ring_at(self._ring, state)
        else:
            if state != self._resume or self._handed:
                self.close()
            self._delivered = int(state.get("delivered", 0))
        self._resume = state
        self._positions.clear()
        self._handed, self._trained = 0, None if self._trained is None else 0

    def _check_attached_ring_at(self, ring: str, state: dict[str, Any]) -> int:
        """The batches the attached ring's rank has delivered, if ``state`` is where it stands (or empty)."""
        with Loader(ring, **self._connect_options) as loader:
            here = loader.state_dict()
        if state and (state.get("next"), state.get("delivered")) != (here["next"], here["delivered"]):
            raise RingError(
                f"RingDataset({ring!r}) attaches to a ring started elsewhere, which stands at batch "
                f"{here['delivered']} of its stream; it cannot move to the checkpoint's batch "
                f"{state.get('delivered')}. "
                "Restart that ring with `ringload start RECIPE --resume STATE.json`, or let the dataset own its ring: "
                "RingDataset(recipe=...).")
        return here["delivered"]
