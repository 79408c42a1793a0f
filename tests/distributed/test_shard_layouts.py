"""Real multi-process runs (torchrun, gloo, 3 ranks) of the ways ranks may hold their data: one
dataset with odb sharding it, one dataset with a sampler per rank, a dataset per rank (each
rank loads its own file), and a rank whose dataset is empty."""

from __future__ import annotations

import numpy as np
import pytest
from ranks import capped_lengths, check_aligned, launch

pytestmark = pytest.mark.slow

RANKS = 3


def _shared_steps(results) -> list[int]:
    """Steps (of the first epoch) in which two or more ranks run a group handed over to them."""
    steps = zip(*(r["epochs"][0] for r in results), strict=True)
    return [j for j, step in enumerate(steps) if sum(s["reason"] == "shared" for s in step) >= 2]


def _handed_to_two_ranks(
    mode: str, seed: int, *, few: int = 100, budget: int = 2048, mean: float = 200, **extra
) -> tuple[list[int], list, dict]:
    """One dataset, a sampler per rank over ``few`` / ``few`` / ``7 * few`` of its indices:
    ranks 0 and 1 run out early and the rest of rank 2's data is handed over to both, often
    in the same step (``seed`` picks lengths where today's code does that several times)."""
    lengths = capped_lengths(9 * few, seed=seed, budget=budget, mean=mean)
    shards = [list(range(0, few)), list(range(few, 2 * few)), list(range(2 * few, 9 * few))]
    config = {
        "lengths": lengths,
        "per_rank_indices": shards,
        "shard": False,
        "budget": budget,
        "window": 128,
        "mode": mode,
        **extra,
    }
    return lengths, shards, config


@pytest.mark.parametrize(
    ("mode", "seed", "num_workers"), [("padded", 0, 0), ("packed", 8, 0), ("padded", 0, 2)]
)
def test_every_step_counts_the_groups_handed_to_several_ranks(tmp_path, mode, seed, num_workers):
    """Every rank's global label-token and sample counts are the sums of what the ranks run,
    also in the steps where two ranks run groups handed over to them."""
    lengths, shards, config = _handed_to_two_ranks(mode, seed, num_workers=num_workers)
    results = launch(tmp_path, config, RANKS)
    assert _shared_steps(results), "no step in which two ranks run handed-over groups"
    check_aligned(results, shards, lengths, budget=config["budget"])


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_gradients_stay_exact_when_several_ranks_run_handed_over_groups(tmp_path, mode):
    """The same layout, smaller (40 / 40 / 280 samples, budget 512), DDP-training a tiny
    model: the gradient of ``scale_loss(..., reduction="token")`` is the one-process gradient
    of the global token mean at every step."""
    lengths, shards, config = _handed_to_two_ranks(
        mode, 3, few=40, budget=512, mean=100, window=64, scenario="grads"
    )
    results = launch(tmp_path, config, RANKS)
    for r in results:
        assert "error" not in r, r.get("traceback")
    assert _shared_steps(results), "no step in which two ranks run handed-over groups"
    miscounted = results[0]["miscounted"]
    assert results[0]["worst_grad_error"] < 1e-9, (
        f"{len(miscounted)} steps miscounted (true, odb's), e.g. {miscounted[:3]}"
    )
    assert miscounted == []
    check_aligned(results, shards, lengths, budget=config["budget"])


def test_per_rank_samplers_that_already_shard_need_shard_false(tmp_path):
    """Samplers that differ between ranks already split the data: sharding them again would
    silently train on a third of it, so the default (``shard`` not given) refuses them and
    names the fix; identical samplers are still sharded. (With ``shard=False`` this layout
    trains on every sample once: test_ddp.py::test_three_ranks_with_100_400_400_samples.)"""
    lengths = capped_lengths(900)
    shards = [list(range(0, 100)), list(range(100, 500)), list(range(500, 900))]
    config = {"lengths": lengths, "per_rank_indices": shards, "shard": None}
    results = launch(tmp_path, config, RANKS)
    batches = [[s for e in r.get("epochs", []) for s in e] for r in results]
    samples = [sum(len(s["indices"]) for s in b if not s["ghost"]) for b in batches]
    errors = [
        r.get("error", f"no error; trained on {n} samples")
        for r, n in zip(results, samples, strict=True)
    ]
    report = "\n".join(f"rank {r}: {e}" for r, e in enumerate(errors))
    assert all(e.startswith("ConfigError") and "shard=False" in e for e in errors), report
    assert not any(batches), "refused before any batch"

    order = np.random.default_rng(9).permutation(900).tolist()
    same = launch(tmp_path, {**config, "per_rank_indices": [order] * RANKS}, RANKS)
    check_aligned(same, None, lengths)  # odb shards them: no sample twice...
    seen = [i for r in same for s in r["epochs"][0] if not s["ghost"] for i in s["indices"]]
    assert sorted(seen) == list(range(900))  # ...and none missed


@pytest.mark.parametrize("sizes", [(400, 400, 400), (300, 400, 600)])
def test_ranks_with_datasets_of_their_own_keep_their_samples(tmp_path, sizes):
    """Each rank reads a dataset of its own (different contents, maybe different sizes): a
    group handed over by index would be read from the wrong dataset, so no group changes rank
    and the ranks that run out first run ghost steps."""
    lengths = [capped_lengths(n, seed=20 + rank) for rank, n in enumerate(sizes)]
    config = {"per_rank_lengths": lengths, "shard": False, "window": 64}
    results = launch(tmp_path, config, RANKS)
    for r in results:
        assert "error" not in r, r.get("traceback")
    kept = []  # per rank: groups handed over to it, samples of its own missed, emitted twice
    for r, n in zip(results, sizes, strict=True):
        steps = [s for s in r["epochs"][0] if not s["ghost"]]
        seen = [i for s in steps for i in s["indices"]]
        shared = sum(s["reason"] == "shared" for s in steps)
        kept.append((shared, len(set(range(n)) - set(seen)), len(seen) - len(set(seen))))
    assert kept == [(0, 0, 0)] * RANKS, f"(handed over, missed, twice) per rank: {kept}"
    shards = [list(range(n)) for n in sizes]
    check_aligned(results, shards, lengths, own_datasets=True)


def test_ranks_whose_datasets_are_all_empty_yield_nothing(tmp_path):
    config = {"per_rank_lengths": [[], [], []], "shard": False}
    for r in launch(tmp_path, config, RANKS):
        assert "error" not in r, r.get("traceback")
        assert r["epochs"] == [[]]


def test_a_rank_with_an_empty_dataset_runs_ghost_steps_with_a_lent_sample(tmp_path):
    """One rank's dataset is empty while the others have data: it has no sample of its own
    to copy for its ghost steps, so another rank lends it one (torch.save bytes over gloo),
    and every rank runs the same steps."""
    lengths = [capped_lengths(200, seed=30), [], capped_lengths(200, seed=31)]
    config = {"per_rank_lengths": lengths, "shard": False, "align_timeout": 60}
    results = launch(tmp_path, config, RANKS, timeout=150)
    check_aligned(results, [list(range(len(n))) for n in lengths], lengths, own_datasets=True)
    empty = results[1]["epochs"][0]
    assert empty and all(s["ghost"] and s["indices"] == [-1] for s in empty)
