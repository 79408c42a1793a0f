"""Real multi-process runs (torchrun, gloo) of the alignment protocol: every guarantee of
docs/protocol.md checked on processes that really talk to each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic import label_tokens, lognormal_lengths
from tiny import free_port, torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("worker.py")
BUDGET = 1024


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(tmp_path: Path, config: dict, nproc: int, *, timeout: float = 180) -> list[dict]:
    """Run ``nproc`` ranks under torchrun; return each rank's JSON record."""
    config = {**config, "out": str(tmp_path)}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    command = torchrun(nproc, str(WORKER), str(path))
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    records = [tmp_path / f"rank{r}.json" for r in range(nproc)]
    missing = [str(p) for p in records if not p.exists()]
    assert not missing, f"ranks wrote nothing ({missing}):\n{done.stdout}\n{done.stderr}"
    results = [json.loads(p.read_text()) for p in records]
    for p in records:
        p.unlink()
    return results


def _lengths(n, seed=0):
    return np.minimum(lognormal_lengths(n, 200, 1.0, seed=seed), BUDGET).tolist()


def _check_aligned(results, shards, lengths, *, join=True):
    """Equal steps; per step equal global counts that sum the ranks' batches; budget held;
    in join mode every sample of every rank once, ghosts only at a rank's tail."""
    for r in results:
        assert "error" not in r, r.get("traceback")
    for epoch in range(len(results[0]["epochs"])):
        per_rank = [r["epochs"][epoch] for r in results]
        assert len({len(steps) for steps in per_rank}) == 1, [len(s) for s in per_rank]
        for j, step in enumerate(zip(*per_rank, strict=True)):
            real = [s for s in step if not s["ghost"]]
            assert {s["global_label_tokens"] for s in step} == {
                sum(s["local_label_tokens"] for s in real)
            }
            assert {s["global_samples"] for s in step} == {sum(s["local_samples"] for s in real)}
            assert all(s["step"] == j for s in step)
            assert all(s["tokens_in_batch"] <= BUDGET for s in step)
            for s in real:
                expected = sum(label_tokens(lengths[i]) for i in s["indices"])
                assert s["local_label_tokens"] == expected
            assert all(s["loss_weight"] == (0.0 if s["ghost"] else 1.0) for s in step)
        for rank, steps in enumerate(per_rank):
            emitted = [i for s in steps if not s["ghost"] for i in s["indices"]]
            assert len(emitted) == len(set(emitted))
            if join and shards is not None:
                assert sorted(emitted) == sorted(shards[rank])
            ghosts = [s["ghost"] for s in steps]
            if True in ghosts:
                assert all(ghosts[ghosts.index(True) :])
    return [[r["epochs"][e] for e in range(len(r["epochs"]))] for r in results]


def test_three_ranks_with_100_400_400_samples(tmp_path):
    lengths = _lengths(900)
    shards = [list(range(0, 100)), list(range(100, 500)), list(range(500, 900))]
    config = {"lengths": lengths, "per_rank_indices": shards, "epochs": 2}
    results = launch(tmp_path, config, 3)
    _check_aligned(results, shards, lengths)
    steps = [r["epochs"][0] for r in results]
    assert sum(s["ghost"] for s in steps[0]) > 0, "rank 0 ran out first and ran ghost steps"
    assert results[0]["stats"]["ghost_steps"] == sum(
        s["ghost"] for e in results[0]["epochs"] for s in e
    )


def test_a_rank_with_an_empty_shard_runs_only_ghost_steps(tmp_path):
    lengths = _lengths(300, seed=1)
    shards = [list(range(300)), []]
    results = launch(tmp_path, {"lengths": lengths, "per_rank_indices": shards}, 2)
    _check_aligned(results, shards, lengths)
    steps = results[1]["epochs"][0]
    assert steps and all(s["ghost"] for s in steps)
    assert all(s["indices"] == [1] for s in steps)  # it borrows dataset[rank]


def test_odb_shards_the_shuffled_order_by_rank(tmp_path):
    lengths = _lengths(500, seed=2)
    results = launch(tmp_path, {"lengths": lengths, "epochs": 2}, 2)
    epochs = _check_aligned(results, None, lengths)
    for epoch in range(2):
        seen = [
            [i for s in epochs[rank][epoch] if not s["ghost"] for i in s["indices"]]
            for rank in range(2)
        ]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(500))
    assert epochs[0][0] != epochs[0][1]


def test_non_join_stops_all_ranks_together_and_counts_the_rest(tmp_path):
    lengths = _lengths(900, seed=3)
    shards = [list(range(0, 100)), list(range(100, 500)), list(range(500, 900))]
    config = {"lengths": lengths, "per_rank_indices": shards, "join": False}
    results = launch(tmp_path, config, 3)
    _check_aligned(results, shards, lengths, join=False)
    for rank, result in enumerate(results):
        steps = result["epochs"][0]
        assert not any(s["ghost"] for s in steps)
        emitted = sum(len(s["indices"]) for s in steps)
        assert emitted + result["stats"]["dropped_samples"] == len(shards[rank])
    assert results[0]["stats"]["dropped_samples"] == 0
    assert results[2]["stats"]["dropped_samples"] > 0


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_workers_under_every_start_method(tmp_path, start_method):
    lengths = _lengths(400, seed=4)
    shards = [list(range(0, 150)), list(range(150, 400))]
    config = {
        "lengths": lengths,
        "per_rank_indices": shards,
        "num_workers": 2,
        "start_method": start_method,
        "mode": "packed",
    }
    _check_aligned(launch(tmp_path, config, 2), shards, lengths)


def test_a_rank_that_raises_stops_the_others_with_a_clear_error(tmp_path):
    lengths = _lengths(400, seed=5)
    shards = [list(range(0, 200)), list(range(200, 400))]
    config = {"lengths": lengths, "per_rank_indices": shards, "bad_index": 300}
    results = launch(tmp_path, config, 2)
    assert results[1]["error"].startswith("SampleError: sample 300")
    assert results[0]["error"].startswith("AlignmentError: rank(s) [1] raised")


def test_a_rank_that_dies_stops_the_others_within_the_timeout(tmp_path):
    """Plain processes (torchrun would kill the survivors itself): rank 1 exits abruptly."""
    lengths = _lengths(600, seed=6)
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
            **_env(),
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


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_gradients_equal_the_single_process_global_token_mean(tmp_path, mode):
    lengths = _lengths(120, seed=7)
    shards = [list(range(0, 40)), list(range(40, 120))]  # uneven: rank 0 runs ghost steps
    config = {
        "lengths": lengths,
        "per_rank_indices": shards,
        "scenario": "grads",
        "mode": mode,
        "window": 16,
    }
    results = launch(tmp_path, config, 2, timeout=300)
    for r in results:
        assert "error" not in r, r.get("traceback")
    assert results[0]["steps"] == results[1]["steps"]
    assert results[0]["ghosts"] > 0
    assert results[0]["worst_grad_error"] < 1e-9


def test_resume_after_a_restart_continues_with_the_same_batches(tmp_path):
    lengths = _lengths(500, seed=8)
    base = {"lengths": lengths, "num_workers": 2, "window": 32}
    full = launch(tmp_path, {**base, "scenario": "epoch"}, 2)
    head = launch(tmp_path, {**base, "scenario": "resume", "save_at": 23}, 2)
    rest = launch(tmp_path, {**base, "scenario": "resume", "load": True}, 2)
    for rank in range(2):
        assert "error" not in rest[rank], rest[rank].get("traceback")
        got = head[rank]["epochs"][0] + rest[rank]["epochs"][0]
        assert got == full[rank]["epochs"][0]
