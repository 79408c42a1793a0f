"""LLaVA JSON + images -> LlavaDataset -> odb.DataLoader (2 workers) -> a tiny Qwen-VL trains."""

import math

import pytest
import qwen_vl_tiny
import torch

import odb
from odb.adapters import qwen_vl
from odb.estimate import count_steps

BUDGET = 400
STEPS = 20


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_llava_data_trains_a_tiny_qwen_vl_model(mode, small_tokenizer, tmp_path):
    family = "qwen2_5_vl"
    processor = qwen_vl_tiny.make_processor(
        family, small_tokenizer, min_pixels=4 * 28 * 28, max_pixels=160 * 160
    )
    dataset = qwen_vl.LlavaDataset(
        qwen_vl_tiny.write_llava_dataset(tmp_path), tmp_path / "images", processor
    )
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
