"""Tiny GRPO runs for the TRL adapter tests: models from config, fixed rollouts, gradients.

Generation is replaced by :class:`FixedRollouts` (``GRPOTrainer._generate_single_turn`` on the
instance), so a stock trainer and an odb trainer built alike see the very same rollouts;
everything after generation (padding, rewards, advantages, old/ref log-probs, chunking, loss)
is TRL's own code. :class:`GradRecorder` keeps the gradients the optimizer is about to apply.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import qwen_vl_tiny
import torch
import transformers
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig, GRPOTrainer

from odb.adapters.trl import enable

TOKEN_RANGE = (10, 2000)  # ordinary tokens of the small tokenizer (specials start at 2048)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: tiny models gain nothing from two, and on a busy 2-core
    machine the idle thread's spin-waiting made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def text_model(tokenizer, seed: int = 0, dtype=torch.float64):
    """A 2-layer Qwen2 causal LM (hidden 64) for ``tokenizer``'s ids."""
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).to(dtype)


def vlm_model(tokenizer, family: str = "qwen2_vl", seed: int = 0, dtype=torch.float64):
    """A tiny Qwen-VL of ``family`` (2 text and 2 vision layers)."""
    return qwen_vl_tiny.tiny_model(family, tokenizer, dtype=dtype, seed=seed)


def with_reference(model, folder: str, noise: float = 0.02, seed: int = 1):
    """Save ``model`` as the KL reference, then move the policy away from it, so the KL term
    and its gradient are not zero. TRL builds the reference from ``config._name_or_path``."""
    model.save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(noise * torch.randn(parameter.shape, generator=generator).to(parameter))
    model.config._name_or_path = folder
    return model


def text_prompts(n: int = 16, longest: int = 25) -> Dataset:
    """Plain-text prompts of 3 to ``longest`` words."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota"]
    prompts = [
        " ".join(words[(i + j) % len(words)] for j in range(3 + (7 * i) % (longest - 2)))
        for i in range(n)
    ]
    return Dataset.from_dict({"prompt": prompts})


def vlm_prompts(n: int = 8, seed: int = 0) -> Dataset:
    """Conversational prompts with one image each, of three sizes (so, prompt lengths)."""
    rng = np.random.default_rng(seed)
    sides = [(56, 56), (56, 112), (112, 168)]
    images, prompts = [], []
    for i in range(n):
        height, width = sides[i % len(sides)]
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
        text = "What is in the picture " + "please " * (i % 4)
        content = [{"type": "image"}, {"type": "text", "text": text}]
        prompts.append([{"role": "user", "content": content}])
    return Dataset.from_dict({"prompt": prompts, "image": images})


def reward(completions, completion_ids, **kwargs):
    """A deterministic, varied reward, so advantages are not all zero."""
    return [float(sum(ids) % 13) / 13 for ids in completion_ids]


class FixedRollouts:
    """Stands in for generation: completions with lognormal lengths (heavy right tail), a pure
    function of the prompt tokens and the row, so two trainers get identical rollouts.

    ``scale`` stretches the lengths (a rank with longer rollouts than the others).
    """

    def __init__(self, max_length: int, median: float = 8.0, sigma: float = 1.0, scale=1.0):
        self.max_length = max_length
        self.median = median
        self.sigma = sigma
        self.scale = scale

    def __call__(self, prompt_ids, images, multimodal_fields, num_generations, **kwargs):
        completions = []
        for row, prompt in enumerate(prompt_ids):
            rng = np.random.default_rng([int(sum(prompt)), len(prompt), row])
            length = self.scale * rng.lognormal(np.log(self.median), self.sigma)
            length = int(min(self.max_length, max(1, round(length))))
            completions.append(rng.integers(*TOKEN_RANGE, length).tolist())
        return completions, None


class GradRecorder(transformers.TrainerCallback):
    """The gradients of every optimizer step, as applied (after DDP's all-reduce)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {
                name: parameter.grad.detach().clone()
                for name, parameter in model.named_parameters()
                if parameter.grad is not None
            }
        )


def grpo_config(output_dir: str, **overrides) -> GRPOConfig:
    """CPU, float64-friendly defaults; SGD so that later steps depend on gradients only."""
    settings = {
        "output_dir": output_dir,
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "num_generations": 4,
        "max_completion_length": 48,
        "max_steps": 2,
        "optim": "sgd",
        "learning_rate": 0.05,
        "max_grad_norm": 0.0,
        "beta": 0.0,
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return GRPOConfig(**settings)


def run(
    model,
    dataset: Dataset,
    processing_class,
    args: GRPOConfig,
    rollouts: FixedRollouts,
    token_budget: float | None = None,
    prepare=None,
    **odb_options,
):
    """Train ``args.max_steps`` steps, stock (``token_budget=None``) or with odb; returns the
    trainer and the gradients of each optimizer step. ``prepare(trainer)`` runs before odb
    is enabled (to wrap a stock method, for instance)."""
    recorder = GradRecorder()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=processing_class,
        callbacks=[recorder],
    )
    trainer._generate_single_turn = rollouts
    if prepare is not None:
        prepare(trainer)
    if token_budget is not None:
        enable(trainer, token_budget, **odb_options)
    trainer.train()
    return trainer, recorder.steps


def max_difference(stock: list[dict], other: list[dict]) -> tuple[float, float]:
    """(largest absolute gradient difference, largest absolute stock gradient) over steps."""
    assert len(stock) == len(other) and stock, (len(stock), len(other))
    difference = scale = 0.0
    for a, b in zip(stock, other, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            difference = max(difference, float((a[name] - b[name]).abs().max()))
            scale = max(scale, float(a[name].abs().max()))
    return difference, scale


def write_tokenizer(folder: str):
    """The small tokenizer, left-padding as TRL expects of processors it did not load."""
    tokenizer = qwen_vl_tiny.load_tokenizer(qwen_vl_tiny.write_small_tokenizer(folder))
    tokenizer.padding_side = "left"
    return tokenizer


def vlm_processor(tokenizer, family: str = "qwen2_vl"):
    """A Qwen-VL processor for small images (one to six 2x2-merged patch blocks a side)."""
    side = 2 * qwen_vl_tiny.CHECKPOINT_IMAGE_SETTINGS[family]["patch_size"]
    return qwen_vl_tiny.make_processor(
        family, tokenizer, min_pixels=2 * side * 2 * side, max_pixels=4 * side * 6 * side
    )


def finish_rank(out: str, record: dict) -> None:
    """End one rank of a multi-process test: write its record, wait for every rank, leave the
    process group."""
    import torch.distributed as dist
    from tiny import leave_distributed

    with open(os.path.join(out, f"rank{record['rank']}.json"), "w") as file:
        json.dump(record, file)
    dist.barrier()
    leave_distributed()
