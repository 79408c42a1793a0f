"""Tiny models, datasets and Trainer set-up shared by the HF adapter tests and their workers."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 128


class TokenDataset(torch.utils.data.Dataset):
    """Sample i: ``lengths[i]`` token ids derived from i; its first third is prompt."""

    def __init__(self, lengths):
        self.lengths = [int(n) for n in lengths]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        n = self.lengths[index]
        ids = (index * 31 + torch.arange(n)) % VOCAB
        labels = ids.clone()
        labels[: n // 3] = -100
        return {"input_ids": ids, "labels": labels}


def lengths(n: int, seed: int = 0, mean: int = 40) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(mean) - 0.3, 0.8, n).round(), 4, 200).astype(int).tolist()


def tiny_model(kind: str = "qwen2", dtype=torch.float64) -> torch.nn.Module:
    """A 2-layer model built from config (no download). ``qwen2`` accepts
    ``num_items_in_batch``; ``qwen2_5_vl`` does not (transformers 5.x)."""
    torch.manual_seed(0)
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**text))
    elif kind == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
            vision_config=dict(
                depth=1,
                hidden_size=16,
                intermediate_size=32,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            image_token_id=VOCAB - 1,
            video_token_id=VOCAB - 2,
            vision_start_token_id=VOCAB - 3,
        )
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "sdpa"
    return model.to(dtype)


def token_loss_sum(model, sample: dict) -> torch.Tensor:
    """Sum of next-token cross-entropy over one sample's label tokens (independent of odb).
    Logits go to float32 first, as the Hugging Face loss does."""
    ids = sample["input_ids"][None]
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits, sample["labels"][1:], ignore_index=-100, reduction="sum"
    )


def training_args(output_dir, **overrides) -> transformers.TrainingArguments:
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_grad_norm=0.0,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


class Recorder(transformers.TrainerCallback):
    """Records every micro-batch's step info (via the trainer's training_step) and, at the
    first optimizer step, the accumulated gradients."""

    def __init__(self, trainer):
        import odb

        self.windows: list[list] = [[]]
        self.first_grads = None
        self.lrs: list[float] = []
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            self.windows[-1].append(odb.step_info(inputs))
            return original(model, inputs, num_items_in_batch)

        trainer.training_step = training_step
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.first_grads is None:
            self.first_grads = grads(self.trainer.model)
        self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])  # the LR this step uses

    def on_step_end(self, args, state, control, **kwargs):
        self.windows.append([])


def grads(model) -> list[torch.Tensor]:
    """Each parameter's gradient, zeros for parameters the batch did not reach."""
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for p in model.parameters()
    ]
