import pytest
import torch

import odb
from odb import ConfigError, StepInfo


def _info(**fields):
    base = dict(
        sample_indices=(1, 2),
        local_samples=2,
        global_samples=5,
        local_label_tokens=30,
        global_label_tokens=100,
        real_tokens=40,
        padded_tokens=50,
        step=0,
        round=0,
        epoch=0,
        reason="fill",
        world_size=2,
    )
    return StepInfo(**{**base, **fields})


def test_token_scale_turns_a_local_sum_into_a_share_of_the_global_mean():
    # DDP averages over 2 ranks: (sum_rank0 * 2/100 + sum_rank1 * 2/100) / 2 = total / 100
    assert odb.scale_loss(torch.tensor(7.0), _info()).item() == pytest.approx(7.0 * 2 / 100)


def test_mean_losses_are_first_turned_back_into_sums():
    mean = torch.tensor(0.5)  # over the 30 local label tokens
    got = odb.scale_loss(mean, _info(), reduced="mean").item()
    assert got == pytest.approx(0.5 * 30 * 2 / 100)


def test_sample_reduction_uses_sample_counts():
    got = odb.scale_loss(torch.tensor(3.0), _info(), reduction="sample").item()
    assert got == pytest.approx(3.0 * 2 / 5)


def test_ghost_steps_weigh_nothing_but_keep_the_graph():
    loss = torch.tensor(4.0, requires_grad=True)
    scaled = odb.scale_loss(loss, _info(ghost=True, loss_weight=0.0))
    scaled.backward()
    assert scaled.item() == 0.0 and loss.grad.item() == 0.0


def test_a_step_without_label_tokens_scales_to_zero():
    assert _info(global_label_tokens=0).token_loss_scale == 0.0


def test_bad_reduction_names_are_refused():
    with pytest.raises(ConfigError, match="reduction"):
        odb.scale_loss(torch.tensor(1.0), _info(), reduction="batch")
    with pytest.raises(ConfigError, match="reduced"):
        odb.scale_loss(torch.tensor(1.0), _info(), reduced="max")


def test_one_process_loss_scale_gives_the_token_mean(tmp_path):
    from synthetic import LengthDataset

    loader = odb.DataLoader(LengthDataset([12, 30, 7]), 100)
    batch = next(iter(loader))
    info = odb.step_info(batch)
    assert info.world_size == 1
    assert odb.scale_loss(torch.tensor(float(info.local_label_tokens)), batch).item() == 1.0
