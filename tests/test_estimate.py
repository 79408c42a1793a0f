import numpy as np
import pytest
from synthetic import LengthDataset, lognormal_lengths

import odb
from odb.cost import SampleSize
from odb.estimate import count_steps, estimate_steps, probe_sizes


@pytest.mark.parametrize("mode", ["padded", "packed"])
@pytest.mark.parametrize("cv", [0.3, 1.0])
def test_estimate_is_close_to_the_real_epoch(mode, cv):
    lengths = np.minimum(lognormal_lengths(6000, 600, cv, seed=2), 8192)
    loader = odb.DataLoader(LengthDataset(lengths), 8192, mode=mode, shuffle=True)
    actual = sum(1 for _ in loader)
    assert estimate_steps(loader) == pytest.approx(actual, rel=0.1)


def test_estimate_is_a_multiple_of_the_step_multiple():
    loader = odb.DataLoader(LengthDataset([100] * 500), 1000, steps_multiple_of=4)
    assert estimate_steps(loader) % 4 == 0


class _Estimating(LengthDataset):
    """A dataset that knows its lengths without processing (what LlavaDataset offers)."""

    def __getitem__(self, index):
        raise AssertionError("the estimate must not process samples when estimate() exists")

    def estimate(self, index):
        return SampleSize(self.lengths[index], self.lengths[index] - 1)


def test_probe_uses_the_datasets_own_estimate():
    dataset = _Estimating([10, 20, 30, 40])
    assert sorted(s.length for s in probe_sizes(dataset, 10, seed=0)) == [10, 20, 30, 40]


def test_padding_steps_end_a_pass_on_the_multiple_with_weightless_ghosts():
    loader = odb.DataLoader(LengthDataset([50] * 7), 100, steps_multiple_of=3, window=8)
    infos = [odb.step_info(b) for b in loader]
    assert len(infos) % 3 == 0
    real = [i for i in infos if not i.ghost]
    assert sorted(x for i in real for x in i.sample_indices) == list(range(7))
    ghosts = [i for i in infos if i.ghost]
    assert ghosts and all(g.loss_weight == 0 and g.global_label_tokens == 0 for g in ghosts)
    assert infos[-len(ghosts) :] == ghosts


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_count_steps_is_exact_for_known_sizes(mode):
    lengths = np.minimum(lognormal_lengths(900, 300, 1.0, seed=4), 3000)
    dataset = LengthDataset(lengths)
    loader = odb.DataLoader(
        dataset, 2048, mode=mode, shuffle=True, over_budget="solo", window=64, steps_multiple_of=3
    )
    sizes = [SampleSize(int(n), int(n) - max(int(n) // 3, 1)) for n in lengths]
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert count_steps(loader, sizes, epoch) == sum(1 for _ in loader)
    with pytest.raises(odb.ConfigError, match="900 sizes"):
        count_steps(odb.DataLoader(LengthDataset([5]), 10), sizes)


def test_estimate_is_reachable_after_import_odb():
    import subprocess
    import sys

    code = "import odb; print(callable(odb.estimate.count_steps))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
