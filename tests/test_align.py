"""The alignment protocol's pure functions over hand-made tables (no process group); the
round engine that uses them is tested in test_engine.py."""

import itertools

import numpy as np
import pytest

import odb.align as align
from odb.align import (
    EXHAUSTED,
    FAILED,
    FINISHED,
    NO_GHOST,
    PROTOCOL_VERSION,
    _fit_in_order,
    check_versions,
    decide,
    decode_received,
    encode_given,
    encode_report,
    lend_ghost,
    report_width,
)
from odb.errors import AlignmentError, ConfigError

MAX_STEPS = 4


def _table(*rows):
    return np.stack(rows)


def _row(status=0, costs=(), labels=None, samples=None, buffered=0, images=(), ghost_images=0):
    labels = labels if labels is not None else [1] * len(costs)
    samples = samples if samples is not None else [1] * len(costs)
    return encode_report(
        status, buffered, costs, labels, samples, MAX_STEPS, (), images, ghost_images
    )


def test_steps_are_the_fewest_offered_by_a_rank_with_data():
    table = _table(_row(costs=[5, 4, 3]), _row(costs=[9, 8]), _row(FINISHED | EXHAUSTED))
    rng = np.random.default_rng(0)
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=rng, share_tail=False)
    assert decision.steps == 2
    assert (decision.choice[2] == -1).all()  # the finished rank runs ghosts
    assert sorted(decision.choice[0].tolist()) == [0, 1]  # its first two offered groups
    assert decision.transfers == ()


def test_a_finished_rank_runs_groups_other_ranks_leave_for_later():
    table = _table(_row(costs=[5, 4, 3]), _row(costs=[9, 8]), _row(FINISHED | EXHAUSTED))
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(0))
    assert decision.steps == 1  # 5 groups for 3 ranks: one step each; the rest waits
    # rank 0 runs 5, rank 1 runs 8, and the finished rank takes the 9 rank 1 leaves: the
    # step runs 5, 8, 9 (slowest 9, 4 + 1 idle) rather than 5, 8 and a 4 handed over by
    # rank 0 (slowest 8, 3 + 4 idle)
    assert decision.own_picks(0) == [0] and decision.own_picks(1) == [1]
    assert [(t.recipient, t.donor, t.position) for t in decision.transfers] == [(2, 1, 0)]
    assert not (decision.choice == -1).any()
    # a rank still reading input sets the pace; an exhausted one with fewer groups is topped up
    table = _table(_row(costs=[5, 4, 3]), _row(EXHAUSTED, costs=[9]), _row(costs=[7, 6]))
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(0))
    assert decision.steps == 2 and not (decision.choice == -1).any()
    assert [(t.recipient, t.donor) for t in decision.transfers] == [(1, 0)]


def test_step_j_pairs_the_jth_costliest_groups_and_sums_global_counts():
    labels = [1, 3, 2]
    table = _table(  # both ranks read all their input: every group runs this round
        _row(EXHAUSTED, costs=[10, 30, 20], labels=labels, samples=[4, 4, 4]),
        _row(EXHAUSTED, costs=[300, 100, 200], labels=[30, 10, 20], samples=[1, 1, 1]),
    )
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(3))
    for j in range(decision.steps):
        # rank 0's k-th costliest is paired with rank 1's k-th costliest
        assert decision.costs[1, j] == 10 * decision.costs[0, j]
        assert decision.global_label_tokens[j] == 11 * labels[decision.choice[0, j]]
        assert decision.global_samples[j] == 5


def test_order_of_steps_is_shared_and_seeded():
    table = _table(_row(costs=[4, 3, 2, 1]), _row(costs=[1, 2, 3, 4]))
    a = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(1))
    b = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(1))
    assert (a.choice == b.choice).all()
    orders = {
        tuple(decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(s)).choice[0])
        for s in range(20)
    }
    assert len(orders) > 1


def test_done_when_no_rank_has_data():
    table = _table(_row(FINISHED | EXHAUSTED), _row(FINISHED | EXHAUSTED))
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(0))
    assert decision.done and not decision.stopped and decision.steps == 0


def test_non_join_stops_everyone_when_one_rank_runs_out():
    table = _table(_row(costs=[5]), _row(FINISHED | EXHAUSTED))
    decision = decide(table, max_steps=MAX_STEPS, join=False, rng=np.random.default_rng(0))
    assert decision.done and decision.stopped


def test_a_failed_rank_makes_every_rank_raise():
    table = _table(_row(costs=[5]), _row(FAILED))
    with pytest.raises(AlignmentError, match=r"rank\(s\) \[1\] raised"):
        decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(0))


def test_report_has_a_fixed_width():
    assert _row(costs=[1]).shape == _row().shape == (report_width(MAX_STEPS),)
    with pytest.raises(ValueError, match="at most 4"):
        _row(costs=[1] * 5)


def test_once_all_ranks_are_exhausted_the_surplus_moves_to_ranks_with_fewer_groups():
    table = _table(
        _row(EXHAUSTED, costs=[50, 40, 30, 20], samples=[1, 2, 3, 4]),
        _row(EXHAUSTED, costs=[45]),
        _row(FINISHED | EXHAUSTED),
    )
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(3))
    assert decision.steps == 2  # ceil(5 groups / 3 ranks)
    # the least idle time: the three costliest groups in one step, the ghost beside the two
    # lightest (15 + 40 idle); rank 0 keeps two groups and hands two over
    steps = sorted(sorted(decision.costs[:, j].tolist()) for j in range(2))
    assert steps == [[0, 20, 30], [40, 45, 50]]
    assert len(decision.own_picks(0)) == 2 and len(decision.given(0)) == 2
    assert {t.donor for t in decision.transfers} == {0}
    assert {t.recipient for t in decision.transfers} <= {1, 2}
    assert (decision.choice == -1).sum() == 1  # 5 groups over 6 slots: one ghost
    assert decision.global_samples.sum() == 1 + 2 + 3 + 4 + 1
    # the second exchange carries the donor's dataset indices to the recipients
    members = {0: [5], 1: [0, 2], 2: [7, 8, 9], 3: [3, 1, 4, 6]}
    given = [[members[p] for p in decision.given(r)] for r in range(3)]
    rows = [encode_given(decision, r, groups) for r, groups in enumerate(given)]
    width = sum(len(members[p]) for p in decision.given(0))
    assert {len(row) for row in rows} == {width}
    gathered = np.stack(rows)
    for rank in (1, 2):
        expected = {t.step: members[t.position] for t in decision.transfers if t.recipient == rank}
        assert decode_received(decision, gathered, rank) == expected
    assert decode_received(decision, gathered, 0) == {}


def test_non_join_shares_only_whole_steps_and_then_stops():
    table = _table(_row(EXHAUSTED, costs=[5, 4, 3]), _row(EXHAUSTED, costs=[9, 8, 7, 6]))
    decision = decide(table, max_steps=MAX_STEPS, join=False, rng=np.random.default_rng(0))
    assert decision.steps == 3 and not (decision.choice == -1).any()
    assert [(t.recipient, t.donor) for t in decision.transfers] == []  # 7 // 2 = 3 each
    table = _table(_row(EXHAUSTED, costs=[5]), _row(EXHAUSTED, costs=[]))
    decision = decide(table, max_steps=MAX_STEPS, join=False, rng=np.random.default_rng(0))
    assert decision.done and decision.stopped


def test_a_rank_with_more_groups_offers_those_closest_in_cost_and_all_that_must_go():
    table = _table(
        _wide(costs=[100, 50, 5, 5, 5]),
        encode_report(
            0, 0, [90, 10, 48, 200, 6], [1] * 5, [1] * 5, WIDE, must=[False, True] + [False] * 3
        ),
    )
    decision = decide(table, max_steps=WIDE, join=True, rng=np.random.default_rng(0))
    # 5 groups each, 2 steps: the targets are 90 and 5; rank 1's stale group (position 1,
    # cost 10) must go and takes the target 5, the 90 the other; rank 0 fits 100 and a 5
    assert decision.steps == 2
    assert sorted(decision.choice[1].tolist()) == [0, 1]
    for j in range(decision.steps):
        pair = {int(decision.costs[0, j]), int(decision.costs[1, j])}
        assert pair in ({100, 90}, {5, 10})


def test_remaining_ghosts_go_to_different_ranks():
    # two exhausted ranks with 4 groups each, three finished ones: 8 groups, 5 ranks, 2 steps
    table = _table(
        _row(EXHAUSTED, costs=[9, 8, 7, 6]),
        _row(EXHAUSTED, costs=[9, 8, 7, 6]),
        *[_row(FINISHED | EXHAUSTED)] * 3,
    )
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(0))
    assert decision.steps == 2
    assert sorted((decision.choice == -1).sum(axis=1).tolist()) == [0, 0, 0, 1, 1]


def test_the_last_ghost_steps_fall_in_one_step_beside_the_lightest_groups():
    # 4 groups on 3 ranks (rank 0 has none): 2 steps, 2 ghost rank-steps. With every rank free
    # to run both steps, rank 0 runs two ghosts: steps 6 6 0 and 3 1 0 (idle 6 + 5). Evened
    # out, rank 1 runs two groups and the others one each: rank 2 hands its 3 to rank 0, and
    # the ghosts share a step: 6 6 3 and 1 0 0 (idle 3 + 2)
    table = _table(
        _row(FINISHED | EXHAUSTED),
        _row(EXHAUSTED, costs=[6, 1]),
        _row(EXHAUSTED, costs=[6, 3]),
    )
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(0))
    steps = sorted(sorted(decision.costs[:, j].tolist()) for j in range(decision.steps))
    assert steps == [[0, 0, 1], [3, 6, 6]]
    assert [(t.donor, t.recipient) for t in decision.transfers] == [(2, 0)]


def test_ranks_of_different_odb_versions_are_refused():
    check_versions(np.array([[PROTOCOL_VERSION], [PROTOCOL_VERSION]]))
    with pytest.raises(ConfigError, match="different odb versions"):
        check_versions(np.array([[PROTOCOL_VERSION], [PROTOCOL_VERSION + 1]]))


def _vision_by_cost(decision, rank=0):
    """Each step's vision flag, keyed by the cost rank ``rank`` runs there."""
    return {int(c): bool(v) for c, v in zip(decision.costs[rank], decision.vision, strict=True)}


def test_a_step_is_a_vision_step_when_any_ranks_batch_has_an_image():
    table = _table(  # both ranks read all their input: every group runs this round
        _row(EXHAUSTED, costs=[30, 20, 10], images=[0, 2, 0]),
        _row(EXHAUSTED, costs=[31, 21, 11], images=[0, 0, 1]),
    )
    decision = decide(table, max_steps=MAX_STEPS, join=True, rng=np.random.default_rng(1))
    assert _vision_by_cost(decision) == {30: False, 20: True, 10: True}


def test_a_ghost_step_copying_a_sample_with_an_image_is_a_vision_step():
    for ghost_images, expected in ((1, True), (0, False)):
        table = _table(
            _row(costs=[9, 8]),
            _row(FINISHED | EXHAUSTED, ghost_images=ghost_images),
        )
        rng = np.random.default_rng(0)
        decision = decide(table, max_steps=MAX_STEPS, join=True, rng=rng, share_tail=False)
        assert (decision.choice[1] == -1).all()
        assert decision.vision.tolist() == [expected] * decision.steps
        # the ghost steps that pad the pass to a multiple of the accumulation steps
        done = decide(
            _table(
                _row(FINISHED | EXHAUSTED), _row(FINISHED | EXHAUSTED, ghost_images=ghost_images)
            ),
            max_steps=MAX_STEPS,
            join=True,
            rng=np.random.default_rng(0),
            steps_so_far=3,
            steps_multiple_of=2,
        )
        assert done.done and done.padding == 1 and done.padding_vision == expected


def test_a_lent_ghost_sample_brings_its_images_along():
    table = _table(
        _row(costs=[9, 8], ghost_images=1),
        _row(FINISHED | EXHAUSTED | NO_GHOST),
    )
    lent = lend_ghost(table, donor=0)
    assert not (lent[:, 0] & NO_GHOST).any()
    rng = np.random.default_rng(0)
    decision = decide(lent, max_steps=MAX_STEPS, join=True, rng=rng, share_tail=False)
    assert (decision.choice[1] == -1).all() and decision.vision.all()


WIDE = 16


def _wide(costs, status=0):
    return encode_report(status, 0, costs, [1] * len(costs), [1] * len(costs), WIDE)


def test_every_rank_chooses_so_that_heavy_groups_run_beside_heavy_ones():
    # rank 0 offers two heavy groups and eight light ones, rank 1 four heavy and six light:
    # running all ten pairs two heavy groups with light ones. A round of 4 steps (40% of
    # the fewest offered) lets both run one heavy and three light groups, each step pairs
    # equal costs, and the rest waits.
    table = _table(_wide(costs=[100] * 2 + [10] * 8), _wide(costs=[100] * 4 + [10] * 6))
    decision = decide(table, max_steps=WIDE, join=True, rng=np.random.default_rng(0))
    assert decision.steps == 4
    assert (decision.costs[0] == decision.costs[1]).all()
    assert sorted(decision.costs[0].tolist()) == [10] * 3 + [100]


def test_groups_that_must_go_all_run_although_ranks_choose():
    must = [True] * 9 + [False]
    table = _table(
        _wide(costs=[10] * 10),
        encode_report(0, 0, [5] * 10, [1] * 10, [1] * 10, WIDE, must=must),
    )
    decision = decide(table, max_steps=WIDE, join=True, rng=np.random.default_rng(0))
    assert decision.steps == 9 and sorted(decision.own_picks(1)) == list(range(9))


def _idle_share(costs):
    slowest = costs.max(axis=0)
    return (len(costs) * slowest.sum() - costs.sum()) / (len(costs) * slowest.sum())


@pytest.mark.parametrize("seed", range(40))
def test_the_last_round_runs_every_group_once_and_never_idles_more_for_evening_out(
    seed, monkeypatch
):
    rng = np.random.default_rng(seed)
    world = int(rng.integers(2, 17))
    counts = rng.integers(0, WIDE + 1, size=world)
    if counts.sum() == 0:
        counts[0] = 1
    rows = [
        _wide(costs=rng.integers(1, 1000, size=count).tolist(), status=EXHAUSTED)
        if count
        else _wide(costs=[], status=FINISHED | EXHAUSTED)
        for count in counts
    ]
    table = np.stack(rows)
    decision = decide(table, max_steps=WIDE, join=True, rng=np.random.default_rng(0))
    runs = decision.choice >= 0
    assert decision.steps == -(-counts.sum() // world)
    ran = sorted(zip(decision.owner[runs].tolist(), decision.choice[runs].tolist(), strict=True))
    assert ran == [(rank, p) for rank in range(world) for p in range(counts[rank])]
    # every rank free to run every step, as before the even quota: never less idle time
    monkeypatch.setattr(
        align, "_even_quota", lambda counts, steps, total: np.full(len(counts), steps)
    )
    free = decide(table, max_steps=WIDE, join=True, rng=np.random.default_rng(0))
    assert _idle_share(decision.costs) <= _idle_share(free.costs)


def _fit_cost(left, right, skip, chosen, over, targets_first):
    """What matching ``left[i]`` to ``right[chosen[i]]`` costs, by the rule of the fit."""
    cost = sum(int(skip[j]) for j in range(len(right)) if j not in chosen)
    for i, j in enumerate(chosen):
        group, target = (right[j], left[i]) if targets_first else (left[i], right[j])
        gap = int(group) - int(target)
        cost += over * gap if gap > 0 else -gap
    return cost


@pytest.mark.parametrize("targets_first", [True, False])
def test_fitting_in_order_finds_the_cheapest_matching_of_all(targets_first):
    """The fit every round uses keeps both lists' order; with the mismatch convex in the gap
    that loses nothing: against every injective matching, by brute force, on random rows."""
    rng = np.random.default_rng(7)
    for _ in range(150):
        rows, width, over = 3, int(rng.integers(1, 4)), int(rng.integers(1, 6))
        right_width = width + int(rng.integers(0, 3))
        left = -np.sort(-rng.integers(0, 40, (rows, width)), axis=1)
        right = -np.sort(-rng.integers(0, 40, (rows, right_width)), axis=1)
        left_count = rng.integers(0, width + 1, rows)
        right_count = np.maximum(left_count, rng.integers(0, right_width + 1, rows))
        skip = np.where(rng.random((rows, right_width)) < 0.3, 1000, 0)
        match = _fit_in_order(
            left, left_count, right, right_count, skip, over, targets_first=targets_first
        )
        for r in range(rows):
            a, b = int(left_count[r]), int(right_count[r])
            row = (left[r, :a], right[r, :b], skip[r, :b])
            cheapest = min(
                _fit_cost(*row, chosen, over, targets_first)
                for chosen in itertools.permutations(range(b), a)
            )
            assert (match[r, a:] == -1).all()
            chosen = match[r, :a].tolist()
            assert len(set(chosen)) == a and all(0 <= j < b for j in chosen)
            assert chosen == sorted(chosen)  # order kept
            assert _fit_cost(*row, chosen, over, targets_first) == cheapest
