"""Helpers of the real multi-process tests: start ranks of worker.py under torchrun and judge
the records they write."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
from synthetic import label_tokens, lognormal_lengths
from tiny import torchrun, torchrun_nodes

WORKER = Path(__file__).with_name("worker.py")
BUDGET = 1024


def worker_env() -> dict:
    """The environment of a rank: one thread each (the ranks share the machine's cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(
    tmp_path: Path, config: dict, nproc: int, *, timeout: float = 180, nodes: int = 1
) -> list[dict]:
    """Run ``nproc`` ranks under torchrun (``nproc`` per node on ``nodes`` agents that meet
    by c10d rendezvous, when ``nodes > 1``); return each rank's JSON record."""
    config = {**config, "out": str(tmp_path)}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    if nodes == 1:
        commands = [torchrun(nproc, str(WORKER), str(path))]
    else:
        commands = torchrun_nodes(nodes, nproc, str(WORKER), str(path))
    agents = [
        subprocess.Popen(
            command, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in commands
    ]
    try:
        output = "\n".join(agent.communicate(timeout=timeout)[0] for agent in agents)
    finally:
        for agent in agents:
            agent.kill()
    records = [tmp_path / f"rank{r}.json" for r in range(nproc * nodes)]
    missing = [str(p) for p in records if not p.exists()]
    assert not missing, f"ranks wrote nothing ({missing}):\n{output}"
    results = [json.loads(p.read_text()) for p in records]
    for p in records:
        p.unlink()
    return results


def capped_lengths(n: int, seed: int = 0, budget: int = BUDGET, mean: float = 200) -> list[int]:
    """Lognormal sample lengths (CV 1), none longer than the budget."""
    return np.minimum(lognormal_lengths(n, mean, 1.0, seed=seed), budget).tolist()


def check_aligned(
    results, shards, lengths, *, join=True, budget=BUDGET, own_datasets=False, ids="indices"
):
    """Equal steps; per step equal global counts that sum the ranks' batches; budget held;
    in join mode every sample of every rank once; a rank runs ghosts only once nothing of its
    own shard is left (it may still run groups handed over at the end).

    ``lengths`` are the sample lengths of the dataset every rank reads or, with
    ``own_datasets``, one list per rank: rank r then reads a dataset of its own, ``shards[r]``
    indexes that one, and "once" holds per rank. ``ids``: the record field that names the
    samples (``uids`` for streams, whose indices are positions in each rank's stream)."""
    for r in results:
        assert "error" not in r, r.get("traceback")
    lengths_of = (lambda rank: lengths[rank]) if own_datasets else (lambda rank: lengths)
    for epoch in range(len(results[0]["epochs"])):
        per_rank = [r["epochs"][epoch] for r in results]
        assert len({len(steps) for steps in per_rank}) == 1, [len(s) for s in per_rank]
        for j, step in enumerate(zip(*per_rank, strict=True)):
            real = [s for s in step if not s["ghost"]]
            assert {s["global_label_tokens"] for s in step} == {
                sum(s["local_label_tokens"] for s in real)
            }, f"step {j}: {[(s['local_label_tokens'], s['global_label_tokens']) for s in step]}"
            assert {s["global_samples"] for s in step} == {sum(s["local_samples"] for s in real)}
            assert all(s["step"] == j for s in step)
            assert all(s["tokens_in_batch"] <= budget for s in step)
            for rank, s in enumerate(step):
                if not s["ghost"]:
                    expected = sum(label_tokens(lengths_of(rank)[i]) for i in s[ids])
                    assert s["local_label_tokens"] == expected
            assert all(s["loss_weight"] == (0.0 if s["ghost"] else 1.0) for s in step)
        emitted = [[i for s in steps if not s["ghost"] for i in s[ids]] for steps in per_rank]
        wanted = shards
        if not own_datasets:  # one dataset: "once" holds over all ranks together
            emitted = [[i for seen in emitted for i in seen]]
            wanted = None if shards is None else [[i for shard in shards for i in shard]]
        for seen in emitted:
            assert len(seen) == len(set(seen)), "nothing emitted twice"
        if join and wanted is not None:
            assert [sorted(seen) for seen in emitted] == [sorted(s) for s in wanted]
        for rank, steps in enumerate(per_rank):
            if shards is None:
                break
            mine = set(shards[rank])
            own = [not s["ghost"] and s["reason"] != "shared" for s in steps]
            for s, is_own in zip(steps, own, strict=True):
                if not s["ghost"]:  # its own samples, or a whole group from another rank
                    assert (set(s[ids]) <= mine) if is_own else not (set(s[ids]) & mine)
            ghosts = [s["ghost"] for s in steps]
            if True in ghosts:  # only in the round its own samples run out, or later
                first = steps[ghosts.index(True)]["round"]
                assert not any(o for o, s in zip(own, steps, strict=True) if s["round"] > first)
    return [[r["epochs"][e] for e in range(len(r["epochs"]))] for r in results]
