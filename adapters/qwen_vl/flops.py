"""What a batch costs a Qwen2/Qwen3 text or Qwen-VL model: FLOPs counted from its config.

The cost layer: :func:`model_flops` counts the matrix products per token, per attention pair
and per vision patch; :func:`compute_cost` turns the count into the ``odb.ComputeCost`` the
planner prices batches with. A config is enough: no weights, no forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import odb
from odb.adapters.qwen_vl.attention import builds_dense_mask
from odb.adapters.qwen_vl.config import _config_of, _text_config
from odb.errors import ConfigError


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of a model's matrix products, by what they scale with.

    ``token``: per language-model token through the linear layers and the LM head;
    ``attention``: per (query, key) pair of language-model attention, all layers;
    ``patch``: per vision patch through the vision tower's linear layers, patch embedding and
    merger(s); :meth:`patch_attention`: per patch of an image, for the vision tower's attention
    (``vision_attention_pair`` per pair of patches in each of ``vision_full_layers`` layers over
    the whole image, and of ``vision_window_layers`` layers over windows of
    ``vision_window_patches`` patches, Qwen2.5-VL's).
    """

    token: float
    attention: float
    patch: float = 0.0
    vision_attention_pair: float = 0.0
    vision_full_layers: int = 0
    vision_window_layers: int = 0
    vision_window_patches: int = 0

    def patch_attention(self, patches: int) -> float:
        """Vision attention FLOPs per patch of a ``patches``-patch image."""
        full = self.vision_full_layers * patches
        window = self.vision_window_layers * min(patches, self.vision_window_patches)
        return self.vision_attention_pair * (full + window)


def model_flops(config: Any) -> ModelFlops:
    """Count the matrix-product FLOPs of a Qwen2/Qwen3 text or Qwen-VL model from its config.

    With ``d`` the hidden size, ``f`` the MLP size, ``N`` layers, ``h``/``k`` query/key-value
    heads of size ``e`` and vocabulary ``V`` (a multiply-add is 2 FLOPs):

    - ``token = 2 * (N * (d*e*(2h + 2k) + 3*d*f) + d*V)`` (q, k, v, o projections, gated MLP,
      LM head); in a mixture-of-experts layer (Qwen3-VL-MoE, Qwen3-MoE, Qwen2-MoE) the MLP
      term is what a token runs: its ``top_k`` experts' gated MLPs (``3*d*f_expert`` each),
      the router (``d*E``) and a shared expert with its gate where the model has one;
    - ``attention = 4 * N * h * e`` per (query, key) pair (scores and weighted values).

    Vision tower (hidden ``c``, MLP ``g``, depth ``D``, patch ``p``, temporal patch ``t``, merge
    ``m``, output ``d``): per patch ``2 * (D * (4*c*c + u*c*g) + 3*t*p*p*c + M * (c*c*m*m +
    c*d))`` with ``u = 3`` for Qwen2.5-VL's gated MLP and 2 otherwise, and ``M`` mergers
    (1, plus Qwen3-VL's deepstack mergers); vision attention is ``4 * c`` per (patch, patch)
    pair in each layer, over the whole image (or Qwen2.5-VL's windows in its window layers).
    Norms, activations, rotary and embedding lookups are left out: they are not matrix products.
    """
    text = _text_config(config)
    d, n = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    token = 2.0 * (
        n * d * head_dim * (2 * heads + 2 * kv_heads)
        + sum(_mlp_per_token(text, layer) for layer in range(n))
        + d * text.vocab_size
    )
    attention = 4.0 * n * heads * head_dim
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return ModelFlops(token, attention)
    model_type = getattr(config, "model_type", "")
    if model_type == "qwen2_vl":
        c, mlp, gated = vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio), False
        out = vision.hidden_size
    else:
        c, mlp, out = vision.hidden_size, vision.intermediate_size, vision.out_hidden_size
        gated = model_type == "qwen2_5_vl"
    m, p, t = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    mergers = 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ())
    depth = vision.depth
    block = 4 * c * c + (3 if gated else 2) * c * mlp
    merger = c * c * m * m + c * out
    patch = 2.0 * (depth * block + vision.in_channels * t * p * p * c + mergers * merger)
    full_layers, window_layers, window_patches = depth, 0, 0
    if model_type == "qwen2_5_vl":
        full_layers = len(vision.fullatt_block_indexes)
        window_layers = depth - full_layers
        window_patches = (vision.window_size // p) ** 2
    return ModelFlops(token, attention, patch, 4.0 * c, full_layers, window_layers, window_patches)


def _mlp_per_token(text: Any, layer: int) -> int:
    """Multiply-adds per token in the MLP of decoder ``layer``: a gated MLP, or, in a
    mixture-of-experts layer, the ``top_k`` experts a token is routed to, the router and a
    shared expert (with its one-output gate) where the model has one. A layer is sparse as
    transformers builds it: experts exist, the layer is not in ``mlp_only_layers``, and
    ``layer + 1`` is a multiple of ``decoder_sparse_step``."""
    d = text.hidden_size
    experts = getattr(text, "num_experts", None) or 0
    sparse = (
        experts > 0
        and layer not in (getattr(text, "mlp_only_layers", None) or ())
        and (layer + 1) % (getattr(text, "decoder_sparse_step", None) or 1) == 0
    )
    if not sparse:
        return 3 * d * text.intermediate_size
    routed = text.num_experts_per_tok * 3 * d * text.moe_intermediate_size + d * experts
    shared = getattr(text, "shared_expert_intermediate_size", None) or 0
    return routed + (3 * d * shared + d if shared else 0)


def _kernel(model_or_config: Any, attention: str | None) -> str | None:
    """The language model's attention kernel: ``attention`` if named, else the model's own
    (its text config's ``_attn_implementation``; None runs transformers' default, sdpa)."""
    if attention is not None:
        return attention
    return getattr(_text_config(_config_of(model_or_config)), "_attn_implementation", None)


def compute_cost(
    model_or_config: Any,
    mode: str = "padded",
    *,
    causal: bool = True,
    attention: str | None = None,
) -> odb.ComputeCost:
    """An ``odb.ComputeCost`` in language-model token units from :func:`model_flops`.

    ``attention_weight = attention / token`` (halved when ``causal``: causal kernels skip the
    upper triangle) multiplies the (query, key) pairs the kernel computes: ``n * max_len**2``
    padded; packed, ``sum(len**2)`` for a kernel that attends within each sample
    (``odb_packed``, flash-attention, flex) and ``sum(len)**2`` for one that gets a dense
    row-by-row mask (sdpa, eager: :func:`builds_dense_mask`, ``odb.ComputeCost.dense_mask``).
    ``attention`` names the kernel; by default it is the model's (its text config's
    ``_attn_implementation``), and transformers' default, sdpa, for a config that has none;
    ``vision_weight = (patch + window attention) / token`` multiplies the batch's vision
    patches, and ``vision_attention_weight = vision_attention_pair * full layers / token``
    the sum over its images of ``patches**2`` (``SampleSize.vision_pairs``): the tower's
    full-attention layers attend over each whole image, so their work grows with the square of
    its patches. Qwen2.5-VL's window layers attend within windows of a fixed size, a cost per
    patch (priced at a whole window: images smaller than one window are rare).
    """
    config = _config_of(model_or_config)
    if mode not in ("padded", "packed"):
        raise ConfigError(f"mode must be 'padded' or 'packed', got {mode!r}")
    attention = _kernel(config, attention)
    flops = model_flops(config)
    pair_flops = flops.attention * (0.5 if causal else 1.0)
    window = flops.vision_attention_pair * flops.vision_window_layers
    pair = flops.vision_attention_pair * flops.vision_full_layers
    return odb.ComputeCost(
        padded=mode == "padded",
        dense_mask=mode == "packed" and builds_dense_mask(attention),
        attention_weight=pair_flops / flops.token,
        vision_weight=(flops.patch + window * flops.vision_window_patches) / flops.token,
        vision_attention_weight=pair / flops.token,
    )


COMPUTE_HEADROOM = 1.5
"""How much more compute than ``token_budget`` text tokens a batch may cost by default under
:func:`compute_budget`: images and long rows cost more per token than short text, and a limit
of exactly ``token_budget`` would hold image-heavy batches far below the memory the token cap
allows (more, smaller steps); at 1.5 most batches are full in tokens or in compute."""


def compute_budget(
    model_or_config: Any,
    token_budget: float,
    mode: str = "padded",
    *,
    headroom: float = COMPUTE_HEADROOM,
    attention: str | None = None,
    cost: odb.ComputeCost | None = None,
) -> odb.Budget:
    """The budget odb plans Qwen-VL batches with by default: priced by :func:`compute_cost`
    (estimated step time, in text-token units, for the ``attention`` kernel, by default the
    model's) up to the compute of ``headroom * token_budget`` text tokens, and never more than
    ``token_budget`` tokens per batch (``max_tokens``, the memory bound). A sample within the
    token cap whose compute alone is over the limit runs alone (``odb.Budget.why_over``).
    ``cost`` replaces the FLOPs-derived weights, for example with those
    :func:`~odb.adapters.qwen_vl.measure_cost` timed; it must price ``mode``'s layout."""
    if not (isinstance(headroom, int | float) and headroom >= 1):
        raise ConfigError(f"headroom must be a number >= 1, got {headroom!r}")
    cap = int(odb.Budget(token_budget).limit)  # validated; the cap counts whole tokens
    if cost is None:
        cost = compute_cost(model_or_config, mode, attention=attention)
    elif not isinstance(cost, odb.ComputeCost) or cost.padded != (mode == "padded"):
        raise ConfigError(
            f"cost must be an odb.ComputeCost that prices {mode} batches, got {cost!r}"
        )
    else:
        attention = _kernel(model_or_config, attention)
        dense = mode == "packed" and builds_dense_mask(attention)
        if cost.dense_mask != dense:
            raise ConfigError(
                f"cost prices packed rows {'with' if cost.dense_mask else 'without'} a dense "
                f"mask, but the model's attention ({attention or 'sdpa'}) "
                f"{'builds' if dense else 'does not build'} one"
            )
    return odb.Budget(headroom * cap, cost, odb.Caps(max_tokens=cap))
