"""LLaVA JSON + images -> LlavaDataset -> odb.DataLoader (2 workers) -> a tiny Qwen-VL trains."""

import json
import math
import random

import pytest
import qwen_vl_tiny
import torch

import odb
from odb.adapters import qwen_vl
from odb.estimate import count_steps

BUDGET = 400
STEPS = 20


@pytest.fixture(scope="module")
def small_tokenizer():
    return qwen_vl_tiny.small_tokenizer()


def _write_dataset(folder, count: int = 24) -> str:
    """Records with 0 to 3 images of 32-160 px, and answers of varying length."""
    rng = random.Random(0)
    (folder / "images").mkdir()
    records = []
    for index in range(count):
        names = []
        for number in range([0, 1, 1, 2, 3][index % 5]):
            name = f"{index}_{number}.png"
            size = rng.randint(32, 160), rng.randint(32, 160)
            qwen_vl_tiny.write_image(str(folder / "images" / name), *size, seed=index * 10 + number)
            names.append(name)
        question = "<image>" * len(names) + f"\nQuestion {index}: what is {index} plus {index}?"
        answer = f"The answer is {2 * index}. " * (1 + index % 3)
        record = {
            "id": index,
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": answer.strip()},
            ],
        }
        if names:
            record["image"] = names
        records.append(record)
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_llava_data_trains_a_tiny_qwen_vl_model(mode, small_tokenizer, tmp_path):
    family = "qwen2_5_vl"
    processor = qwen_vl_tiny.make_processor(
        family, small_tokenizer, min_pixels=4 * 28 * 28, max_pixels=160 * 160
    )
    dataset = qwen_vl.LlavaDataset(_write_dataset(tmp_path), tmp_path / "images", processor)
    torch.manual_seed(0)
    model = qwen_vl_tiny.tiny_model(family, small_tokenizer, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    options = {"mode": mode, "shuffle": True, "seed": 3, "window": 16}
    loader = odb.DataLoader(
        dataset, BUDGET, collate_fn=qwen_vl.collator(model, mode), num_workers=2, **options
    )
    sizes = dataset.estimate_all()
    losses, epoch = [], 0
    while len(losses) < STEPS:
        loader.set_epoch(epoch)
        seen, steps = [], 0
        for batch in loader:
            info = odb.step_info(batch)
            labels = batch["labels"]
            assert info.local_label_tokens == int((labels[:, 1:] != -100).sum())
            assert labels.numel() <= BUDGET
            seen += info.sample_indices
            steps += 1
            if len(losses) < STEPS:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        assert sorted(seen) == list(range(len(dataset)))
        assert steps == count_steps(loader, sizes, epoch)
        epoch += 1
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
