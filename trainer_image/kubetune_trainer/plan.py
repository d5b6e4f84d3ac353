"""Which examples each optimizer step trains on, and the learning-rate schedule.

The whole run is a pure function of (example lengths, hyperparameters, seed): epoch e's
micro-batches are the packed rows of `epoch_rows(seed, e)` in groups of batchSize rows, and an
optimizer step takes the next gradientAccumulationSteps x world_size micro-batches of its
epoch. Steps never straddle epochs. So a step number alone says where in the data a run is, and
a resumed run replays exactly the batches the interrupted one would have seen.

batchSize semantics: with packing on (the default) a micro-batch is batchSize *packed rows* of
up to maxSeqLength tokens, each holding as many whole examples as fit; with packing off it is
batchSize examples padded to the longest of them. Either way a micro-batch has at most
batchSize x maxSeqLength tokens, which is what GPU memory depends on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from kubetune_trainer.data.packing import batch_rows, epoch_rows

SchedulerKind = Literal["cosine", "linear", "constant", "constant_with_warmup"]

# A micro-batch: rows of example indices. Packed: several examples per row; padded: one.
MicroBatch = list[list[int]]


@dataclass(frozen=True)
class StepBatches:
    """The micro-batches of one optimizer step, over all processes."""

    step: int  # 0-based index of the optimizer step
    epoch: int
    first_batch: int  # index of the first micro-batch within its epoch
    batches: list[MicroBatch]

    @property
    def next_position(self) -> tuple[int, int]:
        """(epoch, micro-batch index) where the following step starts."""
        return self.epoch, self.first_batch + len(self.batches)


@dataclass
class TrainingPlan:
    """The deterministic order of micro-batches and optimizer steps for a run."""

    lengths: Sequence[int]
    max_seq_length: int
    batch_size: int
    gradient_accumulation_steps: int
    seed: int
    epochs: float
    max_steps: int | None = None
    packing: bool = True
    world_size: int = 1
    _epochs: dict[int, list[MicroBatch]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.lengths:
            raise ValueError("a training plan needs at least one example")
        self.steps_per_epoch = self.epoch_steps(0)
        self.total_steps = self._total_steps()

    @property
    def batches_per_step(self) -> int:
        return self.gradient_accumulation_steps * self.world_size

    def epoch_batches(self, epoch: int) -> list[MicroBatch]:
        """Micro-batches of one epoch, in training order (cached)."""
        if epoch not in self._epochs:
            if self.packing:
                rows = epoch_rows(self.lengths, self.max_seq_length, seed=self.seed, epoch=epoch)
            else:
                order = list(range(len(self.lengths)))
                random.Random(f"{self.seed}/{epoch}").shuffle(order)
                rows = [[i] for i in order]
            batches = batch_rows(rows, self.batch_size)
            if self.world_size > 1:
                # Every process must get a micro-batch in every step, or DDP waits forever.
                usable = len(batches) // self.world_size * self.world_size
                batches = batches[: max(usable, self.world_size)]
            self._epochs[epoch] = batches
        return self._epochs[epoch]

    def epoch_steps(self, epoch: int) -> int:
        return math.ceil(len(self.epoch_batches(epoch)) / self.batches_per_step)

    def _total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        whole, fraction = divmod(self.epochs, 1)
        total = sum(self.epoch_steps(e) for e in range(int(whole)))
        if fraction > 0:
            total += max(1, round(fraction * self.epoch_steps(int(whole))))
        return total

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within that epoch) of a 0-based global step index."""
        epoch = 0
        while step >= (n := self.epoch_steps(epoch)):
            step -= n
            epoch += 1
        return epoch, step

    def step_batches(self, step: int) -> StepBatches:
        epoch, local = self.locate(step)
        first = local * self.batches_per_step
        batches = self.epoch_batches(epoch)[first : first + self.batches_per_step]
        return StepBatches(step=step, epoch=epoch, first_batch=first, batches=batches)

    def position(self, steps_done: int) -> tuple[int, int]:
        """(epoch, next micro-batch index) after `steps_done` optimizer steps."""
        if steps_done == 0:
            return 0, 0
        return self.step_batches(steps_done - 1).next_position

    def epoch_progress(self, steps_done: int) -> float:
        """Fractional epochs completed after `steps_done` steps (for status and logs)."""
        if steps_done == 0:
            return 0.0
        epoch, local = self.locate(steps_done - 1)
        return epoch + (local + 1) / self.epoch_steps(epoch)


def warmup_steps(total_steps: int, warmup_ratio: float, kind: SchedulerKind) -> int:
    """Warmup length in steps; `constant` never warms up."""
    if kind == "constant":
        return 0
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, *, kind: SchedulerKind, warmup: int, total: int) -> float:
    """Factor on the peak learning rate for optimizer step `step` (0-based, before it runs).

    Linear warmup from 0 over `warmup` steps, then: cosine or linear decay to 0 at `total`,
    or constant. The step-0 factor of a warmup is 0 in HF's schedules, which wastes the
    first batch; here it is 1/warmup, so every step trains.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    decay_steps = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    kind: SchedulerKind,
    total_steps: int,
    warmup_ratio: float,
) -> LambdaLR:
    """A LambdaLR over lr_multiplier; its state_dict (step count) is all a resume needs."""
    warmup = warmup_steps(total_steps, warmup_ratio, kind)
    return LambdaLR(optimizer, partial(lr_multiplier, kind=kind, warmup=warmup, total=total_steps))
