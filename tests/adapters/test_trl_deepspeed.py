"""GRPO with odb under DeepSpeed ZeRO-2 and ZeRO-3: two real processes on CPU (DeepSpeed's CPU
accelerator, gloo), skewed rollouts, the final parameters of the stock trainer's run.

odb runs several forward/backward passes inside one accumulation call. Through accelerate, each
backward would tell the engine whether it ends the window (from the call's sync flag) and step
the optimizer there, and DeepSpeed would divide it by the accumulation steps (the Trainer turns
that off for its own backward only); odb's earlier passes go to the engine directly instead,
as non-boundary micro-steps without that division. With accelerate's backward there, the
parameters differ from the stock run's by 40% of the distance they moved.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from tiny import torchrun

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

BUDGET = 96
WORKER = Path(__file__).with_name("trl_deepspeed_worker.py")


@pytest.mark.parametrize("stage", [2, 3])
def test_grpo_under_zero_trains_as_the_stock_trainer(tmp_path, stage):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
    }
    command = torchrun(2, str(WORKER), str(tmp_path), str(stage), str(BUDGET))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["world_size"] == 2 and rank["global_step"] == 3
        assert 0 < rank["max_forward_tokens"] <= BUDGET
        assert max(rank["window_passes"]) > 1, "odb's own backward passes ran"
        # float32; DeepSpeed reduces odb's passes in other groupings than the stock chunks
        assert rank["moved"] > 1e-2
        assert rank["difference"] <= 1e-5 * rank["moved"], rank
        assert rank["losses"]["odb"] == pytest.approx(rank["losses"]["stock"], rel=1e-4)
    assert ranks[0]["window_passes"] == ranks[1]["window_passes"]
    assert ranks[0]["max_stock_tokens"] > BUDGET  # the long rank's stock forwards would not fit
