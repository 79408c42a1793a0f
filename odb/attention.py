"""Attention within each sample of a packed row, at the cost of the samples, not of the row.

A packed row holds several samples end to end; its position ids restart at 0 where a sample
starts. Derived from those restarts, a dense block-diagonal mask makes every kernel visit all
``row**2`` (query, key) pairs, masked or not. Here the row is cut at its sample boundaries
(``cu_seqlens``, as flash-attention's varlen kernels take them) and attention runs per sample,
so the work is ``sum(len_i**2)`` and nothing of size ``row**2`` is ever built::

    position ids   0 1 2 3 0 1 2 0 1      three samples, lengths 4, 3, 2
    cu_seqlens     [0, 4, 7, 9]

    dense mask (sdpa, eager)             here
    q\\k  a a a a b b b c c              a-block 4x4, b-block 3x3, c-block 2x2,
    a    1 . . . . . . . .               each one causal attention call
    a    1 1 . . . . . . .               (or one varlen kernel call on CUDA)
    ...  81 pairs computed               29 pairs computed

On CUDA in half or bfloat16 precision, torch's own varlen kernel
(``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10; flash-attention underneath) runs the
whole row in one call; elsewhere (CPU, float32, dropout) each sample is one
``scaled_dot_product_attention`` call. The functions here know no model: the transformers glue
is in ``odb.adapters.qwen_vl.attention``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable

import torch

from odb.errors import ConfigError

__all__ = ["packed_attention", "sequence_bounds"]

_VARLEN_DTYPES = (torch.float16, torch.bfloat16)


def sequence_bounds(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` (int32, ``[sequences + 1]``) of rows of position ids flattened end to end.

    A sequence starts at the first token of every row and wherever a position is not the
    previous one plus 1: the rule transformers derives its packed mask from
    (``find_packed_sequence_indices``), so both read a row the same way."""
    positions = position_ids.reshape(-1, position_ids.shape[-1])
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    first = starts.reshape(-1).nonzero().reshape(-1)
    total = first.new_tensor([positions.numel()])
    return torch.cat([first, total]).to(torch.int32)


@functools.cache
def _varlen_kernel() -> tuple[Callable, frozenset[str]] | None:
    """torch's varlen attention and its keyword arguments (they changed between releases:
    2.10 takes ``is_causal``, 2.11 ``window_size`` and ``scale``, 2.12 ``enable_gqa``)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _uses_varlen(query: torch.Tensor, dropout: float) -> bool:
    return (
        query.is_cuda
        and query.dtype in _VARLEN_DTYPES
        and dropout == 0.0
        and _varlen_kernel() is not None
    )


def _varlen(query, key, value, cu_seqlens, *, scale, causal) -> torch.Tensor:
    kernel, params = _varlen_kernel()
    kwargs = {}
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel scales by head_dim ** -0.5
            query = query * (scale * query.shape[-1] ** 0.5)
    if "is_causal" in params:
        kwargs["is_causal"] = causal
    else:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return kernel(query, key, value, cu_seqlens, cu_seqlens, longest, longest, **kwargs)


def _per_sample(query, key, value, cu_seqlens, *, scale, causal, dropout) -> torch.Tensor:
    gqa = query.shape[1] != key.shape[1]
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in itertools.pairwise(bounds):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=gqa
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, dim=0)


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of each sequence ``cu_seqlens[i]:cu_seqlens[i + 1]`` with itself only.

    ``query`` is ``[tokens, heads, head_dim]``, ``key`` and ``value`` ``[tokens, kv_heads,
    head_dim]`` (grouped-query attention when ``kv_heads < heads``); returns ``[tokens, heads,
    head_dim]``. ``scale`` defaults to ``head_dim ** -0.5``; ``dropout`` applies to the
    attention weights (it rules out the varlen kernel, which has none)."""
    if query.shape[1] % key.shape[1]:
        raise ConfigError(
            f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads"
        )
    if _uses_varlen(query, dropout):
        return _varlen(query, key, value, cu_seqlens, scale=scale, causal=causal)
    return _per_sample(query, key, value, cu_seqlens, scale=scale, causal=causal, dropout=dropout)
