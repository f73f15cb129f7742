"""tokenizer_engine: tiktoken, where auto picks it, returns exactly HF tokenizers' ids; elsewhere auto
falls back and says why."""

from __future__ import annotations

import bz2
import csv
import json
from pathlib import Path

import pytest
import tiktoken
from conftest import assert_same_stream, drain
from fetch_assets import fetch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

import ringload
from ringload._errors import RecipeError
from ringload._tasks.base import _load_bpe_folder
from ringload._tasks import engines
from ringload._tasks.engines import (CACHE_ENV, KNOWN_SPLIT_PATTERNS, EngineSwitch, NotExact, byte_level_alphabet,
                                     choose_engine, exact_tiktoken, proofs_dir)

ROOT = Path(__file__).resolve().parent.parent

SPECIAL = "<|endoftext|>"


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Proofs go to this module's own cache directory (daemons started here inherit it)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "ringload-cache"))


@pytest.fixture(scope="module")
def gpt2() -> ringload.TokenizerInfo:
    """The GPT-2 tokenizer from its vocab.json + merges.txt, with the engine auto chooses."""
    return ringload.TokenizerInfo(str(fetch("gpt2-bpe")))


@pytest.fixture(scope="module")
def gpt2_json(tmp_path_factory, gpt2) -> str:
    """The same tokenizer saved as a GPT-2-style tokenizer.json."""
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    gpt2.tokenizer.save(str(path))
    return str(path)


def hf_ids(info: ringload.TokenizerInfo, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in info.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def assert_same_ids(info: ringload.TokenizerInfo, texts: list[str]) -> None:
    assert info.engine.engine == "tiktoken"
    expected, got = hf_ids(info, texts), info.encode_ids(texts)
    wrong = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ, first {texts[wrong[0]][:200]!r}"
    assert len(got) == len(texts)


def test_auto_picks_tiktoken_for_gpt2_folder_and_json(gpt2, gpt2_json):
    """auto proves GPT-2's byte-level BPE exact, from the vocab/merges folder and from tokenizer.json."""
    assert gpt2.engine.engine == "tiktoken" and "proven" in gpt2.engine.reason
    assert ringload.TokenizerInfo(gpt2_json).engine.engine == "tiktoken"


def test_same_ids_on_kjv_verses_and_whole_books(gpt2):
    """Every KJV verse, and every book as one long document, encodes to HF's ids."""
    verses = [json.loads(line) for line in (fetch("kjv") / "kjv.jsonl").read_text().splitlines()]
    texts = [v["text"] for v in verses]
    books: dict[str, list[str]] = {}
    for verse in verses:
        books.setdefault(verse["book"], []).append(verse["text"])
    assert_same_ids(gpt2, texts)
    assert_same_ids(gpt2, ["\n".join(book) for book in books.values()])


def test_same_ids_on_rotten_tomatoes(gpt2_json):
    """Every Rotten Tomatoes plot and review (csv text column) encodes to HF's ids, through tokenizer.json."""
    path = fetch("rotten-tomatoes") / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    assert len(texts) > 1000
    assert_same_ids(ringload.TokenizerInfo(gpt2_json), texts)


def test_same_ids_for_every_assigned_plane(gpt2):
    """Every code point of the planes with assigned characters (0-3, 14; one in 61 of the unassigned
    and private ones), doubled, after a letter, before a digit and around a space and a tab, encodes
    to HF's ids: the two regex engines class every character alike."""
    points = [*range(0, 0x40000), *range(0xE0000, 0xF0000), *range(0x40000, 0xE0000, 61), *range(0xF0000, 0x110000, 61)]
    chars = [chr(c) for c in points if not 0xD800 <= c < 0xE000]
    texts = ["".join(f"a{c}{c}1 {c}\t" for c in chars[at:at + 512]) for at in range(0, len(chars), 512)]
    assert_same_ids(gpt2, texts)


ADVERSARIAL = [
    f"before{SPECIAL}after", f"{SPECIAL}", f"{SPECIAL}{SPECIAL} {SPECIAL}\n{SPECIAL}", f" {SPECIAL} ",
    "<|endoftext", "endoftext|>", "<|endoftext|", "<|endoftext|>>", "<<|endoftext|>", "<|ENDOFTEXT|>",
    f"a <|endoftext|> b <|endoftext|>c{SPECIAL[:-1]}",
    "e\u0301e\u0301\u0301 n\u0303 \u0915\u094d\u0937 \u0e01\u0e34\u0e4a",  # combining marks, Devanagari, Thai
    "👩\u200d👩\u200d👧\u200d👦 🏳️\u200d🌈 👍🏽 🇫🇷🇩🇪 1️⃣",  # ZWJ sequences, modifiers, flags, keycaps
    "漢字かなカナ 한국어 中文，标点。「引号」", "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 \u202eabc\u202c",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u2060word\u00adsoft",
    " " * 5000, "\n" * 3000, "\t" * 1000 + "x", " \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u202f\u205f\u3000x",
    "line\r\nline\r\n\r\n\rline\n\r", "a  b   c    d\t\te\n\n\nf   \n  \n",
    "0" * 3000, "1234567890" * 300 + " 3.14159 1e-9 ١٢٣ ①②③ ½ Ⅻ",
    "it's I'M they're we've you'll she'd 'S 'LL 'ſ ’s ''s",
    "x" * 20000, "ab" * 10000 + " " + "🙂" * 2000,
    "\x00\x01\x02\x1b[31mcontrol\x7f", "\ufffd\ufffe\uffff\U0010ffff\U000e0001",
]


def test_same_ids_on_adversarial_text(gpt2):
    """Special-token strings inside documents, unusual Unicode, whitespace runs, \\r\\n, digits and very
    long words encode to HF's ids."""
    assert_same_ids(gpt2, ADVERSARIAL)
    assert_same_ids(gpt2, ["".join(ADVERSARIAL) * 20])  # one very long document
    assert gpt2.encode_ids([f"a{SPECIAL}b"])[0] == [64, 50256, 65]  # matched as the added token, as HF does


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
                          st.sampled_from([SPECIAL, " ", "\n", "\r\n", "'s", "  ", "12345", "<|", "|>"])),
                max_size=20))
def test_same_ids_on_generated_text(gpt2, parts):
    """Random Unicode text with special-token strings, spaces and digits spliced in encodes to HF's ids."""
    assert_same_ids(gpt2, ["".join(parts)])


def test_lone_surrogate_fails_in_both_engines(gpt2):
    """A lone surrogate (possible from a JSON escape) is an error in both engines, never silently replaced."""
    with pytest.raises(TypeError):
        hf_ids(gpt2, ["a\ud800b"])
    with pytest.raises(UnicodeEncodeError):
        gpt2.encode_ids(["a\ud800b"])


def gpt2_variant(change) -> Tokenizer:
    """The GPT-2 tokenizer with one part of its configuration changed by ``change``."""
    tok = _load_bpe_folder(str(fetch("gpt2-bpe")))
    change(tok)
    return tok


@pytest.mark.parametrize("change, why", [
    (lambda t: setattr(t, "normalizer", normalizers.NFC()), "normalizer NFC"),
    (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)), "add_prefix_space"),
    (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Whitespace()), "pre-tokenizer ['Whitespace']"),
    (lambda t: setattr(t, "decoder", decoders.WordPiece()), "decoder is not ByteLevel"),
    (lambda t: t.add_tokens(["<|endoftext|>x"]), "is a prefix of"),
    (lambda t: setattr(t, "encode_special_tokens", True), "encode_special_tokens"),
])
def test_auto_falls_back_with_reason(change, why):
    """A byte-level BPE that tiktoken cannot replay (normalizer, prefix space, other pre-tokenizer or
    decoder, overlapping added tokens, special tokens encoded as text) runs on tokenizers, saying why."""
    encode, choice = choose_engine(gpt2_variant(change), "auto", "gpt2")
    assert choice.engine == "tokenizers" and why in choice.reason
    with pytest.raises(RecipeError, match="tokenizer_engine: tiktoken cannot reproduce gpt2 exactly"):
        choose_engine(gpt2_variant(change), "tiktoken", "gpt2")


def test_wordpiece_falls_back():
    """BERT's WordPiece tokenizer runs on tokenizers under auto, and the reason names the model."""
    info = ringload.TokenizerInfo(str(fetch("bert-wordpiece") / "tokenizer.json"))
    assert info.engine.engine == "tokenizers" and "WordPiece" in info.engine.reason
    assert info.encode_ids(["hello world"]) == hf_ids(info, ["hello world"])


def test_engine_tokenizers_when_asked(gpt2):
    """tokenizer_engine: tokenizers runs HF even where tiktoken would be exact."""
    _, choice = choose_engine(gpt2.tokenizer, "tokenizers", "gpt2")
    assert choice.engine == "tokenizers"


def test_token_that_its_merges_do_not_build_is_refused():
    """A vocabulary where tiktoken's concatenation rule and HF's merges disagree (the token 'hell' is
    in the vocabulary, but HF's merges split 'hell' as h + ell, and 'hel' as h + el) is refused, and would
    indeed differ."""
    alphabet = byte_level_alphabet()
    vocab = {char: i for i, char in enumerate(alphabet)}
    merges = [("e", "l"), ("el", "l"), ("h", "e"), ("he", "l"), ("hel", "l")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with pytest.raises(NotExact, match="'hel' .* under its own merges"):
        exact_tiktoken(tok)
    naive = tiktoken.Encoding("naive", pat_str=r"\S+|\s+", mergeable_ranks={
        bytes(alphabet[c] for c in token): i for token, i in vocab.items()}, special_tokens={})
    assert tok.encode("hell").ids == [vocab["h"], vocab["ell"]] != naive.encode("hell")


def test_recipe_rejects_unknown_engine(tmp_path):
    """tokenizer_engine must be auto, tokenizers or tiktoken; the error names the key."""
    recipe = ringload.load_recipe(ROOT / "tasks" / "clm-kjv.yaml")
    with pytest.raises(RecipeError, match="tokenizer_engine: must be auto, tokenizers, tiktoken"):
        recipe.replace(tokenizer_engine="fast")


def test_clm_stream_identical_across_engines_and_status_names_engine(ring_name):
    """The clm recipe on KJV with GPT-2 gives the same batches with tiktoken (auto) and tokenizers, and
    status says which engine runs and why."""
    fetch("gpt2-bpe"), fetch("kjv")
    recipe = ringload.load_recipe(ROOT / "tasks" / "clm-kjv.yaml").replace(chunk_bytes=65536, max_batches=40)
    streams, engines = [], []
    for engine in ("auto", "tokenizers"):
        with ringload.start(recipe.replace(tokenizer_engine=engine), name=ring_name):
            streams.append(drain(ring_name, limit=40))
            engines.append(ringload.ring_status(ring_name)["tokenizer_engine"])
    assert len(streams[0]) == 40
    assert_same_stream(streams[0], streams[1])
    assert engines[0]["engine"] == "tiktoken" and engines[1] == {
        "engine": "tokenizers", "reason": "tokenizer_engine: tokenizers in the recipe"}


@pytest.mark.parametrize("pattern", KNOWN_SPLIT_PATTERNS, ids=["llama3-cl100k", "qwen2"])
def test_split_regex_pre_tokenizer_same_ids(pattern):
    """A Split pre-tokenizer with a known pattern (Llama 3 / Qwen2 style, GPT-2's merges) followed by
    ByteLevel without regex is reproduced exactly, on adversarial text and every BMP code point."""
    tok = gpt2_variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])))
    encode, choice = choose_engine(tok, "auto", "split")
    assert choice.engine == "tiktoken"
    chars = [chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000]
    texts = ADVERSARIAL + ["".join(f"a{c}{c}1 {c}\t'{c}" for c in chars[at:at + 512])
                           for at in range(0, len(chars), 512)]
    assert encode(texts) == [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def test_unknown_split_regex_falls_back():
    """A Split regex that is not known to cover every character falls back (tiktoken drops unmatched text)."""
    tok = gpt2_variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])))
    _, choice = choose_engine(tok, "auto", "split")
    assert choice.engine == "tokenizers" and "not one known to cover every character" in choice.reason


def test_proof_is_kept_and_a_broken_record_is_proven_again(monkeypatch, tmp_path):
    """The self-encoding check runs once per configuration: a kept outcome is used without it, and
    a corrupt or truncated record is ignored, proven again and rewritten."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    tok = _load_bpe_folder(str(fetch("gpt2-bpe")))
    calls = []
    check = engines._check_self_encoding
    monkeypatch.setattr(engines, "_check_self_encoding", lambda *args: calls.append(1) or check(*args))
    exact_tiktoken(tok)
    exact_tiktoken(tok)
    assert len(calls) == 1
    records = list(proofs_dir().glob("*.json"))
    assert len(records) == 1 and records[0].read_text() == '{"failure": null}'
    for broken in ("", '{"failure": nu', '{"failure": 7}', "\x00\xff"):
        for record in records:
            record.write_text(broken)
        exact_tiktoken(tok)
    assert len(calls) == 5 and all(r.read_text() == '{"failure": null}' for r in records)
    assert not list(proofs_dir().glob("*.tmp"))


def test_kept_failure_is_reported_without_proving(monkeypatch):
    """A kept failed proof gives the same fallback reason, without running the check again."""
    alphabet = byte_level_alphabet()
    vocab = {char: i for i, char in enumerate(alphabet)}
    merges = [("e", "l"), ("h", "e"), ("he", "l")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    first = choose_engine(tok, "auto", "tiny")[1]
    monkeypatch.setattr(engines, "_check_self_encoding", lambda *args: pytest.fail("proved twice"))
    again = choose_engine(tok, "auto", "tiny")[1]
    assert first == again and first.engine == "tokenizers" and "'hel'" in first.reason


def test_unwritable_cache_still_decides(monkeypatch, tmp_path):
    """With a cache directory that cannot be created, the engine is still chosen (proven each time)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    assert choose_engine(_load_bpe_folder(str(fetch("gpt2-bpe"))), "auto", "gpt2")[1].engine == "tiktoken"


def test_switch_encodes_with_hf_until_decided(gpt2):
    """Before the background decision the switch encodes with HF, after it with tiktoken: same ids."""
    switch = EngineSwitch(gpt2.tokenizer, "auto", "gpt2")
    texts = ADVERSARIAL[:8]
    before = switch.encode(texts)  # starts the decision, encodes with HF meanwhile
    assert switch.choice().engine == "tiktoken"
    assert before == switch.encode(texts) == hf_ids(gpt2, texts)


def test_switch_raises_for_explicit_inexact_tiktoken():
    """tokenizer_engine: tiktoken on WordPiece is a RecipeError, from the first encode after the decision."""
    tok = Tokenizer.from_file(str(fetch("bert-wordpiece") / "tokenizer.json"))
    switch = EngineSwitch(tok, "tiktoken", "bert")
    switch.encode(["hello"])
    with pytest.raises(RecipeError, match="model is WordPiece"):
        switch.choice()
    with pytest.raises(RecipeError, match="model is WordPiece"):
        switch.encode(["hello"])
