"""The planner suite: which length sets it runs, and how it counts planning speed."""

import numpy as np
import pytest

from odb.benchmarks.lengths import lognormal_lengths
from odb.benchmarks.multimodal_sets import BUILTIN_SETS, make_set
from odb.benchmarks.planner_suite import PlannerConfig, run_planner
from odb.errors import ConfigError

CONFIG = PlannerConfig(cvs=(0.5,), samples=300, budget=4096, window=64, real_sets=("mixed",))


@pytest.fixture(scope="module")
def results():
    mine = np.concatenate([lognormal_lengths(700, 0.8, 200, seed=9), [5000, 4097, 4096]])
    return run_planner(CONFIG, extra_sets={"my data": mine}), mine


def test_suite_runs_lognormal_real_and_given_sets(results):
    results, mine = results
    assert [r.name for r in results] == ["lognormal cv=0.5", "mixed", "my data"]
    assert CONFIG.set_count == 2  # the built-in ones
    real = make_set(BUILTIN_SETS["mixed"], CONFIG.samples, CONFIG.budget, CONFIG.seed)
    assert results[1].params["distribution"] == "multimodal set"
    assert results[1].params["cv"] == pytest.approx(real.lengths.std() / real.lengths.mean(), 1e-3)
    assert [m.samples for m in results[1].metrics] == [len(real)] * 4
    # the given lengths are clipped to the budget and counted, never dropped
    assert results[2].clipped == 2
    assert [m.samples for m in results[2].metrics] == [len(mine)] * 4
    assert all(m.real_tokens == np.minimum(mine, CONFIG.budget).sum() for m in results[2].metrics)


def test_speeds_are_cpu_time_of_the_planner_within_the_rounds(results):
    for result in results[0]:
        for m in result.metrics:
            if m.policy.startswith("odb"):
                # the planner's calls are part of the rounds, so it plans faster than they run
                assert 0 < m.round_samples_per_second < m.plan_samples_per_second
            else:
                assert m.plan_samples_per_second is None and m.round_samples_per_second is None


def test_an_empty_given_set_is_refused_by_name():
    with pytest.raises(ConfigError, match="'nothing' is empty"):
        run_planner(CONFIG, extra_sets={"nothing": np.array([], dtype=np.int64)})
