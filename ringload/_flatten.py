"""A packed batch in the padding-free form transformers' flash-attention path takes.

The tasks write document boundaries per batch (``_tasks.base.segment_fields``): ``position_ids``
restarting per segment, and ``cu_seqlens``/``max_seqlen`` for the batch flattened to ``B * L``
tokens. ``flatten_packed`` hands them over under the names and shapes that
``transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` produces, so
``model(**flatten_packed(batch))`` runs flash-attention's varlen kernels with no attention
across documents. This module imports nothing heavy: it only reshapes and slices the batch's
tensors (or numpy arrays).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FLATTENED = ("input_ids", "labels", "position_ids", "token_type_ids")
NEEDED = ("position_ids", "cu_seqlens", "max_seqlen")


def flatten_packed(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` as one sequence of ``B * L`` tokens with its segment boundaries.

    Returns ``input_ids``, ``labels``, ``position_ids`` (and ``token_type_ids``) reshaped to
    ``[1, B * L]`` (views); ``cu_seq_lens_q`` = ``cu_seq_lens_k``, the batch's ``cu_seqlens``
    without the zero-length padding (int32, segments + 1 entries); ``max_length_q`` =
    ``max_length_k``, the longest segment, as a Python int. No ``attention_mask``: given one,
    transformers unpads by it and ignores the boundaries (a row's padding is a segment of its
    own, with labels -100). Reading the segment count and the maximum waits for the device
    when the batch is on a GPU.

    Needs a recipe with ``task: {document_mask: true, cu_seqlens: true}``.
    """
    missing = [key for key in NEEDED if key not in batch]
    if missing:
        raise ValueError(f"flatten_packed: the batch has no {', '.join(missing)}; start the ring with "
                         "task: {document_mask: true, cu_seqlens: true} (clm or mlm)")
    offsets = batch["cu_seqlens"].reshape(-1)
    segments = int((offsets[1:] != offsets[:-1]).sum())  # the padding repeats the last offset
    offsets = offsets[:segments + 1]
    longest = int(batch["max_seqlen"].max())
    flat = {key: batch[key].reshape(1, -1) for key in FLATTENED if key in batch}
    return {**flat, "cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets, "max_length_q": longest,
            "max_length_k": longest}
