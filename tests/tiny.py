"""Tiny models built from config (no download) and process-launch helpers, shared by tests."""

from __future__ import annotations

import os
import socket
import sys

import torch
import transformers


def text_config(vocab: int = 128, positions: int = 2048) -> dict:
    """A 2-layer Qwen2-style text stack small enough for CPU tests."""
    return dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
    )


def tiny_model(
    kind: str = "qwen2", *, vocab: int = 128, dtype=torch.float64, attn: str = "sdpa"
) -> torch.nn.Module:
    """Seeded so every process builds the same weights. ``qwen2`` accepts
    ``num_items_in_batch``; ``qwen2_5_vl`` does not (transformers 5.x)."""
    torch.manual_seed(0)
    text = text_config(vocab)
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
            image_token_id=vocab - 1,
            video_token_id=vocab - 2,
            vision_start_token_id=vocab - 3,
        )
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = attn
    return model.to(dtype)


def token_loss_sum(model, batch) -> torch.Tensor:
    """Sum of per-token cross-entropy over a batch's label tokens (causal shift): the loss
    the multi-process tests scale with odb and compare with one process's."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**{"use_cache": False, **inputs}).logits
    labels = batch["labels"][..., 1:]
    return torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def free_port() -> int:
    """A TCP port free right now on the loopback interface, for one process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *script_and_args: str) -> list[str]:
    """The command that starts ``nproc`` local ranks of a script under torchrun, on a free
    loopback port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *script_and_args,
    ]


def torchrun_nodes(nodes: int, nproc: int, *script_and_args: str) -> list[list[str]]:
    """One torchrun agent per "node", all on this machine, meeting through a c10d rendezvous
    on a free loopback port (as agents on several machines would): ``nodes * nproc`` ranks."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(nodes),
            "--nproc_per_node",
            str(nproc),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            endpoint,
            "--rdzv_id",
            "odb-test",
            *script_and_args,
        ]
        for _ in range(nodes)
    ]


def leave_distributed() -> None:
    """End a test rank: destroy the process groups, then exit at once.

    After all work is done and the groups are destroyed, torch 2.14 still sometimes aborts
    ("terminate called without an active exception") while the interpreter tears down objects
    that reference a gloo group (DDP's reducer, a Trainer's accelerator). Tests judge what the
    ranks wrote, so their ranks skip that teardown rather than fail on it. Drop every loader
    first: DataLoader workers still running at this exit are not shut down, and one blocked
    on a full result queue never exits.
    """
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
