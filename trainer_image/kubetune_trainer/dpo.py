"""Direct Preference Optimization (Rafailov et al., 2023): loss, metrics, reference, evaluation.

For a pair (prompt x, chosen y_c, rejected y_r), with log pi(y|x) summed over the answer's
tokens (data/preference.py decides which tokens those are):

    delta  = [log pi(y_c|x) - log ref(y_c|x)] - [log pi(y_r|x) - log ref(y_r|x)]
    loss   = -(1 - eps) * log sigmoid(beta * delta) - eps * log sigmoid(-beta * delta)

eps is dpo.labelSmoothing (conservative DPO: eps of the labels are assumed flipped; 0 is plain
DPO). The implicit rewards are beta * (log pi - log ref) of each answer; TRL's DPOTrainer
(loss_type "sigmoid") computes the same quantities, which tests/integration/test_dpo_parity.py
checks step by step. The loss of an optimizer step is the mean over all its pairs (every
micro-batch, every process), however they fall into micro-batches.

The reference model is the base model. LoRA and QLoRA use the policy itself with its adapter
switched off (peft's disable_adapter) in eval mode under no_grad: no second copy of the weights,
one extra forward pass per micro-batch, no activations kept. Full fine-tuning changes the base
weights, so the reference log-probabilities of every training and validation pair are computed
once before the first step (`reference_logps`, 2 floats per pair) and travel with the
checkpoints: one forward pass over the data instead of a frozen second copy of the model (which
would add 2 bytes per parameter in bf16 to the memory estimate and a forward pass per step).

Log-probabilities use the output head only at the answer's positions (the model's
`logits_to_keep` mask, as modeling.causal_lm_loss), in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import torch
import torch.nn.functional as F

from kubetune_trainer.data.packing import batch_rows, pack_rows
from kubetune_trainer.data.preference import PAIR_ROW_FACTOR, Pair, PairBatch, collate_pairs
from kubetune_trainer.data.tokenize import IGNORE_INDEX
from kubetune_trainer.modeling import eval_mode

if TYPE_CHECKING:
    from kubetune_trainer.modeling import Precision

# Sums kept per optimizer step, in this order (one tensor, one host sync when drained).
STAT_NAMES: Final = ("loss", "reward_chosen", "reward_rejected", "correct", "pairs")
LN2: Final = math.log(2.0)


def sequence_logps(
    model: torch.nn.Module, pairs: PairBatch, *, trained_logits_only: bool
) -> torch.Tensor:
    """Summed log-probability of each sequence's trained tokens: [2 x pairs] fp32, pair-major
    (2k: chosen, 2k + 1: rejected of the k-th pair of the micro-batch)."""
    batch = pairs.batch
    shifted = batch.labels[:, 1:]
    trained = shifted != IGNORE_INDEX
    inputs = batch.model_inputs()
    del inputs["labels"]
    if trained_logits_only:
        keep = F.pad(trained, (0, 1), value=False)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][trained]
    token_logps = -F.cross_entropy(logits.float(), shifted[trained], reduction="none")
    out = torch.zeros(2 * pairs.num_pairs, dtype=torch.float32, device=token_logps.device)
    return out.index_add(0, pairs.sequence_of_label.to(token_logps.device), token_logps)


@dataclass(frozen=True)
class DpoTerms:
    """Per pair: the loss and the implicit rewards (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_terms(
    policy: torch.Tensor, reference: torch.Tensor, *, beta: float, label_smoothing: float
) -> DpoTerms:
    """`policy` and `reference`: pair-major sequence log-probabilities [2 x pairs]."""
    chosen_ratio = policy[0::2] - reference[0::2].detach()
    rejected_ratio = policy[1::2] - reference[1::2].detach()
    delta = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(-delta)
    return DpoTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


ReferenceFn = Callable[[PairBatch], torch.Tensor]


def adapter_off_reference(
    model: torch.nn.Module, precision: Precision, *, trained_logits_only: bool
) -> ReferenceFn:
    """The base model as the reference: the peft model with its adapter disabled."""

    def reference(pairs: PairBatch) -> torch.Tensor:
        disable: Any = cast(Any, model).disable_adapter
        with torch.no_grad(), eval_mode(model), disable(), precision.autocast():
            return sequence_logps(model, pairs, trained_logits_only=trained_logits_only)

    return reference


def table_reference(table: torch.Tensor) -> ReferenceFn:
    """Precomputed reference log-probabilities [pairs, 2], looked up by pair index."""

    def reference(pairs: PairBatch) -> torch.Tensor:
        return table.to(pairs.pair_index.device)[pairs.pair_index].reshape(-1)

    return reference


class DpoLoss:
    """The micro-batch loss of a DPO step (recipe.train_step's `loss`), which also sums the
    step's statistics on the device; `take_step` hands them over and starts the next step."""

    def __init__(
        self,
        *,
        beta: float,
        label_smoothing: float,
        trained_logits_only: bool,
        reference: ReferenceFn,
    ) -> None:
        self.beta = beta
        self.label_smoothing = label_smoothing
        self.trained_logits_only = trained_logits_only
        self.reference = reference
        self._sums: torch.Tensor | None = None

    def __call__(
        self, model: torch.nn.Module, pairs: PairBatch, divisor: torch.Tensor
    ) -> torch.Tensor:
        reference = self.reference(pairs)
        policy = sequence_logps(model, pairs, trained_logits_only=self.trained_logits_only)
        terms = dpo_terms(policy, reference, beta=self.beta, label_smoothing=self.label_smoothing)
        sums = torch.stack(
            [
                terms.losses.detach().sum(),
                terms.chosen_rewards.sum(),
                terms.rejected_rewards.sum(),
                (terms.chosen_rewards > terms.rejected_rewards).sum().float(),
                torch.tensor(float(pairs.num_pairs), device=policy.device),
            ]
        )
        self._sums = sums if self._sums is None else self._sums + sums
        return terms.losses.sum() / divisor.to(policy.device)

    def take_step(self) -> torch.Tensor:
        """The summed statistics (STAT_NAMES) of the micro-batches since the last call."""
        assert self._sums is not None, "take_step before any micro-batch"
        sums, self._sums = self._sums, None
        return sums


@dataclass(frozen=True)
class DpoMetrics:
    """Means over a set of pairs."""

    loss: float
    reward_chosen: float
    reward_rejected: float
    reward_accuracy: float
    pairs: int

    @property
    def reward_margin(self) -> float:
        return self.reward_chosen - self.reward_rejected

    @classmethod
    def from_sums(cls, sums: Sequence[float]) -> DpoMetrics:
        loss, chosen, rejected, correct, pairs = sums
        n = max(pairs, 1.0)
        return cls(loss / n, chosen / n, rejected / n, correct / n, int(pairs))

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "reward_chosen": self.reward_chosen,
            "reward_rejected": self.reward_rejected,
            "reward_margin": self.reward_margin,
            "reward_accuracy": self.reward_accuracy,
        }


# ------------------------------------------------------------------ whole datasets, evaluation


@torch.no_grad()
def pair_logps(
    model: torch.nn.Module,
    pairs: Sequence[Pair],
    *,
    rows_per_batch: int,
    max_seq_length: int,
    pad_token_id: int,
    precision: Precision,
    mask_dtype: torch.dtype = torch.bool,
    trained_logits_only: bool = False,
    packing: bool = True,
) -> torch.Tensor:
    """Sequence log-probabilities of every pair under `model` in eval mode: [pairs, 2] fp32 on
    the CPU (column 0 chosen, 1 rejected), batched like training."""
    out = torch.zeros((len(pairs), 2), dtype=torch.float32)
    lengths = [len(p) for p in pairs]
    rows = (
        pack_rows(lengths, PAIR_ROW_FACTOR * max_seq_length, seed=0)
        if packing
        else [[i] for i in range(len(pairs))]
    )
    with eval_mode(model):
        for group in batch_rows(rows, rows_per_batch):
            batch = collate_pairs(
                group, pairs, pad_token_id, packing=packing, mask_dtype=mask_dtype
            ).to(precision.device)
            with precision.autocast():
                logps = sequence_logps(model, batch, trained_logits_only=trained_logits_only)
            out[batch.pair_index.cpu()] = logps.view(-1, 2).float().cpu()
    return out


@dataclass(frozen=True)
class PreferenceEval:
    """One model on held-out pairs, against the reference (the base model)."""

    loss: float  # DPO loss: ln 2 for the reference itself
    preference_accuracy: float  # log pi(chosen) > log pi(rejected)
    reward_accuracy: float  # implicit reward of chosen > rejected
    reward_chosen: float
    reward_rejected: float
    pairs: int

    @property
    def reward_margin(self) -> float:
        return self.reward_chosen - self.reward_rejected


def preference_eval(
    policy: torch.Tensor, reference: torch.Tensor, *, beta: float, label_smoothing: float
) -> PreferenceEval:
    """`policy`, `reference`: [pairs, 2] log-probabilities (pair_logps)."""
    terms = dpo_terms(
        policy.reshape(-1).double(),
        reference.reshape(-1).double(),
        beta=beta,
        label_smoothing=label_smoothing,
    )
    return PreferenceEval(
        loss=float(terms.losses.mean()),
        preference_accuracy=float((policy[:, 0] > policy[:, 1]).double().mean()),
        reward_accuracy=float((terms.chosen_rewards > terms.rejected_rewards).double().mean()),
        reward_chosen=float(terms.chosen_rewards.mean()),
        reward_rejected=float(terms.rejected_rewards.mean()),
        pairs=int(policy.shape[0]),
    )
