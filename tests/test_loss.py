import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

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


def _no_label_tokens_loss(model, source: str) -> torch.Tensor:
    """This rank's loss over a batch whose labels are all -100, as a trainer would compute it."""
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    if source.startswith("hf"):
        loss = model(input_ids=ids, labels=labels).loss  # HF's mean over no tokens: NaN
        return loss * 0 if source == "hf_times_tokens" else loss  # 0 label tokens here
    logits = model(input_ids=ids).logits[:, :-1].reshape(-1, 128)
    reduction = "mean" if source == "ce_mean" else "sum"
    return F.cross_entropy(logits, labels[:, 1:].reshape(-1), reduction=reduction)


@pytest.mark.parametrize("global_label_tokens", [10, 0])  # other ranks have tokens / none has
@pytest.mark.parametrize(
    ("source", "reduced"),
    [("hf", "mean"), ("ce_mean", "mean"), ("ce_sum", "sum"), ("hf_times_tokens", "sum")],
)
def test_a_batch_without_label_tokens_adds_zero_loss_and_zero_gradients(
    source, reduced, global_label_tokens
):
    model = tiny_model()
    loss = _no_label_tokens_loss(model, source)
    info = _info(local_label_tokens=0, global_label_tokens=global_label_tokens)
    scaled = odb.scale_loss(loss, info, reduced=reduced)
    assert scaled.item() == 0.0
    scaled.backward()
    for name, parameter in model.named_parameters():
        # DDP needs a gradient for every parameter, zero and finite here
        assert parameter.grad is not None, name
        assert torch.equal(parameter.grad, torch.zeros_like(parameter.grad)), name


@pytest.mark.parametrize("reduced", ["mean", "sum"])
def test_a_nan_loss_over_label_tokens_stays_nan(reduced):
    # only a batch that carries no weight is zeroed; a diverged loss must still show
    assert odb.scale_loss(torch.tensor(float("nan")), _info(), reduced=reduced).isnan()


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


def test_window_shares_add_up_to_the_exact_mean_over_every_rank_and_micro_batch():
    """Two ranks, three micro-batches each, one without label tokens (its mean is NaN) and one
    a ghost: DDP's average over ranks of each rank's summed shares is the plain mean of every
    label token's loss."""
    from odb.loss import window_label_tokens, window_loss_share

    generator = torch.Generator().manual_seed(0)
    counts = [[7, 0, 12], [3, 9, 5]]  # label tokens per (rank, micro-batch)
    ghost = (1, 2)
    losses = [[torch.rand(n, generator=generator) for n in row] for row in counts]
    real = [
        [0 if (r, m) == ghost else n for m, n in enumerate(row)] for r, row in enumerate(counts)
    ]
    infos = [
        [
            _info(
                local_label_tokens=real[r][m],
                global_label_tokens=real[0][m] + real[1][m],
                loss_weight=0.0 if (r, m) == ghost else 1.0,
            )
            for m in range(3)
        ]
        for r in range(2)
    ]
    window = window_label_tokens(infos[0])
    assert window == window_label_tokens(infos[1]) == sum(map(sum, real))
    ranks = [
        sum(
            window_loss_share(loss.mean(), info, window)
            for loss, info in zip(row, inf, strict=True)
        )
        for row, inf in zip(losses, infos, strict=True)
    ]
    kept = [loss for r, row in enumerate(losses) for m, loss in enumerate(row) if (r, m) != ghost]
    exact = torch.cat(kept).mean()
    assert torch.isfinite(ranks[0]) and torch.isfinite(ranks[1])
    assert ((ranks[0] + ranks[1]) / 2).item() == pytest.approx(exact.item(), rel=1e-6)
