"""Exact resume: save at any step, restore into a fresh loader, get the same remaining batches."""

import json

import numpy as np
import pytest
from synthetic import LengthDataset, lognormal_lengths

import odb
from odb import StateError

BUDGET = 2048


def _indices(batches):
    return [odb.step_info(b).sample_indices for b in batches]


def assert_resumes_exactly(make_loader, cuts, epochs=(0,)):
    """The shared harness: for each cut, run ``cut`` batches, save, restore into a fresh
    loader, and compare the rest (indices and step info) with an uninterrupted run."""
    for epoch in epochs:
        reference = make_loader()
        reference.set_epoch(epoch)
        full = list(reference)
        assert full, "the reference run emitted nothing"
        for cut in cuts:
            cut = min(cut, len(full))
            first = make_loader()
            first.set_epoch(epoch)
            iterator = iter(first)
            head = [next(iterator) for _ in range(cut)]
            # the state is plain data: it survives JSON (no tensors, no numpy objects)
            state = json.loads(json.dumps(first.state_dict()))
            del iterator, first
            second = make_loader()
            second.load_state_dict(state)
            rest = list(second)
            assert _indices(head) + _indices(rest) == _indices(full), f"cut at {cut}"
            rest_infos = [odb.step_info(b) for b in rest]
            assert rest_infos == [odb.step_info(b) for b in full[cut:]]
            for resumed, original in zip(rest, full[cut:], strict=True):
                assert resumed["input_ids"].equal(original["input_ids"])


@pytest.fixture(scope="module")
def lengths():
    return np.minimum(lognormal_lengths(700, 300, 1.0, seed=5), BUDGET)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_resume_at_any_step(lengths, mode, num_workers):
    def make():
        return odb.DataLoader(
            LengthDataset(lengths),
            BUDGET,
            mode=mode,
            shuffle=True,
            seed=11,
            window=128,
            num_workers=num_workers,
        )

    cuts = [0, 1, 2, 7, 40, 63, 64, 65, 120] if num_workers == 0 else [0, 5, 50]
    assert_resumes_exactly(make, cuts, epochs=(0, 3) if num_workers == 0 else (1,))


def test_resume_with_solo_and_truncated_samples():
    lengths = [50, 900, 40, 3000, 10, 700, 5000, 20] * 10

    def make(over_budget):
        return lambda: odb.DataLoader(
            LengthDataset(lengths), 1000, over_budget=over_budget, shuffle=True, window=16
        )

    assert_resumes_exactly(make("solo"), [3, 17])
    assert_resumes_exactly(make("truncate"), [3, 17])


def test_resume_with_a_user_sampler():
    sampler = list(range(0, 600, 3))

    def make():
        return odb.DataLoader(
            LengthDataset([20 + i % 97 for i in range(600)]), 512, sampler=sampler, window=32
        )

    assert_resumes_exactly(make, [1, 9])


def test_state_at_the_end_of_an_epoch_resumes_to_nothing_left(lengths):
    loader = odb.DataLoader(LengthDataset(lengths), BUDGET)
    list(loader)
    state = loader.state_dict()
    fresh = odb.DataLoader(LengthDataset(lengths), BUDGET)
    fresh.load_state_dict(state)
    assert list(fresh) == []
    fresh.set_epoch(1)
    assert len(list(fresh)) > 0


def test_state_before_iterating_starts_the_epoch_from_the_beginning(lengths):
    loader = odb.DataLoader(LengthDataset(lengths), BUDGET, shuffle=True)
    loader.set_epoch(2)
    state = loader.state_dict()
    fresh = odb.DataLoader(LengthDataset(lengths), BUDGET, shuffle=True)
    fresh.load_state_dict(state)
    assert fresh.epoch == 2
    assert _indices(fresh) == _indices(loader)


def test_stats_continue_after_a_restore(lengths):
    loader = odb.DataLoader(LengthDataset(lengths), BUDGET)
    iterator = iter(loader)
    for _ in range(5):
        next(iterator)
    fresh = odb.DataLoader(LengthDataset(lengths), BUDGET)
    fresh.load_state_dict(loader.state_dict())
    list(fresh)
    assert fresh.stats().samples == len(lengths)


def test_restoring_with_other_settings_is_refused(lengths):
    state = odb.DataLoader(LengthDataset(lengths), BUDGET).state_dict()
    other = odb.DataLoader(LengthDataset(lengths), BUDGET * 2)
    with pytest.raises(StateError, match=r"token_budget: saved 2048.0, now 4096.0"):
        other.load_state_dict(state)


def test_restoring_onto_another_rank_or_world_size_is_refused(lengths):
    state = odb.DataLoader(LengthDataset(lengths), BUDGET).state_dict()
    state["world_size"], state["rank"] = 2, 1
    with pytest.raises(StateError, match=r"saved by rank 1 of 2.*rank 0 of 1"):
        odb.DataLoader(LengthDataset(lengths), BUDGET).load_state_dict(state)


def test_restoring_garbage_is_refused():
    with pytest.raises(StateError, match="not an odb loader state"):
        odb.DataLoader(LengthDataset([5]), 100).load_state_dict({"epoch": 0})
