"""benchmarks/attention_kernels.py: the three variants run the same samples, side by side."""

import pytest

from odb.benchmarks.attention_kernels import VARIANTS, KernelConfig, measure_kernels, table


@pytest.mark.slow
def test_the_variants_run_the_same_samples(tmp_path):
    config = KernelConfig(samples=8, budget=2048, repeats=1, max_pixels=28 * 28 * 16)
    runs, loss_gap = measure_kernels(config, tmp_path)
    by_name = {run.variant: run for run in runs}
    assert tuple(by_name) == VARIANTS
    padded, dense, kernel = (by_name[name] for name in VARIANTS)
    assert padded.samples == dense.samples == kernel.samples > 0
    # the same packed rows, through two kernels: the same tokens and losses
    assert (dense.batches, dense.tokens) == (kernel.batches, kernel.tokens)
    assert loss_gap < 1e-5
    # padding adds tokens; one row of several samples has more pairs than its samples apart
    assert padded.tokens >= kernel.tokens
    assert dense.attention_pairs > kernel.attention_pairs
    assert all(run.seconds > 0 for run in runs)
    assert table(runs).count("\n") == len(VARIANTS) + 1
