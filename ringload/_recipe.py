"""Recipes: the YAML file that says what to stream, how to tokenize it and for which task.

A recipe is data (read with ``yaml.safe_load``). Every key is checked: an unknown key, a wrong
type or an impossible value is a :class:`RecipeError` that names the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import MISSING, asdict, dataclass, field as dataclass_field, fields
from pathlib import Path
from typing import Any

import yaml

from ._errors import RecipeError
from ._types import MAX_LANES, MAX_RANKS, MAX_SLOTS, MAX_SOURCES, MIN_SLOTS, Dealing

FORMATS = ("text", "jsonl", "cirrussearch", "csv", "tsv", "parquet")
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_SCALE = 16
MIN_CHUNK_BYTES = 1024
STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted")
NODE_SHARDING = ("batches", "chunks", "files")
LONG_RECORD_POLICIES = ("skip", "truncate", "fail")
MAX_TIMEOUT_S = 3600  # an HTTP source's seconds without data before it reconnects
MODES = ("train", "eval")
ASSETS_ENV = "RINGLOAD_ASSETS"
_HOOK = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


def assets_dir() -> Path:
    """Where ``scripts/fetch_assets.py`` puts real files; ``{assets}`` in a recipe expands to it."""
    return Path(os.environ.get(ASSETS_ENV) or Path.home() / ".cache" / "ringload" / "assets")


@dataclass(frozen=True)
class Source:
    paths: tuple[str, ...]
    format: str = "text"
    field: str = "text"
    pair_field: str | None = None
    label_field: str | None = None
    text_unit: str = "line"  # text format: one example per line, or per blank-line-separated paragraph
    filter: str | None = None  # module:function(record) -> bool, keeps a record when true
    map: str | None = None  # module:function(record) -> record
    retries: int = 8  # HTTP(S): reconnections in a row before a read fails
    timeout: float = 60.0  # HTTP(S): seconds without data before reconnecting
    storage_options: dict[str, Any] = dataclass_field(default_factory=dict)
    weight: float = 1.0  # with several sources: this source's share of the stream's chunks


@dataclass(frozen=True)
class Recipe:
    name: str
    sources: tuple[Source, ...]
    tokenizer: str
    task: dict[str, Any]
    batch_size: int = 32
    producers: int = 2
    slots: int | None = None  # per producer; None = enough for two chunks of batches
    seed: int = 0
    epochs: int | None = None  # None = repeat the sources forever
    skip_batches: int = 0  # the consumer starts after this many batches of the stream
    max_batches: int | None = None  # the consumer stops after this many (after the skipped ones)
    chunk_bytes: int | None = None  # None: DEFAULT_CHUNK_BYTES times the global ranks (up to 16)
    on_bad_record: str = "skip"
    max_record_bytes: int | None = None  # a record (line, paragraph, csv row) longer than this is handled by:
    on_long_record: str = "skip"  # skip (a bad record), truncate (texts cut to max_record_bytes), fail
    max_restarts: int = 3
    world_size: int = 1  # consumer ranks this node's ring serves (torchrun's --nproc-per-node)
    nnodes: int = 1  # nodes, each running its own daemon over the same recipe
    node_rank: int = 0
    node_sharding: str = "batches"  # nodes split each chunk's batches; or, in an endless stream, chunks or files
    shuffle: dict[str, int] | None = None  # {buffer: N}: shuffle records in windows of N, files per epoch
    stopping_strategy: str = "first_exhausted"  # several sources: an epoch ends when the first / every one runs out
    tokenizer_engine: str = "auto"  # what encodes token ids: auto, tokenizers or tiktoken (_tasks.engines)
    mode: str = "train"  # eval: a complete pass, every record in one row of one rank (_complete)
    id_field: str | None = None  # eval: the records' field whose value each row carries as its id (_id)
    id_bytes: int = 64  # eval: room for an id's UTF-8 bytes in a row
    bucket_window: int = 0  # eval: sort rows by token length within windows of this many records (0: off)
    token_cache: dict[str, Any] | None = None  # {dir, max_gb}: where chunks' token ids are kept (_cache); None: off

    @property
    def complete_pass(self) -> bool:
        """Every record is kept, in exactly one row of one rank (``mode: eval``, see ``_complete``)."""
        return self.mode == "eval"

    @property
    def shuffle_buffer(self) -> int:
        return self.shuffle["buffer"] if self.shuffle else 0

    @property
    def global_ranks(self) -> int:
        return self.world_size * self.nnodes

    @property
    def dealt_ranks(self) -> int:
        """The ranks a chunk's batches are dealt to: every rank of every node, unless nodes split the files."""
        return self.global_ranks if self.node_sharding == "batches" else self.world_size

    @property
    def first_dealt_rank(self) -> int:
        """The index, among the dealt ranks, of this node's local rank 0."""
        return self.node_rank * self.world_size if self.node_sharding == "batches" else 0

    @property
    def dealing(self) -> Dealing:
        """How this node's chunks are dealt to ranks (``_types.Dealing``); a complete pass pads chunks."""
        return Dealing(self.dealt_ranks, self.first_dealt_rank, self.complete_pass)

    @property
    def chunk_size(self) -> int:
        """Bytes per chunk. By default it grows with the ranks: each chunk is cut to a multiple of
        one batch per rank, and larger chunks keep that cut a small share."""
        return self.chunk_bytes or DEFAULT_CHUNK_BYTES * min(self.dealt_ranks, MAX_CHUNK_SCALE)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sources"] = [{**source, "paths": list(source["paths"])} for source in data["sources"]]
        return data

    def replace(self, **changes: Any) -> Recipe:
        data = self.to_dict()
        changes = {k: v for k, v in changes.items() if v is not None}
        if "source" in changes:
            del data["sources"]
        data.update(changes)
        return parse_recipe(data)


_TOP_KEYS = {f for f in Recipe.__dataclass_fields__} | {"source"}
_SOURCE_KEYS = {f for f in Source.__dataclass_fields__}


def _declared_defaults(cls: type) -> dict[str, Any]:
    """Each field's default as the dataclass declares it: the parser fills omitted keys from here."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


_RECIPE_DEFAULTS = _declared_defaults(Recipe)
_SOURCE_DEFAULTS = _declared_defaults(Source)
# Recipe keys that are one scalar each: the type ``_typed`` checks (int also rules out bool).
_RECIPE_SCALARS: dict[str, type] = {
    "batch_size": int, "producers": int, "slots": int, "seed": int, "epochs": int, "skip_batches": int,
    "max_batches": int, "chunk_bytes": int, "on_bad_record": str, "max_record_bytes": int, "on_long_record": str,
    "max_restarts": int, "world_size": int, "nnodes": int, "node_rank": int, "node_sharding": str,
    "stopping_strategy": str, "tokenizer_engine": str, "mode": str, "id_field": str, "id_bytes": int,
    "bucket_window": int,
}


def as_recipe(recipe: str | os.PathLike[str] | dict[str, Any] | Recipe) -> Recipe:
    """A recipe given as a file, a mapping (relative paths taken from the current directory) or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, base_dir=Path.cwd())
    return load_recipe(recipe)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe file; relative paths in it are taken relative to the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    return parse_recipe(data, base_dir=path.resolve().parent, origin=str(path))


def parse_recipe(data: Any, base_dir: Path | None = None, origin: str = "recipe") -> Recipe:
    """Check a recipe given as a mapping (as ``load_recipe`` reads it) and resolve its paths."""
    from ._tasks import check_task_options, task_class
    from ._tasks.engines import ENGINES

    def fail(key: str, why: str) -> RecipeError:
        return RecipeError(f"{origin}: {key}: {why}")

    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping of keys, got {type(data).__name__}")
    _reject_unknown(data, _TOP_KEYS, "", origin)
    for required in ("name", "tokenizer", "task"):
        if required not in data:
            raise fail(required, "missing (required keys: name, source or sources, tokenizer, task)")

    sources = _parse_sources(data, base_dir, origin)
    task = data["task"]
    if not isinstance(task, dict) or "type" not in task:
        raise fail("task", "must be a mapping with at least `type` (e.g. {type: mlm, seq_len: 128})")
    task = check_task_options(dict(task), origin)
    if task_class(task["type"], origin).reads_labels:
        for i, source in enumerate(sources):
            if source.label_field is None:
                key = "source" if "source" in data else f"sources[{i}]"
                raise fail(f"{key}.label_field", f"task {task['type']} needs a label per record: name the field "
                                                 "(jsonl key or csv/tsv column) that holds it")

    name = data["name"]
    if not isinstance(name, str) or not name:
        raise fail("name", "must be a non-empty string")
    tokenizer = data["tokenizer"]
    if not isinstance(tokenizer, str) or not tokenizer:
        raise fail("tokenizer", "must be the path of a HuggingFace tokenizer.json")

    # A complete pass (mode: eval) ends: one epoch unless the recipe asks for more.
    defaults = {**_RECIPE_DEFAULTS, "epochs": 1 if data.get("mode") == "eval" else _RECIPE_DEFAULTS["epochs"]}
    recipe = Recipe(
        name=name,
        sources=sources,
        tokenizer=_resolve(tokenizer, base_dir),
        task=task,
        shuffle=_shuffle(data.get("shuffle"), origin),
        **{key: _typed(data, key, kind, defaults[key], origin) for key, kind in _RECIPE_SCALARS.items()},
        token_cache=_token_cache(data.get("token_cache", False), base_dir, origin),
    )
    checks = [
        (recipe.stopping_strategy in STOPPING_STRATEGIES, "stopping_strategy",
         f"must be {' or '.join(STOPPING_STRATEGIES)}"),
        (recipe.batch_size >= 1, "batch_size", "must be at least 1"),
        (1 <= recipe.producers <= MAX_LANES, "producers", f"must be 1..{MAX_LANES}"),
        (recipe.slots is None or MIN_SLOTS <= recipe.slots <= MAX_SLOTS, "slots",
         f"must be {MIN_SLOTS}..{MAX_SLOTS} per producer"),
        (recipe.seed >= 0, "seed", "must be a non-negative integer"),
        (recipe.epochs is None or recipe.epochs >= 1, "epochs", "must be at least 1 (omit it to repeat forever)"),
        (recipe.chunk_bytes is None or recipe.chunk_bytes >= MIN_CHUNK_BYTES, "chunk_bytes",
         f"must be at least {MIN_CHUNK_BYTES}"),
        (recipe.skip_batches >= 0, "skip_batches", "must be >= 0"),
        (recipe.max_batches is None or recipe.max_batches >= 1, "max_batches", "must be at least 1"),
        (recipe.on_bad_record in ("skip", "fail"), "on_bad_record", "must be skip or fail"),
        (recipe.max_record_bytes is None or recipe.max_record_bytes >= 1, "max_record_bytes",
         "must be a number of bytes >= 1 (omit it for no cap)"),
        (recipe.on_long_record in LONG_RECORD_POLICIES, "on_long_record", f"must be {', '.join(LONG_RECORD_POLICIES)}"),
        (recipe.on_long_record == "skip" or recipe.max_record_bytes is not None, "on_long_record",
         "applies to records longer than max_record_bytes, which is not set"),
        (recipe.max_restarts >= 0, "max_restarts", "must be >= 0"),
        (1 <= recipe.world_size <= MAX_RANKS, "world_size", f"must be 1..{MAX_RANKS} ranks per node"),
        (recipe.nnodes >= 1, "nnodes", "must be at least 1"),
        (0 <= recipe.node_rank < recipe.nnodes, "node_rank", f"must be 0..nnodes-1 ({recipe.nnodes - 1})"),
        (recipe.producers * recipe.world_size <= MAX_LANES, "producers",
         f"times world_size must be at most {MAX_LANES}"),
        (recipe.node_sharding in NODE_SHARDING, "node_sharding", f"must be {', '.join(NODE_SHARDING)}"),
        (recipe.tokenizer_engine in ENGINES, "tokenizer_engine", f"must be {', '.join(ENGINES)}"),
        (recipe.node_sharding == "batches" or recipe.epochs is None, "node_sharding",
         (f"{recipe.node_sharding} gives each node its own epoch length, and DDP hangs when one node's data "
          "ends first: use it only for an endless stream (no epochs), or use node_sharding: batches")),
    ]
    for ok, key, why in checks:
        if not ok:
            raise fail(key, f"{why}, got {getattr(recipe, key)!r}")
    from ._complete import check_complete_pass

    check_complete_pass(recipe, origin)
    return recipe


def _shuffle(value: Any, origin: str) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecipeError(f"{origin}: shuffle: must be a mapping like {{buffer: 10000}}, got {value!r}")
    _reject_unknown(value, {"buffer"}, "shuffle.", origin)
    buffer = value.get("buffer")
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise RecipeError(f"{origin}: shuffle.buffer: must be a number of records >= 1, got {buffer!r}")
    return {"buffer": buffer}


def _token_cache(value: Any, base_dir: Path | None, origin: str) -> dict[str, Any] | None:
    """``token_cache``: false (off), true (the default directory and size), or {dir, max_gb}."""
    from ._cache import DEFAULT_MAX_GB, default_cache_dir

    if value is False or value is None:
        return None
    settings = {"dir": str(default_cache_dir()), "max_gb": DEFAULT_MAX_GB}
    if value is True:
        return settings
    if not isinstance(value, dict):
        raise RecipeError(f"{origin}: token_cache: must be true, false or a mapping like {{dir: ..., max_gb: 20}}, "
                          f"got {value!r}")
    _reject_unknown(value, {"dir", "max_gb"}, "token_cache.", origin)
    directory = value.get("dir", settings["dir"])
    if not isinstance(directory, str) or not directory or "://" in directory:
        raise RecipeError(f"{origin}: token_cache.dir: must be a local directory, got {directory!r}")
    max_gb = value.get("max_gb", settings["max_gb"])
    if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not 0 < max_gb < float("inf"):
        raise RecipeError(f"{origin}: token_cache.max_gb: must be a positive number of GB, got {max_gb!r}")
    return {"dir": _resolve(directory, base_dir), "max_gb": float(max_gb)}


def _parse_sources(data: dict[str, Any], base_dir: Path | None, origin: str) -> tuple[Source, ...]:
    """``source:`` (one mapping) or ``sources:`` (a list of them, each with a ``weight``)."""
    if ("source" in data) == ("sources" in data):
        raise RecipeError(f"{origin}: give either source (one mapping) or sources (a list of mappings with weight)")
    if "source" in data:
        return (_parse_source(data["source"], "source", base_dir, origin),)
    listed = data["sources"]
    if not isinstance(listed, list) or not listed or len(listed) > MAX_SOURCES:
        raise RecipeError(f"{origin}: sources: must be a list of 1..{MAX_SOURCES} source mappings")
    return tuple(_parse_source(src, f"sources[{i}]", base_dir, origin) for i, src in enumerate(listed))


def _parse_source(src: Any, key: str, base_dir: Path | None, origin: str) -> Source:
    def fail(sub: str, why: str) -> RecipeError:
        return RecipeError(f"{origin}: {key}.{sub}: {why}")

    if not isinstance(src, dict):
        raise RecipeError(f"{origin}: {key}: must be a mapping with paths, format, field")
    _reject_unknown(src, _SOURCE_KEYS, f"{key}.", origin)
    paths = src.get("paths")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise fail("paths", "must be a non-empty list of file paths, globs or URLs")
    fmt = src.get("format", _SOURCE_DEFAULTS["format"])
    if fmt not in FORMATS:
        raise fail("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    prefix = f"{key}."
    field_name, pair_field, label_field = (_typed(src, key, str, _SOURCE_DEFAULTS[key], origin, prefix)
                                           for key in ("field", "pair_field", "label_field"))
    if fmt == "text" and (pair_field or label_field):
        raise fail("format", "text files hold bare lines: use jsonl, csv or tsv for pairs and labels")
    text_unit = _typed(src, "text_unit", str, _SOURCE_DEFAULTS["text_unit"], origin, prefix)
    if text_unit not in ("line", "paragraph"):
        raise fail("text_unit", f"must be line or paragraph, got {text_unit!r}")
    hooks = {hook: _typed(src, hook, str, _SOURCE_DEFAULTS[hook], origin, prefix) for hook in ("filter", "map")}
    for hook, spec in hooks.items():
        if spec is not None and not _HOOK.match(spec):
            raise fail(hook, f"must name a function as module:function, got {spec!r}")
    retries = _typed(src, "retries", int, _SOURCE_DEFAULTS["retries"], origin, prefix)
    if retries < 0:
        raise fail("retries", f"must be a number of reconnections >= 0, got {retries!r}")
    timeout = src.get("timeout", _SOURCE_DEFAULTS["timeout"])
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise fail("timeout", f"must be 0 < seconds <= {MAX_TIMEOUT_S}, got {timeout!r}")
    storage_options = src.get("storage_options") or {}
    if not isinstance(storage_options, dict):
        raise fail("storage_options", "must be a mapping")
    weight = src.get("weight", _SOURCE_DEFAULTS["weight"])
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
        raise fail("weight", f"must be a positive number (a share of the mixed stream), got {weight!r}")
    return Source(tuple(_resolve(p, base_dir) for p in paths), fmt, field_name, pair_field, label_field,
                  text_unit, hooks["filter"], hooks["map"], retries, float(timeout), storage_options, float(weight))


def _reject_unknown(data: dict[str, Any], known: set[str], prefix: str, origin: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(
            f"{origin}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + str(k) for k in unknown)} (known: {', '.join(sorted(prefix + k for k in known))})"
        )


def _typed(data: dict[str, Any], key: str, kind: type, default: Any, origin: str, prefix: str = "") -> Any:
    value = data.get(key, default)
    if value is None and default is None:
        return None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise RecipeError(f"{origin}: {prefix}{key}: must be {kind.__name__}, got {value!r}")
    return value


def _resolve(path: str, base_dir: Path | None) -> str:
    """Expand ``{assets}`` and ``~``; make relative local paths relative to the recipe file."""
    path = path.replace("{assets}", str(assets_dir()))
    if "://" in path:
        return path
    expanded = Path(os.path.expanduser(path))
    if not expanded.is_absolute() and base_dir is not None:
        expanded = base_dir / expanded
    return str(expanded)
