"""measure_cost: the timed weights, the batches it times, and the same weights on every rank."""

import dataclasses
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import qwen_vl_tiny
import torch
from tiny import torchrun

import odb
from odb.adapters import qwen_vl
from odb.adapters.qwen_vl.measure import batch_terms, fit_cost, timing_batches
from odb.errors import ConfigError
from odb.planner import shared_group

WORKER = Path(__file__).with_name("measure_worker.py")


def _terms(family, mode, max_tokens, longest=None):
    config = qwen_vl_tiny.tiny_config(family, qwen_vl_tiny.small_tokenizer())
    shape = qwen_vl.compute_cost(config, mode)
    batches = timing_batches(config, mode, max_tokens, longest)
    return config, batches, np.array([batch_terms(b, shape) for b in batches])


@pytest.mark.parametrize("family", qwen_vl_tiny.FAMILIES)
@pytest.mark.parametrize("mode", ["padded", "packed"])
@pytest.mark.parametrize(
    ("max_tokens", "longest"), [(256, None), (1024, None), (8192, 2048), (16384, None)]
)
def test_the_timed_batches_stay_within_the_cap_and_separate_every_term(
    family, mode, max_tokens, longest
):
    config, batches, terms = _terms(family, mode, max_tokens, longest)
    collate = qwen_vl.collator(config, mode)
    for samples in batches:
        assert collate(samples)["input_ids"].numel() <= max_tokens
        for sample in samples:  # the model's own rule: one image token per merged patch group
            merge = config.vision_config.spatial_merge_size
            grids = sample.get("image_grid_thw", torch.zeros(0, 3))
            tokens = int((sample["input_ids"] == config.image_token_id).sum())
            assert tokens == int(grids.prod(dim=1).sum()) // merge**2
            if "pixel_values" in sample:  # a row per patch of C x temporal patch x patch^2
                vision = config.vision_config
                features = 3 * vision.temporal_patch_size * vision.patch_size**2
                assert sample["pixel_values"].shape == (int(grids.prod(dim=1).sum()), features)
        if mode == "padded" and len(samples) > 1:  # padded batches carry padding
            assert len({len(sample["input_ids"]) for sample in samples}) > 1
    # the constant and all five terms can be told apart
    design = np.column_stack([np.ones(len(terms)), terms])
    assert np.linalg.matrix_rank(design / np.abs(design).max(axis=0)) == design.shape[1]


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_the_fit_recovers_the_weights_that_made_the_timings(mode):
    _, _, terms = _terms("qwen2_5_vl", mode, 8192, 2048)
    rng = np.random.default_rng(0)
    for truth in ([3e-4, 0.4, 1e-4, 20.0], [0.0, 0.3, 0.0, 0.0], [6e-5, 0.0, 2e-4, 5.0]):
        token, fixed = 4e-5, 0.01
        seconds = fixed + token * (terms[:, 0] + terms[:, 1:] @ np.array(truth))
        noisy = seconds * (1 + 0.002 * rng.standard_normal(len(seconds)))
        fitted = fit_cost(terms, noisy)
        assert fitted[0] == pytest.approx(token, rel=0.05)
        weights = fitted[2:-1]
        assert (weights >= 0).all()  # a term at zero may come out slightly below: dropped
        # each term's error is at most 2% of every batch's work
        work = terms[:, 0] + terms[:, 1:] @ np.array(truth)
        error = np.abs(weights - truth) * terms[:, 1:] / work[:, None]
        assert (error <= 0.02).all(), (truth, weights)
        assert fitted[-1] > 0.99


def test_a_term_whose_weight_comes_out_negative_is_dropped_and_the_rest_refitted():
    terms = np.array([[100.0, 10.0], [200.0, 30.0], [300.0, 20.0], [400.0, 60.0]])
    seconds = 1.0 + 0.01 * terms[:, 0] - 0.02 * terms[:, 1]  # the second term "saves" time
    fitted = fit_cost(terms, seconds)
    assert fitted[2] == 0.0
    # the tokens alone, refitted: ordinary least squares of seconds on [1, tokens]
    slope, intercept = np.polyfit(terms[:, 0], seconds, 1)
    assert fitted[0] == pytest.approx(slope) and fitted[1] == pytest.approx(intercept)


@pytest.mark.parametrize(
    ("family", "mode", "attn"),
    [
        ("qwen2_5_vl", "padded", "sdpa"),
        ("qwen2_5_vl", "packed", "sdpa"),
        ("qwen2_5_vl", "packed", "odb_packed"),
        ("qwen2_vl", "padded", "sdpa"),
        ("qwen3_vl", "packed", "odb_packed"),
    ],
)
def test_measure_cost_times_the_model_and_its_cost_prices_each_batch_as_the_fit_does(
    family, mode, attn
):
    model = qwen_vl_tiny.tiny_model(family, qwen_vl_tiny.small_tokenizer(), dtype=torch.float32)
    if attn == "odb_packed":
        qwen_vl.use_packed_attention(model)
    before = [p.detach().clone() for p in model.parameters()]
    measured = qwen_vl.measure_cost(model, mode, max_tokens=1024, repeats=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    flops = qwen_vl.compute_cost(model, mode)
    cost = measured.cost
    assert (cost.padded, cost.dense_mask) == (flops.padded, flops.dense_mask)
    assert cost.dense_mask == (mode == "packed" and attn == "sdpa")
    assert len(measured.batches) == 9
    # the returned cost, priced as the planner prices a group, is the fit's prediction
    config = model.config
    predicted, seconds = [], []
    for samples, row in zip(timing_batches(config, mode, 1024), measured.batches, strict=True):
        sizes = [odb.measure_sample(s, i) for i, s in enumerate(samples)]
        priced = shared_group(sizes, odb.Budget(1, cost)).cost
        work = priced + measured.sample_tokens * len(sizes)
        predicted.append(measured.fixed_seconds + measured.token_seconds * work)
        seconds.append(row["seconds"])
    predicted, seconds = np.array(predicted), np.array(seconds)
    r2 = 1 - ((seconds - predicted) ** 2).sum() / ((seconds - seconds.mean()) ** 2).sum()
    assert r2 == pytest.approx(measured.fit, abs=1e-9)


def test_compute_budget_takes_a_measured_cost_of_its_layout_only():
    config = qwen_vl_tiny.tiny_config("qwen3_vl", qwen_vl_tiny.small_tokenizer())
    timed = dataclasses.replace(qwen_vl.compute_cost(config, "packed"), vision_weight=2.0)
    budget = qwen_vl.compute_budget(config, 4096, "packed", cost=timed)
    assert budget.cost is timed and budget.caps.max_tokens == 4096
    assert budget.limit == qwen_vl.COMPUTE_HEADROOM * 4096
    with pytest.raises(ConfigError, match="prices padded batches"):
        qwen_vl.compute_budget(config, 4096, "padded", cost=timed)
    other_kernel = dataclasses.replace(timed, dense_mask=not timed.dense_mask)
    with pytest.raises(ConfigError, match="dense mask"):
        qwen_vl.compute_budget(config, 4096, "packed", cost=other_kernel)
    with pytest.raises(ConfigError, match="times a model"):
        qwen_vl.measure_cost(config, "packed", max_tokens=1024)
    model = qwen_vl_tiny.tiny_model("qwen3_vl", qwen_vl_tiny.small_tokenizer())
    with pytest.raises(ConfigError, match="max_tokens"):
        qwen_vl.measure_cost(model, "packed", max_tokens=10)
    with pytest.raises(ConfigError, match="longest"):
        qwen_vl.measure_cost(model, "packed", max_tokens=1024, longest=64)
    with pytest.raises(ConfigError, match="mode"):
        qwen_vl.measure_cost(model, "rows", max_tokens=1024)


def _two_ranks(tmp_path, *args):
    out = tmp_path / "weights"
    agent = subprocess.run(
        [*torchrun(2), str(WORKER), str(out), *args],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert agent.returncode == 0, agent.stdout[-3000:] + agent.stderr[-3000:]
    return [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(2)]


def test_every_rank_plans_with_rank_zeros_weights(tmp_path):
    """Two ranks time the batches each on its own; without the averaging (and the broadcast,
    for hosts whose libraries differ) their weights would differ in every digit."""
    ranks = _two_ranks(tmp_path)
    assert "error" not in ranks[0] and ranks[0] == ranks[1]


def test_a_rank_that_fails_to_time_makes_every_rank_raise_instead_of_waiting(tmp_path):
    ranks = _two_ranks(tmp_path, "fail")
    assert ranks[1]["error"] == "RuntimeError: this rank's device failed"
    assert ranks[0]["error"].startswith("ConfigError: measure_cost: another rank failed")
