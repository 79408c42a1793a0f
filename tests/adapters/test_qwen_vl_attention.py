"""attn_implementation="odb_packed": packed rows train like padded batches, without a dense
row-by-row mask, and are priced by what the kernel computes."""

import warnings

import pytest
import qwen_vl_tiny
import test_qwen_vl_packing
import torch
import transformers
from test_qwen_vl_packing import MANY_AND_TEXT, _assert_same, _run, _samples, _text_config

import odb
from odb.adapters import qwen_vl
from odb.adapters.qwen_vl import attention as kernel

folder = test_qwen_vl_packing.folder  # the packing tests' images, as a fixture here too


@pytest.fixture
def spy(monkeypatch):
    """Counts the kernel's per-sample calls and every dense mask sdpa's mask function builds."""
    calls = {"packed": 0, "sdpa_mask": 0}
    packed, sdpa_mask = kernel.packed_attention, transformers.masking_utils.sdpa_mask

    def count_packed(*args, **kwargs):
        calls["packed"] += 1
        return packed(*args, **kwargs)

    def count_mask(*args, **kwargs):
        calls["sdpa_mask"] += 1
        return sdpa_mask(*args, **kwargs)

    monkeypatch.setattr(kernel, "packed_attention", count_packed)
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", count_mask)
    return calls


def _text_model(model_type: str):
    config = _text_config(model_type)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).train()


def _text_samples():
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in (13, 4, 9, 1):
        ids = torch.randint(0, 97, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 2] = -100
        samples.append({"input_ids": ids, "labels": labels})
    return samples


@pytest.mark.slow
@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_packed_rows_through_the_kernel_train_like_padded_batches(
    family, small_tokenizer, folder, spy
):
    samples = _samples(family, small_tokenizer, folder, MANY_AND_TEXT)
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer).train()
    padded = qwen_vl.collator(model, "padded")(samples)
    expected = _run(model, padded)  # sdpa
    assert qwen_vl.use_packed_attention(model) is model
    assert model.config.text_config._attn_implementation == "odb_packed"
    assert model.config.vision_config._attn_implementation == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense-mask warning for this kernel
        packed = qwen_vl.collator(model, "packed")(samples)
    _assert_same(expected, _run(model, packed))
    layers = model.config.text_config.num_hidden_layers
    assert spy == {"packed": layers, "sdpa_mask": 0}  # per sample, and no row-by-row mask
    _assert_same(expected, _run(model, padded))  # a padded batch: sdpa with sdpa's mask
    assert spy == {"packed": layers, "sdpa_mask": 1}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_text_models_pack_through_the_kernel(model_type, spy):
    model = _text_model(model_type)
    samples = _text_samples()
    padded = qwen_vl.collator(model, "padded")(samples)
    expected = _run(model, padded)
    with torch.no_grad():
        sdpa_logits = model(**padded).logits
    qwen_vl.use_packed_attention(model)
    assert model.config._attn_implementation == "odb_packed"
    with torch.no_grad():  # padding positions too: sdpa's own mask, not a plain causal one
        assert torch.equal(model(**padded).logits, sdpa_logits)
    spy["sdpa_mask"] = 0
    for flash_kwargs in (False, True):  # boundaries from the positions, or from cu_seq_lens_q
        packed = qwen_vl.collator(model, "packed", flash_attn_kwargs=flash_kwargs)(samples)
        _assert_same(expected, _run(model, {**packed, "use_cache": False}))
    assert spy == {"packed": 2 * model.config.num_hidden_layers, "sdpa_mask": 0}  # two rows


@pytest.mark.slow
def test_a_sample_never_sees_another(small_tokenizer, folder):
    """Changing the text of the row's middle sample leaves every logit of the samples before
    and after it bit-identical."""
    samples = _samples("qwen2_5_vl", small_tokenizer, folder, MANY_AND_TEXT[:3])
    model = qwen_vl.use_packed_attention(qwen_vl_tiny.tiny_model("qwen2_5_vl", small_tokenizer))
    collate = qwen_vl.collator(model, "packed")
    changed = dict(samples[1])  # the six-image sample: new text, the same images
    text = changed["mm_token_type_ids"] == 0
    changed["input_ids"] = torch.where(text, changed["input_ids"] // 2, changed["input_ids"])
    start = len(samples[0]["input_ids"])
    end = start + len(samples[1]["input_ids"])
    with torch.no_grad():
        before = model(**collate(samples)).logits[0]
        after = model(**collate([samples[0], changed, samples[2]])).logits[0]
    assert not torch.equal(before[start:end], after[start:end])
    assert torch.equal(before[:start], after[:start])
    assert torch.equal(before[end:], after[end:])


@pytest.mark.slow
def test_the_vision_tower_runs_under_the_kernels_name_too(small_tokenizer, folder):
    """Set for the whole model, the name reaches the vision tower, which calls it per image
    without positions or a mask: bidirectional sdpa, as before."""
    samples = _samples("qwen2_5_vl", small_tokenizer, folder, MANY_AND_TEXT)
    model = qwen_vl_tiny.tiny_model("qwen2_5_vl", small_tokenizer).train()
    expected = _run(model, qwen_vl.collator(model, "padded")(samples))
    model.set_attn_implementation(qwen_vl.register())
    assert model.config.vision_config._attn_implementation == "odb_packed"
    _assert_same(expected, _run(model, qwen_vl.collator(model, "packed")(samples)))


def test_generation_with_a_cache_is_sdpas():
    """Decoding (one query against the cache's keys) and left-padded prompts take sdpa's own
    masks: greedy generation is token for token sdpa's."""
    model = _text_model("qwen2").eval()
    prompts = torch.tensor([[0, 0, 5, 9, 13], [3, 8, 21, 34, 55]])
    mask = (prompts != 0).long()
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(prompts, attention_mask=mask, **settings)
    qwen_vl.use_packed_attention(model)
    assert torch.equal(model.generate(prompts, attention_mask=mask, **settings), expected)
    # transformers releases that pass cache_position instead of q_length
    assert kernel.packed_attention_mask(cache_position=torch.arange(4), kv_length=4) is None


def test_the_kernel_follows_the_layers_causality():
    """A bidirectional layer (``is_causal=False``, as an encoder's) attends both ways, still
    within each sample only; an ``is_causal`` argument overrides the layer's."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 5, 4, generator=generator) for _ in range(3))
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    layer = torch.nn.Module()
    for causal in (True, False):
        layer.is_causal = causal
        expected = torch.cat(
            [
                torch.nn.functional.scaled_dot_product_attention(
                    query[:, :, part], key[:, :, part], value[:, :, part], is_causal=causal
                )
                for part in (slice(0, 3), slice(3, 5))
            ],
            dim=2,
        ).transpose(1, 2)
        out, _ = kernel.packed_attention_forward(
            layer, query, key, value, None, position_ids=positions
        )
        torch.testing.assert_close(out, expected)
        layer.is_causal = not causal
        out, _ = kernel.packed_attention_forward(
            layer, query, key, value, None, position_ids=positions, is_causal=causal
        )
        torch.testing.assert_close(out, expected)


def test_sliding_windows_are_refused():
    config = transformers.Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    model = transformers.Qwen2ForCausalLM(config)
    with pytest.raises(odb.ConfigError, match="sliding-window layers"):
        qwen_vl.use_packed_attention(model)
    query = torch.zeros(1, 2, 3, 4)
    with pytest.raises(odb.ConfigError, match="window of 8"):
        kernel.packed_attention_forward(None, query, query, query, None, sliding_window=8)
    with pytest.raises(odb.ConfigError, match="transformers model"):
        qwen_vl.use_packed_attention(torch.nn.Linear(2, 2))


def test_dense_kernels_warn_and_are_priced_by_the_square_of_the_row(small_tokenizer):
    """One packed row of 30 + 50 tokens: 80**2 = 6400 (query, key) pairs through sdpa's mask,
    30**2 + 50**2 = 3400 through a varlen kernel; each pair costs ``attention / 2`` FLOPs
    (causal) in units of ``token`` FLOPs."""
    model = qwen_vl_tiny.tiny_model("qwen2_5_vl", small_tokenizer, dtype=torch.float32)
    flops = qwen_vl.model_flops(model.config)
    pair = flops.attention / 2 / flops.token
    group = (2, 50, 80, 30**2 + 50**2, 0)
    dense, varlen = 80 + pair * 80**2, 80 + pair * (30**2 + 50**2)
    with pytest.warns(UserWarning, match="use_packed_attention"):
        qwen_vl.collator(model, "packed")
    assert float(qwen_vl.compute_cost(model, "packed").group_cost(*group)) == pytest.approx(dense)
    for name in ("flash_attention_2", "flex_attention", "odb_packed"):
        cost = qwen_vl.compute_cost(model, "packed", attention=name)
        assert float(cost.group_cost(*group)) == pytest.approx(varlen)
    # padded batches are priced n * max_len**2 whatever the kernel
    padded = qwen_vl.compute_cost(model, "padded")
    assert float(padded.group_cost(*group)) == pytest.approx(100 + pair * 2 * 50**2)
    qwen_vl.use_packed_attention(model)
    assert float(qwen_vl.compute_cost(model, "packed").group_cost(*group)) == pytest.approx(varlen)
    assert qwen_vl.compute_budget(model, 2048, "packed", attention="sdpa").cost.dense_mask
    assert not qwen_vl.compute_budget(model, 2048, "packed").cost.dense_mask
    config = qwen_vl_tiny.tiny_config("qwen2_5_vl", small_tokenizer)  # no implementation: sdpa
    assert config.text_config._attn_implementation is None
    assert qwen_vl.compute_cost(config, "packed").dense_mask


def test_the_loader_plans_dense_rows_by_their_square():
    """Two samples of 60 tokens: 2 * 60**2 pairs apart (varlen), 120**2 in one dense row; a
    limit between the two prices pairs them only under a varlen kernel."""
    model = _text_model("qwen2")
    samples = [{"input_ids": torch.arange(60), "labels": torch.arange(60)}] * 4
    weight = qwen_vl.compute_cost(model, "packed").attention_weight
    limit = 120 + weight * 1.5 * 2 * 60**2
    rows = {}
    for attention in ("sdpa", "odb_packed"):
        cost = qwen_vl.compute_cost(model, "packed", attention=attention)
        loader = odb.DataLoader(samples, limit, mode="packed", cost=cost)
        rows[attention] = [len(odb.step_info(batch).sample_indices) for batch in loader]
    assert rows == {"sdpa": [1, 1, 1, 1], "odb_packed": [2, 2]}
