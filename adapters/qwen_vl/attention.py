"""``attn_implementation="odb_packed"``: packed rows without cross-sample attention, and
without the dense row-by-row mask that sdpa and eager attention build for them.

The model layer, through transformers' public registries: :func:`register` adds the kernel to
``AttentionInterface`` and its mask function to ``AttentionMaskInterface``;
:func:`use_packed_attention` registers it and selects it for a model's language model (a
Qwen-VL vision tower keeps its own implementation: it attends within images through its own
``cu_seqlens``).

What the kernel receives from a Qwen2 / Qwen3 / Qwen2-VL / Qwen2.5-VL / Qwen3-VL text attention
layer (transformers 5.x): the query, key and value states ``[batch, heads, len, head_dim]``,
the mask its mask function returned, and ``position_ids``: the text positions, row 0 of a
Qwen-VL packed row's ``[4, 1, L]`` positions (the models pass them on "for FA2"), from which it
reads the sample boundaries (:func:`odb.attention.sequence_bounds`), or ``cu_seq_lens_q`` when
a text collator added them. Three cases:

- a padded batch (attention mask given): the mask function returns sdpa's mask and the kernel
  is transformers' sdpa, unchanged, so the implementation can stay set for every batch;
- no mask and rows holding several samples: :func:`odb.attention.packed_attention`, causal
  within each sample (torch's varlen kernel on CUDA in half precision, one sdpa call per sample
  otherwise);
- no mask and one sequence per row (generation, an unpacked batch): sdpa, causal.
"""

from __future__ import annotations

from typing import Any

import torch

from odb.adapters.qwen_vl.config import _config_of, _text_config
from odb.attention import packed_attention, sequence_bounds
from odb.errors import ConfigError

PACKED_ATTENTION = "odb_packed"
"""The name the kernel is registered under, for ``attn_implementation=``."""

DENSE_MASK_ATTENTION = ("sdpa", "eager")
"""transformers' implementations that get a packed row's samples as a dense ``row x row``
block-diagonal mask: their attention costs ``row**2`` pairs, where a varlen kernel
(``odb_packed``, flash-attention, flex) costs ``sum(len_i**2)``."""


def builds_dense_mask(attn_implementation: str | None) -> bool:
    """Whether a model running ``attn_implementation`` computes packed rows through a dense
    mask; a config that names none runs transformers' default, sdpa."""
    return (attn_implementation or "sdpa") in DENSE_MASK_ATTENTION


def _sdpa(*args: Any, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(*args, **kwargs)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: attention within each sample of packed rows, sdpa
    for everything else (see the module docstring)."""
    if sliding_window is not None:
        raise ConfigError(
            f"attn_implementation={PACKED_ATTENTION!r} has no sliding-window attention, and "
            f"this layer attends within a window of {sliding_window}; disable "
            f"use_sliding_window or use flash_attention_2"
        )
    batch, heads, length, head_dim = query.shape
    bounds = None
    if attention_mask is None and key.shape[2] == length:
        if cu_seq_lens_q is not None:
            bounds = cu_seq_lens_q
        elif position_ids is not None:
            bounds = sequence_bounds(position_ids.expand(batch, length))
    if bounds is None or len(bounds) - 1 <= batch:  # one sequence per row: nothing to cut
        return _sdpa(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = packed_attention(
        query.transpose(1, 2).reshape(batch * length, heads, head_dim),
        *(t.transpose(1, 2).reshape(batch * length, -1, head_dim) for t in (key, value)),
        bounds,
        scale=scaling,
        causal=causal,
        dropout=dropout,
    )
    return out.reshape(batch, length, heads, head_dim), None


def packed_attention_mask(**kwargs: Any) -> torch.Tensor | None:
    """An ``AttentionMaskInterface`` function: no mask where the kernel reads the rows'
    sequences from their positions (no padding mask, queries and keys of one length), so
    nothing of size ``row x row`` is built; sdpa's mask otherwise (padded batches, decoding
    with a cache). transformers calls it with keywords only: ``q_length`` (5.x), or
    ``cache_position`` in releases that had no ``q_length``."""
    queries = kwargs["q_length"] if "q_length" in kwargs else len(kwargs["cache_position"])
    if kwargs.get("attention_mask") is None and queries == kwargs["kv_length"]:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(**kwargs)


def register() -> str:
    """Register the kernel and its mask function with transformers (idempotent); returns the
    name to pass as ``attn_implementation`` (``from_pretrained``, ``set_attn_implementation``
    or a config's ``attn_implementation``)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_attention_mask)
    return PACKED_ATTENTION


def _pretrained(model: Any) -> Any:
    """The transformers model inside DDP-style ``.module`` wrappers."""
    found = model
    while not hasattr(found, "set_attn_implementation") and hasattr(found, "module"):
        found = found.module
    if not hasattr(found, "set_attn_implementation"):
        raise ConfigError(f"expected a transformers model, got {type(model).__name__}")
    return found


def use_packed_attention(model: Any) -> Any:
    """Register :data:`PACKED_ATTENTION` and select it for ``model``'s language model, in
    place; returns ``model``. A Qwen-VL vision tower keeps its implementation.

    Sliding-window attention is refused: the kernel attends over whole samples."""
    pretrained = _pretrained(model)
    config = _config_of(pretrained)
    text = _text_config(config)
    if getattr(text, "use_sliding_window", False) and "sliding_attention" in (
        getattr(text, "layer_types", None) or ()
    ):
        raise ConfigError(
            f"{config.model_type} has sliding-window layers (use_sliding_window=True, "
            f"max_window_layers={getattr(text, 'max_window_layers', None)}); "
            f"attn_implementation={PACKED_ATTENTION!r} attends over whole samples: turn the "
            f"window off in the config or use flash_attention_2"
        )
    name = register()
    if text is config:
        pretrained.set_attn_implementation(name)
    else:
        key = next(key for key in config.sub_configs if getattr(config, key) is text)
        pretrained.set_attn_implementation({key: name})
    if text._attn_implementation != name:  # a transformers without per-sub-config choice
        raise ConfigError(
            f"set_attn_implementation left the language model on "
            f"{text._attn_implementation!r}; load the model with "
            f"attn_implementation=qwen_vl.register() instead"
        )
    return model
