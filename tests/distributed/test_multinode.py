"""Two "nodes" on this machine: two torchrun agents, two ranks each, meeting by c10d
rendezvous on the loopback interface, as agents on two machines would. odb only sees the
global rank and world size, so every guarantee must hold as on one node."""

from __future__ import annotations

import pytest
from ranks import capped_lengths, check_aligned, launch

pytestmark = pytest.mark.slow

NODES, PER_NODE = 2, 2


def test_two_nodes_run_equal_steps_with_every_sample_once(tmp_path):
    lengths = capped_lengths(400, seed=21)
    shards = [
        list(range(0, 40)),
        list(range(40, 140)),
        list(range(140, 150)),
        list(range(150, 400)),
    ]
    config = {"lengths": lengths, "per_rank_indices": shards, "shard": False, "num_workers": 1}
    results = launch(tmp_path, config, PER_NODE, nodes=NODES, timeout=240)
    check_aligned(results, shards, lengths)
    steps = [s for r in results for s in r["epochs"][0]]
    assert any(s["reason"] == "shared" for s in steps) and any(s["ghost"] for s in steps)


def test_two_nodes_train_on_the_exact_global_token_mean(tmp_path):
    lengths = capped_lengths(160, seed=22, budget=512, mean=100)
    shards = [list(range(0, 20)), list(range(20, 60)), list(range(60, 70)), list(range(70, 160))]
    config = {
        "lengths": lengths,
        "per_rank_indices": shards,
        "shard": False,
        "scenario": "grads",
        "budget": 512,
        "window": 32,
    }
    results = launch(tmp_path, config, PER_NODE, nodes=NODES, timeout=300)
    for r in results:
        assert "error" not in r, r.get("traceback")
    assert results[0]["miscounted"] == []
    assert results[0]["worst_grad_error"] < 1e-9


def test_two_nodes_resume_with_the_same_batches(tmp_path):
    lengths = capped_lengths(400, seed=23)
    base = {"lengths": lengths, "num_workers": 1, "window": 32}
    full = launch(tmp_path, {**base, "scenario": "epoch"}, PER_NODE, nodes=NODES, timeout=240)
    head = launch(
        tmp_path, {**base, "scenario": "resume", "save_at": 17}, PER_NODE, nodes=NODES, timeout=240
    )
    rest = launch(
        tmp_path, {**base, "scenario": "resume", "load": True}, PER_NODE, nodes=NODES, timeout=240
    )
    for rank in range(NODES * PER_NODE):
        assert "error" not in rest[rank], rest[rank].get("traceback")
        assert head[rank]["epochs"][0] + rest[rank]["epochs"][0] == full[rank]["epochs"][0]
