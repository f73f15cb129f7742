"""The masked-LM task: row layout, masking statistics, and randomness that depends only on the stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_texts

from ringload._types import Records
from ringload._tasks import MaskedLM, TokenizerInfo, check_task_options


def make_task(tokenizer_path: str, batch_size: int = 16, seed: int = 3, **options) -> MaskedLM:
    checked = check_task_options({"type": "mlm", "seq_len": 64, **options}, "test")
    checked.pop("type")
    return MaskedLM(checked, TokenizerInfo(tokenizer_path), batch_size, seed)


def run(task: MaskedLM, texts: list[str], chunk: int = 0) -> list[dict[str, np.ndarray]]:
    batches = []
    for pending in task.batches(Records(texts), chunk):
        out = {f.name: np.empty(f.shape, f.dtype) for f in task.fields()}
        pending.write(out)
        batches.append(out)
    return batches


def unmasked(batch: dict[str, np.ndarray]) -> np.ndarray:
    return np.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def test_packed_rows_are_full_cls_sep_framed(tokenizer_path):
    """Packed rows have no padding, start with [CLS], end with [SEP], and join documents with [SEP]."""
    task = make_task(tokenizer_path, mask_prob=0.0)
    texts = make_texts(300, seed=1)
    batches = run(task, texts)
    assert batches
    for batch in batches:
        assert (batch["attention_mask"] == 1).all()
        assert (batch["input_ids"][:, 0] == task.cls).all() and (batch["input_ids"][:, -1] == task.sep).all()
        assert (batch["labels"] == -100).all()
    # The rows' content, concatenated, is the documents' tokens each followed by [SEP].
    content = np.concatenate([b["input_ids"][:, 1:-1].reshape(-1) for b in batches])
    expected = []
    for ids in task.tok.encode_ids(texts):
        expected += ids + [task.sep]
    assert content.tolist() == expected[: len(content)]
    assert len(expected) - len(content) == task.tokens_dropped < 16 * 62


def test_truncating_tokenizer_file_does_not_truncate_documents(tokenizer_path):
    """A tokenizer.json saved with truncation and padding on still yields whole documents."""
    long_text = " ".join(make_texts(20, seed=2))
    assert len(TokenizerInfo(tokenizer_path).encode_ids([long_text])[0]) > 100


def test_unpacked_rows_are_padded_with_a_correct_attention_mask(tokenizer_path):
    """pack: false puts one truncated document per row, pads it, and masks the padding out."""
    task = make_task(tokenizer_path, pack=False)
    texts = make_texts(64, seed=4)
    batches = run(task, texts)
    assert len(batches) == 4
    ids_per_doc = task.tok.encode_ids(texts)
    for b, batch in enumerate(batches):
        for row in range(16):
            doc = ids_per_doc[b * 16 + row][:62]
            length = len(doc) + 2
            assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
            original = unmasked(batch)[row]
            assert original[0] == task.cls and original[length - 1] == task.sep
            assert original[1:length - 1].tolist() == doc
            assert (batch["input_ids"][row, length:] == task.pad).all()
            assert (batch["labels"][row, length:] == -100).all()


def test_masking_statistics(tokenizer_path):
    """15% of ordinary tokens are chosen, 80/10/10 split, special tokens never chosen (within 5 sigma)."""
    task = make_task(tokenizer_path)
    batches = run(task, make_texts(4000, seed=5))
    special = task.tok.special
    chosen = ordinary = to_mask = kept = 0
    for batch in batches:
        original = unmasked(batch)
        is_chosen = batch["labels"] != -100
        assert not (is_chosen & special[original]).any(), "a special token was chosen"
        chosen += int(is_chosen.sum())
        ordinary += int((~special[original]).sum())
        to_mask += int((is_chosen & (batch["input_ids"] == task.mask)).sum())
        kept += int((is_chosen & (batch["input_ids"] == original)).sum())
    assert ordinary > 100_000

    def near(count: int, n: int, p: float) -> bool:
        return abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p))

    assert near(chosen, ordinary, 0.15)
    assert near(to_mask, chosen, 0.8)
    # Unchanged: the 10% kept plus the random draws that hit the original token.
    assert near(kept, chosen, 0.1 + 0.1 / len(task.ordinary_ids))
    random_replaced = chosen - to_mask - kept
    assert near(random_replaced, chosen, 0.1 * (1 - 1 / len(task.ordinary_ids)))


def test_random_replacements_are_ordinary_tokens(tokenizer_path):
    """The 10% random replacements never insert a special token."""
    task = make_task(tokenizer_path, mask_token_prob=0.0, random_token_prob=1.0)
    for batch in run(task, make_texts(500, seed=6)):
        chosen = batch["labels"] != -100
        assert chosen.any()
        assert not task.tok.special[batch["input_ids"][chosen]].any()


def test_masking_depends_only_on_seed_chunk_and_index(tokenizer_path):
    """The same chunk gives the same batches in any task instance; another seed or chunk id changes the mask."""
    texts = make_texts(400, seed=7)
    a = run(make_task(tokenizer_path), texts, chunk=5)
    b = run(make_task(tokenizer_path), texts, chunk=5)
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    other_chunk = run(make_task(tokenizer_path), texts, chunk=6)
    other_seed = run(make_task(tokenizer_path, seed=4), texts, chunk=5)
    assert not np.array_equal(a[0]["labels"], other_chunk[0]["labels"])
    assert not np.array_equal(a[0]["labels"], other_seed[0]["labels"])
    assert np.array_equal(unmasked(a[0]), unmasked(other_seed[0]))


def test_agrees_with_transformers_data_collator(tokenizer_path):
    """ringload's masking matches transformers' DataCollatorForLanguageModeling rates on the same tokens."""
    transformers = pytest.importorskip("transformers")
    import torch

    task = make_task(tokenizer_path, batch_size=32)
    batches = run(task, make_texts(3000, seed=8))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, cls_token="[CLS]", sep_token="[SEP]",
                                                mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]")
    collator = transformers.DataCollatorForLanguageModeling(fast, mlm_probability=0.15)
    torch.manual_seed(0)
    theirs = collator([{"input_ids": row} for b in batches for row in unmasked(b).astype(np.int64).tolist()])
    original = np.concatenate([unmasked(b) for b in batches])
    ordinary = ~task.tok.special[original]
    ours = {"labels": np.concatenate([b["labels"] for b in batches]), "ids": np.concatenate([b["input_ids"] for b in batches])}
    collated = {"labels": theirs["labels"].numpy(), "ids": theirs["input_ids"].numpy()}

    def rates(batch: dict[str, np.ndarray]) -> tuple[float, float]:
        chosen = batch["labels"] != -100
        assert not (chosen & ~ordinary).any()
        return chosen.sum() / ordinary.sum(), (chosen & (batch["ids"] == task.mask)).sum() / chosen.sum()

    (our_rate, our_mask), (their_rate, their_mask) = rates(ours), rates(collated)
    n = int(ordinary.sum())
    assert abs(our_rate - their_rate) < 5 * math.sqrt(2 * 0.15 * 0.85 / n)
    assert abs(our_mask - their_mask) < 5 * math.sqrt(2 * 0.8 * 0.2 / (0.15 * n))


def test_whole_word_masking_chooses_words_independently(tokenizer_path):
    """whole_word_mask chooses about mask_prob of the words, each on its own draw (not whole documents)."""
    task = make_task(tokenizer_path, batch_size=8, mask_prob=0.3, whole_word_mask=True)
    chosen_words = next_also_chosen = words = 0
    for batch in run(task, make_texts(400, seed=5)):
        chosen = batch["labels"] != -100
        original = np.where(chosen, batch["labels"], batch["input_ids"])
        for row in range(len(original)):
            tokens = [task.tok.tokenizer.id_to_token(int(t)) for t in original[row]]
            starts = [pos for pos, t in enumerate(tokens) if not t.startswith(("##", "["))]
            words += len(starts)
            picks = [bool(chosen[row, pos]) for pos in starts]
            chosen_words += sum(picks)
            next_also_chosen += sum(a and b for a, b in zip(picks, picks[1:]))
    assert words > 2000
    assert abs(chosen_words / words - 0.3) < 0.05
    assert next_also_chosen / chosen_words < 0.4  # independent draws: about 0.3; one draw per document: near 1
