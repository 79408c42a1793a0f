"""The Hugging Face adapter with the real Trainer in 2 processes: torchrun and
``accelerate launch --multi_gpu`` (``--cpu`` would silently run one process); DDP, and FSDP2 as
far as it runs on CPU (docs/hf-trainer.md, "FSDP")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_setup import TokenDataset, grads, lengths, tiny_model, token_loss_sum
from tiny import free_port, torchrun

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("hf_worker.py")
BUDGET = 256


def _launch(tmp_path: Path, config: dict, launcher: str) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {**config, "out": str(tmp_path)}
    path = tmp_path / f"config-{config.get('run', 'run')}.json"
    path.write_text(json.dumps(config))
    if launcher == "torchrun":
        command = torchrun(2)
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
        command = [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, str(WORKER), str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in results] == [2, 2], "two real processes"
    return results


def _check(results, dataset, epochs):
    a, b = results
    assert len(a["windows"]) == len(b["windows"]) == a["global_step"] == b["global_step"]
    assert a["lrs"] == b["lrs"]
    for epoch in range(epochs):
        seen = [
            i
            for r in results
            for w in r["windows"]
            for s in w
            if s["epoch"] == epoch and not s["ghost"]
            for i in s["indices"]
        ]
        assert sorted(seen) == list(range(len(dataset))), f"epoch {epoch}: each sample once"
    for wa, wb in zip(a["windows"], b["windows"], strict=True):
        assert [s["global_label_tokens"] for s in wa] == [s["global_label_tokens"] for s in wb]
        assert all(s["padded_tokens"] <= BUDGET for s in wa + wb)


def _check_logged_figures(results):
    """Each log holds one optimizer step's samples and real tokens over both ranks (the
    tokens through the adapter's all-reduce at log time), the same on both ranks."""
    a, b = results
    for rank in results:
        assert len(rank["logs"]) == len(rank["windows"])
    pairs = zip(a["logs"], b["logs"], a["windows"], b["windows"], strict=True)
    for entry_a, entry_b, wa, wb in pairs:
        real = sum(s["real_tokens"] for s in wa + wb if not s["ghost"])
        samples = sum(s["global_samples"] for s in wa)
        for entry in (entry_a, entry_b):
            assert entry["odb_tokens_per_step"] == real
            assert entry["odb_samples_per_step"] == samples
    samples = sum(s["global_samples"] for w in a["windows"] for s in w)
    assert a["final"]["odb_train_samples"] == b["final"]["odb_train_samples"] == samples


def _check_first_gradient(tmp_path, results, dataset):
    """Rank 0's DDP gradient of the first optimizer step equals one process's exact mean
    over both ranks' samples of that window."""
    samples = [
        dataset[i] for r in results for s in r["windows"][0] if not s["ghost"] for i in s["indices"]
    ]
    tokens = sum(int((x["labels"][1:] != -100).sum()) for x in samples)
    reference = tiny_model()
    (sum(token_loss_sum(reference, x) for x in samples) / tokens).backward()
    got = torch.load(tmp_path / "grads.pt")
    for mine, want in zip(got, grads(reference), strict=True):
        torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_equal_steps_coverage_exact_gradient(tmp_path, launcher):
    dataset_lengths = lengths(75, seed=4)
    config = {
        "lengths": dataset_lengths,
        "budget": BUDGET,
        "args": {"num_train_epochs": 2, "gradient_accumulation_steps": 2},
        "params": True,
    }
    results = _launch(tmp_path, config, launcher)
    dataset = TokenDataset(dataset_lengths)
    _check(results, dataset, epochs=2)
    _check_first_gradient(tmp_path, results, dataset)
    _check_logged_figures(results)
    assert results[0]["final"]["epoch"] == results[1]["final"]["epoch"] == 2.0
    assert results[0]["lrs"][-1] <= 0.05 * max(results[0]["lrs"])


def test_two_process_resume_continues_with_the_same_batches(tmp_path):
    dataset_lengths = lengths(90, seed=5)
    args = {"num_train_epochs": 2, "gradient_accumulation_steps": 2}
    base = {"lengths": dataset_lengths, "budget": BUDGET}
    full = _launch(tmp_path / "full", {**base, "args": args}, "torchrun")
    saving = {**args, "save_strategy": "steps", "save_steps": 6}
    _launch(tmp_path / "run", {**base, "args": saving}, "torchrun")
    checkpoint = tmp_path / "run" / "run" / "checkpoint-6"
    resumed = _launch(
        tmp_path / "run", {**base, "args": args, "resume": str(checkpoint)}, "torchrun"
    )
    for rank in range(2):
        assert resumed[rank]["windows"] == full[rank]["windows"][6:]


def test_fsdp2_sharded_by_transformers_trains_as_ddp(tmp_path):
    """The Trainer's FSDP2 path that runs on CPU: a model sharded at load time by transformers
    (``DistributedConfig(fsdp_size=2)``; ``TrainingArguments(fsdp=...)`` and accelerate's FSDP
    plugin fall back to DDP on CPU). Every optimizer step trains the sharded model, and the run
    sees the batches, first gradient and final parameters of the same training under DDP,
    accumulation windows included."""
    dataset_lengths = lengths(75, seed=4)
    tiny_model().save_pretrained(tmp_path / "tiny")
    config = {
        "lengths": dataset_lengths,
        "budget": BUDGET,
        "args": {"num_train_epochs": 2, "gradient_accumulation_steps": 2},
        "params": True,
    }
    ddp = _launch(tmp_path / "ddp", config, "torchrun")
    fsdp2 = _launch(
        tmp_path / "fsdp2", {**config, "sharded_from": str(tmp_path / "tiny")}, "torchrun"
    )
    assert all(r["sharded"] and all(r["sharded"]) for r in fsdp2), "FSDP2 at every step"
    assert not any(any(r["sharded"]) for r in ddp)
    dataset = TokenDataset(dataset_lengths)
    _check(fsdp2, dataset, epochs=2)
    _check_first_gradient(tmp_path / "fsdp2", fsdp2, dataset)
    for a, b in zip(ddp, fsdp2, strict=True):
        assert a["windows"] == b["windows"] and a["lrs"] == b["lrs"]
    want = torch.load(tmp_path / "ddp" / "params-run.pt")
    got = torch.load(tmp_path / "fsdp2" / "params-run.pt")
    initial = dict(tiny_model().named_parameters())
    assert got.keys() == want.keys() == initial.keys()
    for name, value in got.items():
        assert float((value - initial[name].detach()).abs().max()) > 1e-3, f"{name} was trained"
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-12, msg=name)  # bitwise here
