"""The DPO loss, rewards and log-probabilities (dpo.py), on numbers and on a tiny Llama."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F

from kubetune_trainer.data.preference import Pair, collate_pairs
from kubetune_trainer.data.tokenize import IGNORE_INDEX, Example
from kubetune_trainer.dpo import (
    DpoLoss,
    DpoMetrics,
    dpo_terms,
    pair_logps,
    preference_eval,
    sequence_logps,
    table_reference,
)
from kubetune_trainer.modeling import Precision
from localenv import models

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

CPU = Precision(torch.device("cpu"), torch.float32, None, grad_scaler=False)


def test_the_loss_is_ln2_when_the_policy_is_the_reference() -> None:
    logps = torch.tensor([-3.0, -5.0, -2.5, -1.0])
    terms = dpo_terms(logps, logps.clone(), beta=0.1, label_smoothing=0.0)
    assert torch.allclose(terms.losses, torch.full((2,), math.log(2)))
    assert terms.chosen_rewards.abs().max() == 0 and terms.rejected_rewards.abs().max() == 0


def test_loss_and_rewards_follow_the_formulas() -> None:
    policy = torch.tensor([-2.0, -6.0])  # chosen, rejected
    reference = torch.tensor([-3.0, -5.0])
    beta, eps = 0.5, 0.2
    terms = dpo_terms(policy, reference, beta=beta, label_smoothing=eps)
    delta = beta * ((-2.0 + 3.0) - (-6.0 + 5.0))
    sigmoid = 1 / (1 + math.exp(-delta))
    expected = -(1 - eps) * math.log(sigmoid) - eps * math.log(1 - sigmoid)
    assert float(terms.losses[0]) == pytest.approx(expected)
    assert float(terms.chosen_rewards[0]) == pytest.approx(0.5)
    assert float(terms.rejected_rewards[0]) == pytest.approx(-0.5)


def _pairs() -> list[Pair]:
    def example(prompt: list[int], answer: list[int]) -> Example:
        return Example([*prompt, *answer], [IGNORE_INDEX] * len(prompt) + answer)

    return [
        Pair(example([1, 5, 6], [7, 8, 2]), example([1, 5, 6], [9, 2])),
        Pair(example([1, 10], [11, 2]), example([1, 10], [12, 13, 14, 2])),
        Pair(example([1, 3, 4, 5], [6, 2]), example([1, 3, 4, 5], [16, 2])),
    ]


def _by_hand(model: LlamaForCausalLM, example: Example) -> float:
    """Sum of log p(label) over an example's trained tokens, one sequence alone."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    targets = torch.tensor(example.labels[1:])
    logp = F.log_softmax(logits.float(), -1)
    keep = targets != IGNORE_INDEX
    return float(logp[keep].gather(-1, targets[keep, None]).sum())


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("trained_logits_only", [True, False])
def test_sequence_log_probabilities_equal_each_sequence_alone(
    packing: bool, trained_logits_only: bool
) -> None:
    model = models.tiny_llama(64, attn="sdpa").eval()
    pairs = _pairs()
    rows = [[0, 2], [1]] if packing else [[0], [2], [1]]
    batch = collate_pairs(rows, pairs, 0, packing=packing)
    with torch.no_grad():
        got = sequence_logps(model, batch, trained_logits_only=trained_logits_only)
    expected = [_by_hand(model, s) for i in (0, 2, 1) for s in (pairs[i].chosen, pairs[i].rejected)]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=1e-5)
    table = pair_logps(model, pairs, rows_per_batch=2, max_seq_length=16, pad_token_id=0,
                       precision=CPU, packing=packing)  # fmt: skip
    torch.testing.assert_close(table.reshape(-1)[[0, 1, 4, 5, 2, 3]], got, atol=1e-4, rtol=1e-5)


def test_the_step_loss_is_the_mean_over_its_pairs_whatever_the_micro_batches() -> None:
    model = models.tiny_llama(64, attn="sdpa")
    pairs = _pairs()
    reference = torch.zeros((3, 2))  # any fixed reference will do
    loss = DpoLoss(beta=0.1, label_smoothing=0.0, trained_logits_only=True,
                   reference=table_reference(reference))  # fmt: skip
    divisor = torch.tensor(3.0)
    whole = loss(model, collate_pairs([[0], [1], [2]], pairs, 0, packing=False), divisor)
    whole_sums = loss.take_step()
    split = loss(model, collate_pairs([[0], [1]], pairs, 0, packing=False), divisor) + loss(
        model, collate_pairs([[2]], pairs, 0, packing=False), divisor
    )
    split_sums = loss.take_step()
    torch.testing.assert_close(whole, split)
    torch.testing.assert_close(whole_sums, split_sums)
    metrics = DpoMetrics.from_sums(whole_sums.tolist())
    assert metrics.pairs == 3 and metrics.loss == pytest.approx(float(whole.detach()))
    assert metrics.reward_margin == pytest.approx(metrics.reward_chosen - metrics.reward_rejected)


def test_held_out_scores_compare_each_model_with_the_reference() -> None:
    reference = torch.tensor([[-5.0, -4.0], [-3.0, -6.0]])  # the base prefers pair 2 only
    tuned = torch.tensor([[-4.0, -4.5], [-2.0, -7.0]])  # now both
    base = preference_eval(reference, reference, beta=0.1, label_smoothing=0.0)
    assert base.loss == pytest.approx(math.log(2)) and base.preference_accuracy == 0.5
    assert base.reward_accuracy == 0.0 and base.reward_margin == 0.0
    fine = preference_eval(tuned, reference, beta=0.1, label_smoothing=0.0)
    assert fine.preference_accuracy == 1.0 and fine.reward_accuracy == 1.0
    assert fine.loss < math.log(2) and fine.reward_margin > 0
