import pickle

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
