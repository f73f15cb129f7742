"""Tasks: turning a chunk's records into training batches, written straight into ring slots.

A task declares the fields of its batches (``Task.fields``) and, for one chunk, yields
``PendingBatch`` objects in order. Tokenization happens while the generator advances; the
producer claims a slot only once a batch is ready and then calls ``write`` with the slot's
arrays, so a batch goes from the tokenizer's output into shared memory with no copy in between.

Randomness (masking) is drawn from ``numpy.random.default_rng((seed, chunk, index))``: a pure
function of the recipe's seed and the batch's place in the stream, never of which producer ran it.

Dtypes in the ring are what the standard models accept without a cast, so CPU batches can be
zero-copy views: ``input_ids``/``token_type_ids``/``position_ids`` int32 (embeddings take int32),
``attention_mask`` int8, ``labels`` int64 (cross-entropy wants int64 targets) or float32 (multi-hot).
"""

from __future__ import annotations

import importlib
from typing import Any

from .._errors import RecipeError
from .base import PendingBatch, Task, TokenizerInfo
from .classify import Classify, MultiLabel
from .clm import CausalLM
from .encode import Encode
from .mlm import MaskedLM

TASKS: dict[str, type[Task]] = {"mlm": MaskedLM, "clm": CausalLM, "classify": Classify, "multilabel": MultiLabel,
                             "encode": Encode}

__all__ = ["TASKS", "CausalLM", "Classify", "Encode", "MaskedLM", "MultiLabel", "PendingBatch", "Task",
           "TokenizerInfo", "build_task", "check_task_options", "task_class"]


def task_class(type_name: str, origin: str = "recipe") -> type[Task]:
    """A built-in task by name, or a custom one by ``module:Class`` (imported, must subclass Task)."""
    if type_name in TASKS:
        return TASKS[type_name]
    if ":" not in type_name:
        raise RecipeError(f"{origin}: task.type: unknown task {type_name!r} "
                          f"(built in: {', '.join(TASKS)}; a custom task is named module:Class)")
    module_name, _, class_name = type_name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"{origin}: task.type: cannot import {type_name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise RecipeError(f"{origin}: task.type: {type_name!r} is not a subclass of ringload.Task")
    return cls


def check_task_options(task: dict[str, Any], origin: str) -> dict[str, Any]:
    """Fill defaults and check the task's options; unknown options are an error naming them."""
    type_name = task.pop("type")
    if not isinstance(type_name, str):
        raise RecipeError(f"{origin}: task.type: must be a task name or module:Class, got {type_name!r}")
    cls = task_class(type_name, origin)
    unknown = sorted(set(task) - set(cls.options))
    if unknown:
        raise RecipeError(f"{origin}: unknown task option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join('task.' + k for k in unknown)} for type {type_name} "
                          f"(known: {', '.join(sorted(cls.options))})")
    checked: dict[str, Any] = {"type": type_name}
    for key, default in cls.options.items():
        value = task.get(key, default)
        if type(default) is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise RecipeError(f"{origin}: task.{key}: must be {type(default).__name__}, got {value!r}")
        checked[key] = value
    if "seq_len" in checked and not 8 <= checked["seq_len"] <= 65536:
        raise RecipeError(f"{origin}: task.seq_len: must be 8..65536, got {checked['seq_len']}")
    for role, token in checked.get("special_tokens", {}).items():
        if role not in TokenizerInfo.ROLES or not isinstance(token, str):
            raise RecipeError(f"{origin}: task.special_tokens: {role!r}: {token!r} must map one of "
                              f"{', '.join(TokenizerInfo.ROLES)} to a token string")
    cls.check_options(checked, origin)
    return checked


def build_task(task: dict[str, Any], tokenizer_path: str, batch_size: int, seed: int,
               engine: str = "auto") -> Task:
    """Instantiate the recipe's task with its tokenizer (encoding ids with ``engine``, the recipe's
    ``tokenizer_engine``); options it leaves out take the task's defaults."""
    cls = task_class(task["type"])
    options = {**cls.options, **{k: v for k, v in task.items() if k != "type"}}
    tokenizer = TokenizerInfo(tokenizer_path, options.get("special_tokens"), engine)
    return cls(options, tokenizer, batch_size, seed)
