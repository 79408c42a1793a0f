"""odb.attention: attention within each sample of a packed row equals a dense block mask."""

import pytest
import torch

import odb
from odb import attention


def _block_mask(lengths: list[int], causal: bool) -> torch.Tensor:
    """The dense row-by-row mask transformers builds for a packed row, written out by hand."""
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for length in lengths:
        block = torch.ones(length, length, dtype=torch.bool)
        mask[start : start + length, start : start + length] = block.tril() if causal else block
        start += length
    return mask


def _dense(query, key, value, lengths, *, causal, scale=None):
    """Reference: one masked attention over the whole row, keys repeated for every head."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scores = torch.einsum("qhd,khd->hqk", query, key) * (scale or query.shape[-1] ** -0.5)
    scores = scores.masked_fill(~_block_mask(lengths, causal), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), value)


def _qkv(total: int, heads: int, kv_heads: int, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(total, heads, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(total, kv_heads, dim, generator=generator, dtype=torch.float64)
    value = torch.randn(total, kv_heads, dim, generator=generator, dtype=torch.float64)
    return query, key, value


def test_sequence_bounds_cut_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    assert attention.sequence_bounds(positions).tolist() == [0, 4, 7, 9]
    # every row starts a sequence, even one whose positions do not start at 0
    rows = torch.tensor([[0, 1, 2, 0], [5, 6, 0, 1]])
    assert attention.sequence_bounds(rows).tolist() == [0, 3, 4, 6, 8]
    assert attention.sequence_bounds(torch.arange(5)).tolist() == [0, 5]
    assert attention.sequence_bounds(torch.arange(5)).dtype == torch.int32


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_packed_attention_equals_a_dense_block_mask(causal, heads, kv_heads):
    lengths = [5, 1, 9, 3]
    query, key, value = _qkv(sum(lengths), heads, kv_heads)
    bounds = torch.tensor([0, 5, 6, 15, 18])
    out = attention.packed_attention(query, key, value, bounds, causal=causal)
    torch.testing.assert_close(out, _dense(query, key, value, lengths, causal=causal))
    scaled = attention.packed_attention(query, key, value, bounds, causal=causal, scale=0.1)
    expected = _dense(query, key, value, lengths, causal=causal, scale=0.1)
    torch.testing.assert_close(scaled, expected)


def test_gradients_flow_to_every_sample():
    lengths = [3, 4]
    query, key, value = (t.requires_grad_() for t in _qkv(7, 2, 1))
    attention.packed_attention(query, key, value, torch.tensor([0, 3, 7])).sum().backward()
    reference = [t.detach().clone().requires_grad_() for t in (query, key, value)]
    _dense(*reference, lengths, causal=True).sum().backward()
    for mine, theirs in zip((query, key, value), reference, strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_heads_must_group_evenly():
    query, key, value = _qkv(4, 3, 2)
    with pytest.raises(odb.ConfigError, match="3 query heads"):
        attention.packed_attention(query, key, value, torch.tensor([0, 4]))


def _fake_varlen(version: str):
    """torch's varlen_attn with the keyword arguments of one release, computed with sdpa per
    sequence, to check how odb adapts its call to each signature."""
    calls = []

    def run(query, key, value, cu_q, cu_k, max_q, max_k, **kwargs):
        calls.append(kwargs)
        causal = kwargs.get("is_causal", kwargs.get("window_size") == (-1, 0))
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        gqa = kwargs.get("enable_gqa", False)
        assert gqa or key.shape[1] == query.shape[1], "2.10/2.11 need the key heads repeated"
        return attention._per_sample(
            query, key, value, cu_q, scale=kwargs.get("scale"), causal=causal, dropout=0.0
        )

    params = {
        "2.10": {"is_causal", "return_aux"},
        "2.11": {"return_aux", "scale", "window_size"},
        "2.14": {"return_aux", "scale", "window_size", "enable_gqa"},
    }[version]
    return run, frozenset(params), calls


@pytest.mark.parametrize("version", ["2.10", "2.11", "2.14"])
def test_the_varlen_call_fits_each_torch_release(version, monkeypatch):
    kernel, params, calls = _fake_varlen(version)
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (kernel, params))
    lengths = [4, 2, 6]
    query, key, value = _qkv(12, 4, 2)
    bounds = torch.tensor([0, 4, 6, 12])
    out = attention._varlen(query, key, value, bounds, scale=0.3, causal=True)
    torch.testing.assert_close(out, _dense(query, key, value, lengths, causal=True, scale=0.3))
    full = attention._varlen(query, key, value, bounds, scale=None, causal=False)
    torch.testing.assert_close(full, _dense(query, key, value, lengths, causal=False))
    assert len(calls) == 2


def test_the_varlen_kernel_is_for_cuda_half_precision_without_dropout():
    query = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    assert not attention._uses_varlen(query, 0.0)  # CPU: one sdpa call per sample
    if torch.cuda.is_available():
        assert attention._uses_varlen(query.cuda(), 0.0) == (attention._varlen_kernel() is not None)
        assert not attention._uses_varlen(query.cuda(), 0.1)
        assert not attention._uses_varlen(query.float().cuda(), 0.0)
