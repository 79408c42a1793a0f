"""Tiny models, datasets and Trainer set-up shared by the HF adapter tests and their workers."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from tiny import tiny_model  # noqa: F401  (re-exported for the adapter tests)

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
    """Records every micro-batch's step info (via the trainer's training_step), each window's
    learning rate and, at the first optimizer step, the accumulated gradients."""

    def __init__(self, trainer):
        import odb

        self.windows: list[list] = [[]]
        self.first_grads = None
        self.lrs: list[float] = []
        self.sharded: list[bool] = []  # per optimizer step: did it train an FSDP2 model?
        original = trainer.training_step

        def training_step(model, inputs, num_items_in_batch=None):
            if not self.windows[-1]:
                # The LR this window trains with, read before its first backward: with an
                # optimizer in the DeepSpeed config, the engine steps the optimizer and the
                # scheduler inside the last backward, before on_pre_optimizer_step.
                self.lrs.append(self.trainer.optimizer.param_groups[0]["lr"])
            self.windows[-1].append(odb.step_info(inputs))
            return original(model, inputs, num_items_in_batch)

        trainer.training_step = training_step
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sharded.append(sharded(self.trainer.model))
        if self.first_grads is None:
            self.first_grads = grads(self.trainer.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.windows.append([])


def grads(model) -> list[torch.Tensor]:
    """Each parameter's whole gradient, zeros for parameters the batch did not reach (an FSDP2
    gradient is gathered from its shards: a collective, so every rank must call this)."""
    return [
        torch.zeros_like(whole(p)) if p.grad is None else whole(p.grad).detach().clone()
        for p in model.parameters()
    ]


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor, or the whole of an FSDP2 parameter or gradient (a sharded DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def sharded(model) -> bool:
    """The model is sharded by FSDP2: an ``FSDPModule`` whose parameters are all DTensors."""
    from torch.distributed.fsdp import FSDPModule

    params = list(model.parameters())
    return isinstance(model, FSDPModule) and all(hasattr(p, "full_tensor") for p in params)
