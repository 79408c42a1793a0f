"""The multimodal benchmark: built-in sets, oracles, ranks, the GPU cost model, the suite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from odb.adapters.qwen_vl import compute_budget
from odb.benchmarks.cli import main
from odb.benchmarks.gpu_model import (
    QWEN3_VL_8B,
    BatchShape,
    GpuSpec,
    ModelSpec,
    StepCostModel,
)
from odb.benchmarks.metrics import check_coverage
from odb.benchmarks.multimodal_sets import (
    BUILTIN_SETS,
    MultimodalSet,
    VisionSettings,
    builtin_sets,
    image_patches,
    make_set,
)
from odb.benchmarks.multimodal_suite import (
    PLACEHOLDER_LATENCY,
    MultimodalConfig,
    batch_shapes,
    estimate_run,
    placeholder_ranks,
    run_multimodal,
)
from odb.benchmarks.policies import (
    PolicyRun,
    epoch_order,
    odb_batches,
    odb_simulation,
    oracle_batches,
    sorted_batches,
    standard_batches,
)
from odb.benchmarks.ranks import RankedRun, odb_ranked, round_robin
from odb.benchmarks.report import multimodal_section
from odb.cost import Budget, PackedCost, PaddedCost

VISION = VisionSettings()


# -- built-in sets ---------------------------------------------------------------------------
def test_image_patches_follow_smart_resize_by_hand():
    # 480x640: sides already multiples of 32 and within range: 30 x 40 patches.
    # 4000x3000: rounded 4000x3008 is over 1024*32*32 pixels; scaled by sqrt(12e6 / 1048576)
    # and floored to multiples of 32: 1152 x 864 -> 72 x 54 patches.
    # 200x150: rounded 192x160 is under 256*256; scaled by sqrt(65536 / 30000) and ceiled:
    # 320 x 224 -> 20 x 14 patches.
    patches = image_patches(np.array([480, 4000, 200]), np.array([640, 3000, 150]), VISION)
    assert patches.tolist() == [1200, 72 * 54, 20 * 14]


def test_image_patches_match_qwen_vl_utils():
    smart_resize = pytest.importorskip("qwen_vl_utils").smart_resize
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(20, 5000, 300), rng.integers(20, 5000, 300)
    keep = np.maximum(heights, widths) / np.minimum(heights, widths) < 100
    heights, widths = heights[keep], widths[keep]
    expected = []
    for h, w in zip(heights.tolist(), widths.tolist(), strict=True):
        rh, rw = smart_resize(h, w, 32, VISION.min_pixels, VISION.max_pixels)
        expected.append((rh // 16) * (rw // 16))
    assert image_patches(heights, widths, VISION).tolist() == expected


@pytest.fixture(scope="module")
def sets():
    return {name: make_set(spec, 20_000, 16_384, seed=0) for name, spec in BUILTIN_SETS.items()}


@pytest.mark.parametrize(
    ("name", "cv"),
    [("text-chat", 0.5), ("single-image-vqa", 0.3), ("long-multimodal", 1.0), ("mixed", 0.8)],
)
def test_builtin_sets_have_the_public_sets_length_spread(sets, name, cv):
    assert abs(sets[name].summary()["length_cv"] - cv) < 0.05


def test_builtin_set_columns_are_consistent(sets):
    for data in sets.values():
        assert len(data) == 20_000 and data.lengths.max() <= 16_384
        assert (data.label_tokens >= 0).all() and (data.label_tokens < data.lengths).all()
        assert ((data.images == 0) == (data.patches == 0)).all()
        with_images = data.images > 0
        # Per image patches**2 summed: between (sum of patches)**2 / images and its square.
        squares = data.patches[with_images].astype(np.float64) ** 2
        assert (data.vision_pairs[with_images] <= squares).all()
        assert (data.vision_pairs[with_images] >= squares / data.images[with_images]).all()
        # Visual tokens are patches / 4 (merge 2), so they never exceed the length.
        assert (data.patches // 4 < data.lengths).all()
    assert sets["text-chat"].images.max() == 0
    vqa = sets["single-image-vqa"]
    assert (vqa.images == 1).all() and (vqa.vision_pairs == vqa.patches**2).all()
    sizes = vqa.sizes()
    assert (sizes[3].length, sizes[3].vision_patches, sizes[3].images) == (
        vqa.lengths[3],
        vqa.patches[3],
        1,
    )


def test_builtin_sets_are_seeded_and_filter_over_long_samples():
    a = make_set(BUILTIN_SETS["long-multimodal"], 2000, 4096, seed=3)
    b = make_set(BUILTIN_SETS["long-multimodal"], 2000, 4096, seed=3)
    assert np.array_equal(a.lengths, b.lengths) and np.array_equal(a.patches, b.patches)
    assert a.lengths.max() <= 4096 and a.filtered > 0
    other = make_set(BUILTIN_SETS["long-multimodal"], 2000, 4096, seed=4)
    assert not np.array_equal(a.lengths, other.lengths)
    with pytest.raises(ValueError, match="unknown multimodal set"):
        builtin_sets(["long multimodal"], 10, 4096, 0)


# -- oracles ---------------------------------------------------------------------------------
def _as_sets(batches):
    return sorted(sorted(b.tolist()) for b in batches)


def test_gmt_padded_is_the_sorted_cut_in_shuffled_order():
    lengths = np.array([2, 5, 3, 1, 2, 3, 2])
    run = oracle_batches(lengths, 6, seed=0, packed=False)
    assert run.name == "gmt padded" and not run.packed
    assert _as_sets(run.batches) == [[0, 4, 6], [1], [2, 5], [3]]
    assert _as_sets(run.batches) == _as_sets(sorted_batches(lengths, 6).batches)
    shuffled = [oracle_batches(lengths, 6, seed=s, packed=False).batches for s in range(6)]
    assert len({tuple(len(b) for b in batches) for batches in shuffled}) > 1


def test_gmt_packed_is_best_fit_decreasing_over_the_epoch():
    # 6 opens a row (room 4); 5 opens another (room 5); 4 best-fits the first (room 0);
    # 3 then 2 fill the second.
    run = oracle_batches(np.array([6, 5, 4, 3, 2]), 10, seed=1, packed=True)
    assert run.name == "gmt packed" and run.packed
    assert _as_sets(run.batches) == [[0, 2], [1, 3, 4]]


def test_oracles_send_an_over_budget_sample_alone():
    for packed in (False, True):
        run = oracle_batches(np.array([20, 1, 1]), 10, seed=0, packed=packed)
        assert _as_sets(run.batches) == [[0], [1, 2]]


def test_bmt_plans_each_mega_bucket_of_the_shuffled_epoch_alone():
    # Budget 8: an 8 goes alone, the ones of a bucket share one batch. GMT: 4 + 1 batches;
    # BMT with buckets of 4: per bucket, its eights plus one batch if it holds a one.
    lengths = np.array([1, 8] * 6)
    gmt = oracle_batches(lengths, 8, seed=2, packed=False)
    assert len(gmt.batches) == 7
    bmt = oracle_batches(lengths, 8, seed=2, packed=False, bucket=4)
    assert bmt.name == "bmt padded"
    buckets = epoch_order(len(lengths), 2).reshape(3, 4)
    expected = sum(int((lengths[b] == 8).sum()) + int((lengths[b] == 1).any()) for b in buckets)
    assert len(bmt.batches) == expected > len(gmt.batches)
    bucket_of = {int(i): k for k, bucket in enumerate(buckets) for i in bucket}
    order = [{bucket_of[int(i)] for i in batch} for batch in bmt.batches]
    assert all(len(owners) == 1 for owners in order)  # no batch mixes buckets
    assert [owners.pop() for owners in order] == sorted(bucket_of[int(b[0])] for b in bmt.batches)


# -- ranks -----------------------------------------------------------------------------------
def test_round_robin_deals_one_batch_per_rank_per_step():
    batches = [np.array([i]) for i in range(5)]
    ranked = round_robin(PolicyRun("p", batches, packed=True), 2)
    assert ranked.world == 2 and ranked.packed
    assert [[b.tolist() for b in step] for step in ranked.steps] == [
        [[0], [1]],
        [[2], [3]],
        [[4], []],
    ]
    assert [b.tolist() for b in ranked.flat().batches] == [[0], [1], [2], [3], [4]]


@pytest.fixture(scope="module")
def small_set():
    return make_set(BUILTIN_SETS["long-multimodal"], 1500, 16_384, seed=1)


def test_odb_ranks_read_their_stride_and_one_rank_is_odb_batches(small_set):
    sizes = small_set.sizes()
    budget = Budget(16_384, PaddedCost())
    one = odb_ranked(sizes, budget, seed=5, world=1, window=128)
    expected = odb_batches(sizes, budget, seed=5, window=128)
    assert [step[0].tolist() for step in one.steps] == [b.tolist() for b in expected.batches]
    three = odb_ranked(sizes, budget, seed=5, world=3, window=128)
    order = epoch_order(len(small_set), 5)
    shards = [set(order[rank::3].tolist()) for rank in range(3)]
    for rank in range(3):
        foreign = [
            s for s, step in enumerate(three.steps) if not set(step[rank].tolist()) <= shards[rank]
        ]
        # only the end of the data is shared out, a whole group from one other rank at a time:
        # once a rank has read its stride, what the buffers still hold (at most the window,
        # 128 of each rank's 500 samples) runs, so never before that share of the steps
        assert all(s >= (1 - 128 / len(shards[rank])) * len(three.steps) for s in foreign)
        for s in foreign:
            batch = set(three.steps[s][rank].tolist())
            assert any(batch <= shard for other, shard in enumerate(shards) if other != rank)


def test_every_policy_covers_every_sample_once_at_every_world_size(small_set):
    lengths, budget = small_set.lengths, 16_384
    offline = [
        standard_batches(lengths, budget, seed=0),
        sorted_batches(lengths, budget),
        *(
            oracle_batches(lengths, budget, 0, packed, bucket)
            for packed in (False, True)
            for bucket in (None, 512)
        ),
    ]
    sizes = small_set.sizes()
    for world in (1, 4):
        runs = [round_robin(run, world) for run in offline]
        runs += [
            odb_ranked(sizes, Budget(budget, cost), 0, world, window=128)
            for cost in (PaddedCost(), PackedCost())
        ]
        assert len(runs) == 8
        for run in runs:
            assert all(len(step) == world for step in run.steps), run.name
            check_coverage(run.name, run.flat().batches, len(small_set))


# -- GPU cost model --------------------------------------------------------------------------
TOY = ModelSpec(
    "toy",
    hidden=4,
    layers=1,
    heads=1,
    kv_heads=1,
    head_dim=4,
    intermediate=8,
    vocab=10,
    tied_embeddings=True,
    vision_hidden=2,
    vision_depth=1,
    vision_intermediate=4,
    deepstack=0,
    patch=1,
    temporal_patch=1,
    merge=1,
    position_embeddings=0,
    vision_heads=1,
)
TOY_GPU = GpuSpec(
    "toy",
    peak_flops=1000.0,
    memory_bandwidth=64.0,
    max_utilisation=0.5,
    half_tokens=10.0,
    fixed_overhead=0.25,
)


def test_qwen3_vl_8b_has_its_published_parameter_count():
    assert QWEN3_VL_8B.params == pytest.approx(8.77e9, rel=0.005)
    assert QWEN3_VL_8B.config().vision_config.deepstack_visual_indexes == [0, 1, 2]


def _toy_batch(samples, longest, tokens, squares, patches, pairs):
    return BatchShape(
        *(np.array([value]) for value in (samples, longest, tokens, squares, patches, pairs))
    )


def test_step_flops_and_time_by_hand():
    model = StepCostModel(TOY, TOY_GPU)
    # Forward + backward = 3x the forward's 2 FLOPs per multiply-add. Per token: q,k,v,o
    # 4*4*(2+2) = 64 and gated MLP 3*4*8 = 96 in the layer, head 4*10 = 40: 6 * 200.
    # Per causal pair: scores and values 2 * 2 * 1 head * 4 = 16 forward.
    assert (model.token_flops, model.pair_flops) == (1200, 48)
    # Per patch: block 4*2*2 + 2*2*4 = 32, patch embedding 3*1*1*2 = 6, merger 2*2 + 2*4 = 12;
    # per pair of patches of an image: 2 * 2 * width 2 in the one layer.
    assert (model.patch_flops, model.image_pair_flops) == (300, 24)
    # Samples of 3 and 5 tokens, one image of 4 patches.
    batch = _toy_batch(2, 5, 8, 9 + 25, 4, 16)
    # Padded: 2 rows of 5 = 10 tokens, 2 * 5*6/2 = 30 causal pairs.
    assert model.flops(batch, packed=False)[0] == 1200 * 10 + 48 * 30 + 300 * 4 + 24 * 16
    # Packed: 8 tokens, 3*4/2 + 5*6/2 = 21 pairs.
    assert model.flops(batch, packed=True)[0] == 1200 * 8 + 48 * 21 + 300 * 4 + 24 * 16
    # Utilisation 0.5 * 10 / (10 + 10) = 0.25 padded, 0.5 * 8 / 18 packed.
    assert model.compute_seconds(batch, packed=False)[0] == pytest.approx(15024 / 250)
    assert model.compute_seconds(batch, packed=True)[0] == pytest.approx(12192 / (1000 * 4 / 18))
    assert model.overhead == pytest.approx(0.25 + 32 * TOY.params / 64)
    empty = _toy_batch(0, 0, 0, 0, 0, 0)
    assert model.compute_seconds(empty, packed=False)[0] == 0.0


def test_utilisation_rises_with_tokens_and_saturates():
    model = StepCostModel(QWEN3_VL_8B)
    u = model.utilisation(np.array([256, 1024, 16_384, 10**9]))
    assert (np.diff(u) > 0).all()
    assert u[1] == pytest.approx(0.25) and u[-1] == pytest.approx(0.5, abs=1e-6)


def _toy_set(lengths, patches, pairs):
    lengths = np.array(lengths)
    return MultimodalSet(
        "toy",
        "",
        lengths,
        lengths - 1,
        np.array(patches),
        (np.array(patches) > 0) * 1,
        np.array(pairs),
        0,
        VISION,
    )


def test_batch_shapes_and_a_step_lasts_as_long_as_its_slowest_rank():
    data = _toy_set([3, 5, 2, 4], [4, 0, 0, 1], [16, 0, 0, 1])
    run = RankedRun("r", [[np.array([0, 1]), np.array([2])], [np.array([3]), np.array([], int)]])
    shape = batch_shapes(run, data)
    assert shape.samples.tolist() == [[2, 1], [1, 0]]
    assert shape.longest.tolist() == [[5, 2], [4, 0]]
    assert shape.tokens.tolist() == [[8, 2], [4, 0]]
    assert shape.square_tokens.tolist() == [[34, 4], [16, 0]]
    assert shape.patches.tolist() == [[4, 0], [1, 0]]
    assert shape.image_pairs.tolist() == [[16, 0], [1, 0]]
    model = StepCostModel(TOY, TOY_GPU)
    # Step 0: ranks compute 15024 FLOPs at 1000 * 0.5 * 10/20 and 2544 at 1000 * 0.5 * 2/12;
    # step 1: 1200*4 + 48*10 + 300 + 24 = 5604 at 1000 * 0.5 * 4/14, and nothing.
    compute = [[15024 / 250, 2544 / (500 * 2 / 12)], [5604 / (500 * 4 / 14), 0.0]]
    assert model.compute_seconds(shape, packed=False) == pytest.approx(np.array(compute))
    estimate = estimate_run(run, shape, model, samples=4)
    slowest = compute[0][0] + compute[1][0]
    assert estimate.epoch_seconds == pytest.approx(2 * model.overhead + slowest)
    assert estimate.step_seconds == pytest.approx(estimate.epoch_seconds / 2)
    assert estimate.samples_per_second == pytest.approx(4 / estimate.epoch_seconds)
    assert estimate.balance == pytest.approx(np.sum(compute) / (2 * slowest))
    # rank 1 has no image at step 0 and runs the placeholder after its one 2-token sample:
    # 1200 * 3 + 48 * 6 + 300 * 4 + 24 * 16 = 5472 FLOPs at 1000 * 0.5 * 3/13 and the vision
    # tower's assumed latency, still under rank 0's 60.1 s: the epoch does not get longer
    assert placeholder_ranks(shape).tolist() == [[False, True], [False, False]]
    assert compute[0][0] > 5472 / (500 * 3 / 13) + PLACEHOLDER_LATENCY
    assert estimate.placeholder_cost == 0.0


def test_a_placeholder_on_the_slowest_rank_lengthens_the_step():
    data = _toy_set([5, 4], [0, 1], [0, 1])
    run = RankedRun("r", [[np.array([1]), np.array([0])]])
    model = StepCostModel(TOY, TOY_GPU)
    estimate = estimate_run(run, batch_shapes(run, data), model, samples=2)
    # rank 1's one 5-token sample is the slowest (6720 FLOPs at 500 * 5/15); with the
    # placeholder after it, one row of 6: 1200 * 6 + 48 * 21 + 300 * 4 + 24 * 16 at 500 * 6/16,
    # and the vision tower's assumed launch-bound pass
    before = 6720 / (500 * 5 / 15)
    after = 9792 / (500 * 6 / 16) + PLACEHOLDER_LATENCY
    assert before > 5604 / (500 * 4 / 14)
    expected = (model.overhead + after) / (model.overhead + before) - 1
    assert estimate.placeholder_cost == pytest.approx(expected)


# -- the suite and the command ---------------------------------------------------------------
def test_suite_speedups_compare_runs_of_the_same_set_world_and_mode():
    config = MultimodalConfig(
        sets=("mixed",), samples=800, window=128, worlds=(1, 2), models=("Qwen3-VL-2B",)
    )
    result = run_multimodal(config)
    assert len(result.runs) == 2 * 10
    rate = {(r.world, r.policy): r.estimates[0].samples_per_second for r in result.runs}
    oracles = [f"{kind} {mode}" for kind in ("gmt", "bmt") for mode in ("padded", "packed")]
    for r in result.runs:
        (e,) = r.estimates
        mode = "packed" if r.packed else "padded"
        assert e.speedup["standard"] == pytest.approx(
            e.samples_per_second / rate[r.world, "standard"]
        )
        assert e.speedup["gmt"] == pytest.approx(
            e.samples_per_second / rate[r.world, f"gmt {mode}"]
        )
        assert e.speedup["bmt"] == pytest.approx(
            e.samples_per_second / rate[r.world, f"bmt {mode}"]
        )
        best = max(rate[r.world, oracle] for oracle in oracles)
        assert e.speedup["best oracle"] == pytest.approx(e.samples_per_second / best)
        assert e.epoch_seconds == pytest.approx(config.samples / e.samples_per_second)
        assert 0 <= r.padding_ratio < 1 and r.peak_tokens > 0
        if r.policy.startswith("odb compute"):  # the memory cap holds under a compute budget
            assert r.peak_tokens <= config.budget
        if r.packed:
            assert r.padding_ratio == 0


def _png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quick_multimodal_writes_tables_json_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--quick", "--out", str(out), "--cv", "1", "--set", "long-multimodal"]
    argv += ["--world", "1", "--world", "3", "--model", "qwen3-vl-2b", "--batch-size", "2"]
    argv.append("--full")  # the whole report on stdout, not the summary
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert (out / "report.md").read_text() == table
    assert "### Estimated samples/s, Qwen3-VL-2B on H100" in table
    assert "### long-multimodal: Qwen3-VL-2B on H100" in table
    for world in (1, 3):
        for policy in (
            "standard",
            "standard bs=2",
            "gmt padded",
            "bmt packed",
            "odb packed",
            "odb compute padded",
        ):
            assert f"| {world} | {policy} |" in table
    record = json.loads((out / "results.json").read_text())["multimodal"]
    assert record["config"]["worlds"] == [1, 3]
    assert record["config"]["models"] == ["Qwen3-VL-2B"]
    assert [s["name"] for s in record["sets"]] == ["long-multimodal"]
    assert len(record["runs"]) == 2 * 11
    assert _png(out / "multimodal_throughput.png") and _png(out / "multimodal_speedup.png")


def test_cli_refuses_an_unknown_model_or_set(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "qwen3-vl-72b"])
    assert "unknown model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--set", "laion"])


def test_odb_compute_runs_once_per_model_and_is_scored_by_the_step_model():
    config = MultimodalConfig(
        sets=("mixed",),
        samples=800,
        window=128,
        worlds=(2,),
        models=("Qwen3-VL-2B", "Qwen3-VL-8B"),
        policies=("gmt-packed", "odb-compute-packed"),
    )
    result = run_multimodal(config)
    compute = [r for r in result.runs if r.policy == "odb compute packed"]
    assert sorted(e.model for r in compute for e in r.estimates) == sorted(config.models)
    assert all(len(r.estimates) == 1 for r in compute)
    # planned for different models, the two runs batch differently
    assert compute[0].steps != compute[1].steps or compute[0].real_tokens_per_step != (
        compute[1].real_tokens_per_step
    )
    assert "odb compute against the token oracles" in multimodal_section(result)


def test_odb_compute_balances_each_steps_compute_across_sixteen_ranks():
    """The loader's own rounds (odb.simulate runs the engine) on the set whose groups differ
    most in compute: long rows alone, short image chats by the dozen. Each step's costs, as
    the planner priced them, stay within a few percent across 16 ranks, tail included; pairing
    each rank's groups by its targets alone reached 0.948 here."""
    data = builtin_sets(("long-multimodal",), 10_000, 16_384, seed=0)[0]
    budget = compute_budget(QWEN3_VL_8B.config(), 16_384, "padded", attention="odb_packed")
    simulation, _ = odb_simulation(data.sizes(), budget, 0, 16, 1024)
    costs = np.array([[0.0 if s.ghost else s.cost for s in rank] for rank in simulation.steps])
    slowest = costs.max(axis=0)
    assert costs.sum() / (16 * slowest.sum()) >= 0.96
    batches = [np.array(s.sample_indices) for rank in simulation.steps for s in rank if not s.ghost]
    check_coverage("odb compute padded", batches, len(data))  # every sample once
