"""The GRPO adapter's planning and row handling, without a model or a process group.

Several ranks are simulated in one process by stacking their reports, as the all_gather
would (the same functions run inside the trainer).
"""

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import odb
from odb.adapters.trl import (
    GRPOBatching,
    RolloutLayoutError,
    RowSizes,
    encode_rows,
    envelope_groups,
    fewest_groups,
    own_groups,
    sorted_segments,
    split_groups,
)
from odb.adapters.trl.layout import _concat_rows, _Layout, _take_rows, _trim
from odb.adapters.trl.trainer import _Batcher
from odb.exchange import run_ranks

BUDGET = odb.Budget(100)


def _cost(sizes: RowSizes, rows) -> int:
    return len(rows) * int(sizes.lengths[rows].max())


def _covers_once(groups, n: int) -> None:
    rows = np.concatenate(groups) if groups else np.array([], dtype=np.int64)
    assert sorted(rows.tolist()) == list(range(n))


lengths_lists = st.lists(st.integers(1, 100), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(lengths_lists)
def test_fewest_groups_fit_the_budget_and_cover_every_row(lengths):
    sizes = RowSizes.text(lengths)
    groups = fewest_groups(sizes, BUDGET)
    _covers_once(groups, len(lengths))
    assert all(_cost(sizes, g) <= 100 for g in groups)
    # a lower bound no partition can beat: the padded tokens of the rows alone
    assert len(groups) >= -(-sum(lengths) // 100)


@settings(max_examples=60, deadline=None)
@given(lengths_lists, st.integers(1, 50))
def test_split_groups_gives_exactly_the_asked_count(lengths, extra):
    sizes = RowSizes.text(lengths)
    fewest = fewest_groups(sizes, BUDGET)
    count = len(fewest) + extra
    groups = split_groups(sizes, BUDGET, count)
    assert len(groups) == min(count, len(lengths))
    _covers_once(groups, len(lengths))
    costs = [_cost(sizes, g) for g in groups]
    assert all(c <= 100 for c in costs)
    assert costs == sorted(costs, reverse=True)  # costliest first
    assert costs[0] <= max(_cost(sizes, g) for g in fewest)  # more passes never cost more


def test_split_groups_spreads_rows_over_lighter_passes():
    sizes = RowSizes.text([10] * 8)
    assert [len(g) for g in split_groups(sizes, BUDGET, 4)] == [2, 2, 2, 2]


def test_groups_never_span_two_segments():
    sizes = RowSizes.text([50, 10, 10, 40, 30, 20, 5, 5])
    segments = [np.arange(0, 4), np.arange(4, 8)]
    for groups in (
        fewest_groups(sizes, BUDGET, segments=segments),
        split_groups(sizes, BUDGET, 6, segments=segments),
    ):
        _covers_once(groups, 8)
        assert all(set(g) <= set(range(4)) or set(g) <= set(range(4, 8)) for g in groups)
    assert len(split_groups(sizes, BUDGET, 6, segments=segments)) == 6


def test_over_budget_row_is_an_error_that_names_it():
    sizes = RowSizes.text([20, 130, 10])
    with pytest.raises(odb.OverBudgetError, match=r"row 1 .*length 130") as raised:
        fewest_groups(sizes, BUDGET)
    assert raised.value.index == 1


def test_over_budget_row_runs_alone_with_solo():
    sizes = RowSizes.text([20, 130, 10, 15])
    groups = fewest_groups(sizes, BUDGET, over_budget="solo")
    assert [1] in [g.tolist() for g in groups]
    _covers_once(groups, 4)


def test_config_refuses_packed_cost_and_truncation():
    with pytest.raises(odb.ConfigError, match="padded"):
        GRPOBatching(1000, cost=odb.PackedCost())
    with pytest.raises(odb.ConfigError, match="over_budget"):
        GRPOBatching(1000, over_budget="truncate")
    with pytest.raises(odb.ConfigError, match="token_budget"):
        GRPOBatching(0)


def _ranks_plan(rank_lengths, capacity, count=1, budget=BUDGET):
    """Every simulated rank's (segment, rows, ghosts) per pass, as the trainer computes them."""
    sizes = [RowSizes.text(lengths) for lengths in rank_lengths]
    ordered = [sorted_segments(s, [np.arange(len(s))]) for s in sizes]
    table = np.stack([encode_rows(s, o, capacity) for s, o in zip(sizes, ordered, strict=True)])
    passes = envelope_groups(table, capacity, budget, count)
    return sizes, [own_groups(s, o, passes, capacity) for s, o in zip(sizes, ordered, strict=True)]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(1, 100), min_size=8, max_size=8), min_size=2, max_size=4),
    st.integers(1, 8),
)
def test_every_rank_runs_the_same_passes_with_the_same_row_counts(rank_lengths, count):
    sizes, plans = _ranks_plan(rank_lengths, capacity=8, count=count)
    assert len({len(plan) for plan in plans}) == 1  # equal pass counts
    assert len(plans[0]) >= count
    for pass_index in range(len(plans[0])):  # equal rows per pass: TRL gathers per-row metrics
        assert len({len(plan[pass_index][1]) for plan in plans}) == 1
    for rank_sizes, plan in zip(sizes, plans, strict=True):
        groups = [rows for _, rows, _ in plan]
        _covers_once(groups, 8)
        assert all(ghosts == 0 for _, _, ghosts in plan)  # equal rows: no ghost needed
        assert all(_cost(rank_sizes, g) <= 100 for g in groups)


def test_a_rank_with_short_rows_follows_the_long_rank_without_ghosts():
    long, short = [90, 80, 70, 60, 50, 40, 30, 20], [5] * 8
    (_, plans) = _ranks_plan([long, short], capacity=8)
    alone = len(fewest_groups(RowSizes.text(short), BUDGET))
    assert alone == 1 and len(plans[1]) == len(plans[0]) > alone
    assert [len(rows) for _, rows, _ in plans[1]] == [len(rows) for _, rows, _ in plans[0]]


def test_ghost_rows_only_where_a_rank_has_fewer_rows():
    rank_lengths = [[30] * 8, [40, 35, 20, 12, 9]]
    sizes, plans = _ranks_plan(rank_lengths, capacity=8)
    assert sum(ghosts for _, _, ghosts in plans[0]) == 0
    assert sum(ghosts for _, _, ghosts in plans[1]) == 3
    for (_, rows0, _), (_, rows1, ghosts1) in zip(*plans, strict=True):
        assert len(rows0) == len(rows1)  # equal row counts per pass
        assert all(row == 4 for row in rows1[len(rows1) - ghosts1 :])  # copies of the shortest
    _covers_once([rows[: len(rows) - g] for _, rows, g in plans[1]], 5)
    for rank_sizes, plan in zip(sizes, plans, strict=True):  # ghosts included, within budget
        assert all(_cost(rank_sizes, rows) <= 100 for _, rows, _ in plan)


def test_a_long_ghost_row_is_budgeted_where_it_runs():
    """The rank with fewer rows has only long ones: its ghost copies are long too, and the
    plan must still fit its passes (the envelope counts the ghost, not the peer's short row)."""
    sizes, plans = _ranks_plan([[10] * 8, [45, 45]], capacity=8)
    for rank_sizes, plan in zip(sizes, plans, strict=True):
        assert all(_cost(rank_sizes, rows) <= 100 for _, rows, _ in plan)
    assert len({len(plan) for plan in plans}) == 1


# --- rows of TRL's rollout dicts -------------------------------------------------------------


def _rollouts():
    """Three rows in TRL's layout; each row's image patches hold its row number."""
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    completion_mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    grids = [
        torch.tensor([[1, 2, 2]]),
        torch.zeros((0, 3), dtype=torch.long),
        torch.tensor([[1, 2, 4], [1, 2, 2]]),
    ]
    pixel_values = torch.cat(
        [torch.full((int(g.prod(-1).sum()), 5), float(row)) for row, g in enumerate(grids)]
    )
    return {
        "prompt_ids": torch.arange(9).reshape(3, 3) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": 100 + torch.arange(12).reshape(3, 4) * completion_mask,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([0.5, -1.0, 2.0]),
        "old_per_token_logps": -torch.rand(3, 4),
        "mm_token_type_ids": torch.ones(3, 7, dtype=torch.long),
        "num_items_in_batch": torch.tensor(6),
        "pixel_values": pixel_values,
        "image_grid_thw": torch.cat(grids),
        "num_images": [1, 0, 2],
    }


def test_take_rows_keeps_images_with_their_rows():
    window = _concat_rows([_rollouts()])
    picked = _take_rows(window, [2, 0])
    assert picked["num_images"] == [2, 1]
    assert picked["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2], [1, 2, 2]]
    rows_of_patches = picked["pixel_values"][:, 0].tolist()
    assert rows_of_patches == [2.0] * 12 + [0.0] * 4
    assert picked["advantages"].tolist() == [2.0, 0.5]
    assert picked["num_items_in_batch"].item() == 6


def test_rows_without_images_carry_no_pixel_tensors():
    picked = _take_rows(_concat_rows([_rollouts()]), [1])
    assert "pixel_values" not in picked and "image_grid_thw" not in picked


def test_concat_rows_joins_chunks_in_order():
    first, second = _rollouts(), _rollouts()
    second["advantages"] = second["advantages"] + 10
    window = _concat_rows([first, second])
    assert window["advantages"].tolist() == [0.5, -1.0, 2.0, 10.5, 9.0, 12.0]
    assert len(window["pixel_values"]) == 6  # split per row
    assert window["num_images"] == [1, 0, 2, 1, 0, 2]


def test_trim_drops_only_padding_no_row_needs():
    batch = _take_rows(_concat_rows([_rollouts()]), [0, 2])
    trimmed = _trim(batch)
    # longest prompt of rows 0 and 2 is 2 tokens, longest completion 3
    assert trimmed["prompt_ids"].shape == (2, 2)
    assert trimmed["completion_ids"].shape == (2, 3)
    assert trimmed["old_per_token_logps"].shape == (2, 3)
    assert trimmed["mm_token_type_ids"].shape == (2, 5)
    assert torch.equal(trimmed["prompt_mask"].sum(1), batch["prompt_mask"].sum(1))
    assert torch.equal(trimmed["completion_mask"].sum(1), batch["completion_mask"].sum(1))
    assert torch.equal(trimmed["pixel_values"], batch["pixel_values"])


def test_layout_reads_prompt_and_completion_lengths():
    rollouts = _rollouts()
    mask = torch.cat([rollouts["prompt_mask"], rollouts["completion_mask"]], dim=1)
    layout = _Layout.of(mask, 4)
    assert layout.prompt.tolist() == [2, 3, 1]
    assert layout.completion.tolist() == [2, 1, 3]


def test_layout_refuses_a_mask_with_gaps():
    mask = torch.tensor([[1, 0, 1, 1, 1, 0]])
    with pytest.raises(RolloutLayoutError, match="left-padded prompt"):
        _Layout.of(mask, 3)


def test_the_planning_layer_imports_without_trl():
    """Only the layout and trainer layers import TRL; the package loads them on first use."""
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import odb.adapters.trl as adapter\n"
        "from odb.benchmarks.rl import run_rl\n"
        "assert 'odb.adapters.trl.trainer' not in sys.modules\n"
        "try:\n"
        "    adapter.OdbGRPOTrainer\n"
        "except ImportError:\n"
        "    print('needs trl')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "needs trl"


def test_a_rank_that_cannot_plan_stops_every_rank_in_the_same_exchange():
    """Rank 1 holds a row over the budget: it raises its own error naming the row, after
    sending a FAILED report with its cause; rank 0 raises the core's AlignmentError, which
    names rank 1 and why, instead of waiting for a plan that never comes."""
    trainer = SimpleNamespace(
        loss_type="grpo",
        is_deepspeed_enabled=False,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
    )
    lengths = [[30, 20], [30, 200]]

    def rank(exchange):
        batcher = _Batcher(trainer, GRPOBatching(100))
        batcher._exchange = exchange
        sizes = RowSizes.text(lengths[exchange.rank])
        try:
            return batcher._aligned(sizes, [np.arange(2)], 2, 1, batcher.config.budget)
        except odb.OdbError as error:
            return error

    first, second = run_ranks(2, rank)
    assert isinstance(second, odb.OverBudgetError) and "rollout row 1" in str(second)
    assert isinstance(first, odb.AlignmentError)
    assert "rank(s) [1] raised while planning their rollouts" in str(first)
    assert "a sample broke the sample contract or the budget" in str(first)
