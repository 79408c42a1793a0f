"""Synthetic sample lengths with a chosen mean and spread.

Public SFT sets differ mostly in how spread out their lengths are, and that spread (the
coefficient of variation, CV) is what decides how much fixed-size batching pads. A lognormal
with a given mean and CV is the usual model of it: right-skewed, always positive.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["clip_to_budget", "lognormal_lengths"]


def lognormal_lengths(mean: float, cv: float, n: int, seed: int) -> np.ndarray:
    """``n`` integer lengths (at least 1 token) from a lognormal with this mean and CV.

    With ``sigma**2 = log(1 + cv**2)`` and ``mu = log(mean) - sigma**2 / 2`` the lognormal has
    exactly the requested mean and CV before rounding.
    """
    if mean <= 0 or cv < 0 or n < 0:
        raise ValueError(f"need mean > 0, cv >= 0 and n >= 0; got {mean=}, {cv=}, {n=}")
    sigma = math.sqrt(math.log1p(cv * cv))
    mu = math.log(mean) - sigma * sigma / 2
    lengths = np.random.default_rng(seed).lognormal(mu, sigma, n)
    return np.maximum(np.rint(lengths), 1).astype(np.int64)


def clip_to_budget(lengths: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """Lengths capped at ``budget`` (as a pipeline truncating at ``max_length`` would), and
    how many were cut; a sample longer than the budget fits no batch under any policy."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.minimum(lengths, budget), int(np.count_nonzero(lengths > budget))
