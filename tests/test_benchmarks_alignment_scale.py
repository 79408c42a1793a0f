"""The alignment round's cost at scale (``odb.benchmarks.alignment_scale``) at small scale:
each figure is checked against what the protocol says it must be, not against a past output."""

from __future__ import annotations

import json

import pytest

from odb.align import report_width
from odb.benchmarks.alignment_scale import (
    NetworkModel,
    ScaleConfig,
    _shards,
    run_alignment_scale,
)
from odb.benchmarks.cli import main
from odb.buffer import RoundSettings
from odb.cost import Budget, PaddedCost
from odb.simulate import simulate

CONFIG = ScaleConfig(samples_per_rank=48, worlds=(8, 32), repeats=1, window=256)


@pytest.fixture(scope="module")
def results():
    return run_alignment_scale(CONFIG)


def test_a_report_round_moves_one_row_per_rank(results):
    width = report_width(max(64, 2 * (CONFIG.window // 8)))  # docs/protocol.md: max_steps
    for r in results:
        assert r.report_width == width
        assert r.report_bytes_sent == 8 * width
        assert r.report_bytes_received == r.world * width * 8
        report = r.kind("report")
        assert report.count == r.rounds
        assert report.sent_bytes == r.rounds * 8 * width
        assert report.received_bytes == r.rounds * r.world * 8 * width


def test_exchanges_and_steps_are_those_of_the_same_simulated_pass(results):
    settings = RoundSettings.create(Budget(CONFIG.budget, PaddedCost()), window=CONFIG.window)
    for r in results:
        run = simulate(_shards(CONFIG, r.world), settings, seed=CONFIG.seed)
        assert r.steps == len(run.steps[0]) and r.rounds == run.rounds
        assert r.collectives == run.collectives  # the engine's own count of its exchanges
        assert r.kind("opening").count == 2  # protocol versions, then the ranks' identities
        handed = r.kind("hand-over")
        assert handed.count == 2 * run.transfer_rounds  # indices, then verdicts
        assert handed.received_bytes == r.world * handed.sent_bytes
        assert r.collectives_per_step >= r.rounds_per_step >= 1 / settings.max_steps


def test_decision_times_are_measured_for_every_round(results):
    for r in results:
        assert len(r.decide_seconds) == r.rounds
        assert all(seconds > 0 for seconds in r.decide_seconds)
        assert 0 < r.decide_median <= r.decide_p95 <= max(r.decide_seconds)


def test_overhead_adds_decisions_and_the_ring_estimate_per_step(results):
    assert NetworkModel(1e-5, 1e9).all_gather_seconds(4, 1000) == pytest.approx(3 * 1.1e-5)
    network = CONFIG.network
    for r in results:
        ring = r.rounds * network.all_gather_seconds(r.world, 8 * r.report_width)
        assert r.kind("report").network_seconds == pytest.approx(ring)
        expected = (sum(r.decide_seconds) + r.network_seconds) / r.steps / CONFIG.step_seconds
        assert r.overhead == pytest.approx(expected)
        assert r.network_seconds > ring  # the opening exchanges cost time too


def test_cli_alignment_scale_writes_its_section_and_record(tmp_path):
    out = tmp_path / "bench"
    argv = ["--quick", "--alignment-scale", "--scale-world", "4", "--scale-samples", "40"]
    assert main([*argv, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    section = report.split("## The alignment round's cost at scale")[1].split("\n## ")[0]
    assert "\n| 4 |" in section
    record = json.loads((out / "results.json").read_text())["alignment_scale"]
    assert record["config"]["worlds"] == [4]
    (result,) = record["results"]
    assert result["report_bytes_received"] == 4 * 8 * result["report_width"]
    assert result["overhead"] > 0
