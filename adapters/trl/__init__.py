"""Token-budgeted, rank-balanced micro-batches for TRL's ``GRPOTrainer``.

Where odb sits in one GRPO optimizer step (the stock trainer's parts are untouched)::

    generation batch (prompts)                               stock TRL
      -> generate completions, score rewards, advantages     stock TRL (vLLM or transformers)
      -> old / ref log-probs            [odb: forwards cut under the scoring budget]
      -> shuffle, equal row chunks      stock TRL (kept: same RNG, same chunks)
      -> accumulation window            [odb: the rows of the window's chunks are re-cut]
             rows sorted by length, cut into T groups under the budget; every rank runs T
             passes with the same number of rows in pass j (one all_gather of sorted sizes)
             each group trimmed of padding it does not need, images follow their rows
             T passes spread over the window's gradient-accumulation calls
      -> loss per pass                  stock ``_compute_loss``, times a per-loss-type factor
      -> backward per pass (no_sync but the last), optimizer step    stock HF Trainer

Why the per-pass factor (``_plan_window``) makes the window's gradient equal to the stock one: TRL
normalises each micro-batch's loss by a quantity that, for dapo/cispo/vespo, is the same for
every micro-batch of the window (a global token count), so any partition of the rows sums to
the same loss; for grpo/sapo/luspo/dr_grpo by the micro-batch's row count, which odb replaces
with the stock chunk's row count (factor ``rows / chunk_rows``); for bnpo by the micro-batch's
token count, so odb only cuts inside stock chunks and rescales by ``tokens / chunk_tokens``.

Padding: TRL lays a row out as a left-padded prompt and a right-padded completion, so a padded
batch is ``n * (max prompt + max completion)`` wide even when no row is that long. Every
forward odb runs moves each row's tokens to the left (``prompt | completion | pad``), so the
batch is ``n * max(prompt + completion)``: exactly the padded cost the core planner budgets.
Rotary position embeddings are relative and Qwen-VL's 3-D positions are derived from the
attention mask, so log-probabilities do not change (up to float rounding).

Use ``OdbGRPOTrainer(..., token_budget=...)`` or ``enable(trainer, token_budget)``; see
docs/rl.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from odb.adapters.trl.planning import (
    RowSizes,
    encode_rows,
    envelope_groups,
    fewest_groups,
    ghost_slot,
    own_groups,
    sorted_segments,
    split_groups,
)

__all__ = [
    "GRPOBatching",
    "GRPOBatchingStats",
    "OdbGRPOTrainer",
    "RolloutLayoutError",
    "RowSizes",
    "enable",
    "encode_rows",
    "envelope_groups",
    "fewest_groups",
    "ghost_slot",
    "own_groups",
    "sorted_segments",
    "split_groups",
]

# Names of the layers that import TRL, loaded on first use: the planning layer (and the
# benchmarks that run it) imports without TRL installed.
_NEED_TRL = {
    "GRPOBatching": "trainer",
    "GRPOBatchingStats": "trainer",
    "OdbGRPOTrainer": "trainer",
    "RolloutLayoutError": "layout",
    "enable": "trainer",
}


def __getattr__(name: str) -> Any:
    if name not in _NEED_TRL:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NEED_TRL[name]}"), name)
