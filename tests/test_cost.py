import numpy as np
import pytest
import torch

from odb import (
    Budget,
    Caps,
    ComputeCost,
    ConfigError,
    PackedCost,
    PaddedCost,
    SampleError,
    SampleSize,
    SampleTypeError,
    measure_sample,
)


def test_measure_counts_label_tokens_after_the_causal_shift():
    labels = torch.tensor([-100, -100, 5, 6, -100, 7])
    size = measure_sample({"input_ids": torch.arange(6), "labels": labels}, 0)
    # labels[1:] = [-100, 5, 6, -100, 7] -> 3 targets
    assert size == SampleSize(length=6, label_tokens=3)


def test_measure_first_label_never_counts():
    size = measure_sample({"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, 0)
    assert size.label_tokens == 2


def test_measure_without_labels_counts_every_next_token():
    assert measure_sample({"input_ids": np.arange(10)}, 3).label_tokens == 9


def test_measure_reads_vision_grid_rows():
    sample = {
        "input_ids": torch.arange(20),
        "image_grid_thw": torch.tensor([[1, 4, 6], [1, 2, 2]]),
        "video_grid_thw": torch.tensor([[2, 2, 2]]),
    }
    size = measure_sample(sample, 0)
    assert (size.vision_patches, size.images) == (24 + 4 + 8, 3)


def test_measure_errors_if_input_ids_missing():
    with pytest.raises(SampleError, match=r"sample 7: missing key 'input_ids'"):
        measure_sample({"labels": [1]}, 7)


def test_measure_errors_if_input_ids_empty():
    with pytest.raises(SampleError, match=r"sample 2: 'input_ids' is empty"):
        measure_sample({"input_ids": torch.tensor([], dtype=torch.long)}, 2)


def test_measure_errors_on_a_batch_of_one_with_a_fix():
    with pytest.raises(SampleError, match=r"sample 4: .*batch of one.*\[0\]"):
        measure_sample({"input_ids": torch.zeros(1, 9, dtype=torch.long)}, 4)


def test_measure_errors_on_2d_input_ids():
    with pytest.raises(SampleError, match=r"sample 1: 'input_ids' must be 1-D .* \(3, 9\)"):
        measure_sample({"input_ids": torch.zeros(3, 9, dtype=torch.long)}, 1)


def test_measure_errors_on_nested_lists():
    with pytest.raises(SampleError, match="returned a batch"):
        measure_sample({"input_ids": [[1, 2], [3, 4]]}, 0)


def test_measure_errors_on_labels_of_another_length():
    with pytest.raises(SampleError, match=r"sample 5: 'labels' has length 3 but 'input_ids'"):
        measure_sample({"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3]}, 5)


def test_measure_errors_on_attention_mask_of_another_length():
    with pytest.raises(SampleError, match="'attention_mask' has length 2"):
        measure_sample({"input_ids": [1, 2, 3], "attention_mask": [1, 1]}, 0)


def test_measure_errors_if_not_a_mapping():
    with pytest.raises(SampleTypeError, match=r"sample 0: the dataset returned list"):
        measure_sample([{"input_ids": [1]}], 0)


def test_padded_cost_is_rows_times_longest():
    cost = PaddedCost().group_cost(np.array([3]), np.array([100]), 250, 0, 0)
    assert cost.tolist() == [300.0]


def test_packed_cost_is_sum_of_lengths():
    assert float(PackedCost().group_cost(3, 100, 250, 0, 0)) == 250.0


def test_compute_cost_adds_attention_and_vision_terms():
    padded = ComputeCost(padded=True, attention_weight=0.01, vision_weight=0.5)
    # 2 rows of 10: tokens 20, attention 2 * 10^2 = 200, patches 8
    assert float(padded.group_cost(2, 10, 15, 125, 8)) == pytest.approx(20 + 2 + 4)
    packed = ComputeCost(padded=False, attention_weight=0.01, vision_weight=0.5)
    assert float(packed.group_cost(2, 10, 15, 125, 8)) == pytest.approx(15 + 1.25 + 4)


def test_a_dense_mask_prices_the_square_of_the_packed_row():
    """sdpa and eager attend over a packed row through a row-by-row mask: 15 tokens in the
    row are 15**2 = 225 pairs, where a varlen kernel computes 10**2 + 5**2 = 125."""
    dense = ComputeCost(padded=False, attention_weight=0.01, vision_weight=0.5, dense_mask=True)
    assert float(dense.group_cost(2, 10, 15, 125, 8)) == pytest.approx(15 + 2.25 + 4)
    # a sample alone is one block: the same price under both kernels
    varlen = ComputeCost(padded=False, attention_weight=0.01, vision_weight=0.5)
    assert dense.one_sample_cost(10, 8) == varlen.one_sample_cost(10, 8) == 10 + 1 + 4
    # 5 tokens joining a row of 10: 2 * 10 * 5 = 100 more pairs than its own 25
    assert dense.joining_cost(10, 5) == pytest.approx(0.01 * 100)
    assert varlen.joining_cost(10, 5) == 0
    with pytest.raises(ConfigError, match="dense_mask prices packed rows"):
        ComputeCost(padded=True, dense_mask=True)


def test_longest_within_inverts_the_single_sample_cost():
    cost = ComputeCost(padded=False, attention_weight=0.001, vision_weight=2.0)
    longest = cost.longest_within(5000, patches=100)
    assert float(cost.sample_cost(longest, 100)) <= 5000 < float(cost.sample_cost(longest + 1, 100))


@pytest.mark.parametrize("limit", [0, -5, float("nan"), float("inf"), "1000", True])
def test_budget_must_be_a_positive_number(limit):
    with pytest.raises(ConfigError, match="token_budget"):
        Budget(limit)


def test_caps_must_be_positive_integers():
    with pytest.raises(ConfigError, match="max_images"):
        Caps(max_images=0)


def test_weights_must_be_non_negative():
    with pytest.raises(ConfigError, match="attention_weight"):
        ComputeCost(attention_weight=-1)


def test_why_over_names_the_limit_that_was_broken():
    budget = Budget(100, PaddedCost(), Caps(max_images=2, max_vision_patches=50))
    assert budget.why_over(SampleSize(100, 10)) is None
    assert "exceeds the token budget 100" in budget.why_over(SampleSize(101, 10))
    assert "max_images=2" in budget.why_over(SampleSize(10, 1, 20, 3))
    assert "max_vision_patches=50" in budget.why_over(SampleSize(10, 1, 60, 1))


def test_one_sample_cost_equals_the_vectorised_cost():
    for cost in (
        PaddedCost(),
        PackedCost(),
        ComputeCost(True, 1 / 768, 0.4),
        ComputeCost(False, 3e-4, 2.5),
    ):
        for length, patches in ((1, 0), (777, 0), (4096, 1296), (32768, 20000)):
            assert cost.one_sample_cost(length, patches) == float(cost.sample_cost(length, patches))


@pytest.mark.parametrize(
    ("key", "value", "kind"),
    [
        ("input_ids", torch.tensor([1.0, 2.0, 3.0]), "float32"),
        ("input_ids", [1.0, 2.0, 3.0], "float"),
        ("input_ids", [1, 2, 3.5], "float"),
        ("input_ids", np.array([1.0, 2.0, 3.0]), "float64"),
        ("input_ids", torch.tensor([True, False, True]), "bool"),
        ("labels", torch.tensor([-100.0, 2.0, 3.0]), "float32"),
        ("labels", [-100, 2.0, 3], "float"),
    ],
)
def test_measure_refuses_token_ids_that_are_not_integers(key, value, kind):
    sample = {"input_ids": torch.arange(3), key: value}
    with pytest.raises(SampleError, match=rf"sample 6: '{key}' holds {kind} values"):
        measure_sample(sample, 6)


@pytest.mark.parametrize(
    "ids",
    [
        [5, 6, 7],
        (5, 6, 7),
        [np.int64(5), np.int32(6), 7],
        torch.tensor([5, 6, 7], dtype=torch.int32),
        np.array([5, 6, 7], dtype=np.uint16),
    ],
)
def test_measure_accepts_integer_token_ids_of_any_integer_type(ids):
    size = measure_sample({"input_ids": ids, "labels": ids}, 0)
    assert size == SampleSize(length=3, label_tokens=2)


def test_measure_sums_each_frames_patches_squared():
    sample = {
        "input_ids": torch.arange(20),
        "image_grid_thw": torch.tensor([[1, 4, 6], [1, 2, 2]]),
        "video_grid_thw": torch.tensor([[2, 2, 2]]),
    }
    # the tower attends within each image and each video frame: 24^2 + 4^2 + 2 * 4^2
    assert measure_sample(sample, 0).vision_pairs == 576 + 16 + 32


def test_vision_attention_follows_each_images_own_size():
    cost = ComputeCost(padded=False, vision_weight=0.5, vision_attention_weight=0.01)
    # 400 patches as one image (400^2 pairs) or as four of 100 (4 * 100^2): the same patches,
    # four times less attention
    one = float(cost.group_cost(1, 10, 10, 100, 400, 400**2))
    four = float(cost.group_cost(1, 10, 10, 100, 400, 4 * 100**2))
    assert one == pytest.approx(10 + 200 + 1600) and four == pytest.approx(10 + 200 + 400)
    assert cost.one_sample_cost(10, 400, 400**2) == pytest.approx(one)
    longest = cost.longest_within(2000, patches=400, pairs=400**2)
    assert cost.one_sample_cost(longest, 400, 400**2) <= 2000
    assert cost.one_sample_cost(longest + 1, 400, 400**2) > 2000


def test_a_sample_within_the_token_cap_is_never_over_a_compute_limit():
    compute = ComputeCost(padded=True, vision_weight=1.0)
    capped = Budget(1000, compute, Caps(max_tokens=800))
    # 500 tokens and 900 patches cost 1400 > 1000: alone in its batch, not over budget
    assert capped.why_over(SampleSize(500, 1, 900, 1)) is None
    assert "max_tokens=800" in capped.why_over(SampleSize(900, 1))
    # without a token cap (or a cost that counts tokens only) the limit is the memory bound
    assert "exceeds the token budget" in Budget(1000, compute).why_over(SampleSize(500, 1, 900, 1))
    assert "exceeds" in Budget(400, PaddedCost(), Caps(max_tokens=800)).why_over(SampleSize(500, 1))
