"""A real client: a transformers BERT trained on batches read straight from the ring."""

from __future__ import annotations

import pytest

import ringload

transformers = pytest.importorskip("transformers")


def test_bert_masked_lm_loss_falls(recipe_file, ring_name):
    """BertForMaskedLM consumes ring batches as they are (model(**batch)) and its loss falls over 30 steps."""
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with ringload.start(recipe_file(epochs=None, batch_size=16), name=ring_name):
        with ringload.connect(ring_name) as loader:
            for _, batch in zip(range(30), loader):
                loss = model(**batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, f"loss did not fall: {first:.2f} -> {last:.2f}"
