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


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_measure_cost_times_the_model_and_its_cost_prices_each_batch_as_the_fit_does(mode):
    model = qwen_vl_tiny.tiny_model(
        "qwen2_5_vl", qwen_vl_tiny.small_tokenizer(), dtype=torch.float32
    )
    before = [p.detach().clone() for p in model.parameters()]
    measured = qwen_vl.measure_cost(model, mode, max_tokens=1024, repeats=1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    flops = qwen_vl.compute_cost(model, mode)
    cost = measured.cost
    assert (cost.padded, cost.dense_mask) == (flops.padded, flops.dense_mask)
    assert measured.token_seconds > 0 and np.isfinite(measured.fixed_seconds)
    assert measured.sample_tokens >= 0 and len(measured.batches) == 9
    # the returned cost, priced with odb's own formula, is the fit's prediction
    config = model.config
    predicted, seconds = [], []
    for samples, row in zip(timing_batches(config, mode, 1024), measured.batches, strict=True):
        sizes = [odb.measure_sample(s, i) for i, s in enumerate(samples)]
        lengths = np.array([s.length for s in sizes])
        priced = cost.group_cost(
            len(sizes),
            lengths.max(),
            lengths.sum(),
            (lengths**2).sum(),
            sum(s.vision_patches for s in sizes),
            sum(s.vision_pairs for s in sizes),
        )
        work = float(priced) + measured.sample_tokens * len(sizes)
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
    with pytest.raises(ConfigError, match="max_tokens"):
        qwen_vl.measure_cost(config, "packed", max_tokens=10)
    with pytest.raises(ConfigError, match="mode"):
        qwen_vl.measure_cost(config, "rows", max_tokens=1024)


def test_every_rank_plans_with_rank_zeros_weights(tmp_path):
    """Two ranks time the batches each on its own; without the averaging and broadcast their
    weights would differ in every digit."""
    out = tmp_path / "weights"
    agent = subprocess.run(
        [*torchrun(2), str(WORKER), str(out)],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert agent.returncode == 0, agent.stdout[-3000:] + agent.stderr[-3000:]
    ranks = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["cost"]["vision_weight"] > 0
