"""The framework adapters, each driven by the real library training a tiny model end to end on CPU.

Every test compares the batches the model consumed (checksums taken inside the training step) with
the stream a bare loop reads from a fresh ring of the same recipe: every batch intact, in the same
order, none missing or repeated. Checkpoint tests train with a checkpoint at step k, resume from it
in a fresh trainer and a fresh ring, and compare the batches after k with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import batch_checksum as checksum

import ringload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HERE = Path(__file__).parent
STEPS = 24


def reference(recipe, name: str, limit: int | None = None, **start) -> list[tuple[int, int]]:
    """(checksum, epoch) of each batch a bare loop reads from a fresh ring of ``recipe``."""
    seen = []
    with ringload.start(recipe, name=name, **start), ringload.connect(name, timeout=60) as loader:
        for batch in loader:
            seen.append((checksum(batch), loader.epoch))
            if limit is not None and len(seen) >= limit:
                break
    return seen


def tiny_bert(kind=None):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    return (kind or transformers.BertForMaskedLM)(config)


def assert_loss_fell(losses: list[float]) -> None:
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, f"loss did not fall: {first:.2f} -> {last:.2f}"


# -- the dataset -------------------------------------------------------------------------------

def test_each_iteration_is_one_recipe_epoch(recipe_file, ring_name):
    """DataLoader(RingDataset, batch_size=None): each for-loop delivers exactly one recipe epoch, the next one starts
    with the batch the previous one left in the ring, an iteration left early is finished by the next, and the
    iteration after the last epoch is empty."""
    recipe = recipe_file(epochs=2)
    expected = reference(recipe, ring_name)
    epochs = [[tag for tag, epoch in expected if epoch == e] for e in (0, 1)]
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None)
        first = [checksum(batch) for batch in loader]
        partial = []
        for batch in loader:
            partial.append(checksum(batch))
            if len(partial) == 3:
                break
        rest = [checksum(batch) for batch in loader]
        after = [checksum(batch) for batch in loader]
    assert first == epochs[0]
    assert partial + rest == epochs[1]
    assert after == []


def test_dataloader_workers_are_refused(recipe_file, ring_name):
    """A RingDataset under DataLoader(num_workers=1) fails with a message that says to use num_workers=0."""
    with ringload.start(recipe_file(epochs=None), name=ring_name):
        loader = torch.utils.data.DataLoader(ringload.RingDataset(ring_name), batch_size=None, num_workers=1)
        with pytest.raises(RuntimeError, match="num_workers=0"):
            next(iter(loader))


def test_state_dict_restarts_an_owned_ring_after_the_last_batch(recipe_file, ring_name):
    """An owned ring's state_dict() after k batches, loaded into a fresh dataset, continues with batch k+1."""
    recipe = recipe_file(epochs=None)
    expected = [tag for tag, _ in reference(recipe, ring_name, limit=20)]
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        got = [checksum(batch) for _, batch in zip(range(7), dataset)]
        state = json.loads(json.dumps(dataset.state_dict()))
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        dataset.load_state_dict(state)
        got += [checksum(batch) for _, batch in zip(range(13), dataset)]
    assert got == expected


def test_owned_ring_under_several_processes_is_refused(recipe_file, monkeypatch):
    """RingDataset(recipe=...) under WORLD_SIZE=2 fails at once, saying to start the ring per node and attach by name."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ringload.RingError, match="--world-size N --detach"):
        ringload.RingDataset(recipe=recipe_file())


def test_attached_dataset_refuses_a_state_its_ring_is_not_at(recipe_file, ring_name):
    """RingDataset("NAME") cannot move a ring started elsewhere: loading another position says how to restart it."""
    recipe = recipe_file(epochs=None)
    with ringload.start(recipe, name=ring_name):
        dataset = ringload.RingDataset(ring_name)
        for _, _batch in zip(range(3), dataset):
            pass
        state = dataset.state_dict()
        for _, _batch in zip(range(2), dataset):
            pass
        with pytest.raises(ringload.RingError, match="--resume"):
            dataset.load_state_dict(state)


# -- PyTorch Lightning -------------------------------------------------------------------------

def lightning_module(seen: list[int], losses: list[float]):
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_bert()

        def training_step(self, batch, batch_idx):
            seen.append(checksum(batch))
            loss = self.model(**batch).loss
            losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    return Module()


def lightning_trainer(tmp_path, steps: int, callbacks=()):
    pl = pytest.importorskip("pytorch_lightning")
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
                      enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks))


def test_lightning_fit_trains_on_the_exact_stream(recipe_file, ring_name, tmp_path):
    """Trainer.fit on a RingDataset: loss falls and the batches training_step sees are the bare loop's, in order."""
    from ringload.lightning import ExactResume

    recipe = recipe_file(epochs=None, batch_size=16)
    expected = [tag for tag, _ in reference(recipe, ring_name, limit=STEPS)]
    seen, losses = [], []
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        lightning_trainer(tmp_path, STEPS, [ExactResume()]).fit(lightning_module(seen, losses),
                                                                 train_dataloaders=dataset)
    assert seen == expected
    assert_loss_fell(losses)


def test_lightning_checkpoint_resumes_the_exact_stream(recipe_file, ring_name, tmp_path):
    """fit(ckpt_path=step 4's checkpoint) in a fresh Trainer and ring trains on batches 5..8 of the uninterrupted run,
    although Lightning had fetched batch 5 when it saved the checkpoint."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ringload.lightning import ExactResume

    recipe = recipe_file(epochs=None)
    saves = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    first, resumed = [], []
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        lightning_trainer(tmp_path, 8, [ExactResume(), saves]).fit(lightning_module(first, []),
                                                                   train_dataloaders=dataset)
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        lightning_trainer(tmp_path, 8, [ExactResume()]).fit(lightning_module(resumed, []), train_dataloaders=dataset,
                                                            ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert len(first) == 8
    assert resumed == first[4:]


# -- accelerate --------------------------------------------------------------------------------

def test_accelerate_one_process_trains_on_the_exact_stream(recipe_file, ring_name):
    """One process, accelerator.prepare(DataLoader(RingDataset, batch_size=None)) with dispatch_batches=False:
    loss falls and the model sees the bare loop's stream."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import DataLoaderConfiguration

    recipe = recipe_file(epochs=None, batch_size=16)
    expected = [tag for tag, _ in reference(recipe, ring_name, limit=STEPS)]
    accelerator = accelerate.Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seen, losses = [], []
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        model, optimizer, loader = accelerator.prepare(model, optimizer,
                                                       torch.utils.data.DataLoader(dataset, batch_size=None))
        for _, batch in zip(range(STEPS), loader):
            seen.append(checksum(batch))
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert seen == expected
    assert_loss_fell(losses)


@pytest.mark.timeout(300)
def test_accelerate_two_processes_each_read_their_own_rank(recipe_file, ring_name, tmp_path):
    """torchrun --nproc-per-node 2 with accelerate (gloo, CPU) on a ring started with --world-size 2: each process
    trains on exactly its own rank's stream (no rank sees rank 0's batches) and DDP keeps the weights identical."""
    recipe = recipe_file(epochs=None, batch_size=4, task={"type": "mlm", "seq_len": 32})
    steps = 6
    expected = {}
    with ringload.start(recipe, name=ring_name, world_size=2):
        for rank in (0, 1):
            with ringload.connect(ring_name, rank=rank) as loader:
                expected[rank] = [checksum(batch) for _, batch in zip(range(steps), loader)]
    with ringload.start(recipe, name=ring_name, world_size=2):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
             str(HERE / "accelerate_worker.py"), ring_name, str(tmp_path), str(steps)],
            capture_output=True, text=True, timeout=240, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["process_index"] == rank
        assert report["batches"] == expected[rank]
    assert not set(reports[0]["batches"]) & set(reports[1]["batches"])
    assert reports[0]["weights"] == reports[1]["weights"]


# -- Hugging Face Trainer ----------------------------------------------------------------------

def ring_trainer(base, seen: list[int], losses: list[float], **kwargs):
    """A RingTrainer-style class over ``base`` that records each batch and loss inside the training step."""
    from ringload.hf import RingTrainerMixin

    class Recording(RingTrainerMixin, base):
        def compute_loss(self, model, inputs, *args, **kw):
            seen.append(checksum(inputs))
            loss = super().compute_loss(model, inputs, *args, **kw)
            losses.append(float(loss.detach()))
            return loss

    return Recording(**kwargs)


def training_args(output_dir, steps: int, kind=None, **overrides):
    options = {"output_dir": str(output_dir), "max_steps": steps, "learning_rate": 3e-3, "report_to": [],
               "use_cpu": True, "disable_tqdm": True, "logging_strategy": "no", "save_strategy": "no",
               "per_device_train_batch_size": 1}
    options.update(overrides)
    return (kind or transformers.TrainingArguments)(**options)


def test_hf_trainer_trains_on_the_exact_stream_and_drops_columns_the_model_lacks(recipe_file, ring_name, tmp_path):
    """RingTrainer with DistilBERT (whose forward has no token_type_ids): remove_unused_columns leaves that field
    out, loss falls, and every other field of every batch is the bare loop's."""
    recipe = recipe_file(epochs=None, batch_size=16)
    with ringload.start(recipe, name=ring_name), ringload.connect(ring_name) as loader:
        expected = []
        for _, batch in zip(range(STEPS), loader):
            assert "token_type_ids" in batch
            expected.append(checksum({k: v for k, v in batch.items() if k != "token_type_ids"}))
    torch.manual_seed(0)
    model = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        vocab_size=400, dim=64, n_layers=2, n_heads=2, hidden_dim=128, max_position_embeddings=64))
    seen, losses = [], []
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        ring_trainer(transformers.Trainer, seen, losses, model=model, args=training_args(tmp_path, STEPS),
                     train_dataset=dataset).train()
    assert seen == expected
    assert_loss_fell(losses)


def test_hf_trainer_checkpoint_resumes_the_exact_stream(recipe_file, ring_name, tmp_path):
    """train(resume_from_checkpoint=checkpoint-4) in a fresh RingTrainer and ring trains on batches 5..8 of the
    uninterrupted run, with gradient accumulation over 2 batches (so steps 3 and 4 are batches 5..8)."""
    recipe = recipe_file(epochs=None)
    args = {"gradient_accumulation_steps": 2, "save_strategy": "steps", "save_steps": 2}
    first, resumed = [], []
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        ring_trainer(transformers.Trainer, first, [], model=tiny_bert(), args=training_args(tmp_path, 4, **args),
                     train_dataset=dataset).train()
    assert (tmp_path / "checkpoint-2" / "ringload_state.json").is_file()
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        ring_trainer(transformers.Trainer, resumed, [], model=tiny_bert(), args=training_args(tmp_path, 4, **args),
                     train_dataset=dataset).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert len(first) == 8
    assert resumed == first[4:]


def test_seq2seq_style_trainer_subclass(recipe_file, ring_name, tmp_path):
    """RingTrainerMixin composes with Trainer subclasses: Seq2SeqTrainer trains GPT-2 on a causal-LM ring."""
    recipe = recipe_file(epochs=None, task={"type": "clm", "seq_len": 64})
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=400, n_positions=64, n_embd=64, n_layer=2,
                                                                 n_head=2))
    seen, losses = [], []
    with ringload.RingDataset(recipe=recipe, name=ring_name) as dataset:
        ring_trainer(transformers.Seq2SeqTrainer, seen, losses, model=model,
                     args=training_args(tmp_path, 12, kind=transformers.Seq2SeqTrainingArguments),
                     train_dataset=dataset).train()
    assert len(seen) == 12 and len(set(seen)) == 12
