"""The optimised planner makes exactly the decisions of the planner it replaced.

tests/planner_reference.py keeps the pre-optimisation planner verbatim; every plan below must
match it group for group: the same members in the same order, the same reasons, the same
token counts, and costs and qualities equal to the last bit.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from planner_reference import reference_plan

from odb.cost import Budget, Caps, ComputeCost, PackedCost, PaddedCost
from odb.planner import plan_groups


def _groups(plan):
    return [
        (g.members.tolist(), g.real_tokens, g.padded_tokens, g.cost, g.quality, g.reason)
        for g in plan.groups
    ]


def _assert_same_plan(columns, budget, **options):
    expected = reference_plan(*columns, budget, **options)
    got = plan_groups(*columns, budget, **options)
    assert got.n_ready == expected.n_ready
    assert _groups(got) == _groups(expected)


costs = st.one_of(
    st.just(PaddedCost()),
    st.just(PackedCost()),
    st.builds(
        ComputeCost,
        padded=st.booleans(),
        attention_weight=st.sampled_from([0.0, 1e-4, 1 / 6144, 2e-3]),
        vision_weight=st.sampled_from([0.0, 0.3, 1.7]),
        vision_attention_weight=st.sampled_from([0.0, 1e-5, 3e-4]),
    ),
)
caps = st.builds(
    Caps,
    max_samples=st.one_of(st.none(), st.integers(1, 40)),
    max_images=st.one_of(st.none(), st.integers(1, 12)),
    max_vision_patches=st.one_of(st.none(), st.integers(64, 8000)),
    max_tokens=st.one_of(st.none(), st.integers(200, 6000)),
)


@st.composite
def buffers(draw):
    """A buffer's columns: lengths from a few values (many ties) or spread out, some over the
    budget (marked solo or not), images with their patches and pairs, ages around max_wait."""
    n = draw(st.integers(0, 260))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        lengths = rng.choice(rng.integers(1, 3000, 4), n)
    else:
        lengths = np.maximum(1, rng.lognormal(np.log(draw(st.integers(20, 2000))), 0.9, n))
        lengths = lengths.astype(np.int64)
    images = rng.poisson(draw(st.sampled_from([0.0, 0.5, 2.0])), n)
    per_image = rng.integers(16, 1200, (n, 12))
    mask = np.arange(12) < images[:, None]
    patches = (per_image * mask).sum(axis=1)
    pairs = (per_image**2 * mask).sum(axis=1)
    ages = rng.integers(0, 8, n)
    solo = rng.random(n) < draw(st.sampled_from([0.0, 0.05]))
    return lengths.astype(np.int64), patches, images, ages, solo, pairs


@settings(max_examples=400, deadline=None)
@given(
    columns=buffers(),
    cost=costs,
    cap=caps,
    limit=st.integers(500, 20_000),
    fill_threshold=st.sampled_from([0.0, 0.5, 0.9, 0.97, 0.98, 1.0]),
    max_wait=st.integers(1, 8),
    keep=st.one_of(st.integers(0, 12), st.integers(0, 300)),  # small: pressure releases
    final=st.booleans(),
)
def test_same_plan_as_the_reference(
    columns, cost, cap, limit, fill_threshold, max_wait, keep, final
):
    lengths, patches, images, ages, solo, pairs = columns
    _assert_same_plan(
        (lengths, patches, images, ages, solo),
        Budget(limit, cost, cap),
        fill_threshold=fill_threshold,
        max_wait=max_wait,
        keep=keep,
        final=final,
        vision_pairs=pairs,
    )


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(600, 1100),
    cv=st.sampled_from([0.3, 1.0, 2.5]),
    packed=st.booleans(),
    final=st.booleans(),
)
def test_same_plan_on_full_windows(seed, n, cv, packed, final):
    """Windows as the default settings plan them: a thousand text samples, budget 16384."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(np.log1p(cv * cv))
    lengths = np.clip(rng.lognormal(np.log(1500) - sigma**2 / 2, sigma, n), 1, 16384)
    zeros = np.zeros(n, dtype=np.int64)
    _assert_same_plan(
        (lengths.astype(np.int64), zeros, zeros, rng.integers(0, 40, n), zeros.astype(bool)),
        Budget(16384, PackedCost() if packed else PaddedCost()),
        fill_threshold=0.97 if packed else 0.98,
        max_wait=32,
        keep=896,
        final=final,
    )


@settings(max_examples=300, deadline=None)
@given(
    columns=buffers(),
    cost=costs,
    k=st.integers(1, 30),
    nudge=st.sampled_from([-1e-4, -1e-6, 0.0, 1e-6, 1e-4]),
    bound=st.sampled_from(["limit", "max_tokens", "max_vision_patches", "max_images"]),
    cap_samples=st.booleans(),
    final=st.booleans(),
)
def test_same_plan_at_the_budget_and_caps_boundaries(
    columns, cost, k, nudge, bound, cap_samples, final
):
    """The budget or a cap set just at, below or above what the first run of the k longest
    samples takes (and that run's size as max_samples, so the run cannot grow past the edge
    by its count alone): decisions right at the edge must match too."""
    lengths, patches, images, ages, solo, pairs = columns
    first = np.argsort(-lengths, kind="stable")[:k]
    if len(first) == 0:
        return
    n, longest = len(first), int(lengths[first].max())
    run_patches, run_pairs = int(patches[first].sum()), int(pairs[first].sum())
    if cost.padded:  # priced as the planner prices a run: n rows of the longest, plus vision
        tokens = n * longest
        row = longest * (1.0 + cost.attention_weight * longest)
        run_cost = (
            n * row + cost.vision_weight * run_patches + cost.vision_attention_weight * run_pairs
        )
    else:
        tokens = int(lengths[first].sum())
        run_cost = float(cost.sample_cost(lengths[first], patches[first], pairs[first]).sum())
    caps = {"max_samples": n} if cap_samples else {}
    if bound == "limit":
        budget = Budget(run_cost * (1 + nudge), cost, Caps(**caps))
    else:
        edge = {"max_tokens": tokens, "max_vision_patches": run_patches}.get(bound)
        edge = int(images[first].sum()) if edge is None else edge
        caps[bound] = max(1, edge + int(np.sign(nudge)))
        budget = Budget(run_cost * 2 + 1, cost, Caps(**caps))
    _assert_same_plan(
        (lengths, patches, images, ages, solo),
        budget,
        fill_threshold=0.9,
        max_wait=4,
        keep=len(lengths) // 2,
        final=final,
        vision_pairs=pairs,
    )
