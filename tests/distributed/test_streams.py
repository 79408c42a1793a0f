"""Streams under torchrun (three gloo ranks on CPU, DataLoader workers in each): every rank
reading a stream of its own, of unequal lengths and one of them empty, or odb splitting one
stream across the ranks; ranks killed right after saving and resumed; a bad item on one rank.

What each step must hold comes from the streams the tests made (their uids and lengths): equal
steps, every sample once, exact global counts, and a resumed run yields the steps that the
uninterrupted run had left."""

from __future__ import annotations

import time

import pytest
from ranks import capped_lengths, check_aligned, launch

pytestmark = pytest.mark.slow

LENGTHS = capped_lengths(150, seed=21)
OWN = [list(range(0, 40)), [], list(range(40, 150))]  # rank 1's stream is empty
ONE = list(range(150))
# Two loaders per launch (each start of three ranks costs seconds): each rank reads its own
# stream with two workers, then odb splits one stream across the ranks (read by one worker,
# so rank r keeps samples r, r + 3, ... of it).
RUNS = [
    {"state": "own", "stream_uids": OWN, "shard": False, "num_workers": 2},
    {"state": "split", "stream_uids": [ONE] * 3, "shard": True, "num_workers": 1},
]
SPLIT = [ONE[rank::3] for rank in range(3)]
BASE = {"lengths": LENGTHS, "window": 16, "fetch_size": 4, "runs": RUNS}


def run_records(results, run):
    """Each rank's result of one of the launch's runs."""
    return [r["runs"][run] for r in results]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Both runs, uninterrupted: per run, per rank, its steps."""
    results = launch(tmp_path_factory.mktemp("full"), BASE, 3, timeout=120)
    runs = []
    for run, shards in enumerate([OWN, SPLIT]):
        epochs = check_aligned(run_records(results, run), shards, LENGTHS, ids="uids")
        runs.append([steps for (steps,) in epochs])
    return runs


def test_unequal_streams_and_an_empty_one_are_aligned_and_exact(full):
    """check_aligned (in the fixture): equal steps, every uid once, each step's global counts
    the sums of the ranks' own; here: who runs ghost steps."""
    short, empty, long = full[0]
    assert empty and all(s["ghost"] for s in empty)
    assert any(s["ghost"] for s in short) and not any(s["ghost"] for s in long)


def test_a_stream_split_by_odb_is_aligned_and_exact(full):
    assert all(len(steps) == len(full[1][0]) for steps in full[1])
    assert sum(not s["ghost"] for steps in full[1] for s in steps) > 0


def test_ranks_killed_after_saving_resume_with_the_steps_left(full, tmp_path):
    """Own streams: saved once rank 0's stream has ended and rank 2's has not (rank 1 holds the
    lent ghost sample); the split stream: halfway."""
    cuts = [[s["ghost"] for s in full[0][0]].index(True) + 1, len(full[1][0]) // 2]
    assert all(0 < k < len(full[run][0]) for run, k in enumerate(cuts))
    saving = [
        {**run, "scenario": "resume", "save_at": k} for run, k in zip(RUNS, cuts, strict=True)
    ]
    head = launch(tmp_path, {**BASE, "runs": saving, "kill": True}, 3, timeout=120)
    loading = [{**run, "scenario": "resume", "load": True} for run in RUNS]
    rest = launch(tmp_path, {**BASE, "runs": loading}, 3, timeout=120)
    for run, k in enumerate(cuts):
        pairs = zip(run_records(head, run), run_records(rest, run), strict=True)
        for rank, (saved, resumed) in enumerate(pairs):
            assert "error" not in resumed, resumed["traceback"]
            assert saved["epochs"] == [full[run][rank][:k]]
            assert resumed["epochs"] == [full[run][rank][k:]]


def test_a_bad_item_on_one_rank_stops_every_rank_with_a_named_error(tmp_path):
    """Rank 2's stream yields a string halfway, while rank 0 runs ghost steps and rank 1 has
    nothing: every rank raises an odb error, well before the alignment timeout."""
    config = {**RUNS[0], "lengths": LENGTHS, "window": 16, "fetch_size": 4}
    start = time.time()
    results = launch(tmp_path, {**config, "bad_at": 100, "align_timeout": 30}, 3, timeout=90)
    assert results[2]["error"].startswith("SampleTypeError"), results[2].get("traceback")
    for rank in (0, 1):
        assert results[rank]["error"].startswith("AlignmentError: rank(s) [2] raised")
    assert all(r["odb_error"] for r in results)
    assert max(r["error_time"] for r in results) - start < 30
