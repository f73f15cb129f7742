"""Hugging Face ``Trainer`` over a ring: the least glue, and checkpoints that resume the exact stream.

    from ringload.hf import RingTrainer

    dataset = ringload.RingDataset(recipe="tasks/mlm-kjv.yaml")
    trainer = RingTrainer(model=model, args=TrainingArguments(..., max_steps=1000), train_dataset=dataset)
    trainer.train()                                   # later: trainer.train(resume_from_checkpoint=True)

What :class:`RingTrainerMixin` changes in a ``Trainer`` (or a subclass such as ``Seq2SeqTrainer``:
``class MyTrainer(RingTrainerMixin, Seq2SeqTrainer)``):

* the train DataLoader is ``DataLoader(dataset, batch_size=None)``: the ring's batches are already
  batches, and Trainer must not batch them again. It is not passed through ``accelerator.prepare``:
  each process already reads its own rank (``LOCAL_RANK``), so accelerate must neither shard nor
  dispatch it, and Trainer moves every batch to the device itself.
* ``remove_unused_columns``: the ring's fields are model inputs; any the model's ``forward`` does not
  take (e.g. ``token_type_ids`` for a model without them) are left out of each batch, as Trainer
  does for a dataset's columns.
* checkpoints: every checkpoint directory gets ``ringload_state.json`` (the dataset's
  ``state_dict()``), and ``train(resume_from_checkpoint=...)`` hands it to the dataset's
  ``load_state_dict()``, which restarts a ring the dataset owns right after the checkpoint's last
  batch. Trainer's own fast-forward over already-seen batches is switched off
  (``ignore_data_skip``): the ring resumes the stream itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ._dataset import RingDataset
from ._errors import RingError

STATE_FILE = "ringload_state.json"

if TYPE_CHECKING:  # the mixin's methods use and extend the Trainer it is mixed into
    _Trainer = transformers.Trainer
else:
    _Trainer = object


class RingTrainerMixin(_Trainer):
    """Mix into a ``transformers.Trainer`` subclass, before it, to train from a :class:`RingDataset`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.train_dataset, RingDataset):
            raise TypeError(f"{type(self).__name__} trains from a ringload.RingDataset (train_dataset=...), "
                            f"got {type(self.train_dataset).__name__}")
        self.args.ignore_data_skip = True  # the ring restarts where the checkpoint stands; nothing to skip
        self.add_callback(RingStateCallback(self.train_dataset))

    @property
    def _ring_dataset(self) -> RingDataset:
        dataset = self.train_dataset
        assert isinstance(dataset, RingDataset)  # checked in __init__
        return dataset

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        keep = None
        if self.args.remove_unused_columns:
            self._set_signature_columns_if_needed()
            # Trainer.__init__ sets it to None without an annotation, so its type reads None; the call fills it.
            keep = frozenset(cast("list[str]", self._signature_columns))
        # torch types collate_fn as taking a list of samples; with batch_size=None it takes one batch (a dict).
        return torch.utils.data.DataLoader(self._ring_dataset, batch_size=None,
                                           collate_fn=_ModelInputs(keep) if keep else None)  # type: ignore[arg-type]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if resume_from_checkpoint and not isinstance(resume_from_checkpoint, bool):  # True was replaced above
            path = Path(resume_from_checkpoint, STATE_FILE)
            if not path.is_file():
                raise RingError(f"{path} is missing: checkpoint {resume_from_checkpoint} was not written by a "
                                "RingTrainer, so it does not say where the ring's stream stood")
            self._ring_dataset.load_state_dict(json.loads(path.read_text()))
        return super().train(resume_from_checkpoint, *args, **kwargs)


class RingTrainer(RingTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that trains from a :class:`RingDataset` (see the module's doc)."""


class RingStateCallback(transformers.TrainerCallback):
    """Writes the dataset's state into every checkpoint directory Trainer saves."""

    def __init__(self, dataset: RingDataset):
        self.dataset = dataset

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:  # ranks move in step: rank 0's state is every rank's
            directory = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            (directory / STATE_FILE).write_text(json.dumps(self.dataset.state_dict()))


class _ModelInputs:
    """A batch's fields that the model's forward takes (picklable, unlike a lambda)."""

    def __init__(self, keep: frozenset[str]):
        self.keep = keep

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in batch.items() if key in self.keep}
