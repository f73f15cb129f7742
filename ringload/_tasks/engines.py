"""Tokenizer engines: HF ``tokenizers``, or ``tiktoken`` rebuilt from the same byte-level BPE.

``tiktoken`` encodes byte-level BPE several times faster than ``tokenizers`` on one core, but it
runs a different algorithm, so it is used only where it provably returns the same ids as
``Tokenizer.encode_batch_fast(texts, add_special_tokens=False)``. ``exact_tiktoken`` checks the
tokenizer's configuration and vocabulary and either builds the ``tiktoken.Encoding`` or says why not.

Why the checks suffice (each is named in the reason when it fails):

* Text reaches the model the same way. HF first cuts out every added token (special or not, also
  with ``add_special_tokens=False``), then splits the rest with the pre-tokenizer's regex and maps
  its bytes to the byte-level alphabet; tiktoken cuts out its special tokens (all allowed), then
  splits with ``pat_str``. So: no normalizer, a ``ByteLevel`` pre-tokenizer with the GPT-2 regex
  and no prefix space (or a ``Split`` with one of ``KNOWN_SPLIT_PATTERNS``, which match every
  character, so nothing falls between matches), and added tokens without strip/single-word rules
  of which none is a prefix of another (HF takes the longest match at a position, tiktoken the
  first alternative: they differ only there).
* BPE merges the same pairs. HF merges, in a word, the adjacent pair with the lowest merge rank;
  tiktoken the adjacent pair whose concatenation has the lowest token id. With the ids of the
  merge results increasing in merge order (one merge per token), the two agree on every pair
  that *is* a merge. They could differ on an adjacent pair whose concatenation is a token but not
  its merge. Such a pair never occurs if every token, encoded alone by HF's merges, is itself:
  BPE is local, so the parts covering a token's bytes in any word were built by exactly the
  merges HF runs on the token alone, which would then stop at that pair instead of the token.
  Both sides then agree on every state, hence on the result; tiktoken's shortcut for a word that
  is a whole token gives what the merges give (and what HF's ``ignore_merges`` gives).
* Every byte has its token, so neither side ever needs an unknown token or byte fallback.

The self-encoding check costs about half a second for GPT-2; its outcome is kept in
``proofs_dir()``, keyed by the tokenizer's whole configuration, the versions of tokenizers and
tiktoken and this module's source, so a tokenizer is proven once per machine, not per process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Tokenizer, models

from .._errors import RecipeError

ENGINES = ("auto", "tokenizers", "tiktoken")
CACHE_ENV = "RINGLOAD_CACHE"  # ringload's cache directory (default ~/.cache/ringload)

# The regex of HF's ByteLevel pre-tokenizer (use_regex: true), the same as GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Split patterns (Llama 3 / cl100k, Qwen2) whose last alternatives \s+ and [^\s\p{L}\p{N}]+ (with
# \p{L}+ and \p{N}) match any character, so HF's Isolated split leaves no text between matches.
KNOWN_SPLIT_PATTERNS = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""  # Llama 3, cl100k
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""  # Qwen2
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
)


class NotExact(Exception):
    """tiktoken cannot be shown to return the tokenizer's ids; the message says which check failed."""


@dataclass(frozen=True)
class EngineChoice:
    """Which engine encodes the ids, and why (shown by ``ringload status`` and ``inspect``)."""

    engine: str  # "tokenizers" or "tiktoken"
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"engine": self.engine, "reason": self.reason}


Encoder = Callable[[list[str]], list[list[int]]]


def choose_engine(tok: Tokenizer, requested: str, path: str) -> tuple[Encoder, EngineChoice]:
    """The function that encodes texts to ids for ``requested`` (one of ``ENGINES``), and the choice made.

    ``auto`` takes tiktoken when it is provably exact for this tokenizer and ``tokenizers`` otherwise;
    ``tiktoken`` asked for by name and not exact is a RecipeError that says why."""
    if requested == "tokenizers":
        return _hf_encoder(tok), EngineChoice("tokenizers", "tokenizer_engine: tokenizers in the recipe")
    try:
        encoding = exact_tiktoken(tok)
    except NotExact as why:
        if requested == "tiktoken":
            raise RecipeError(f"tokenizer_engine: tiktoken cannot reproduce {path} exactly: {why}; "
                              "use tokenizer_engine: auto or tokenizers") from None
        return _hf_encoder(tok), EngineChoice("tokenizers", f"tiktoken not exact for this tokenizer: {why}")
    return _tiktoken_encoder(encoding), EngineChoice(
        "tiktoken", "byte-level BPE proven reproducible by tiktoken" if requested == "auto"
        else "tokenizer_engine: tiktoken in the recipe (proven exact)")


class EngineSwitch:
    """Encodes with the requested engine, once chosen; until then (auto or tiktoken) with HF.

    Proving tiktoken exact reads the whole vocabulary (about half a second), so it runs in a
    background thread started by the first ``encode``, and the first batches are not kept waiting:
    both engines give the same ids, so when the switch happens changes nothing in the stream.
    ``choice`` waits for the decision (and raises the RecipeError of an explicit, inexact tiktoken).
    """

    def __init__(self, tok: Tokenizer, requested: str, path: str):
        self._tok, self._requested, self._path = tok, requested, path
        self._hf = _hf_encoder(tok)
        self._chosen: tuple[Encoder, EngineChoice] | None = None
        self._error: BaseException | None = None
        self._decided = threading.Event()
        self._thread: threading.Thread | None = None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self._chosen is None and self._requested != "tokenizers" and not self._decided.is_set():
            self._start()
            return self._hf(texts)
        return self._engine()[0](texts)

    def choice(self) -> EngineChoice:
        """The engine ``encode`` runs from now on, and why; decided here if no thread has started."""
        return self._engine()[1]

    def _engine(self) -> tuple[Encoder, EngineChoice]:
        if self._chosen is None:
            if self._thread is None and not self._decided.is_set():
                self._decide()
            self._decided.wait()
            if self._error is not None:
                raise self._error
            assert self._chosen is not None  # _decide sets either _chosen or _error
        return self._chosen

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._decide, name="ringload-engine", daemon=True)
            self._thread.start()

    def _decide(self) -> None:
        try:
            self._chosen = choose_engine(self._tok, self._requested, self._path)
        except BaseException as exc:  # handed to the thread that asks for the choice
            self._error = exc
        finally:
            self._decided.set()


def _hf_encoder(tok: Tokenizer) -> Encoder:
    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    return encode


def _tiktoken_encoder(encoding: Any) -> Encoder:
    allowed = encoding.special_tokens_set  # HF cuts out every added token, also without special tokens
    # The Rust encoder itself, as Encoding.encode calls it: Encoding.encode would replace a lone
    # surrogate (possible in JSON text) with U+FFFD where HF raises, and encode_batch starts a
    # thread pool per call where a producer owns one core.
    encode_one = encoding._core_bpe.encode

    def encode(texts: list[str]) -> list[list[int]]:
        return [encode_one(text, allowed) for text in texts]
    return encode


def exact_tiktoken(tok: Tokenizer) -> Any:
    """A ``tiktoken.Encoding`` that returns ``tok``'s ids for every text, or NotExact saying why not."""
    if tok.encode_special_tokens:
        raise NotExact("encode_special_tokens is on (added tokens in text are encoded as text)")
    config_text = tok.to_str()
    config = json.loads(config_text)
    model = config["model"]
    if model.get("type") != "BPE":
        raise NotExact(f"model is {model.get('type')}, not BPE")
    pattern = _split_pattern(config)
    for key, harmless in (("dropout", (None, 0.0)), ("continuing_subword_prefix", (None, "")),
                          ("end_of_word_suffix", (None, "")), ("byte_fallback", (False,))):
        if model.get(key) not in harmless:
            raise NotExact(f"BPE {key} is {model.get(key)!r}")
    if (config.get("decoder") or {}).get("type") != "ByteLevel":
        raise NotExact("decoder is not ByteLevel")
    specials = _added_tokens(config)
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    byte_of = byte_level_alphabet()
    missing = [f"{b:#04x}" for char, b in byte_of.items() if char not in vocab]
    if missing:
        raise NotExact(f"the vocabulary lacks byte tokens {', '.join(missing[:8])}")
    ranks = _merge_ranks(vocab, merges, byte_of)
    _proven_self_encoding(config_text, vocab, merges, ranks, byte_of)
    unmerged = [t for t in vocab if t not in ranks and t not in specials]
    if unmerged and model.get("ignore_merges"):
        # HF returns such a token for a word equal to it; tiktoken's vocabulary (merge results) lacks it.
        raise NotExact(f"ignore_merges with {len(unmerged)} tokens no merge builds, e.g. {unmerged[0]!r}")
    import tiktoken

    ranks_by_bytes = {bytes(byte_of[c] for c in token): ranks[token] for token in ranks}
    encoding = tiktoken.Encoding("ringload-exact", pat_str=pattern, mergeable_ranks=ranks_by_bytes,
                                 special_tokens=specials)
    if not hasattr(encoding, "_core_bpe"):
        raise NotExact(f"tiktoken {tiktoken.__version__} has no Encoding._core_bpe (written for 0.7 to 0.14)")
    return encoding


def byte_level_alphabet() -> dict[str, int]:
    """Character of HF's (and GPT-2's) byte-level alphabet -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {chr(b): b for b in printable}
    chars.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return chars


def _split_pattern(config: dict[str, Any]) -> str:
    """tiktoken's ``pat_str`` for the tokenizer's normalizer and pre-tokenizer, or NotExact."""
    normalizer = config.get("normalizer")
    if normalizer is not None and not (normalizer.get("type") == "Sequence" and not normalizer.get("normalizers")):
        raise NotExact(f"normalizer {normalizer.get('type')} (tiktoken does not normalize)")
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        _check_byte_level(steps[0])
        return GPT2_PATTERN
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        split = steps[0]
        _check_byte_level(steps[1])
        regex = split.get("pattern", {}).get("Regex")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise NotExact(f"Split pre-tokenizer with behavior {split.get('behavior')}, invert {split.get('invert')}")
        if regex not in KNOWN_SPLIT_PATTERNS:
            raise NotExact(f"Split regex {regex!r} is not one known to cover every character")
        return regex
    kinds = [s.get("type") for s in steps]
    raise NotExact(f"pre-tokenizer {kinds} is not ByteLevel (GPT-2 regex) or Split + ByteLevel")


def _check_byte_level(step: dict[str, Any]) -> None:
    if step.get("add_prefix_space"):
        raise NotExact("ByteLevel add_prefix_space is true")


def _added_tokens(config: dict[str, Any]) -> dict[str, int]:
    """Added token -> id, as tiktoken's special tokens, or NotExact if HF would match them differently."""
    added = config.get("added_tokens") or []
    for token in added:
        rules = [rule for rule in ("single_word", "lstrip", "rstrip") if token.get(rule)]
        if rules:
            raise NotExact(f"added token {token['content']!r} has {', '.join(rules)}")
    contents = sorted(token["content"] for token in added)
    for shorter, longer in zip(contents, contents[1:], strict=False):
        if longer.startswith(shorter):
            raise NotExact(f"added token {shorter!r} is a prefix of {longer!r}")
    return {token["content"]: token["id"] for token in added}


def _merge_ranks(vocab: dict[str, int], merges: list[tuple[str, str]], byte_of: dict[str, int]) -> dict[str, int]:
    """Token -> id for the byte tokens and every merge result: tiktoken's ranks. NotExact unless the
    ids of the merge results increase with merge order (tiktoken's priority is the id)."""
    ranks = {char: vocab[char] for char in byte_of}
    previous = -1
    for index, (left, right) in enumerate(merges):
        result = left + right
        if left not in vocab or right not in vocab or result not in vocab:
            raise NotExact(f"merge {index} ({left!r}, {right!r}) uses or builds a token outside the vocabulary")
        if result in ranks:
            raise NotExact(f"token {result!r} is built by more than one merge or is a byte")
        if vocab[result] <= previous:
            raise NotExact(f"merge {index} builds id {vocab[result]}, not above the previous merge's {previous}")
        previous = ranks[result] = vocab[result]
    return ranks


def proofs_dir() -> Path:
    """Where the outcomes of the self-encoding check are kept."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ringload") / "engine-proofs"


def _proven_self_encoding(config_text: str, vocab: dict[str, int], merges: list[tuple[str, str]],
                          ranks: dict[str, int], byte_of: dict[str, int]) -> None:
    """``_check_self_encoding``, or its outcome kept from an earlier run on the same configuration."""
    key = hashlib.sha256()
    for part in (config_text, tokenizers.__version__,
                 importlib.metadata.version("tiktoken"), Path(__file__).read_text()):
        key.update(part.encode("utf-8", "surrogatepass") + b"\0")
    path = proofs_dir() / f"{key.hexdigest()}.json"
    try:
        kept = json.loads(path.read_text())
        failure = kept["failure"]
        if failure is not None and not isinstance(failure, str):
            raise ValueError("not a proof record")
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: prove it again
        try:
            _check_self_encoding(vocab, merges, ranks, byte_of)
            failure = None
        except NotExact as why:
            failure = str(why)
        _keep(path, {"failure": failure})
    if failure is not None:
        raise NotExact(failure)


def _keep(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` whole or not at all; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(record, out)
        os.replace(temporary, path)  # readers see the old file or the whole new one
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _check_self_encoding(vocab: dict[str, int], merges: list[tuple[str, str]], ranks: dict[str, int],
                         byte_of: dict[str, int]) -> None:
    """NotExact unless HF's merges encode every merge result, alone, to itself (see the module docstring)."""
    bare = Tokenizer(models.BPE(vocab, merges))  # merges only: no ignore_merges shortcut, no pre-tokenizer
    built = [token for token in ranks if token not in byte_of]
    for token, encoding in zip(built, bare.encode_batch_fast(built, add_special_tokens=False), strict=True):
        if encoding.ids != [ranks[token]]:
            raise NotExact(f"token {token!r} (id {ranks[token]}) encodes to {encoding.ids} under its own merges")
