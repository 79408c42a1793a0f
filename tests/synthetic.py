"""Datasets for tests: processed samples whose contents reveal their index."""

from __future__ import annotations

import numpy as np
import torch


def lognormal_lengths(n: int, mean: float, cv: float, seed: int, low: int = 1) -> np.ndarray:
    sigma = np.sqrt(np.log1p(cv * cv))
    mu = np.log(mean) - sigma * sigma / 2
    lengths = np.random.default_rng(seed).lognormal(mu, sigma, n)
    return np.maximum(np.round(lengths), low).astype(np.int64)


class LengthDataset(torch.utils.data.Dataset):
    """Sample ``i`` has ``lengths[i]`` tokens, all equal to ``i``; its first third is prompt
    (labels -100)."""

    def __init__(self, lengths, images=None):
        self.lengths = [int(n) for n in lengths]
        self.images = images

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        n = self.lengths[index]
        ids = torch.full((n,), index, dtype=torch.long)
        labels = ids.clone()
        labels[: n // 3] = -100
        sample = {"input_ids": ids, "labels": labels}
        if self.images is not None and self.images[index]:
            count = self.images[index]
            sample["image_grid_thw"] = torch.tensor([[1, 4, 4]] * count)
            sample["pixel_values"] = torch.zeros(16 * count, 8)
        return sample


def label_tokens(n: int) -> int:
    """What odb should count for a LengthDataset sample of n tokens."""
    return n - max(n // 3, 1)
