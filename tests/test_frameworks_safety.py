"""Safe by construction: no caller or framework that keeps or prefetches batches reads a rewritten slot.

Every batch is tagged with a checksum of its contents when the loader hands it out, and the tag is
verified where the model consumes it: after the next batch was fetched in a bare loop, and inside
the training step of real Lightning, accelerate (``DataLoaderShard`` fetches one batch ahead) and
Hugging Face ``Trainer`` runs. With a slot given back when the next batch is requested (the old
rule), most batches fail their tag in each of these; these tests pin the new rule.
"""

from __future__ import annotations

import gc
import time
import warnings

import pytest
from conftest import batch_checksum as checksum

import ringload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STEPS = 16


class Tagged(torch.utils.data.IterableDataset):
    """The ring's batches, each tagged (checksum recorded) at the moment the loader hands it out."""

    def __init__(self, name: str, steps: int = STEPS):
        self.name, self.steps = name, steps
        self.tags: list[int] = []
        self.seen: list[bool] = []  # per consumed batch: did it still match its tag?

    def __iter__(self):
        with ringload.connect(self.name, timeout=60) as loader:
            for _, batch in zip(range(self.steps), loader):
                self.tags.append(checksum(batch))
                yield batch

    def verify(self, batch: dict) -> None:
        """Called where the model consumes a batch: compare it with the tag of the same stream position."""
        self.seen.append(checksum(batch) == self.tags[len(self.seen)])

    def assert_intact(self) -> None:
        changed = self.seen.count(False)
        assert len(self.seen) == self.steps, f"{len(self.seen)} batches consumed, expected {self.steps}"
        assert changed == 0, f"{changed} of {len(self.seen)} batches changed between hand-out and use"


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(config)


@pytest.fixture
def ring(recipe_file, ring_name):
    """An endless MLM ring whose producers keep every lane full (the consumer is the slow side)."""
    with ringload.start(recipe_file(epochs=None), name=ring_name) as handle:
        yield handle.name


def test_bare_loop_that_keeps_the_previous_batch(ring):
    """A loop that looks at batch k after fetching batch k+1 (and after the producers had time to write) sees it intact."""
    tagged = Tagged(ring, steps=40)
    previous = None
    for batch in tagged:
        if previous is not None:
            time.sleep(0.005)  # a training step: producers write into every slot given back meanwhile
            tagged.verify(previous)
        previous = batch
    tagged.verify(previous)
    tagged.assert_intact()


def test_lightning_fit_prefetching_fetcher(ring, tmp_path):
    """Lightning's fetcher requests one batch ahead; every batch matches its tag inside training_step."""
    pl = pytest.importorskip("pytorch_lightning")
    tagged = Tagged(ring)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_bert()

        def training_step(self, batch, batch_idx):
            tagged.verify(batch)
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Module(), train_dataloaders=tagged)
    tagged.assert_intact()


def test_accelerate_dataloader_shard_prefetching(ring):
    """accelerate's DataLoaderShard (dispatch_batches=False) fetches a batch ahead; every batch matches its tag."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.utils import DataLoaderConfiguration

    tagged = Tagged(ring)
    accelerator = accelerate.Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=False))
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer,
                                                   torch.utils.data.DataLoader(tagged, batch_size=None))
    assert type(loader).__name__ == "DataLoaderShard"
    for batch in loader:
        tagged.verify(batch)
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    tagged.assert_intact()


def test_hf_trainer_with_a_prepared_dataloader(ring, tmp_path):
    """HF Trainer fed through accelerate's DataLoaderShard (dispatch_batches=False, which fetches a batch ahead):
    every batch matches its tag inside the step."""
    tagged = Tagged(ring)

    class Trainer(transformers.Trainer):
        def get_train_dataloader(self):
            loader = self.accelerator.prepare(torch.utils.data.DataLoader(self.train_dataset, batch_size=None))
            assert type(loader).__name__ == "DataLoaderShard"
            return loader

        def compute_loss(self, model, inputs, *args, **kwargs):
            tagged.verify(inputs)
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, report_to=[], save_strategy="no",
                                          use_cpu=True, disable_tqdm=True, logging_strategy="no",
                                          accelerator_config={"dispatch_batches": False})
    Trainer(model=tiny_bert(), args=args, train_dataset=tagged).train()
    tagged.assert_intact()


def test_copy_true_batches_hold_no_slot(recipe_file, ring_name):
    """connect(copy=True): keeping far more batches than the lanes have slots neither stalls nor changes them."""
    with ringload.start(recipe_file(epochs=None, slots=4), name=ring_name):
        with ringload.connect(ring_name, copy=True, timeout=30) as loader:
            kept = [(batch, checksum(batch)) for _, batch in zip(range(60), loader)]
            region = loader._slot_bytes
            time.sleep(0.2)
            assert all(checksum(batch) == tag for batch, tag in kept)
            assert not any(region[0] <= t.data_ptr() < region[1] for batch, _ in kept for t in batch.values())


def test_keeping_more_batches_than_slots_keeps_the_stream_flowing(recipe_file, ring_name):
    """Holding on to every batch, far more than the lanes' slots: the stream goes on (the batches that hold
    up a lane move to private memory) and every kept batch stays intact."""
    with ringload.start(recipe_file(epochs=None, slots=4), name=ring_name):
        with ringload.connect(ring_name, timeout=10) as loader:
            kept = []
            for _ in range(4 * 2 * 5):  # five times both lanes' slots together
                batch = next(loader)
                kept.append((batch, checksum(batch)))
            assert all(checksum(batch) == tag for batch, tag in kept)


def test_batches_held_only_by_reference_cycles_are_collected_while_waiting(recipe_file, ring_name):
    """Batches kept alive only by reference cycles (gc disabled) do not stall the stream: the wait collects them."""

    class Node:
        pass

    with ringload.start(recipe_file(epochs=None, slots=4), name=ring_name):
        with ringload.connect(ring_name, timeout=20) as loader:
            gc.disable()
            try:
                for _ in range(40):  # five times the slots of both lanes
                    node = Node()
                    node.self, node.batch = node, next(loader)
                    del node
            finally:
                gc.enable()


def test_close_copies_out_kept_batches_and_warns_about_derived_views(recipe_file, ring_name):
    """close() switches kept tensors to private copies (contents unchanged after the ring reuses their slots) and
    warns when a view derived from one still points into the ring."""
    with ringload.start(recipe_file(epochs=None, slots=4), name=ring_name):
        loader = ringload.connect(ring_name)
        kept = next(loader)
        tag = checksum(kept)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loader.close()  # no derived view: no warning
        with ringload.connect(ring_name) as other:
            for _ in range(30):
                next(other)
        assert checksum(kept) == tag

        loader = ringload.connect(ring_name)
        batch = next(loader)
        row = batch["input_ids"][0]  # a view the loader cannot switch
        with pytest.warns(RuntimeWarning, match="views derived"):
            loader.close()
        assert batch["input_ids"].data_ptr() != row.data_ptr()  # the batch's own tensor was switched


def test_a_signal_during_the_wait_is_not_an_error():
    """A signal with a Python handler (as the SIGCHLD handler a DataLoader with workers installs) interrupting the
    consumer's wait makes it wait on, not fail: here it ends in LoaderTimeout, not posix_ipc.SignalError."""
    import signal

    from _ringtools import RingSet

    rings = RingSet()
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        name, _ring, _sems = rings.create(lanes=1, slots=4)
        with ringload.connect(name, timeout=1) as loader:
            signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
            with pytest.raises(ringload.LoaderTimeout):
                next(loader)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        assert rings.cleanup() == []


def test_a_batch_kept_for_good_does_not_stall_its_lane(recipe_file, ring_name):
    """A caller that keeps its first batch while reading many times a lane's slots: the stream flows, and
    the kept batch (moved to private memory when its lane filled up) keeps its contents; a slice taken
    from a batch holds its slot until dropped, and the timeout message says so."""
    with ringload.start(recipe_file(slots=4, epochs=None), name=ring_name), \
            ringload.connect(ring_name, timeout=10) as loader:
        first = next(loader)
        kept = checksum(first)
        for _ in range(60):  # 15 times a lane's 4 slots
            next(loader)
        assert checksum(first) == kept
        sliced = next(loader)["input_ids"][:2]
        with pytest.raises(ringload.LoaderTimeout, match="still referenced"):
            for _ in range(60):
                next(loader)
        del sliced
        next(loader)
