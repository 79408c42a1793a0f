"""odb.estimate_steps for streams: from the first samples of the stream and its known length,
compared with the steps a real pass of the loader yields."""

from __future__ import annotations

import datasets
import pytest
from streams import StatefulStream, collate_uids, stream_sample
from synthetic import lognormal_lengths

import odb
from odb.estimate import count_steps, estimate_steps

N = 600


def _lengths() -> list[int]:
    return [int(min(x, 90)) for x in lognormal_lengths(N, 30, 0.8, 7, low=2)]


def _hf(lengths) -> datasets.IterableDataset:
    rows = [stream_sample(u, n) for u, n in enumerate(lengths)]
    table = {key: [r[key].tolist() for r in rows] for key in ("input_ids", "labels")}
    table["uid"] = list(range(len(lengths)))
    return datasets.Dataset.from_dict(table).to_iterable_dataset(num_shards=3)


class _SizedStream(StatefulStream):
    """A torch stream that states its length."""

    def __len__(self) -> int:
        return len(self.uids)


def _loader(stream, **options) -> odb.DataLoader:
    return odb.DataLoader(stream, 256, window=64, collate_fn=collate_uids, **options)


@pytest.mark.parametrize("kind", ["hf, num_samples", "torch, len()"])
def test_the_estimate_of_a_stream_of_known_length_is_close_to_a_real_pass(kind):
    lengths = _lengths()
    if kind.startswith("hf"):
        loader = _loader(_hf(lengths), num_samples=N, steps_multiple_of=4)
    else:
        loader = _loader(_SizedStream(range(N), lengths), steps_multiple_of=4)
    real = sum(1 for _ in loader)
    estimate = estimate_steps(loader)
    assert estimate % 4 == 0
    assert abs(estimate - real) <= 0.1 * real, (estimate, real)


def test_the_estimate_scales_with_the_stated_length():
    """The first samples are measured; the count of steps comes from num_samples."""
    lengths = _lengths()
    real = sum(1 for _ in _loader(_hf(lengths)))
    estimate = estimate_steps(_loader(_hf(lengths), num_samples=3 * N))
    assert abs(estimate - 3 * real) <= 0.1 * 3 * real, (estimate, real)


def test_a_stream_of_unknown_length_has_no_estimate_nor_count():
    loader = _loader(_hf(_lengths()))
    with pytest.raises(odb.ConfigError, match=r"num_samples=.*max_steps"):
        estimate_steps(loader)
    with pytest.raises(odb.ConfigError, match="index order"):
        count_steps(loader, [])
