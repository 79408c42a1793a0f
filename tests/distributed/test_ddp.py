"""Real multi-process runs (torchrun, gloo) of the alignment protocol: every guarantee of
docs/protocol.md checked on processes that really talk to each other."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ranks import WORKER, capped_lengths, check_aligned, launch, worker_env
from synthetic import label_tokens
from tiny import free_port, tiny_model

pytestmark = pytest.mark.slow


def test_three_ranks_with_100_400_400_samples(tmp_path):
    lengths = capped_lengths(900)
    shards = [list(range(0, 100)), list(range(100, 500)), list(range(500, 900))]
    config = {"lengths": lengths, "per_rank_indices": shards, "epochs": 2}
    results = launch(tmp_path, config, 3)
    check_aligned(results, shards, lengths)
    steps = [r["epochs"][0] for r in results]
    # rank 0 runs out first and then runs groups the others hand over (and ghost steps in
    # rounds where they offer fewer groups than there are ranks: check_aligned checks that a
    # rank runs ghosts only once its own shard is used up)
    assert sum(s["reason"] == "shared" for s in steps[0]) > 0
    for r in results:
        epochs = [s for e in r["epochs"] for s in e]
        assert r["stats"]["ghost_steps"] == sum(s["ghost"] for s in epochs)
        assert r["stats"]["shared_groups"] == sum(s["reason"] == "shared" for s in epochs)


def test_a_rank_with_an_empty_shard_runs_ghost_steps_until_the_end_is_shared(tmp_path):
    lengths = capped_lengths(300, seed=1)
    shards = [list(range(300)), []]
    config = {"lengths": lengths, "per_rank_indices": shards, "share_tail": False}
    results = launch(tmp_path, config, 2)
    check_aligned(results, shards, lengths)
    steps = results[1]["epochs"][0]
    assert steps and all(s["ghost"] for s in steps)
    assert all(s["indices"] == [1] for s in steps)  # it borrows dataset[rank]
    results = launch(tmp_path, {**config, "share_tail": True}, 2)
    check_aligned(results, shards, lengths)
    steps = results[1]["epochs"][0]
    assert any(s["reason"] == "shared" for s in steps) and steps[0]["ghost"]
    assert results[1]["stats"]["shared_groups"] == sum(s["reason"] == "shared" for s in steps)


def _skewed(n, seed):
    """Equal sample counts, unequal work: rank 0 gets 70% of the longer half of the lengths."""
    lengths = capped_lengths(n, seed=seed)
    order = np.argsort(lengths)[::-1].tolist()
    half, heavy = n // 2, int(0.7 * n // 2)
    shards = [
        order[:heavy] + order[half : 2 * half - heavy],
        order[heavy:half] + order[2 * half - heavy :],
    ]
    return lengths, [np.random.default_rng(seed).permutation(s).tolist() for s in shards]


def test_the_end_of_unequal_shards_is_shared_so_all_ranks_finish_together(tmp_path):
    lengths, shards = _skewed(400, seed=11)
    config = {"lengths": lengths, "per_rank_indices": shards, "num_workers": 2, "window": 64}
    apart = launch(tmp_path, {**config, "share_tail": False}, 2)
    check_aligned(apart, shards, lengths)
    together = launch(tmp_path, config, 2)
    check_aligned(together, shards, lengths)
    ghost_steps = [
        sum(s["ghost"] for r in run for s in r["epochs"][0]) for run in (apart, together)
    ]
    assert ghost_steps[0] > 30 and ghost_steps[1] <= ghost_steps[0] / 5, ghost_steps
    assert len(together[0]["epochs"][0]) < len(apart[0]["epochs"][0])
    received = [s for s in together[1]["epochs"][0] if s["reason"] == "shared"]
    assert received and all(set(s["indices"]) <= set(shards[0]) for s in received)


def test_odb_shards_the_shuffled_order_by_rank(tmp_path):
    lengths = capped_lengths(500, seed=2)
    results = launch(tmp_path, {"lengths": lengths, "epochs": 2}, 2)
    epochs = check_aligned(results, None, lengths)
    for epoch in range(2):
        seen = [
            [i for s in epochs[rank][epoch] if not s["ghost"] for i in s["indices"]]
            for rank in range(2)
        ]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(500))
    assert epochs[0][0] != epochs[0][1]


def test_non_join_stops_all_ranks_together_and_counts_the_rest(tmp_path):
    lengths = capped_lengths(900, seed=3)
    shards = [list(range(0, 100)), list(range(100, 500)), list(range(500, 900))]
    config = {"lengths": lengths, "per_rank_indices": shards, "join": False}
    results = launch(tmp_path, config, 3)
    check_aligned(results, shards, lengths, join=False)
    for rank, result in enumerate(results):
        steps = result["epochs"][0]
        assert not any(s["ghost"] for s in steps)
        emitted = sum(len(s["indices"]) for s in steps)
        assert emitted + result["stats"]["dropped_samples"] == len(shards[rank])
    assert results[0]["stats"]["dropped_samples"] == 0
    assert results[2]["stats"]["dropped_samples"] > 0


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_workers_under_every_start_method(tmp_path, start_method):
    lengths = capped_lengths(400, seed=4)
    shards = [list(range(0, 150)), list(range(150, 400))]
    config = {
        "lengths": lengths,
        "per_rank_indices": shards,
        "num_workers": 2,
        "start_method": start_method,
        "mode": "packed",
    }
    check_aligned(launch(tmp_path, config, 2), shards, lengths)


def test_a_rank_that_raises_stops_the_others_with_a_clear_error(tmp_path):
    lengths = capped_lengths(400, seed=5)
    shards = [list(range(0, 200)), list(range(200, 400))]
    config = {"lengths": lengths, "per_rank_indices": shards, "bad_index": 300}
    results = launch(tmp_path, config, 2)
    assert results[1]["error"].startswith("SampleError: sample 300")
    assert results[0]["error"].startswith("AlignmentError: rank(s) [1] raised")


def test_a_rank_that_dies_stops_the_others_within_the_timeout(tmp_path):
    """Plain processes (torchrun would kill the survivors itself): rank 1 exits abruptly."""
    lengths = capped_lengths(600, seed=6)
    config = {
        "lengths": lengths,
        "scenario": "die",
        "victim": 1,
        "after": 3,
        "align_timeout": 20,
        "out": str(tmp_path),
        "window": 16,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    port = free_port()
    procs = []
    start = time.time()
    for rank in range(2):
        env = {
            **worker_env(),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    for proc in procs:
        proc.wait(timeout=120)
    assert procs[1].returncode == 17
    survivor = json.loads((tmp_path / "rank0.json").read_text())
    assert survivor["error"].startswith("AlignmentError: rank 0: an alignment round failed")
    assert survivor["error_time"] - start < 20 + 30  # the timeout, plus start-up


@pytest.mark.parametrize(
    ("mode", "split", "wrap"),
    [
        ("padded", "uneven", "ddp"),
        ("packed", "uneven", "ddp"),
        ("packed", "skewed", "ddp"),
        ("padded", "uneven", "fsdp2"),  # FSDP2's fully_shard on CPU/gloo, in a plain loop
        ("packed", "skewed", "fsdp2"),
    ],
)
def test_gradients_equal_the_single_process_global_token_mean(tmp_path, mode, split, wrap):
    if split == "uneven":  # rank 0 runs out first: ghost steps
        lengths, shards = capped_lengths(120, seed=7), [list(range(0, 40)), list(range(40, 120))]
    else:  # equal counts, unequal work: groups handed over at the end
        lengths, shards = _skewed(120, seed=7)
    config = {
        "lengths": lengths,
        "per_rank_indices": shards,
        "scenario": "grads",
        "mode": mode,
        "window": 16,
        "wrap": wrap,
    }
    results = launch(tmp_path, config, 2, timeout=300)
    for r in results:
        assert "error" not in r, r.get("traceback")
    assert results[0]["steps"] == results[1]["steps"]
    assert all(r["sharded_grads"] == (wrap == "fsdp2") for r in results)
    assert results[0]["miscounted"] == []
    if split == "uneven":
        assert results[0]["ghosts"] > 0
    else:
        assert results[1]["shared"] > 0
    assert results[0]["worst_grad_error"] < 1e-9


def test_fsdp2_training_checkpointed_and_resumed_ends_as_uninterrupted_and_as_ddp(tmp_path):
    """AdamW training of the tiny float64 model over unequal shards (ghost steps and
    handed-over groups after the cut), checkpointed after ``cut`` steps (the loader's state
    and a distributed checkpoint of the FSDP2 model and optimizer), then resumed in a fresh
    launch: its batches and final parameters are those of the uninterrupted FSDP2 run, whose
    parameters are those of the same training under DDP."""
    lengths, shards = capped_lengths(120, seed=7), [list(range(0, 40)), list(range(40, 120))]
    base = {
        "lengths": lengths,
        "per_rank_indices": shards,
        "scenario": "train",
        "window": 16,
        "wrap": "fsdp2",
    }
    cut = 10
    runs = [
        {"wrap": "ddp", "params": "ddp"},
        {"params": "fsdp2"},
        {"save_at": cut},
    ]
    first = launch(tmp_path, {**base, "runs": runs}, 2, timeout=300)
    resumed = launch(tmp_path, {**base, "load": True, "params": "resumed"}, 2, timeout=300)
    for r in first:
        for record in r["runs"]:
            assert "error" not in record, record.get("traceback")
    for r in resumed:
        assert "error" not in r, r.get("traceback")
    ddp, fsdp2, head = ([r["runs"][i]["epochs"][0] for r in first] for i in range(len(runs)))
    assert [r["runs"][1]["sharded"] for r in first] == [True, True]
    assert ddp == fsdp2
    for rank in range(2):
        assert head[rank] == fsdp2[rank][:cut]
        assert resumed[rank]["epochs"][0] == fsdp2[rank][cut:]
    after = [s for steps in fsdp2 for s in steps[cut:]]
    assert any(s["ghost"] for s in after) and any(s["reason"] == "shared" for s in after)

    params = {name: torch.load(tmp_path / f"{name}.pt") for name in ("ddp", "fsdp2", "resumed")}
    initial = {name: p.detach() for name, p in tiny_model(vocab=512).named_parameters()}
    assert params["fsdp2"].keys() == params["ddp"].keys() == initial.keys()
    for name, value in params["fsdp2"].items():
        # Every token of a LengthDataset sample is the same, so attention averages equal
        # values and the query and key projections get no gradient: all else must move.
        if "q_proj" not in name and "k_proj" not in name:
            assert float((value - initial[name]).abs().max()) > 1e-2, f"{name} was trained"
        # Bitwise equal here; a little room for reductions that round differently.
        torch.testing.assert_close(params["resumed"][name], value, rtol=0, atol=1e-12)
        torch.testing.assert_close(value, params["ddp"][name], rtol=0, atol=1e-12)


def test_resume_after_a_restart_continues_with_the_same_batches(tmp_path):
    lengths = capped_lengths(500, seed=8)
    base = {"lengths": lengths, "num_workers": 2, "window": 32}
    full = launch(tmp_path, {**base, "scenario": "epoch"}, 2)
    head = launch(tmp_path, {**base, "scenario": "resume", "save_at": 23}, 2)
    rest = launch(tmp_path, {**base, "scenario": "resume", "load": True}, 2)
    for rank in range(2):
        assert "error" not in rest[rank], rest[rank].get("traceback")
        got = head[rank]["epochs"][0] + rest[rank]["epochs"][0]
        assert got == full[rank]["epochs"][0]


def test_resume_inside_the_shared_end_of_the_data(tmp_path):
    lengths, shards = _skewed(300, seed=12)
    base = {"lengths": lengths, "per_rank_indices": shards, "num_workers": 2, "window": 64}
    full = launch(tmp_path, {**base, "scenario": "epoch"}, 2)
    reasons = [s["reason"] for s in full[1]["epochs"][0]]
    cut = reasons.index("shared")  # the state then holds a handed-over group not yet run
    head = launch(tmp_path, {**base, "scenario": "resume", "save_at": cut}, 2)
    rest = launch(tmp_path, {**base, "scenario": "resume", "load": True}, 2)
    for rank in range(2):
        assert "error" not in rest[rank], rest[rank].get("traceback")
        assert head[rank]["epochs"][0] + rest[rank]["epochs"][0] == full[rank]["epochs"][0]


def _reread_config(fault: str) -> tuple[list[int], dict]:
    """Unequal shards, so groups are handed over, of a dataset that reads differently there."""
    lengths, shards = _skewed(400, seed=11)
    config = {"lengths": lengths, "per_rank_indices": shards, "num_workers": 2, "window": 64}
    return lengths, {**config, "reread_fault": fault, "align_timeout": 120}


def test_a_rank_that_cannot_read_a_handed_over_group_stops_every_rank_at_once(tmp_path):
    _, config = _reread_config("raise")
    start = time.time()
    results = launch(tmp_path, config, 2)
    assert results[1]["error"].startswith("OSError: cannot read sample")
    assert results[0]["error"].startswith("AlignmentError: rank(s) [1] raised reading the samples")
    assert max(r["error_time"] for r in results) - start < 60  # not the 120 s timeout


def test_a_dataset_that_only_reads_in_workers_is_never_handed_over(tmp_path):
    lengths, config = _reread_config("unreadable")
    _, shards = _skewed(400, seed=11)
    results = launch(tmp_path, config, 2)
    check_aligned(results, shards, lengths)
    steps = [s for r in results for s in r["epochs"][0]]
    assert not any(s["reason"] == "shared" for s in steps)
    assert any(s["ghost"] for s in steps), "the lighter rank runs ghost steps instead"


def test_global_label_tokens_count_what_the_recipient_read(tmp_path):
    lengths, config = _reread_config("labels")
    results = launch(tmp_path, config, 2)
    steps = list(zip(*(r["epochs"][0] for r in results), strict=True))
    shared = [step for step in steps if any(s["reason"] == "shared" for s in step)]
    assert shared
    for step in steps:
        real = [s for s in step if not s["ghost"]]
        assert {s["global_label_tokens"] for s in step} == {
            sum(s["local_label_tokens"] for s in real)
        }
    for step in shared:  # the re-read samples carry one label token fewer each
        s = next(s for s in step if s["reason"] == "shared")
        assert s["local_label_tokens"] == sum(label_tokens(lengths[i]) - 1 for i in s["indices"])
