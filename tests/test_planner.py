"""Properties of the pure planner and of planning rounds over a buffer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odb.buffer import RoundSettings
from odb.cost import Budget, Caps, ComputeCost, PackedCost, PaddedCost, SampleSize
from odb.errors import ConfigError
from odb.planner import Reason, plan_groups
from odb.simulate import simulate

COSTS = {
    "padded": PaddedCost(),
    "packed": PackedCost(),
    "compute-padded": ComputeCost(padded=True, attention_weight=1e-3, vision_weight=0.5),
    "compute-packed": ComputeCost(padded=False, attention_weight=1e-3, vision_weight=0.5),
    "compute-packed-dense": ComputeCost(
        padded=False, attention_weight=1e-3, vision_weight=0.5, dense_mask=True
    ),
}


def _plan(lengths, budget, *, patches=None, images=None, ages=None, solo=None, **options):
    n = len(lengths)
    zeros = np.zeros(n, dtype=np.int64)
    options = {"fill_threshold": 0.9, "max_wait": 10, "keep": n, "final": False, **options}
    return plan_groups(
        np.asarray(lengths),
        zeros if patches is None else np.asarray(patches),
        zeros if images is None else np.asarray(images),
        zeros if ages is None else np.asarray(ages),
        np.zeros(n, dtype=bool) if solo is None else np.asarray(solo),
        budget,
        **options,
    )


def _true_cost(budget, lengths, patches):
    lengths = np.asarray(lengths, dtype=np.float64)
    n, longest = len(lengths), lengths.max()
    return float(
        budget.cost.group_cost(n, longest, lengths.sum(), (lengths**2).sum(), np.sum(patches))
    )


samples = st.lists(st.tuples(st.integers(1, 600), st.integers(0, 3)), min_size=0, max_size=300)


@settings(max_examples=150, deadline=None)
@given(
    items=samples,
    cost=st.sampled_from(sorted(COSTS)),
    limit=st.integers(1000, 5000),
    max_samples=st.one_of(st.none(), st.integers(1, 12)),
    max_images=st.one_of(st.none(), st.integers(3, 8)),
    max_tokens=st.one_of(st.none(), st.integers(600, 3000)),
    final=st.booleans(),
    keep=st.integers(0, 300),
)
def test_plan_covers_every_sample_once_within_budget_and_caps(
    items, cost, limit, max_samples, max_images, max_tokens, final, keep
):
    lengths = [n for n, _ in items]
    images = [k for _, k in items]
    patches = [16 * k for k in images]
    caps = Caps(max_samples=max_samples, max_images=max_images, max_tokens=max_tokens)
    budget = Budget(limit, COSTS[cost], caps)
    plan = _plan(lengths, budget, patches=patches, images=images, final=final, keep=keep)

    members = np.concatenate([g.members for g in plan.groups]) if plan.groups else []
    assert sorted(np.asarray(members).tolist()) == list(range(len(lengths)))
    for group in plan.groups:
        group_lengths = np.asarray(lengths)[group.members]
        assert _true_cost(budget, group_lengths, np.asarray(patches)[group.members]) <= limit
        assert max_samples is None or len(group.members) <= max_samples
        assert max_images is None or np.asarray(images)[group.members].sum() <= max_images
        assert max_tokens is None or group.padded_tokens <= max_tokens
        assert group.real_tokens == group_lengths.sum()
    assert all(g.ready for g in plan.groups[: plan.n_ready])
    assert not any(g.ready for g in plan.groups[plan.n_ready :])
    held = sum(len(g.members) for g in plan.groups if not g.ready)
    assert held <= keep
    if final:
        assert plan.n_ready == len(plan.groups)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 900), max_size=200), cost=st.sampled_from(sorted(COSTS)))
def test_plan_is_deterministic(lengths, cost):
    budget = Budget(2000, COSTS[cost])
    first, second = _plan(lengths, budget), _plan(list(lengths), budget)
    assert [g.members.tolist() for g in first.groups] == [g.members.tolist() for g in second.groups]
    assert first.n_ready == second.n_ready


def test_padded_cut_is_greedy_on_sorted_lengths():
    # sorted: 900 880 870 610 600 600 590 300 290; budget 2800
    lengths = [600, 300, 900, 610, 880, 590, 870, 290, 600]
    plan = _plan(lengths, Budget(2800), fill_threshold=0.0, final=True)
    got = [sorted((lengths[m] for m in g.members), reverse=True) for g in plan.groups]
    # 900: 3 rows fit (2700); 610: 4 rows (2440); 300: 2 rows left (600)
    assert sorted(got) == sorted([[900, 880, 870], [610, 600, 600, 590], [300, 290]])


def test_padded_tail_group_is_held_until_final():
    lengths = [1000, 1000, 500]
    plan = _plan(lengths, Budget(2000), fill_threshold=0.5)
    reasons = {tuple(sorted(g.members.tolist())): g.reason for g in plan.groups}
    assert reasons[(0, 1)] is Reason.FILL  # full by tokens
    assert reasons[(2,)] is Reason.HELD  # tail: three more rows of 500 could still join
    assert _plan(lengths, Budget(2000), fill_threshold=0.5, final=True).n_ready == 2


def test_padded_inefficient_group_waits_for_neighbours():
    # 1000 and 200 in one group: efficiency 1200 / 2000 = 0.6 < 0.9
    plan = _plan([1000, 200, 1500], Budget(2000))
    reasons = {tuple(sorted(g.members.tolist())): g.reason for g in plan.groups}
    assert reasons[(2,)] is Reason.FILL  # 1500 alone is full (no second row fits)
    assert reasons[(0, 1)] is Reason.HELD


def test_packed_is_best_fit_decreasing():
    # decreasing: 6 5 4 3 2 (bins of 10): 6 -> A(4 left); 5 -> B(5 left);
    # 4 -> A exactly (tightest); 3 -> B (2 left); 2 -> B (0 left)
    plan = _plan([3, 6, 2, 5, 4], Budget(10, PackedCost()), fill_threshold=0.0)
    got = sorted(sorted([3, 6, 2, 5, 4][m] for m in g.members) for g in plan.groups)
    assert got == [[2, 3, 5], [4, 6]]


def test_packed_rows_under_a_dense_mask_are_priced_by_their_whole_length():
    """cost = T + 0.1 * T**2 for a row of T tokens (sdpa's dense mask), limit 21.
    decreasing: 6 -> A (9.6); 5 -> A would be a row of 11 (23.1): B (7.5); 4 -> A, the
    tightest, a row of 10 (20.0); 3 -> B, 8 tokens (14.4); 2 -> B, 10 tokens (20.0).
    Priced per sample (varlen), 6 and 5 would share a row: 6 + 5 + 0.1 * (36 + 25) = 17.1."""
    lengths = [3, 6, 2, 5, 4]
    dense = ComputeCost(padded=False, attention_weight=0.1, dense_mask=True)
    plan = _plan(lengths, Budget(21, dense), fill_threshold=0.0)
    got = sorted((sorted(lengths[m] for m in g.members), g.cost) for g in plan.groups)
    assert [rows for rows, _ in got] == [[2, 3, 5], [4, 6]]
    assert [cost for _, cost in got] == pytest.approx([20.0, 20.0])
    varlen = _plan(lengths, Budget(21, ComputeCost(padded=False, attention_weight=0.1)))
    assert any({5, 6} <= {lengths[m] for m in g.members} for g in varlen.groups)


def test_packed_bin_below_fill_threshold_is_held():
    plan = _plan([700, 200, 50], Budget(1000, PackedCost()), fill_threshold=0.97)
    assert plan.n_ready == 0
    assert _plan([700, 200, 90], Budget(1000, PackedCost()), fill_threshold=0.97).n_ready == 1


def test_stale_groups_are_forced_first():
    lengths = [100, 100, 50]
    plan = _plan(lengths, Budget(1000, PackedCost()), ages=[0, 10, 0], max_wait=10)
    assert plan.n_ready == 1 and plan.groups[0].reason is Reason.STALE


def test_solo_samples_form_their_own_ready_group():
    plan = _plan([5000, 10, 20], Budget(1000), solo=[True, False, False])
    assert plan.groups[0].reason is Reason.SOLO
    assert plan.groups[0].members.tolist() == [0]


def test_pressure_releases_best_held_groups_to_make_room():
    plan = _plan([700, 200, 50, 40], Budget(1000, PackedCost()), fill_threshold=1.0, keep=0)
    assert plan.n_ready == len(plan.groups)
    assert {g.reason for g in plan.groups} == {Reason.PRESSURE}


def test_round_settings_defaults_and_validation():
    settings_ = RoundSettings.create(Budget(100), window=64)
    assert (settings_.round_size, settings_.max_wait, settings_.fill_threshold) == (8, 32, 0.98)
    assert RoundSettings.create(Budget(100, PackedCost())).fill_threshold == 0.97
    with pytest.raises(ConfigError, match="round_size"):
        RoundSettings.create(Budget(100), window=8, round_size=9)
    with pytest.raises(ConfigError, match="window"):
        RoundSettings.create(Budget(100), window=0)
    with pytest.raises(ConfigError, match="fill_threshold"):
        RoundSettings.create(Budget(100), fill_threshold=1.5)


def _run_epoch(lengths, settings_, seed=0):
    """Feed lengths through the loader's planning rounds (one simulated rank); return the
    emitted groups and, per sample, the round it arrived in and the round it left in."""
    shard = [(i, SampleSize(int(n), 1)) for i, n in enumerate(lengths)]
    result = simulate([shard], settings_, seed=seed)
    groups = [list(step.sample_indices) for step in result.steps[0]]
    arrived = {i: i // settings_.round_size for i in range(len(lengths))}
    left = {i: step.round for step in result.steps[0] for i in step.sample_indices}
    return groups, arrived, left


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 2000), min_size=1, max_size=400),
    packed=st.booleans(),
    window=st.integers(4, 64),
    max_wait=st.integers(1, 6),
)
def test_rounds_emit_every_sample_once_and_bound_the_wait(lengths, packed, window, max_wait):
    budget = Budget(4096, PackedCost() if packed else PaddedCost())
    settings_ = RoundSettings.create(budget, window=window, max_wait=max_wait)
    groups, arrived, left = _run_epoch(lengths, settings_)
    emitted = sorted(i for g in groups for i in g)
    assert emitted == list(range(len(lengths)))
    for index in arrived:
        assert left[index] - arrived[index] <= max_wait


def test_emission_order_within_a_round_is_shuffled_by_seed():
    lengths = np.random.default_rng(0).integers(50, 3000, 2000)
    settings_ = RoundSettings.create(Budget(16384), window=1024)
    a, _, _ = _run_epoch(lengths, settings_, seed=1)
    b, _, _ = _run_epoch(lengths, settings_, seed=1)
    c, _, _ = _run_epoch(lengths, settings_, seed=2)
    assert a == b
    assert a != c and sorted(map(tuple, a)) == sorted(map(tuple, c))
    # not a length curriculum: within the first round's steps, longest rows are not all first
    first_max = [max(lengths[i] for i in g) for g in a[:20]]
    assert first_max != sorted(first_max, reverse=True)


def test_max_tokens_bounds_memory_under_a_compute_priced_budget():
    # attention priced in: long rows cost more than their tokens, short rows barely more, so
    # without a token cap a budget of 3000 admits 14 rows of 200 tokens = 2800 tokens and
    # the cap of 1000 must cut that to 5 rows
    cost = ComputeCost(padded=True, attention_weight=1e-4)
    free = _plan([200] * 14, Budget(3000, cost), fill_threshold=0.0, final=True)
    assert [len(g.members) for g in free.groups] == [14]
    capped = _plan([200] * 14, Budget(3000, cost, Caps(max_tokens=1000)), final=True)
    assert [len(g.members) for g in capped.groups] == [5, 5, 4]
    packed = ComputeCost(padded=False, attention_weight=1e-4)
    rows = _plan([300, 300, 300, 300], Budget(3000, packed, Caps(max_tokens=700)), final=True)
    assert sorted(g.real_tokens for g in rows.groups) == [600, 600]
    budget = Budget(3000, cost, Caps(max_tokens=1000))
    assert "max_tokens=1000" in budget.why_over(SampleSize(1200, 1))
    assert budget.longest_text() == 1000


@pytest.mark.parametrize("padded", [True, False])
def test_vision_attention_splits_groups_of_large_images(padded):
    # four samples of equal length and patches: as one image each (1600^2 pairs) they cost
    # far more than as 16 small images (16 * 100^2), and a group of them must split
    cost = ComputeCost(padded=padded, vision_attention_weight=1e-3)
    budget = Budget(6000, cost)
    patches = [1600] * 4
    small = _plan([100] * 4, budget, patches=patches, vision_pairs=[16 * 100**2] * 4, final=True)
    assert [len(g.members) for g in small.groups] == [4]
    large = _plan([100] * 4, budget, patches=patches, vision_pairs=[1600**2] * 4, final=True)
    assert sorted(len(g.members) for g in large.groups) == [2, 2]
    for group in large.groups:
        assert group.cost <= budget.limit
        assert group.cost == pytest.approx(200 + 2 * 1600**2 * 1e-3)


def test_a_packed_row_full_of_tokens_is_ready_whatever_it_costs():
    # a compute limit far above what the capped rows cost: the token cap fills them
    cost = ComputeCost(padded=False, attention_weight=1e-4)
    plan = _plan([500, 500, 500, 500], Budget(10_000, cost, Caps(max_tokens=1000)))
    assert [g.ready for g in plan.groups] == [True, True]
