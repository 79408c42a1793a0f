import logging

import pytest
import torch
from tiny import tiny_model

import odb.collate
from odb import PackedCollator, PaddedCollator


def _samples():
    return [
        {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3])},
        {"input_ids": torch.tensor([4, 5]), "labels": torch.tensor([4, 5])},
    ]


def test_padded_collator_pads_right_with_minus_100_labels_and_a_mask():
    batch = PaddedCollator(pad_token_id=9)(_samples())
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, 5, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_padded_collator_rounds_width_up():
    batch = PaddedCollator(pad_to_multiple_of=4)(_samples())
    assert batch["input_ids"].shape == (2, 4)
    assert batch["attention_mask"].sum().item() == 5


def test_padded_collator_keeps_given_masks_and_lists():
    samples = [
        {"input_ids": [1, 2], "attention_mask": [1, 0]},
        {"input_ids": [3], "attention_mask": [1]},
    ]
    batch = PaddedCollator()(samples)
    assert batch["attention_mask"].tolist() == [[1, 0], [1, 0]]


@pytest.mark.parametrize("collate", [PaddedCollator(), PackedCollator()])
def test_fields_that_are_not_numeric_are_left_out_and_named_once(collate, caplog):
    """A model takes tensors: a dataset's text column in the batch would break model(**batch).
    Numbers and numeric lists become tensors."""
    samples = [
        {"input_ids": [1, 2], "text": "a b", "uid": 7, "grid": [[1, 2, 2]], "note": None},
        {"input_ids": [3], "text": "c", "uid": 8, "grid": [[1, 4, 2]], "note": None},
    ]
    odb.collate._DROPPED.clear()
    with caplog.at_level(logging.WARNING, logger="odb"):
        batch = collate(samples)
        collate(samples)
    assert "text" not in batch and "note" not in batch
    assert all(
        isinstance(value, torch.Tensor) for key, value in batch.items() if key != "use_cache"
    )
    assert batch["uid"].tolist() == [7, 8]
    assert batch["grid"].tolist() == [[1, 2, 2], [1, 4, 2]]
    named = [r.getMessage() for r in caplog.records if "leaves field" in r.getMessage()]
    assert len(named) == 1 and "'text'" in named[0] and "'note'" in named[0]


def test_vision_fields_are_concatenated_in_sample_order():
    samples = [
        {
            "input_ids": torch.arange(4),
            "pixel_values": torch.zeros(8, 3),
            "image_grid_thw": torch.tensor([[1, 2, 4]]),
        },
        {"input_ids": torch.arange(2)},
        {
            "input_ids": torch.arange(5),
            "pixel_values": torch.ones(4, 3),
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
        },
    ]
    for collate in (PaddedCollator(), PackedCollator()):
        batch = collate(samples)
        assert batch["pixel_values"].shape == (12, 3)
        assert batch["pixel_values"][8:].eq(1).all()
        assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]


def test_packed_collator_restarts_positions_and_masks_boundaries():
    batch = PackedCollator()(_samples())
    assert batch["use_cache"] is False
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert "attention_mask" not in batch


def test_packed_collator_does_not_modify_the_samples():
    samples = _samples()
    PackedCollator()(samples)
    assert samples[1]["labels"].tolist() == [4, 5]


def test_packed_collator_flash_attention_kwargs():
    batch = PackedCollator(flash_attn_kwargs=True)(_samples())
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_k"] == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(attn):
    """The core regression for padding-free rows: no cross-sample attention, no lost target."""
    model = tiny_model(vocab=97, attn=attn)
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in (17, 5, 11, 2):
        ids = torch.randint(0, 97, (length,), generator=generator)
        labels = ids.clone()
        labels[: length // 3] = -100
        samples.append({"input_ids": ids, "labels": labels})

    def loss_and_grads(batch):
        model.zero_grad()
        loss = model(**batch).loss  # as a user calls it: the packed row must disable the cache
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    padded_loss, padded_grads = loss_and_grads(PaddedCollator()(samples))
    packed_loss, packed_grads = loss_and_grads(PackedCollator()(samples))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-9, atol=1e-9)
    for packed, padded in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(packed, padded, rtol=1e-7, atol=1e-9)
