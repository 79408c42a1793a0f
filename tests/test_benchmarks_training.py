"""LLaVA input to the multimodal suite, and the measured-training suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from odb.adapters import qwen_vl
from odb.adapters.qwen_vl import LlavaDataset, RecordError, VisionGeometry
from odb.benchmarks.cli import main
from odb.benchmarks.llava_input import SYNTHETIC_LONG_MULTIMODAL, llava_set, write_synthetic_llava
from odb.benchmarks.qwen_vl_offline import (
    ImageSettings,
    load_processor,
    small_tokenizer,
    tiny_model,
    tiny_processor,
)
from odb.benchmarks.report import _quality_lines
from odb.benchmarks.train_models import (
    PRESETS,
    load_processor_for,
    model_name,
    prepare_tokenizer,
)
from odb.benchmarks.training_run import _loader
from odb.benchmarks.training_suite import TrainingConfig, TrainingResult, _summarise, peak_flops

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


def _rank(steps: list[list[int]], busy: float = 1.0, wait: float = 0.0) -> dict:
    """A rank's record: each step spends 0.5 s waiting for data, ``busy`` s computing,
    ``wait`` s waiting for the others and 0.25 s updating."""
    return {
        "device": "NVIDIA H100 80GB HBM3",
        "dtype": "bfloat16",
        "peak_memory_mib": 100.0,
        "learning_rate": 1e-3,
        "heldout_loss": None,
        "heldout_record_loss": None,
        "weights": 1.5,
        "steps": [
            {
                "indices": s,
                "loss": float(k),
                "computed": 10,
                "data": 0.5,
                "busy": busy,
                "wait": wait,
                "update": 0.25,
            }
            for k, s in enumerate(steps)
        ],
    }


def _sizes(lengths: list[int]) -> dict:
    lengths = np.array(lengths)
    return {"lengths": lengths, "flops": 1e12 * lengths, "labels": lengths // 2}


def test_summary_times_the_steps_after_warm_up_at_the_slowest_rank():
    sizes = _sizes([10, 20, 30, 40])
    config = TrainingConfig(warmup_steps=1, budget=4096, max_length=2048)
    whole = _summarise(config, "odb-padded", 1, 0, [_rank([[0], [1, 2], [3]])], sizes, 2)
    assert (whole.missing, whole.repeated, whole.steps, whole.timed_steps) == (0, 0, 3, 2)
    # Steps 2 and 3 are timed: 1.75 s each, samples 1, 2, 3 (20 + 30 + 40 tokens).
    assert whole.seconds == pytest.approx(3.5)
    assert whole.samples_per_second == pytest.approx(3 / 3.5)
    assert whole.real_tokens_per_second == pytest.approx(90 / 3.5)
    assert whole.samples_seen == [1, 3, 4] and whole.losses == [0.0, 1.0, 2.0]
    assert whole.model_tflops == pytest.approx(90 / 3.5)  # 1e12 FLOPs per token
    assert whole.mfu == pytest.approx(90e12 / 3.5 / 989e12)  # an H100's bf16 peak
    assert whole.data_share == pytest.approx(0.5 / 1.75) and whole.batch_size is None
    # Two ranks: rank 1 computes 3 s per step; rank 0 waits 2 s for it.
    ranks = [_rank([[0], [0], [1]], wait=2.0), _rank([[1], [2], [2]], busy=3.0)]
    config = TrainingConfig(warmup_steps=0, budget=4096, max_length=2048, peak_tflops=100)
    two = _summarise(config, "standard", 2, 0, ranks, sizes, 1)
    assert (two.missing, two.repeated) == (1, 3) and two.batch_size == 1
    assert two.seconds == pytest.approx(3 * 3.75) and two.step_p50 == pytest.approx(3.75)
    assert two.wait == pytest.approx(1.0) and two.wait_share == pytest.approx(6 / 22.5)
    assert two.mfu == pytest.approx(two.model_tflops / 100)
    limited = TrainingConfig(steps=2, budget=4096, max_length=2048)
    part = _summarise(limited, "odb-padded", 1, 0, [_rank([[0], [1], [2]])], sizes, 2)
    assert (part.missing, part.repeated) == (None, None)


def test_quality_table_compares_odb_neutral_with_standards_seed_spread():
    sizes = _sizes([10, 20, 30, 40])
    config = TrainingConfig(budget=4096, max_length=2048, seeds=(0, 1, 2), heldout=2)
    base = _summarise(config, "standard", 1, 0, [_rank([[0, 1], [2, 3]])], sizes, 2)
    standard = [(0, 2.9, 3.0), (1, 3.1, 3.2), (2, 3.0, 3.1)]  # seed, per token, per record
    neutral = [(0, 3.15, 3.4), (1, 3.05, 3.3), (2, 3.1, 3.35)]  # means 3.1 (in), 3.35 (out)
    runs = [
        replace(base, loader=name, seed=seed, heldout_loss=tok, heldout_record_loss=rec)
        for name, rows in (("standard", standard), ("odb neutral", neutral))
        for seed, tok, rec in rows
    ]
    result = TrainingResult(config, {"heldout": 2}, runs)
    assert result.loss_spread("odb neutral", 1, "heldout_loss") == pytest.approx((3.1, 3.05, 3.15))
    text = "\n".join(_quality_lines(result))
    assert "held-out loss per token: odb neutral's mean 3.1000 is within" in text
    assert "held-out loss per record: odb neutral's mean 3.3500 is outside" in text
    assert "| odb neutral | 1 | 3.1000 [3.0500, 3.1500] | 3.3500 [3.3000, 3.4000] |" in text


def test_summary_refuses_ranks_that_disagree():
    sizes = _sizes([10, 20])
    config = TrainingConfig(budget=4096, max_length=2048)
    uneven = [_rank([[0], [1]]), _rank([[1]])]
    with pytest.raises(RuntimeError, match="different numbers of steps"):
        _summarise(config, "odb-padded", 2, 0, uneven, sizes, 1)
    drifted = [_rank([[0]]), {**_rank([[1]]), "weights": 1.25}]
    with pytest.raises(RuntimeError, match="weights"):
        _summarise(config, "odb-padded", 2, 0, drifted, sizes, 1)


def test_peak_flops_only_for_known_gpus_in_half_precision():
    assert peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "float16") == 312e12
    assert peak_flops("NVIDIA H200", "float32") is None
    assert peak_flops("cpu", "bfloat16") is None


def test_presets_have_the_published_sizes():
    """Parameter counts of the released checkpoints (their model cards), built on the meta
    device from the presets."""
    import torch
    import transformers

    from odb.benchmarks.overhead import load_qwen_tokenizer

    tokenizer = load_qwen_tokenizer()
    published = {
        "Qwen2.5-VL-3B": 3.75e9,
        "Qwen2.5-VL-7B": 8.29e9,
        "Qwen3-VL-2B": 2.13e9,
        "Qwen3-VL-8B": 8.77e9,
    }
    for name, count in published.items():
        config = PRESETS[name].config(tokenizer)
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        assert params == pytest.approx(count, rel=0.003), name
        assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model_name("qwen2.5-vl-3b") == "Qwen2.5-VL-3B"
    with pytest.raises(ValueError, match="neither a preset"):
        model_name("Qwen9-VL")


def test_training_budget_must_hold_a_record_of_the_maximum_length(capsys):
    with pytest.raises(ValueError, match="maximum length"):
        TrainingConfig(max_length=2048, budget=1024)
    with pytest.raises(ValueError, match="lr_rule"):
        TrainingConfig(lr_rule="cubic")
    with pytest.raises(ValueError, match="unknown data"):
        TrainingConfig(data="imagenet")
    with pytest.raises(ValueError, match="warmup_steps must be 0 or more"):
        TrainingConfig(warmup_steps=-1)
    with pytest.raises(SystemExit):
        main(["--train", "--train-budget", "1024", "--train-max-length", "2048"])
    assert "must hold a record of the maximum length" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--train", "--model", "Qwen9-VL"])
    assert "neither a preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--train-only"])
    assert "--train-only needs --train" in capsys.readouterr().err


def test_compute_measured_and_neutral_loaders(tmp_path):
    tokenizer = small_tokenizer(tmp_path / "tokenizer")
    model = tiny_model(tokenizer, 0)
    settings = {"num_workers": 0, "budget": 2048, "window": 16, "batch_size": 3}
    settings["max_length"] = 1024
    for mode in ("padded", "packed"):
        loader, weights = _loader(f"odb-compute-{mode}", [], model, settings, 0)
        assert loader.mode == mode and loader.budget.cost.prices_compute
        assert loader.budget.caps.max_tokens == 2048 and loader.budget.limit > 2048
        flops = qwen_vl.compute_cost(model, mode)  # the model's FLOPs weights, reported
        assert weights["attention_weight"] == flops.attention_weight
        assert weights["vision_weight"] == flops.vision_weight and "fit" not in weights
        # the same budget, its weights timed on this machine before the run
        measured, timed = _loader(f"odb-measured-{mode}", [], model, settings, 0)
        assert measured.mode == mode and measured.budget.limit == loader.budget.limit
        assert measured.budget.caps == loader.budget.caps
        assert measured.budget.cost != flops  # timed, not counted
        assert timed["seconds"] > 0 and timed["fit"] <= 1
        tokens, none = _loader(f"odb-{mode}", [], model, settings, 0)
        assert not tokens.budget.cost.prices_compute and tokens.budget.limit == 2048
        assert none is None
    neutral, _ = _loader("odb-neutral", [], model, settings, 0)
    assert neutral.mode == "padded" and neutral.budget.caps.max_samples == 3
    assert _loader("standard-5", [1] * 10, model, settings, 0)[0].batch_size == 5
    assert _loader("standard", [1] * 10, model, settings, 0)[0].batch_size == 3
    with pytest.raises(ValueError, match="unknown loader"):
        TrainingConfig(loaders=("odb-fast",))


def test_one_given_pixel_bound_replaces_only_that_one_of_the_models_range(tmp_path):
    prepare_tokenizer("tiny", tmp_path)
    both = VisionGeometry.from_processor(load_processor_for("tiny", tmp_path))
    capped = load_processor_for("tiny", tmp_path, max_pixels=28 * 28 * 64)
    capped = VisionGeometry.from_processor(capped)
    assert (capped.min_pixels, capped.max_pixels) == (both.min_pixels, 28 * 28 * 64)
    assert both.max_pixels > 28 * 28 * 64


@pytest.mark.slow
def test_cli_trains_on_llava_data_with_two_processes(llava_data, tmp_path, capsys):
    """The issue's command on the user's records under torchrun: every loader trains every
    sample once, both ranks end with the same weights (the summary checks), odb's learning
    rate follows its samples per step, odb neutral never exceeds Standard's batch size."""
    source, images = llava_data
    out = tmp_path / "out"
    args = ["--train", "--train-only", "--llava", str(source), "--images", str(images)]
    args += ["--model", "tiny", "--nproc", "2", "--max-pixels", str(28 * 28 * 64)]
    args += ["--train-budget", "4096", "--warmup-steps", "0", "--heldout", "2"]
    args += ["--train-lr-rule", "sqrt", "--out", str(out)]
    for loader in ("standard", "odb-padded", "odb-neutral"):
        args += ["--train-loader", loader]
    assert main(args) == 0
    written = json.loads((out / "results.json").read_text())
    assert written["planner"]["sets"] == [] and "multimodal" not in written
    record = written["training"]
    data, runs = record["data"], record["runs"]
    assert [(r["loader"], r["world"]) for r in runs] == [
        ("standard", 2),
        ("odb padded", 2),
        ("odb neutral", 2),
    ]
    samples, batch_size = data["samples"], data["standard_batch_size"]
    assert samples + data["heldout"] == 16 and data["heldout"] == 2
    for run in runs:
        assert (run["missing"], run["repeated"]) == (0, 0), run["loader"]
        assert run["samples_seen"][-1] == samples and len(run["losses"]) == run["steps"]
        assert all(np.isfinite(run["losses"])) and np.isfinite(run["heldout_loss"])
        assert np.isfinite(run["heldout_record_loss"])
    standard, padded, neutral = runs
    assert standard["steps"] == -(-samples // (2 * batch_size))
    assert standard["learning_rate"] == 1e-3
    per_step = samples / 2 / padded["steps"]  # per rank
    assert padded["learning_rate"] == pytest.approx(1e-3 * (per_step / batch_size) ** 0.5)
    assert max(np.diff([0, *neutral["samples_seen"]])) <= 2 * batch_size
    printed = capsys.readouterr().out
    assert "training, measured on cpu: tiny on train, float32" in printed
    assert printed.count("Training, MEASURED on cpu: ") == 3 and "Planner" not in printed
    report = (out / "report.md").read_text()
    assert "## Measured training (tiny on train" in report and "## Planner" not in report
    assert "Loss over 1 seed(s), the 2 held-out records" in report


@pytest.mark.slow
def test_gpu_check_script_runs_end_to_end_on_cpu_with_the_tiny_preset(tmp_path):
    """benchmarks/gpu_check.sh itself, as the GPU machine runs it, with CPU settings."""
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "ODB_GPU_CHECK_INSTALL": "0",
        "ODB_GPU_CHECK_MODEL": "tiny",
        "ODB_GPU_CHECK_DEVICE": "cpu",
        "ODB_GPU_CHECK_DTYPE": "float32",
        "ODB_GPU_CHECK_SAMPLES": "16",
        "ODB_GPU_CHECK_BUDGET": "8192",
        "ODB_GPU_CHECK_MAX_LENGTH": "4096",
        "ODB_GPU_CHECK_WARMUP": "1",
        "ODB_GPU_CHECK_STEPS": "1",
    }
    out = tmp_path / "gpu-check-out"
    script = root / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", str(script), str(out)], env=env, check=True, timeout=600)
    record = json.loads((out / "results.json").read_text())["training"]
    loaders = ["standard", "odb padded", "odb packed", "odb measured packed"]
    assert [r["loader"] for r in record["runs"]] == loaders
    assert all(r["timed_steps"] == 1 for r in record["runs"])
    assert record["runs"][3]["cost_weights"]["seconds"] > 0  # timed on the device
    assert record["packed_loss"]["passed"] and record["config"]["data"] == "mixed"
    for run in record["runs"]:
        assert run["samples_seen"][-1] > 0 and all(np.isfinite(run["losses"]))
        assert (run["missing"], run["repeated"]) == (None, None)  # 2 of the epoch's steps
    assert record["runs"][2]["computed_tokens"] == record["runs"][2]["real_tokens"]  # packed
    assert "torch" in (out / "environment.txt").read_text()
    assert (out / "training_loss.png").stat().st_size > 0


@pytest.mark.slow
def test_cli_trains_a_text_models_checkpoint_on_text_records(tmp_path, capsys):
    """--model FOLDER of a Qwen2 causal LM: its tokenizer makes the samples, a record with an
    image is left out and counted, and the packed row equals the padded batch."""
    import transformers

    checkpoint = tmp_path / "qwen2-tiny"
    tokenizer = small_tokenizer(checkpoint)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    transformers.Qwen2ForCausalLM(config).save_pretrained(checkpoint)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "looked", "at", "the", "sky"]
    records = [
        {
            "conversations": [
                {"from": "human", "value": " ".join(words[: 2 + i % 9]) + "?"},
                {"from": "gpt", "value": " ".join(words * (1 + i % 4))},
            ]
        }
        for i in range(12)
    ]
    records.append({"image": "x.png", "conversations": records[0]["conversations"]})
    source = tmp_path / "chat.json"
    source.write_text(json.dumps(records))
    out = tmp_path / "out"
    args = ["--train", "--train-only", "--model", str(checkpoint), "--llava", str(source)]
    args += ["--train-loader", "standard", "--train-loader", "odb-packed", "--warmup-steps", "0"]
    args += ["--train-budget", "1024", "--train-max-length", "512", "--out", str(out)]
    assert main(args) == 0
    record = json.loads((out / "results.json").read_text())["training"]
    assert record["data"]["samples"] == 12 and record["data"]["invalid"] == {"RecordError": 1}
    assert record["data"]["with_images"] == 0
    assert [r["missing"] for r in record["runs"]] == [0, 0]
    assert record["packed_loss"]["passed"] and record["packed_loss"]["samples"] == 4
    assert "records of chat" in (out / "report.md").read_text()


def test_the_report_lists_the_weights_each_compute_run_priced_with():
    from types import SimpleNamespace

    from odb.benchmarks.report import _cost_weight_lines

    flops = {"attention_weight": 6.2e-4, "vision_weight": 0.331, "vision_attention_weight": 3.1e-4}
    timed = {
        **flops,
        "attention_weight": 2.8e-4,
        "fit": 0.998,
        "sample_tokens": 24.4,
        "seconds": 8.8,
    }
    runs = [
        SimpleNamespace(loader="odb packed", world=2, seed=0, cost_weights=None),
        SimpleNamespace(loader="odb compute packed", world=2, seed=0, cost_weights=flops),
        SimpleNamespace(loader="odb measured packed", world=2, seed=1, cost_weights=timed),
    ]
    rows = [line for line in _cost_weight_lines(runs) if line.startswith("| odb")]
    assert rows == [
        "| odb compute packed | 2 | 0 | 0.00062 | 0.331 | 0.00031 | - | - | - |",
        "| odb measured packed | 2 | 1 | 0.00028 | 0.331 | 0.00031 | 0.998 | 24.4 | 8.8 |",
    ]
    assert _cost_weight_lines(runs[:1]) == []
