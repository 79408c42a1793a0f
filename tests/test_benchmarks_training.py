"""LLaVA input to the multimodal suite, and the measured-training suite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from odb.adapters.qwen_vl import LlavaDataset, RecordError
from odb.benchmarks.cli import main
from odb.benchmarks.llava_input import SYNTHETIC_LONG_MULTIMODAL, llava_set, write_synthetic_llava
from odb.benchmarks.plots import plot_training_loss
from odb.benchmarks.qwen_vl_offline import (
    ImageSettings,
    load_processor,
    small_tokenizer,
    tiny_model,
    tiny_processor,
)
from odb.benchmarks.report import training_section
from odb.benchmarks.training_suite import TrainingConfig, _loader, _summarise, run_training

IMAGES = ImageSettings(28 * 28 * 4, 28 * 28 * 64)


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    return write_synthetic_llava(folder, 16, 0, SYNTHETIC_LONG_MULTIMODAL), folder / "images"


def test_synthetic_records_have_images_of_varied_sizes_and_text(llava_data):
    source, images = llava_data
    records = json.loads(source.read_text())
    assert len(records) == 16
    counts = [len(r.get("image", [])) for r in records]
    assert min(counts) >= 1 and max(counts) >= 3
    sizes = {(p.stat().st_size > 0, p.suffix) for p in images.iterdir()}
    assert sizes == {(True, ".png")}
    for record in records:
        question = record["conversations"][0]["value"]
        assert question.count("<image>") == len(record["image"])


def test_llava_set_sizes_are_those_of_the_processed_samples(llava_data):
    source, images = llava_data
    processor = tiny_processor(images=IMAGES)
    data = llava_set(source, images, processor, budget=100_000)
    dataset = LlavaDataset(source, images, processor)
    for index in (0, 5, 11):
        sample = dataset[index]
        assert data.lengths[index] == len(sample["input_ids"])
        grids = sample["image_grid_thw"]
        assert data.patches[index] == int(grids.prod(dim=1).sum())
        assert data.vision_pairs[index] == int((grids.prod(dim=1) ** 2).sum())
        assert data.images[index] == len(grids)


def test_llava_set_leaves_out_records_over_the_budget(llava_data):
    source, images = llava_data
    processor = tiny_processor(images=IMAGES)
    everything = llava_set(source, images, processor, budget=100_000)
    budget = int(np.median(everything.lengths))
    kept = llava_set(source, images, processor, budget=budget)
    assert kept.filtered == int(np.count_nonzero(everything.lengths > budget))
    assert len(kept) + kept.filtered == len(everything)
    assert kept.lengths.max() <= budget


def _with_bad_records(source, folder):
    """The records of ``source`` with three that cannot become samples inserted (at 2, 5 and
    9): a text-only chat whose text holds the literal ``<image>``, a missing image file, and
    no assistant turn. Written to ``folder/bad.json``."""
    records = json.loads(source.read_text())
    turns = [{"from": "human", "value": "What does <image> mean in HTML?"}]
    records.insert(2, {"conversations": [*turns, {"from": "gpt", "value": "Nothing."}]})
    ask = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
    missing = {"image": "nowhere.png", "conversations": ask}
    records.insert(5, missing)
    records.insert(9, {"conversations": [{"from": "human", "value": "Anyone there?"}]})
    path = folder / "bad.json"
    path.write_text(json.dumps(records))
    return path


def test_invalid_llava_records_are_counted_and_left_out(llava_data, tmp_path):
    source, images = llava_data
    bad = _with_bad_records(source, tmp_path)
    processor = tiny_processor(images=IMAGES)
    errors = []
    data = llava_set(bad, images, processor, budget=100_000, errors=errors)
    clean = llava_set(source, images, processor, budget=100_000)
    assert [e.index for e in errors] == [2, 5, 9]
    assert data.invalid == {"ImageCountError": 1, "MissingImageError": 1, "NoAssistantTurnError": 1}
    assert np.array_equal(data.lengths, clean.lengths) and "3 invalid" in data.description
    with pytest.raises(RecordError, match="record 2"):
        llava_set(bad, images, processor, budget=100_000, strict=True)


def test_cli_llava_skips_invalid_records_unless_strict(llava_data, tmp_path, capsys):
    source, images = llava_data
    bad = _with_bad_records(source, tmp_path)
    args = ["--quick", "--llava", str(bad), "--images", str(images), "--out", str(tmp_path)]
    args += ["--max-pixels", str(IMAGES.max_pixels), "--world", "2"]
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "3 invalid record(s) left out" in shown and "record 5: image file not found" in shown
    multimodal = json.loads((tmp_path / "results.json").read_text())["multimodal"]
    assert multimodal["sets"][0]["samples"] == 16
    with pytest.raises(RecordError, match="record 2"):
        main([*args, "--strict"])


def test_cli_llava_runs_the_multimodal_comparison_on_the_data(llava_data, tmp_path, capsys):
    source, images = llava_data
    out = tmp_path / "out"
    args = ["--quick", "--llava", str(source), "--images", str(images), "--out", str(out)]
    assert main([*args, "--max-pixels", str(IMAGES.max_pixels), "--world", "2"]) == 0
    report = (out / "report.md").read_text()
    assert "| train |" in report and "LlavaDataset.estimate" in report
    multimodal = json.loads((out / "results.json").read_text())["multimodal"]
    assert [s["name"] for s in multimodal["sets"]] == ["train"]
    assert multimodal["sets"][0]["samples"] == 16
    assert {r["policy"] for r in multimodal["runs"]} >= {"standard", "odb padded", "odb packed"}
    assert (out / "multimodal_throughput.png").stat().st_size > 0
    assert "Multimodal, ESTIMATED" in capsys.readouterr().out


def test_a_saved_processor_loads_with_its_own_image_settings(llava_data, tmp_path):
    source, images = llava_data
    tiny_processor(images=IMAGES).save_pretrained(tmp_path / "processor")
    processor = load_processor(str(tmp_path / "processor"))
    offline = llava_set(source, images, tiny_processor(images=IMAGES), budget=100_000)
    loaded = llava_set(source, images, processor, budget=100_000)
    assert loaded.vision == offline.vision
    assert np.array_equal(loaded.lengths, offline.lengths)


def _rank(steps: list[list[int]], seconds: float = 2.0) -> dict:
    return {
        "seconds": seconds,
        "peak_rss_mib": 100.0,
        "learning_rate": 1e-3,
        "steps": [{"indices": s, "loss": 1.0, "computed": 10} for s in steps],
    }


def test_summary_counts_missing_and_repeated_samples_and_the_slowest_rank():
    lengths = np.array([10, 20, 30, 40])
    whole = _summarise("odb-padded", 1, [_rank([[0, 1], [2, 3]])], lengths, 2)
    assert (whole.missing, whole.repeated, whole.steps) == (0, 0, 2)
    assert whole.samples_per_second == 2.0 and whole.real_tokens_per_second == 50.0
    assert whole.samples_seen == [2, 4] and whole.batch_size is None
    ranks = [_rank([[0], [0]]), _rank([[1], [2]], seconds=4.0)]
    broken = _summarise("standard", 2, ranks, lengths, 1)
    assert (broken.missing, broken.repeated, broken.seconds) == (1, 1, 4.0)
    assert broken.batch_size == 1


@pytest.mark.slow
def test_training_suite_trains_every_sample_once_per_loader(tmp_path):
    config = TrainingConfig(
        samples=10,
        max_length=1024,
        budget=2048,
        max_pixels=28 * 28 * 64,
        num_workers=1,
        lr_rule="sqrt",
    )
    result = run_training(config, tmp_path / "data")
    assert [r.loader for r in result.runs] == ["standard", "odb padded", "odb packed"]
    samples = result.data["samples"]
    for run in result.runs:
        assert (run.missing, run.repeated) == (0, 0), run.loader
        assert run.samples_seen[-1] == samples and len(run.losses) == run.steps
        assert all(np.isfinite(run.losses)) and run.peak_rss_mib > 0
    standard = result.runs[0]
    batch_size = result.data["standard_batch_size"]
    assert standard.steps == -(-samples // batch_size)
    assert standard.learning_rate == config.learning_rate
    for run in result.runs[1:]:  # odb's rate follows the samples per step it really ran
        per_step = samples / run.steps
        assert run.learning_rate == pytest.approx(1e-3 * (per_step / batch_size) ** 0.5)
    assert result.speedup(standard) == 1.0
    table = training_section(result)
    assert table.count("\n| ") == 1 + len(result.runs)
    assert plot_training_loss(result, tmp_path / "loss.png").stat().st_size > 0


def test_training_budget_must_hold_a_record_of_the_maximum_length(capsys):
    with pytest.raises(ValueError, match="maximum length"):
        TrainingConfig(max_length=2048, budget=1024)
    with pytest.raises(ValueError, match="lr_rule"):
        TrainingConfig(lr_rule="cubic")
    with pytest.raises(SystemExit):
        main(["--train", "--train-budget", "1024", "--train-max-length", "2048"])
    assert "--train-budget must be at least --train-max-length" in capsys.readouterr().err


def test_compute_loaders_plan_by_the_models_compute_under_the_token_cap(tmp_path):
    tokenizer = small_tokenizer(tmp_path / "tokenizer")
    model = tiny_model(tokenizer, 0)
    settings = {"num_workers": 0, "seed": 0, "budget": 2048, "window": 16}
    for mode in ("padded", "packed"):
        loader = _loader(f"odb-compute-{mode}", [], model, settings, 1)
        assert loader.mode == mode and loader.budget.cost.prices_compute
        assert loader.budget.caps.max_tokens == 2048 and loader.budget.limit > 2048
        tokens = _loader(f"odb-{mode}", [], model, settings, 1)
        assert not tokens.budget.cost.prices_compute and tokens.budget.limit == 2048
    with pytest.raises(ValueError, match="unknown loader"):
        TrainingConfig(loaders=("odb-fast",))
