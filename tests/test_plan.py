"""Known length: `ringload plan` counts each epoch's batches per rank; len() of loaders and datasets is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import batch_checksum, make_texts

import ringload
from ringload._plan import make_plan

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def plans(tmp_path, monkeypatch):
    """Plans go to a directory of the test's own (the daemon inherits the variable)."""
    monkeypatch.setenv("RINGLOAD_PLANS", str(tmp_path / "plans"))
    return tmp_path / "plans"


def delivered_per_epoch(datasets: list[ringload.RingDataset], epochs: int) -> list[list[tuple[int, int]]]:
    """Per epoch, per rank: (len() before the iteration, batches the iteration delivered), ranks in step."""
    per_epoch = []
    for _ in range(epochs):
        lengths = [len(d) for d in datasets]
        counts = [0] * len(datasets)
        for batches in zip(*datasets):
            for rank, _batch in enumerate(batches):
                counts[rank] += 1
        per_epoch.append(list(zip(lengths, counts)))
    return per_epoch


@pytest.mark.parametrize(("world_size", "shuffle"), [(1, False), (1, True), (2, False), (2, True)])
def test_plan_counts_equal_the_batches_delivered(recipe_file, ring_name, world_size, shuffle):
    """For 1 and 2 ranks, shuffled and not: the plan's count of every epoch equals what each rank receives in it,
    len() of each rank's dataset says so before every iteration, and len() of a fresh loader is the total."""
    recipe = ringload.load_recipe(recipe_file(epochs=2, shuffle={"buffer": 500} if shuffle else None))
    recipe = recipe.replace(world_size=world_size)
    counts, _ = make_plan(recipe)
    assert all(c > 20 for c in counts)
    with ringload.start(recipe, name=ring_name):
        loaders = [ringload.connect(ring_name, rank=r) for r in range(world_size)]
        assert [len(loader) for loader in loaders] == [sum(counts)] * world_size
        for loader in loaders:
            loader.close()
        datasets = [ringload.RingDataset(ring_name, rank=r) for r in range(world_size)]
        got = delivered_per_epoch(datasets, 2)
        assert [len(d) for d in datasets] == [0] * world_size  # past the last epoch
    assert got == [[(c, c)] * world_size for c in counts]


def test_plan_cli_and_skip_and_max_batches(recipe_file, ring_name):
    """`ringload plan` prints the counts it stores; with skip_batches and max_batches, len() counts what is actually
    handed out: an epoch short of the skipped batches, a last epoch cut by max_batches."""
    whole = recipe_file(epochs=2)
    result = subprocess.run([sys.executable, "-m", "ringload", "plan", str(whole)], capture_output=True, text=True,
                            timeout=120, check=True)
    counts = [int(line.split()[2]) for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(counts) == 2 and "plan stored in" in result.stdout
    recipe = ringload.load_recipe(recipe_file(epochs=2, skip_batches=5, max_batches=counts[0]))
    assert make_plan(recipe)[0] == counts
    with ringload.start(recipe, name=ring_name):
        with ringload.connect(ring_name) as loader:
            assert len(loader) == counts[0]
        dataset = ringload.RingDataset(ring_name)
        got = delivered_per_epoch([dataset], 2)
    assert got == [[(counts[0] - 5, counts[0] - 5)], [(5, 5)]]


def test_len_is_a_type_error_that_says_what_to_run(recipe_file, ring_name, corpus, tmp_path):
    """Without a plan len() raises TypeError naming `ringload plan` (with the ranks option); for an endless stream it
    says there is no length; a plan made before a source file changed no longer applies."""
    source = tmp_path / "data.jsonl"
    source.write_text(corpus["jsonl"].read_text())
    recipe = recipe_file(epochs=1, source={"paths": [str(source)]})
    with ringload.start(recipe, name=ring_name, world_size=2):
        with pytest.raises(TypeError, match=r"ringload plan RECIPE --world-size 2"):
            len(ringload.connect(ring_name, rank=0))
    with ringload.start(recipe_file(epochs=None), name=ring_name), pytest.raises(TypeError, match="endlessly"):
        len(ringload.RingDataset(ring_name))
    make_plan(ringload.load_recipe(recipe))
    with ringload.start(recipe, name=ring_name), ringload.connect(ring_name) as loader:
        assert len(loader) > 0
    os.utime(source, ns=(0, 0))
    with ringload.start(recipe, name=ring_name), ringload.connect(ring_name) as loader:
        with pytest.raises(TypeError, match="ringload plan"):
            len(loader)


def small_recipe(recipe_file, tmp_path, **overrides):
    """A finite recipe of a few dozen batches per epoch, planned."""
    source = tmp_path / "small.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(300, seed=5)))
    path = recipe_file(epochs=2, source={"paths": [str(source)]}, chunk_bytes=4096, **overrides)
    counts, _ = make_plan(ringload.load_recipe(path))
    return path, counts


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(config)


def test_hf_trainer_runs_whole_recipe_epochs_by_length(recipe_file, ring_name, tmp_path):
    """RingTrainer with num_train_epochs=2 and no max_steps: the plan's length sets the steps, and Trainer trains
    on exactly the two recipe epochs, batch for batch."""
    transformers = pytest.importorskip("transformers")
    from ringload.hf import RingTrainer

    path, counts = small_recipe(recipe_file, tmp_path)
    with ringload.start(path, name=ring_name), ringload.connect(ring_name) as loader:
        expected = [batch_checksum(batch) for batch in loader]
    assert len(expected) == sum(counts)
    seen = []

    class Recording(RingTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            seen.append(batch_checksum(inputs))
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), num_train_epochs=2, report_to=[],
                                          use_cpu=True, disable_tqdm=True, logging_strategy="no", save_strategy="no")
    with ringload.RingDataset(recipe=path, name=ring_name) as dataset:
        trainer = Recording(model=tiny_bert(), args=args, train_dataset=dataset)
        trainer.train()
    assert trainer.state.global_step == sum(counts)
    assert seen == expected


def test_lightning_epochs_are_recipe_epochs(recipe_file, ring_name, tmp_path):
    """Lightning fit with max_epochs=2 on a planned ring: each Lightning epoch has len() batches and is one recipe
    epoch, so Lightning needs no prefetch to find the end of an epoch."""
    pl = pytest.importorskip("pytorch_lightning")
    path, counts = small_recipe(recipe_file, tmp_path)
    per_epoch: list[int] = []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_bert()

        def on_train_epoch_start(self):
            per_epoch.append(0)

        def training_step(self, batch, batch_idx):
            per_epoch[-1] += 1
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    with ringload.RingDataset(recipe=path, name=ring_name) as dataset:
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(Module(), train_dataloaders=dataset)
        assert trainer.num_training_batches == counts[0]
    assert per_epoch == counts
