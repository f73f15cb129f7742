"""PyTorch Lightning over a ring: ``fit`` on a :class:`RingDataset`, checkpoints that resume the exact stream.

    dataset = ringload.RingDataset(recipe="tasks/mlm-kjv.yaml")
    trainer = pl.Trainer(max_steps=1000, callbacks=[ringload.lightning.ExactResume()])
    trainer.fit(model, train_dataloaders=dataset)      # later: trainer.fit(..., ckpt_path="last")

Pass the dataset itself, not a DataLoader around it: Lightning 2.x saves the ``state_dict()`` of a
train dataloader that has ``state_dict``/``load_state_dict`` into its checkpoints and hands it back
on ``fit(ckpt_path=...)`` (a plain DataLoader has neither). Lightning's fetcher requests one batch
ahead of the model when the epoch length is unknown, so the state must be taken after the batch the
model is on rather than after the last one fetched: :class:`ExactResume` tells the datasets which
batch that is. Uses the ``pytorch_lightning`` package.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch

from ._dataset import RingDataset


class ExactResume(pl.Callback):
    """Reports each training batch to the ring datasets, so their checkpoints resume right after it."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapped = [loader for loader in _loaders(trainer.train_dataloader)
                   if isinstance(loader, torch.utils.data.DataLoader) and isinstance(loader.dataset, RingDataset)]
        if wrapped:
            raise TypeError("pass the RingDataset itself to fit(train_dataloaders=...), not a DataLoader around it: "
                            "Lightning checkpoints the state of a dataloader only if it has state_dict(), and "
                            "a DataLoader has none")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for loader in _loaders(trainer.train_dataloader):
            if isinstance(loader, RingDataset):
                loader._batch_trained()


def _loaders(iterables: Any) -> Iterator[Any]:
    """The dataloaders of Lightning's train_dataloader (one, or a collection of them)."""
    if isinstance(iterables, dict):
        iterables = list(iterables.values())
    if isinstance(iterables, (list, tuple)):
        for item in iterables:
            yield from _loaders(item)
    elif iterables is not None:
        yield iterables
