"""The GRPO benchmark (``python -m odb.benchmarks.rl``) runs and says what the figure shows."""

import json

from odb.benchmarks.rl import RLConfig, main, run_rl


def test_odb_bounds_every_forward_and_pads_less_than_stock():
    config = RLConfig(cvs=(1.0, 2.0), steps=4)
    for result in run_rl(config):
        assert result.odb_peak <= config.token_budget < result.stock_peak
        assert result.real_tokens <= result.odb_tokens < result.stock_tokens
        assert result.odb_passes >= config.gradient_accumulation_steps


def test_main_writes_the_figure_table_and_record(tmp_path):
    assert main(["--quick", "--out", str(tmp_path), "--cv", "1.5"]) == 0
    assert (tmp_path / "rl.png").stat().st_size > 0
    assert "| 1.5 |" in (tmp_path / "rl.md").read_text()
    record = json.loads((tmp_path / "rl.json").read_text())
    assert record["config"]["cvs"] == [1.5] and len(record["results"]) == 1
