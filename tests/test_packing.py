"""Packing outputs: document boundaries as transformers' DataCollatorWithFlattening writes them,
cu_seqlens/max_seqlen for flash-attention's varlen kernels, and best-fit packing with its
padding and truncation shares in status."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import make_texts

import ringload
from ringload._types import Records
from ringload._tasks import Task, TokenizerInfo, build_task, check_task_options

ROW = 64
BATCH = 4


def make_task(tokenizer_path: str, task_type: str, seq_len: int = ROW, batch_size: int = BATCH, **options) -> Task:
    tokens = {"special_tokens": {"eos": "[SEP]"}} if task_type == "clm" else {}
    checked = check_task_options({"type": task_type, "seq_len": seq_len, **tokens, **options}, "test")
    return build_task(checked, tokenizer_path, batch_size, seed=0)


def run(task: Task, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Every batch the task makes of one chunk, written into fresh arrays."""
    batches = []
    for pending in task.batches(Records(texts), 0):
        out = {f.name: np.full(f.shape, -7, f.dtype) for f in task.fields()}
        pending.write(out)
        batches.append(out)
    return batches


def as_torch(batch: dict[str, np.ndarray]) -> dict:
    import torch

    return {k: torch.from_numpy(v) for k, v in batch.items()}


def collate(features: list[dict[str, list[int]]]) -> dict:
    transformers = pytest.importorskip("transformers")
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    return collator(features)


def assert_same_as_collator(ours: dict, theirs: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key.startswith("max_length"):
            assert ours[key] == theirs[key], key
        else:
            assert ours[key].tolist() == theirs[key].tolist(), key


def stream_of(tok: TokenizerInfo, texts: list[str], separator: int) -> tuple[list[int], set[int]]:
    """The documents, each followed by the separator, as one list, and the offsets where documents start."""
    stream, starts = [], set()
    for ids in tok.encode_ids(texts):
        starts.add(len(stream))
        stream += ids + [separator]
    return stream, starts


def short_texts(tok: TokenizerInfo, n: int, seed: int, longest: int) -> list[str]:
    """Generated documents of at most ``longest`` tokens."""
    texts = make_texts(n, seed)
    return [text for text, ids in zip(texts, tok.encode_ids(texts)) if len(ids) <= longest]


def row_segments(task_type: str, batch: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """The real segments of a batch's rows by its position_ids, without mlm's leading [CLS]."""
    segments = []
    for ids, starts, attention in zip(batch["input_ids"], batch["position_ids"] == 0, batch["attention_mask"]):
        bounds = [*np.flatnonzero(starts).tolist(), len(ids)]
        pieces = [ids[a:b].tolist() for a, b in zip(bounds, bounds[1:]) if attention[a]]
        if task_type == "mlm":
            pieces[0] = pieces[0][1:]
        segments += [tuple(piece) for piece in pieces]
    return segments


def split_at(tokens: list[int], cuts: list[int]) -> list[list[int]]:
    bounds = [0, *cuts, len(tokens)]
    return [tokens[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def test_clm_concat_equals_data_collator_with_flattening(tokenizer_path):
    """clm concat rows, flattened: input_ids, labels, position_ids, cu_seq_lens and max_length are the collator's for the rows' document pieces."""
    task = make_task(tokenizer_path, "clm", document_mask=True, cu_seqlens=True)
    texts = make_texts(200, seed=3)
    stream, doc_starts = stream_of(task.tok, texts, task.eos)
    batches = run(task, texts)
    assert len(batches) >= 3
    for index, batch in enumerate(batches[:3]):
        features = []
        for row in range(BATCH):
            begin = (index * BATCH + row) * ROW
            cuts = [p - begin for p in sorted(doc_starts) if begin < p < begin + ROW]
            features += [{"input_ids": piece} for piece in split_at(stream[begin:begin + ROW], cuts)]
        theirs = collate(features)
        ours = ringload.flatten_packed(as_torch(batch))
        assert_same_as_collator(ours, theirs, ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                               "max_length_q", "max_length_k"))
        assert (batch["attention_mask"] == 1).all()


def test_mlm_concat_equals_data_collator_with_flattening(tokenizer_path):
    """mlm concat rows [CLS] ... [SEP], flattened: input_ids, position_ids, cu_seq_lens and max_length are the collator's for the rows' segments."""
    task = make_task(tokenizer_path, "mlm", mask_prob=0.0, document_mask=True, cu_seqlens=True)
    texts = make_texts(200, seed=4)
    stream, doc_starts = stream_of(task.tok, texts, task.sep)
    step = ROW - 2
    batches = run(task, texts)
    assert len(batches) >= 3
    for index, batch in enumerate(batches[:3]):
        features = []
        for row in range(BATCH):
            begin = (index * BATCH + row) * step
            # [CLS] joins the row's first segment, the closing [SEP] its last.
            tokens = [task.cls, *stream[begin:begin + step], task.sep]
            cuts = [p - begin + 1 for p in sorted(doc_starts) if begin < p < begin + step]
            features += [{"input_ids": piece} for piece in split_at(tokens, cuts)]
        theirs = collate(features)
        ours = ringload.flatten_packed(as_torch(batch))
        # labels differ by design: the collator's are causal-LM labels, ours the masked-LM ones.
        assert_same_as_collator(ours, theirs, ("input_ids", "position_ids", "cu_seq_lens_q", "max_length_q"))
        assert "token_type_ids" in ours and ours["token_type_ids"].shape == ours["input_ids"].shape


@pytest.mark.parametrize("task_type", ["clm", "mlm"])
def test_best_fit_equals_data_collator_with_flattening(tokenizer_path, task_type):
    """best_fit rows hold whole documents; flattened, they are the collator's output for those documents and each row's padding."""
    task = make_task(tokenizer_path, task_type, document_mask=True, cu_seqlens=True, packing="best_fit",
                     **({"mask_prob": 0.0} if task_type == "mlm" else {}))
    separator = task.eos if task_type == "clm" else task.sep
    texts = short_texts(task.tok, 300, seed=5, longest=ROW - 3)
    documents = {tuple(ids + [separator]) for ids in task.tok.encode_ids(texts)}
    placed = []
    for batch in run(task, texts):
        features = []
        for ids, attention in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            used = sum(attention)
            content = ids[1:used] if task_type == "mlm" else ids[:used]
            pieces = split_at(content, [i + 1 for i, t in enumerate(content[:-1]) if t == separator])
            placed += [tuple(piece) for piece in pieces]
            if task_type == "mlm":
                pieces[0] = [task.cls, *pieces[0]]
            features += [{"input_ids": piece, "labels": piece} for piece in pieces]
            if used < ROW:
                features.append({"input_ids": ids[used:], "labels": [-100] * (ROW - used)})
        theirs = collate(features)
        ours = ringload.flatten_packed(as_torch(batch))
        keys = ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
        assert_same_as_collator(ours, theirs, keys + (("labels",) if task_type == "clm" else ()))
    # Every placed piece is a whole document, and none is placed twice.
    assert set(placed) <= documents and len(placed) == len(set(placed)) > 200
    assert task.documents_cut == 0


def test_cu_seqlens_padding_and_max_seqlen(tokenizer_path):
    """cu_seqlens runs 0 .. B*L over the segments, then repeats B*L to its fixed capacity; max_seqlen is each row's longest segment."""
    task = make_task(tokenizer_path, "clm", document_mask=True, cu_seqlens=True, packing="best_fit")
    for batch in run(task, make_texts(300, seed=6)):
        cu = batch["cu_seqlens"].reshape(-1)
        assert batch["cu_seqlens"].shape == (BATCH, ROW + 1) and cu.dtype == np.int32
        starts = np.flatnonzero(batch["position_ids"].reshape(-1) == 0)
        assert cu[:len(starts)].tolist() == starts.tolist()
        assert (cu[len(starts):] == BATCH * ROW).all()
        for row in range(BATCH):
            row_starts = [s - row * ROW for s in starts if row * ROW <= s < (row + 1) * ROW] + [ROW]
            assert batch["max_seqlen"][row] == max(np.diff(row_starts))
        # Document ids count the segments of each row; labels never cross a boundary.
        assert (batch["_document_ids"][:, -1] + 1 == [len(set(d)) for d in batch["_document_ids"]]).all()
        assert (batch["labels"][batch["position_ids"] == 0] == -100).all()


@pytest.mark.parametrize("task_type", ["clm", "mlm"])
def test_best_fit_splits_long_documents_into_row_pieces(tokenizer_path, task_type):
    """best_fit splits a document longer than a row into row-size pieces (mlm's each ending in [SEP]), counts it as cut, and places the rest whole."""
    task = make_task(tokenizer_path, task_type, document_mask=True, packing="best_fit", batch_size=2,
                     **({"mask_prob": 0.0} if task_type == "mlm" else {}))
    short = short_texts(task.tok, 150, seed=7, longest=ROW - 3)
    long_text = " ".join(make_texts(12, seed=8))
    long_ids = task.tok.encode_ids([long_text])[0]
    assert len(long_ids) > 3 * ROW
    segments = set()
    for batch in run(task, [*short[:60], long_text, *short[60:]]):
        segments |= set(row_segments(task_type, batch))
    if task_type == "clm":
        document = long_ids + [task.eos]
        pieces = [tuple(document[at:at + ROW]) for at in range(0, len(document), ROW)]
    else:
        pieces = [tuple(long_ids[at:at + ROW - 2]) + (task.sep,) for at in range(0, len(long_ids), ROW - 2)]
    assert len(pieces) > 3 and all(piece in segments for piece in pieces)
    assert task.documents_cut == 1


def test_best_fit_accounts_for_every_token_and_record(tokenizer_path):
    """best_fit: placed plus dropped tokens are all the chunk's tokens; records_done only grows; the output is a pure function of the chunk."""
    task = make_task(tokenizer_path, "mlm", packing="best_fit", whole_word_mask=True)
    texts = short_texts(task.tok, 500, seed=9, longest=ROW - 2)
    pending = list(task.batches(Records(texts), 0))
    total = sum(len(ids) + 1 for ids in task.tok.encode_ids(texts))
    assert sum(p.tokens - BATCH for p in pending) + task.tokens_dropped == total  # p.tokens counts each [CLS]
    done = [p.records_done for p in pending]
    assert done == sorted(done) and 0 < done[-1] <= len(texts)
    first, again = run(task, texts), run(make_task(tokenizer_path, "mlm", packing="best_fit", whole_word_mask=True), texts)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert (first[0]["input_ids"][first[0]["attention_mask"] == 0] == task.pad).all()
    assert (first[0]["labels"][first[0]["attention_mask"] == 0] == -100).all()


def test_best_fit_pads_instead_of_cutting(tokenizer_path):
    """On the same documents best_fit cuts fewer documents than concat and pays with padding."""
    texts = make_texts(600, seed=10)
    concat = make_task(tokenizer_path, "clm")
    best_fit = make_task(tokenizer_path, "clm", packing="best_fit")
    padding = {}
    for name, task in (("concat", concat), ("best_fit", best_fit)):
        batches = run(task, texts)
        padding[name] = 1 - sum(b["attention_mask"].sum() for b in batches) / (len(batches) * BATCH * ROW)
    assert padding["concat"] == 0 and 0 < padding["best_fit"] < 0.1
    longer_than_a_row = sum(len(ids) + 1 > ROW for ids in best_fit.tok.encode_ids(texts))
    assert best_fit.documents_cut == longer_than_a_row < concat.documents_cut


def test_packed_rows_give_each_document_its_own_logits(tokenizer_path):
    """A tiny Llama fed a best_fit batch (position_ids, no attention_mask) gives each document the logits it gets alone, flattened or not."""
    transformers = pytest.importorskip("transformers")
    import torch

    task = make_task(tokenizer_path, "clm", document_mask=True, cu_seqlens=True, packing="best_fit")
    batch = as_torch(run(task, short_texts(task.tok, 300, seed=11, longest=ROW // 3))[0])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=task.tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=ROW, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # use_cache=False: transformers looks for packed rows in position_ids only without a cache.
        rows = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        flat = model(**ringload.flatten_packed(batch), use_cache=False).logits.reshape(rows.shape)
        crossing = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         attention_mask=batch["attention_mask"], use_cache=False).logits
        compared = 0
        for row in range(BATCH):
            bounds = [*np.flatnonzero(batch["position_ids"][row].numpy() == 0).tolist(), ROW]
            for a, b in zip(bounds, bounds[1:]):
                if not batch["attention_mask"][row, a]:
                    continue  # the row's padding
                alone = model(input_ids=batch["input_ids"][row:row + 1, a:b], use_cache=False).logits[0]
                torch.testing.assert_close(rows[row, a:b], alone, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(flat[row, a:b], alone, atol=1e-5, rtol=1e-5)
                compared += 1
    assert compared >= 3 * BATCH
    # With an attention_mask transformers ignores the boundaries: the reason the README says to leave it out.
    assert not torch.allclose(rows, crossing, atol=1e-3)


@pytest.mark.parametrize(("options", "message"), [
    ({"type": "clm", "cu_seqlens": True}, "task.cu_seqlens: needs task.document_mask: true"),
    ({"type": "clm", "packing": "first_fit"}, "task.packing: must be one of concat, best_fit"),
    ({"type": "mlm", "pack": False, "document_mask": True}, "task.document_mask need packed rows"),
    ({"type": "mlm", "pack": False, "packing": "best_fit"}, "task.packing: best_fit need packed rows"),
])
def test_packing_options_are_checked(options, message):
    """Packing options that cannot work together are refused with a message naming them."""
    with pytest.raises(ringload.RecipeError, match=message):
        check_task_options(options, "recipe.yaml")


def test_flatten_packed_names_the_missing_options():
    """flatten_packed on a batch without boundaries says which task options produce them."""
    with pytest.raises(ValueError, match="document_mask: true, cu_seqlens: true"):
        ringload.flatten_packed({"input_ids": np.zeros((2, 8), np.int32)})


def finished_stream(recipe, name: str) -> tuple[list[dict[str, np.ndarray]], dict]:
    """All batches of a finite ring (bookkeeping fields too) and its status once every producer has counted."""
    with ringload.start(recipe, name=name):
        with ringload.connect(name, meta=True) as loader:
            batches = [{k: v.numpy().copy() for k, v in batch.items()} for batch in loader]
        deadline = time.monotonic() + 10
        while (status := ringload.ring_status(name))["state"] != "finished" and time.monotonic() < deadline:
            time.sleep(0.05)
    return batches, status


def test_status_reports_padding_and_truncation(recipe_file, ring_name):
    """Through a ring, status reports best_fit's padding share of the rows it published and no document cut, and concat's cuts."""
    task = {"type": "clm", "seq_len": 256, "document_mask": True, "cu_seqlens": True, "special_tokens": {"eos": "[SEP]"}}
    batches, status = finished_stream(recipe_file(task={**task, "packing": "best_fit"}), ring_name)
    assert {"cu_seqlens", "max_seqlen", "position_ids", "_document_ids"} <= set(batches[0])
    mask = np.concatenate([b["attention_mask"] for b in batches])
    assert status["packing"]["padding_ratio"] == round(1 - mask.sum() / mask.size, 4) > 0
    assert status["packing"]["truncation_ratio"] == 0
    # The same stream from one producer as from two (the ring's name is free again once it stopped).
    single, _ = finished_stream(recipe_file(task={**task, "packing": "best_fit"}, producers=1), ring_name)
    assert len(single) == len(batches) and all(np.array_equal(a[k], b[k]) for a, b in zip(single, batches) for k in a)
    _, concat = finished_stream(recipe_file(task=task), ring_name)
    assert concat["packing"]["padding_ratio"] == 0 < concat["packing"]["truncation_ratio"]
