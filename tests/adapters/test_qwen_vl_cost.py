"""compute_cost / model_flops: the counted FLOPs are those torch's flop counter measures."""

import pytest
import qwen_vl_tiny
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import odb
from odb.adapters import qwen_vl


def _measured(function) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        function()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
def test_model_flops_match_the_flop_counter(family, small_tokenizer):
    # eager attention: its matmuls are counted (the CPU sdpa kernel is not, in torch 2.14)
    model = qwen_vl_tiny.tiny_model(
        family, small_tokenizer, dtype=torch.float32, attn="eager"
    ).eval()
    flops = qwen_vl.model_flops(model.config)
    for length in (7, 40):
        ids = torch.randint(0, 1000, (1, length))
        measured = _measured(lambda ids=ids: model(input_ids=ids, use_cache=False))
        # the kernel computes the full square of scores; causal kernels skip half of it
        assert measured == pytest.approx(flops.token * length + flops.attention * length**2)
    patch = model.config.vision_config.patch_size
    for rows, cols in ((8, 8), (8, 16)):  # whole windows for Qwen2.5-VL's 4x4-patch windows
        grid = torch.tensor([[1, rows, cols]])
        pixels = torch.randn(rows * cols, 3 * 2 * patch * patch)
        measured = _measured(lambda p=pixels, g=grid: model.model.visual(p, grid_thw=g))
        patches = rows * cols
        expected = patches * (flops.patch + flops.patch_attention(patches))
        assert measured == pytest.approx(expected)


def test_compute_cost_prices_attention_and_vision_in_token_units(small_tokenizer):
    config = qwen_vl_tiny.tiny_config("qwen2_vl", small_tokenizer)
    flops = qwen_vl.model_flops(config)
    packed = qwen_vl.compute_cost(config, "packed")
    assert isinstance(packed, odb.ComputeCost) and not packed.padded
    assert packed.attention_weight == pytest.approx(flops.attention / 2 / flops.token)
    assert packed.vision_weight == pytest.approx(flops.patch / flops.token)
    pair = flops.vision_attention_pair * flops.vision_full_layers / flops.token
    assert packed.vision_attention_weight == pytest.approx(pair)
    full = qwen_vl.compute_cost(config, "padded", causal=False)
    assert full.padded and full.attention_weight == pytest.approx(2 * packed.attention_weight)
    # one 100-token sample: its tokens, its attention, and two images of 100 and 300 patches:
    # the vision tower's attention grows with each image's own patch count
    expected = (
        100
        + packed.attention_weight * 100**2
        + packed.vision_weight * 400
        + packed.vision_attention_weight * (100**2 + 300**2)
    )
    pairs = 100**2 + 300**2
    assert float(packed.sample_cost([100], [400], [pairs])[0]) == pytest.approx(expected)
    # the cost of a whole image is what the flop count of its tower says
    for patches in (64, 256):
        image = packed.sample_cost([1], [patches], [patches**2])[0] - packed.sample_cost([1], [0])
        measured = patches * (flops.patch + flops.patch_attention(patches)) / flops.token
        assert float(image[0]) == pytest.approx(measured)


def test_window_layers_are_priced_per_patch(small_tokenizer):
    config = qwen_vl_tiny.tiny_config("qwen2_5_vl", small_tokenizer)
    flops = qwen_vl.model_flops(config)
    cost = qwen_vl.compute_cost(config, "packed")
    assert flops.vision_window_layers > 0
    window = flops.vision_attention_pair * flops.vision_window_layers
    expected = (flops.patch + window * flops.vision_window_patches) / flops.token
    assert cost.vision_weight == pytest.approx(expected)
    # an image of whole windows: what the flop count says
    patches = 4 * flops.vision_window_patches
    image = cost.sample_cost([1], [patches], [patches**2]) - cost.sample_cost([1], [0])
    measured = patches * (flops.patch + flops.patch_attention(patches)) / flops.token
    assert float(image[0]) == pytest.approx(measured)


def test_text_models_have_no_vision_term():
    config = transformers.Qwen3Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    cost = qwen_vl.compute_cost(config, "packed")
    assert cost.vision_weight == 0 and cost.attention_weight > 0
    flops = qwen_vl.model_flops(config)
    # q, o: 64x128; k, v: 64x64; gated MLP 3 x 64x128; LM head 64x1000; 2 layers
    per_layer = 2 * 64 * 128 + 2 * 64 * 64 + 3 * 64 * 128
    assert flops.token == 2 * (2 * per_layer + 64 * 1000)
    assert flops.attention == 4 * 2 * 4 * 32


def test_the_loader_takes_the_cost(small_tokenizer):
    config = qwen_vl_tiny.tiny_config("qwen3_vl", small_tokenizer)
    cost = qwen_vl.compute_cost(config, "packed")
    lengths = [30, 50, 70, 20]
    samples = [{"input_ids": torch.arange(n), "labels": torch.arange(n)} for n in lengths]
    loader = odb.DataLoader(samples, 120, mode="packed", cost=cost)
    for batch in loader:
        info = odb.step_info(batch)
        group = [lengths[i] for i in info.sample_indices]
        assert sum(group) + cost.attention_weight * sum(n * n for n in group) <= 120
    with pytest.raises(odb.ConfigError):
        qwen_vl.compute_cost(config, "ragged")


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_a_mixture_of_experts_token_costs_the_experts_it_is_routed_to(family):
    # layers 0 and 2 sparse (4 experts, 2 per token), layer 1 dense; Qwen2-MoE adds a shared
    # expert with its gate
    settings = {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "mlp_only_layers": [1],
    }
    if family == "qwen2_moe":
        settings["shared_expert_intermediate_size"] = 48
    config = transformers.AutoConfig.for_model(family, **settings)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    flops = qwen_vl.model_flops(config)
    for length in (7, 40):
        ids = torch.randint(0, 300, (1, length))
        measured = _measured(lambda ids=ids: model(input_ids=ids, use_cache=False))
        assert measured == pytest.approx(flops.token * length + flops.attention * length**2)
