"""Every rank runs the vision tower at a step where any rank's batch holds an image: the
guarantee FSDP and ZeRO-3 need (they gather the tower's weights collectively when it runs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import qwen_vl_tiny
from tiny import torchrun

WORKER = Path(__file__).with_name("vision_worker.py")


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _records(folder: Path) -> list[dict]:
    """8 records with one image each, then 12 text-only ones of varying length."""
    (folder / "images").mkdir()
    records = []
    for i in range(8):
        name = f"{i}.png"
        qwen_vl_tiny.write_image(str(folder / "images" / name), 28 * (2 + i % 3), 56, seed=i)
        records.append({"image": name, "conversations": _turns("<image>\nWhat is it?", "Noise.")})
    for i in range(12):
        answer = " ".join(["word"] * (3 + 7 * i))
        records.append({"conversations": _turns(f"Say {3 + 7 * i} words.", answer)})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision_alignment")
    path = folder / "records.json"
    path.write_text(json.dumps(_records(folder)))
    return {"records": str(path), "images": str(folder / "images")}


def _launch(tmp_path: Path, config: dict, timeout: float) -> tuple[list[dict] | None, str]:
    """Two ranks under torchrun; their records, or None when they did not all finish
    within ``timeout`` seconds (torchrun and its ranks are then killed)."""
    config = {**config, "out": str(tmp_path)}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    agent = subprocess.Popen(
        [*torchrun(2), str(WORKER), str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output = agent.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(agent.pid, 9)
        return None, agent.communicate()[0] + f"\n[still running after {timeout} s: killed]"
    records = [tmp_path / f"rank{r}.json" for r in range(2)]
    if not all(p.exists() for p in records):
        return None, output
    return [json.loads(p.read_text()) for p in records], output


# rank 0: the 8 image records and 4 text ones; rank 1: text only
SHARDS = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_fsdp2_with_images_on_one_rank_trains_on_the_exact_mean(tmp_path, data, mode):
    config = {**data, "mode": mode, "budget": 320, "per_rank_indices": SHARDS}
    results, output = _launch(tmp_path, {**config, "placeholder": True}, timeout=240)
    assert results is not None, output[-4000:]
    for r in results:
        assert "error" not in r, r.get("traceback")
    steps = [r["steps"] for r in results]
    assert len(steps[0]) == len(steps[1])
    placed = 0
    for first, second in zip(*steps, strict=True):
        assert first["vision"] == second["vision"]
        assert (first["images"] > 0) == first["vision"] == (second["images"] > 0)
        placed += second["placeholder"]
        assert not first["placeholder"] or first["ghost"]
    assert placed == results[1]["vision_placeholders"] > 0
    assert results[0]["worst_grad_error"] < 1e-9


@pytest.mark.slow
def test_fsdp2_without_the_placeholder_does_not_get_past_a_mixed_step(tmp_path, data):
    """The same run without the placeholder: rank 0 gathers a vision block's weights while
    rank 1 gathers a decoder layer's. gloo notices the sizes differ and aborts the ranks (NCCL
    does not check: the ranks wait for each other until its timeout); either way training
    stops at the first mixed step."""
    config = {**data, "mode": "padded", "budget": 320, "per_rank_indices": SHARDS}
    config.update(placeholder=False, pg_timeout=20)
    results, output = _launch(tmp_path, config, timeout=120)
    assert results is None, "trained through steps with images on one rank only"
    assert "collective mismatch" in output or "killed]" in output, output[-4000:]
