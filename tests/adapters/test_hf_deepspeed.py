"""The Hugging Face adapter under DeepSpeed ZeRO-2 and ZeRO-3 with the real Trainer, 2 processes
on CPU (DeepSpeed's CPU accelerator, gloo): the same batches, losses, gradient norms and final
parameters as the DDP run of the same data, and resume from a ZeRO checkpoint.

The Trainer drives DeepSpeed through accelerate: every micro-batch's backward goes to
``engine.backward`` with ``scale_wrt_gas=False`` (no division by the accumulation steps; the
adapter's loss is already the window's share), and the accumulation boundary is set from the
Trainer's own sync flag (every ``gradient_accumulation_steps`` micro-batches). odb makes every
window exactly that many micro-batches (``steps_multiple_of``), so DeepSpeed steps where DDP's
optimizer does. These tests check the outcome, not the reading of the sources.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from hf_setup import lengths
from tiny import torchrun

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("hf_worker.py")
BUDGET = 256
# SGD, not AdamW: Adam's update hardly changes when every gradient is scaled alike, so a wrong
# scale (a division by the accumulation steps, a missing world size) would not show in the
# parameters; SGD's update is proportional to the gradient. float32: ZeRO refuses float64.
ARGS = {
    "num_train_epochs": 2,
    "gradient_accumulation_steps": 2,
    "optim": "sgd",
    "learning_rate": 0.5,
}


def _zero(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def _launch(out: Path, config: dict, stderr: list | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    config = {"lengths": lengths(75, seed=4), "budget": BUDGET, "dtype": "float32", **config}
    config["out"] = str(out)
    path = out / f"config-{config.get('run', 'run')}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [*torchrun(2), str(WORKER), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # the first DeepSpeed run on a machine JIT-builds its shm op (~1 min)
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    if stderr is not None:
        stderr.append(done.stderr)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _params(out: Path, run: str = "run") -> list[torch.Tensor]:
    return list(torch.load(out / f"params-{run}.pt").values())


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
    """The DDP run everything is compared with, and the parameters it started from."""
    out = tmp_path_factory.mktemp("ddp")
    results = _launch(out, {"args": ARGS, "params": True})
    start = [p.detach().clone() for p in _start_parameters()]
    return results, start, _params(out)


def _start_parameters() -> list[torch.Tensor]:
    from tiny import tiny_model

    return list(tiny_model(dtype=torch.float32).parameters())


def _assert_same_training(got: list[dict], want: list[dict]) -> None:
    """The same windows on each rank, and per step the same logged loss and gradient norm.

    The tolerances are float32's: DeepSpeed reduces gradients in buckets, in another order than
    DDP's all-reduce, which moves the last bits; a wrong loss share is off by tens of percent.
    """
    for mine, theirs in zip(got, want, strict=True):
        assert mine["windows"] == theirs["windows"]
        assert mine["global_step"] == theirs["global_step"] == len(theirs["logs"])
        assert mine["lrs"] == pytest.approx(theirs["lrs"], rel=1e-6)
        for a, b in zip(mine["logs"], theirs["logs"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)


def _assert_same_update(got, start, want) -> None:
    """The final parameters equal DDP's, within 1e-5 of the distance training moved them."""
    moved = torch.cat([(w - s).flatten() for w, s in zip(want, start, strict=True)]).norm()
    diff = torch.cat([(g - w).flatten() for g, w in zip(got, want, strict=True)]).norm()
    assert moved > 1e-2, "training moved the parameters"
    assert diff <= 1e-5 * moved, f"{diff:.3g} from DDP's parameters, which moved {moved:.3g}"


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_as_ddp(tmp_path, ddp, stage):
    want, start, want_params = ddp
    got = _launch(tmp_path, {"args": {**ARGS, "deepspeed": _zero(stage)}})
    _assert_same_training(got, want)
    assert any(s["ghost"] for r in got for w in r["windows"] for s in w), "ghost batches ran"
    _assert_same_update(_params(tmp_path), start, want_params)


def test_zero3_resume_continues_as_ddp(tmp_path, ddp):
    """A ZeRO-3 checkpoint (DeepSpeed's partitioned states and odb's position) resumes with
    the remaining batches, learning rates and final parameters of the uninterrupted DDP run."""
    want, start, want_params = ddp
    zero = {**ARGS, "deepspeed": _zero(3)}
    _launch(tmp_path, {"args": {**zero, "save_strategy": "steps", "save_steps": 6}})
    checkpoint = tmp_path / "run" / "checkpoint-6"
    assert any(checkpoint.glob("global_step6/*optim_states.pt")), "DeepSpeed's own checkpoint"
    resumed = _launch(tmp_path, {"args": zero, "resume": str(checkpoint)})
    for mine, theirs in zip(resumed, want, strict=True):
        assert mine["windows"] == theirs["windows"][6:]
        assert mine["lrs"] == pytest.approx(theirs["lrs"][6:], rel=1e-6)
        # the log history comes back from the checkpoint: its first 6 entries are the saving run's
        for a, b in zip(mine["logs"], theirs["logs"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    _assert_same_update(_params(tmp_path), start, want_params)


def test_zero_with_deepspeed_optimizer_follows_the_data_schedule(tmp_path, ddp):
    """An optimizer in the DeepSpeed config: the engine steps the Trainer's scheduler, which the
    trainer then holds inside accelerate's wrapper; odb still sets each window's learning rate
    at its middle (the LRs equal the DDP run's, whatever the optimizer)."""
    want, _, _ = ddp
    optimizer = {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}
    config = {**_zero(2), "optimizer": optimizer}
    got = _launch(tmp_path, {"args": {**ARGS, "deepspeed": config}})
    for mine, theirs in zip(got, want, strict=True):
        assert mine["windows"] == theirs["windows"]
        assert mine["lrs"] == pytest.approx(theirs["lrs"], rel=1e-6)
        assert mine["lrs"][-1] > 0


def test_deepspeed_scheduler_is_warned_about_in_epochs_mode(tmp_path):
    """DeepSpeed's own scheduler counts to the estimated steps: odb says so."""
    scheduler = {
        "type": "WarmupDecayLR",
        "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"},
    }
    stderr = []
    args = {**ARGS, "num_train_epochs": 1, "deepspeed": {**_zero(2), "scheduler": scheduler}}
    _launch(tmp_path, {"args": args}, stderr)
    assert "the DeepSpeed config's scheduler steps over the estimated" in stderr[0]
