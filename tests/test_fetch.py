import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from odb.fetch import SHARED_MEMORY_BYTES, ChunkSampler, decode_chunk, encode_chunk


def test_samples_survive_the_trip_with_dtypes_shapes_and_structure():
    sample = {
        "input_ids": torch.arange(7),
        "pixel_values": torch.randn(3, 4).to(torch.bfloat16),
        "flags": torch.tensor(True),
        "nested": {"grid": torch.tensor([[1, 2, 2]]), "names": ["a", "b"]},
        "pair": (torch.ones(2, dtype=torch.float16), 3),
        "text": "hello",
        "strided": torch.arange(10)[::2],
    }
    ((index, back),) = decode_chunk(pickle.loads(pickle.dumps(encode_chunk([(5, sample)]))))
    assert index == 5
    assert back.keys() == sample.keys()
    for key in ("input_ids", "pixel_values", "flags", "strided"):
        assert back[key].dtype == sample[key].dtype and back[key].equal(sample[key])
    assert back["nested"]["grid"].equal(sample["nested"]["grid"])
    assert back["nested"]["names"] == ["a", "b"] and back["text"] == "hello"
    assert isinstance(back["pair"], tuple) and back["pair"][0].equal(sample["pair"][0])


def test_large_tensors_stay_tensors_for_shared_memory():
    big = torch.zeros(SHARED_MEMORY_BYTES // 4 + 1, dtype=torch.float32)
    ((_, encoded),) = encode_chunk([(0, {"pixel_values": big})])
    assert encoded["pixel_values"] is big


def test_chunk_sampler_cuts_the_index_stream():
    sampler = ChunkSampler(3)
    sampler.indices = range(7)
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6]]


# A training process that iterates an odb loader with two workers, writes every process it
# started (the workers; a forkserver and a resource tracker too, under those start methods),
# then dies without shutting them down. Samples of 4000 tokens make each 8-sample chunk
# about 512 KB, far more than a pipe holds, so the workers' result pipes are full.
_DYING_TRAINER = """
import os, signal, sys, time

sys.path.insert(0, {tests!r})
import odb
from synthetic import LengthDataset


def descendants():
    try:
        import psutil
    except ImportError:
        children = {{}}
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{{name}}/stat") as stat:
                    parent = int(stat.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(parent, []).append(int(name))
        found, todo = [], [os.getpid()]
        while todo:
            below = children.get(todo.pop(), [])
            found += below
            todo += below
        return found
    return [child.pid for child in psutil.Process().children(recursive=True)]


if __name__ == "__main__":
    method, how, out = sys.argv[1:]
    loader = odb.DataLoader(
        LengthDataset([4000] * 2000), 8000, num_workers=2, multiprocessing_context=method
    )
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    time.sleep(0.5)  # let the workers fill their pipes
    with open(out + ".tmp", "w") as file:
        file.write(" ".join(map(str, descendants())))
    os.rename(out + ".tmp", out)
    if how == "exit":
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has exited: only its parent's reaping is left)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["exit", "sigkill"])
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_exit_when_the_training_process_dies(tmp_path, method, how):
    script, pids_file = tmp_path / "trainer.py", tmp_path / "pids"
    script.write_text(_DYING_TRAINER.format(tests=str(Path(__file__).parent)))
    # Output to a file, not a pipe: orphaned workers would hold a pipe open and block run().
    with open(tmp_path / "output", "w") as output:
        subprocess.run(
            [sys.executable, str(script), method, how, str(pids_file)],
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert pids_file.exists(), (tmp_path / "output").read_text()
    pids = [int(pid) for pid in pids_file.read_text().split()]
    assert len(pids) >= 2, "the trainer found no workers"
    deadline = time.monotonic() + 10
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:  # do not leave them behind for the rest of the test run
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes {left} of a dead trainer still run 10 s after it died"
