"""Streams for tests: torch IterableDatasets whose samples reveal their id, split across
DataLoader workers with ``get_worker_info()`` as torch users do."""

from __future__ import annotations

import torch
from torch.utils.data import IterableDataset, get_worker_info


def stream_sample(uid: int, length: int) -> dict:
    """Sample ``uid``: ``length`` tokens all equal to ``uid``, its first third prompt."""
    ids = torch.full((length,), uid, dtype=torch.long)
    labels = ids.clone()
    labels[: length // 3] = -100
    return {"input_ids": ids, "labels": labels, "uid": uid}


class PlainStream(IterableDataset):
    """Samples ``uids`` with ``lengths[uid]`` tokens; each DataLoader worker yields every
    ``num_workers``-th of them. ``fail_at``: raise on that uid; ``bad_at``: yield a string
    there instead of a sample."""

    def __init__(self, uids, lengths, *, fail_at=None, bad_at=None):
        self.uids = [int(u) for u in uids]
        self.lengths = lengths
        self.fail_at, self.bad_at = fail_at, bad_at
        self.done = 0  # this worker's samples yielded (stateful subclass)
        self.start = 0

    def _own(self) -> list[int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.uids[worker::workers]

    def __iter__(self):
        self.done = self.start
        for uid in self._own()[self.start :]:
            if uid == self.fail_at:
                raise RuntimeError(f"the stream broke at sample {uid}")
            self.done += 1
            yield "not a sample" if uid == self.bad_at else stream_sample(uid, self.lengths[uid])


class StatefulStream(PlainStream):
    """A PlainStream that can say where it is (the torch ``Stateful`` convention)."""

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["done"]


def collate_uids(samples: list[dict]) -> dict:
    """A batch that names its samples and their token counts (the tests compare them)."""
    return {
        "uid": torch.tensor([s["uid"] for s in samples]),
        "tokens": torch.tensor([len(s["input_ids"]) for s in samples]),
    }
