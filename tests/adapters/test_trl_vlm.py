"""odb's GRPO passes on a tiny Qwen2-VL with images: stock gradients, images kept with rows.

Prompts carry one image each, of three sizes (a few to a few dozen image tokens), so prompt
lengths differ and every pass must take exactly its rows' patches (``image_grid_thw``) along.
"""

import pytest
import trl_tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trl_one_thread")]

BUDGET = 160  # prompts reach ~50 tokens and completions 32: stock forwards hold ~4 x 80


class ForwardLog:
    """Wraps the stock log-prob forward to record what each forward received."""

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id
        self.forwards = []

    def __call__(self, trainer):
        stock = trainer._get_per_token_logps_and_entropies

        def logged(model, input_ids, attention_mask, *args, **kwargs):
            grid = kwargs.get("image_grid_thw")
            self.forwards.append(
                {
                    "tokens": input_ids.numel(),
                    "image_tokens": int(
                        ((input_ids == self.image_token_id) & (attention_mask > 0)).sum()
                    ),
                    "patches": 0 if grid is None else int(grid.prod(-1).sum()),
                    "pixel_rows": 0
                    if kwargs.get("pixel_values") is None
                    else len(kwargs["pixel_values"]),
                }
            )
            return stock(model, input_ids, attention_mask, *args, **kwargs)

        trainer._get_per_token_logps_and_entropies = logged


@pytest.mark.parametrize(
    ("family", "loss_type", "beta"),
    [("qwen2_vl", "dapo", 0.05), ("qwen2_vl", "grpo", 0.0), ("qwen3_vl", "bnpo", 0.05)],
)
def test_vlm_gradients_equal_stock_with_images_aligned(
    tokenizer, tmp_path, family, loss_type, beta
):
    processor = trl_tiny.vlm_processor(tokenizer, family)
    rollouts = trl_tiny.FixedRollouts(32)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    runs, logs = [], []
    for name, budget in (("stock", None), ("odb", BUDGET)):
        model = trl_tiny.vlm_model(tokenizer, family)
        if beta:
            model = trl_tiny.with_reference(model, str(tmp_path / f"reference-{name}"))
        args = trl_tiny.grpo_config(
            str(tmp_path / name), loss_type=loss_type, beta=beta, max_completion_length=32
        )
        log = ForwardLog(image_token)
        runs.append(
            trl_tiny.run(
                model, trl_tiny.vlm_prompts(), processor, args, rollouts, budget, prepare=log
            )
        )
        logs.append(log)
    (_, stock), (trainer, grads) = runs
    difference, scale = trl_tiny.max_difference(stock, grads)
    assert difference <= 1e-4 * scale, (difference, scale)

    stats = trainer.odb_stats
    assert 0 < stats.max_forward_tokens <= BUDGET < stats.max_stock_tokens
    assert len(logs[1].forwards) > len(logs[0].forwards)  # odb ran other, smaller forwards
    for forward in logs[1].forwards:
        assert forward["tokens"] <= BUDGET
        # each image's patches came with its row: 4 patches per image token (merge 2x2)
        assert forward["pixel_rows"] == forward["patches"] == 4 * forward["image_tokens"] > 0
