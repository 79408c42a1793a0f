"""odb's GRPO passes give the stock trainer's gradients, on a tiny text model.

Each test trains a stock ``GRPOTrainer`` and an odb-enabled one from the same weights on the
same fixed rollouts (generation replaced by ``trl_tiny.FixedRollouts``; rewards, advantages,
old/ref log-probs, shuffling, chunking and the loss are TRL's own code) and compares the
gradients the optimizer receives at every step. The budget is small enough that odb runs
other passes than the stock micro-batches, which the tests check too, so they cannot pass
by running the stock path.
"""

import numpy as np
import pytest
import trl_tiny
from trl import GRPOTrainer

from odb.adapters.trl import OdbGRPOTrainer, enable

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trl_one_thread")]

BUDGET = 128  # prompts reach ~56 tokens and completions 48: stock forwards hold ~4 x 104


def _train_both(tokenizer, tmp_path, budget=BUDGET, beta=0.0, rollouts=None, **config):
    """Stock and odb runs from the same weights; returns (stock grads, odb grads, trainer)."""
    rollouts = rollouts or trl_tiny.FixedRollouts(48)
    runs = []
    for name, token_budget in (("stock", None), ("odb", budget)):
        model = trl_tiny.text_model(tokenizer)
        if beta:
            model = trl_tiny.with_reference(model, str(tmp_path / f"reference-{name}"))
        args = trl_tiny.grpo_config(str(tmp_path / name), beta=beta, **config)
        runs.append(
            trl_tiny.run(model, trl_tiny.text_prompts(), tokenizer, args, rollouts, token_budget)
        )
    (_, stock), (trainer, grads) = runs
    return stock, grads, trainer


def _assert_equal(stock, grads, tolerance=1e-4):
    difference, scale = trl_tiny.max_difference(stock, grads)
    assert scale > 0
    assert difference <= tolerance * scale, (difference, scale)


def _assert_odb_did_the_work(trainer, budget=BUDGET):
    stats = trainer.odb_stats
    assert 0 < stats.max_forward_tokens <= budget < stats.max_stock_tokens
    assert stats.max_scoring_tokens <= budget
    assert stats.padded_tokens < stats.stock_tokens
    # other micro-batches than the stock trainer's gradient_accumulation_steps equal chunks
    assert stats.window_passes != [trainer.args.gradient_accumulation_steps] * stats.windows


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_gradients_equal_stock(tokenizer, tmp_path, loss_type, beta):
    stock, grads, trainer = _train_both(tokenizer, tmp_path, beta=beta, loss_type=loss_type)
    _assert_equal(stock, grads)
    _assert_odb_did_the_work(trainer)
    if beta:  # reference log-probs were computed by odb's budgeted scoring forwards
        assert trainer.odb_stats.scoring_tokens > 0


@pytest.mark.parametrize("loss_type", ["cispo", "vespo", "sapo", "luspo"])
def test_other_loss_types_equal_stock(tokenizer, tmp_path, loss_type):
    """The other normalisations TRL has: a window-wide token count (cispo, vespo) or the
    micro-batch's rows (sapo, luspo)."""
    stock, grads, trainer = _train_both(tokenizer, tmp_path, loss_type=loss_type)
    _assert_equal(stock, grads)
    _assert_odb_did_the_work(trainer)


@pytest.mark.parametrize(
    ("loss_type", "config"),
    [
        # old log-probs are computed (generation and optimizer steps are not aligned)
        ("dapo", {"num_iterations": 2, "beta": 0.05}),
        # one generation serves two optimizer steps
        ("bnpo", {"steps_per_generation": 4, "max_steps": 4}),
        # one optimizer step spans two generations: windows are planned in two parts
        ("grpo", {"gradient_accumulation_steps": 4, "steps_per_generation": 2}),
    ],
)
def test_gradients_equal_stock_across_generation_schedules(tokenizer, tmp_path, loss_type, config):
    stock, grads, trainer = _train_both(tokenizer, tmp_path, loss_type=loss_type, **config)
    _assert_equal(stock, grads)
    _assert_odb_did_the_work(trainer)


def test_a_bigger_peer_spreads_this_rank_over_more_passes(tokenizer, tmp_path):
    """A (simulated) second rank with longer rows makes this rank run more, lighter passes
    with the same row counts; the gradients stay the stock ones."""

    class LongerPeer:
        """Stands in for the all_gather: a peer whose rows are all near the budget."""

        def gather(self, report):
            peer = report.copy()
            width = (len(report) - 2) // 3
            lengths = peer[2 : 2 + width]
            lengths[lengths > 0] = np.maximum(lengths[lengths > 0], BUDGET - 8)
            return np.stack([report, peer])

    model = trl_tiny.text_model(tokenizer)
    args = trl_tiny.grpo_config(str(tmp_path / "stock"))
    rollouts = trl_tiny.FixedRollouts(48)
    _, stock = trl_tiny.run(model, trl_tiny.text_prompts(), tokenizer, args, rollouts)

    recorder = trl_tiny.GradRecorder()
    trainer = OdbGRPOTrainer(
        model=trl_tiny.text_model(tokenizer),
        reward_funcs=trl_tiny.reward,
        args=trl_tiny.grpo_config(str(tmp_path / "odb")),
        train_dataset=trl_tiny.text_prompts(),
        processing_class=tokenizer,
        callbacks=[recorder],
        token_budget=BUDGET,
    )
    trainer._generate_single_turn = rollouts
    trainer._odb._exchange = LongerPeer()
    trainer.train()
    _assert_equal(stock, recorder.steps)
    stats = trainer.odb_stats
    rows = len(trainer._buffered_inputs) * trainer.args.per_device_train_batch_size
    assert stats.window_passes == [rows] * stats.windows  # one row per pass, like the peer
    assert stats.window_fewest != stats.window_passes


def test_ghost_rows_keep_row_counts_without_changing_gradients(tokenizer, tmp_path):
    """A (simulated) peer with more rows than this rank: this rank pads its passes with
    zero-weight copies so row counts match, and its gradients stay the stock ones."""

    class BiggerPeer:
        def gather(self, report):
            peer = report.copy()
            width = (len(report) - 2) // 3
            lengths = peer[2 : 2 + width]
            spare = np.flatnonzero(lengths == 0)[:3]
            lengths[spare] = 30
            peer[1] += len(spare)
            return np.stack([report, peer])

    config = {"steps_per_generation": 4, "max_steps": 2}  # a generation has spare report slots
    rollouts = trl_tiny.FixedRollouts(48)
    args = trl_tiny.grpo_config(str(tmp_path / "stock"), **config)
    _, stock = trl_tiny.run(
        trl_tiny.text_model(tokenizer), trl_tiny.text_prompts(), tokenizer, args, rollouts
    )

    def peer(trainer):
        enable(trainer, BUDGET)
        trainer._odb._exchange = BiggerPeer()

    args = trl_tiny.grpo_config(str(tmp_path / "odb"), **config)
    trainer, grads = trl_tiny.run(
        trl_tiny.text_model(tokenizer),
        trl_tiny.text_prompts(),
        tokenizer,
        args,
        rollouts,
        prepare=peer,
    )
    _assert_equal(stock, grads)
    assert trainer.odb_stats.ghost_rows == 3 * trainer.odb_stats.windows


def test_evaluation_loss_equals_stock_within_the_scoring_budget(tokenizer, tmp_path):
    losses = []
    for name, token_budget in (("stock", None), ("odb", BUDGET)):
        model = trl_tiny.with_reference(trl_tiny.text_model(tokenizer), str(tmp_path / name))
        args = trl_tiny.grpo_config(
            str(tmp_path / f"run-{name}"), beta=0.05, per_device_eval_batch_size=8
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=trl_tiny.reward,
            args=args,
            train_dataset=trl_tiny.text_prompts(),
            eval_dataset=trl_tiny.text_prompts(8),
            processing_class=tokenizer,
        )
        trainer._generate_single_turn = trl_tiny.FixedRollouts(48)
        if token_budget:
            enable(trainer, token_budget)
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-9)
    assert 0 < trainer.odb_stats.max_scoring_tokens <= BUDGET


def test_enable_binds_this_instance_only(tokenizer, tmp_path):
    def build():
        return GRPOTrainer(
            model=trl_tiny.text_model(tokenizer),
            reward_funcs=trl_tiny.reward,
            args=trl_tiny.grpo_config(str(tmp_path)),
            train_dataset=trl_tiny.text_prompts(),
            processing_class=tokenizer,
        )

    enabled, other = enable(build(), BUDGET), build()
    assert "compute_loss" in vars(enabled) and "compute_loss" not in vars(other)
    assert GRPOTrainer.compute_loss is other.compute_loss.__func__
    with pytest.raises(ValueError, match="already enabled"):
        enable(enabled, BUDGET)
