"""Recipes: every mistake is an error that names the key; paths resolve relative to the recipe."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml

import ringload
from ringload import RecipeError, load_recipe, parse_recipe
from ringload._recipe import Source

BASE = {
    "name": "r",
    "source": {"paths": ["data.jsonl"], "format": "jsonl", "field": "text"},
    "tokenizer": "tok.json",
    "task": {"type": "mlm", "seq_len": 128},
}


def with_changes(**changes):
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, value in changes.items():
        if value is None:
            recipe.pop(key)
        else:
            recipe[key] = value
    return recipe


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sorce": {}}, "unknown key sorce"),
        ({"source": {"paths": ["x"], "fromat": "text"}}, "unknown key source.fromat"),
        ({"task": {"type": "mlm", "seq_len": 128, "mask_rate": 0.2}}, "unknown task option task.mask_rate"),
        ({"task": {"type": "mlm", "seq_len": "128"}}, "task.seq_len: must be int"),
        ({"task": {"type": "mlm", "seq_len": 4}}, "task.seq_len: must be 8..65536"),
        ({"task": {"type": "mlm", "mask_prob": 1.5}}, "task.mask_prob: must be within 0..1"),
        ({"task": {"type": "nope"}}, "task.type: unknown task 'nope'"),
        ({"batch_size": 0}, "batch_size: must be at least 1"),
        ({"batch_size": True}, "batch_size: must be int"),
        ({"producers": 0}, "producers: must be 1..256"),
        ({"slots": 1}, "slots: must be 2..65536"),
        ({"epochs": 0}, "epochs: must be at least 1"),
        ({"source": {"paths": [], "format": "text"}}, "source.paths: must be a non-empty list"),
        ({"source": {"paths": ["x"], "format": "xml"}}, "source.format: 'xml' is not one of"),
        ({"tokenizer": None}, "tokenizer: missing"),
        ({"on_bad_record": "ignore"}, "on_bad_record: must be skip or fail"),
        ({"max_record_bytes": 0}, "max_record_bytes: must be a number of bytes >= 1"),
        ({"max_record_bytes": 10**6, "on_long_record": "cut"}, "on_long_record: must be skip, truncate, fail"),
        ({"on_long_record": "truncate"}, "on_long_record: applies to records longer than max_record_bytes, which is"),
        ({"sources": [{"paths": ["x"]}]}, "give either source (one mapping) or sources"),
        ({"source": None, "sources": [{"paths": ["x"], "weight": 0}]}, "sources[0].weight: must be a positive number"),
        ({"source": None, "sources": [{"paths": ["x"]}, {"paths": ["y"], "fromat": "text"}]},
         "unknown key sources[1].fromat"),
        ({"stopping_strategy": "longest"}, "stopping_strategy: must be first_exhausted or all_exhausted"),
        ({"shuffle": {"buffer": 0}}, "shuffle.buffer: must be a number of records >= 1"),
        ({"shuffle": {"size": 10}}, "unknown key shuffle.size"),
        ({"nnodes": 2, "node_rank": 2}, "node_rank: must be 0..nnodes-1 (1)"),
        ({"world_size": 0}, "world_size: must be 1..64"),
        ({"node_sharding": "files", "epochs": 2}, "node_sharding: files gives each node its own epoch length"),
        ({"node_sharding": "records"}, "node_sharding: must be batches, chunks, files"),
        ({"node_sharding": "chunks", "epochs": 1}, "node_sharding: chunks gives each node its own epoch length"),
        ({"source": {"paths": ["x"], "retries": -1}}, "source.retries: must be a number of reconnections >= 0, got -1"),
        ({"source": {"paths": ["x"], "timeout": 0}}, "source.timeout: must be 0 < seconds <= 3600, got 0"),
        ({"task": {"type": "classify", "labels": ["a", ["b"]]}}, "task.labels: must be a list of names"),
        ({"task": {"type": "classify", "num_labels": 2}}, "source.label_field: task classify needs a label per record"),
        ({"source": None, "sources": [{"paths": ["x"], "format": "jsonl", "label_field": "y"},
                                      {"paths": ["z"], "format": "jsonl"}],
          "task": {"type": "multilabel", "labels": ["a"]}}, "sources[1].label_field: task multilabel needs a label"),
    ],
)
def test_mistakes_name_the_key(changes, message):
    """Each malformed recipe raises RecipeError whose message names the offending key."""
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_recipe(with_changes(**changes))


def test_omitted_keys_take_the_dataclass_defaults():
    """A recipe that gives only the required keys gets every default the Recipe and Source dataclasses declare."""
    recipe = parse_recipe(with_changes())
    for owner, parsed in ((ringload.Recipe, recipe), (Source, recipe.sources[0])):
        for field in dataclasses.fields(owner):
            given = field.name in BASE or field.name in BASE["source"]
            if field.default is not dataclasses.MISSING and not given:
                assert getattr(parsed, field.name) == field.default, field.name


@pytest.mark.parametrize("epochs_and_sharding", [{"epochs": 2}, {"epochs": None, "node_sharding": "chunks"}])
def test_every_recipe_key_is_read(epochs_and_sharding):
    """Each Recipe field given in a recipe, set away from its default, comes through the parser unchanged."""
    given = {
        "batch_size": 7, "producers": 3, "slots": 5, "seed": 9, "skip_batches": 1, "max_batches": 4,
        "chunk_bytes": 4096, "on_bad_record": "fail", "max_record_bytes": 100, "on_long_record": "truncate",
        "max_restarts": 1, "world_size": 2, "nnodes": 2, "node_rank": 1, "node_sharding": "batches",
        "shuffle": {"buffer": 3}, "stopping_strategy": "all_exhausted", "tokenizer_engine": "tokenizers",
        "token_cache": {"dir": "/scratch/tokens", "max_gb": 2.5},
        **epochs_and_sharding,
    }
    recipe = parse_recipe({**with_changes(), **given})
    fields = {f.name for f in dataclasses.fields(ringload.Recipe)}
    assert set(given) | set(BASE) - {"source"} | {"sources"} == fields - COMPLETE_PASS_KEYS
    assert {key: getattr(recipe, key) for key in given} == given


COMPLETE_PASS_KEYS = {"mode", "id_field", "id_bytes", "bucket_window"}  # read only with mode: eval


def test_every_complete_pass_key_is_read():
    """The keys of a complete pass, set away from their defaults, come through the parser unchanged."""
    given = {"mode": "eval", "id_field": "id", "id_bytes": 32, "bucket_window": 64}
    recipe = parse_recipe({**with_changes(task={"type": "encode", "seq_len": 16}), **given})
    assert set(given) == COMPLETE_PASS_KEYS
    assert {key: getattr(recipe, key) for key in given} == given


def test_paths_resolve_relative_to_the_recipe_file(tmp_path, monkeypatch):
    """Relative paths are taken from the recipe's folder, {assets} from RINGLOAD_ASSETS, URLs stay as they are."""
    monkeypatch.setenv("RINGLOAD_ASSETS", "/cache/assets")
    data = with_changes(tokenizer="{assets}/bert/tokenizer.json",
                        source={"paths": ["data.jsonl", "https://host/x.jsonl"], "format": "jsonl"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.sources[0].paths == (str(tmp_path / "data.jsonl"), "https://host/x.jsonl")
    assert recipe.tokenizer == "/cache/assets/bert/tokenizer.json"
    assert recipe.task == {"type": "mlm", "seq_len": 128, "mask_prob": 0.15, "mask_token_prob": 0.8,
                           "random_token_prob": 0.1, "pack": True, "whole_word_mask": False, "packing": "concat",
                           "document_mask": False, "cu_seqlens": False, "special_tokens": {}}


def test_recipe_is_data_not_code(tmp_path):
    """YAML tags that would build Python objects are rejected (safe_load)."""
    (tmp_path / "r.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "r.yaml")


def test_cli_reports_a_bad_recipe_in_one_line(tmp_path):
    """`ringload start` on a bad recipe exits non-zero with the key in a one-line message, no traceback."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(with_changes(batch_sise=3)))
    result = subprocess.run([sys.executable, "-m", "ringload", "start", str(tmp_path / "r.yaml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown key batch_sise" in result.stderr and "Traceback" not in result.stderr


def test_recipe_fuzz_never_escapes_as_another_error():
    """Arbitrary YAML-shaped data either parses into a Recipe or raises RecipeError, never anything else."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False),
                        st.text(max_size=8))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                                  inner, max_size=3),
                          max_leaves=8)
    keys = st.sampled_from(["name", "source", "tokenizer", "task", "batch_size", "producers", "slots", "seed",
                            "epochs", "chunk_bytes", "on_bad_record", "max_restarts", "bogus"])
    task_keys = st.sampled_from(["type", "seq_len", "mask_prob", "pack", "labels", "num_labels", "document_mask"])

    @settings(max_examples=400, deadline=None)
    @given(st.dictionaries(keys, values, max_size=6), st.dictionaries(task_keys, values, max_size=4),
           st.sampled_from(["mlm", "clm", "classify", "multilabel", "x:y", 3]))
    def check(top, task, task_type):
        data = with_changes()
        data.update(top)
        if isinstance(data.get("task"), dict):
            data["task"] = {**task, "type": task_type}
        try:
            parse_recipe(data)
        except RecipeError:
            pass

    check()
