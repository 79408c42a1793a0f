"""The exceptions odb raises.

Every error is an :class:`OdbError`, and also the builtin exception type a caller would expect
(``ValueError`` for bad input, ``TypeError`` for wrong types, ``RuntimeError`` for state and
protocol failures), so ``except ValueError`` keeps working for code that does not know odb.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BatchTypeError",
    "ConfigError",
    "OdbError",
    "OverBudgetError",
    "SampleError",
    "SampleTypeError",
    "StateError",
]


class OdbError(Exception):
    """Base class of all odb errors."""


class ConfigError(OdbError, ValueError):
    """An option of the loader, planner or collator is invalid."""


class SampleError(OdbError, ValueError):
    """A processed sample breaks the sample contract (see docs/design.md, "sample contract")."""

    def __init__(self, index: int, message: str):
        super().__init__(f"sample {index}: {message}")
        self.index = index


class SampleTypeError(OdbError, TypeError):
    """The dataset returned something that is not one sample dict."""

    def __init__(self, index: int, message: str):
        super().__init__(f"sample {index}: {message}")
        self.index = index


class OverBudgetError(SampleError):
    """One sample alone costs more than the token budget (or breaks a per-batch cap)."""


class StateError(OdbError, RuntimeError):
    """A saved loader state cannot be restored onto this loader."""


class BatchTypeError(OdbError, TypeError):
    """A batch is not what odb emits or expects (not a mapping, or without step info)."""


class AlignmentError(OdbError, RuntimeError):
    """The ranks could not agree on a round: a peer failed, died or timed out."""


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ConfigError naming the option."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value
