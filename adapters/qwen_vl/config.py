"""The transformers config behind a model-or-config argument.

Shared by the cost layer (:mod:`.flops`) and the batch layer (:mod:`.collators`), which both
accept a model, a DDP-wrapped model or a config, and read a VL model's text settings.
"""

from __future__ import annotations

from typing import Any

import torch

from odb.errors import ConfigError


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def _config_of(model_or_config: Any) -> Any:
    """The config of a model (unwrapping DDP-style ``.module`` wrappers), or the config given."""
    found = model_or_config
    while isinstance(found, torch.nn.Module) and not hasattr(found, "config"):
        if not hasattr(found, "module"):
            break
        found = found.module
    config = getattr(found, "config", found)
    if not hasattr(config, "model_type"):
        raise ConfigError(
            f"expected a transformers model or config, got {type(model_or_config).__name__}"
        )
    return config
