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
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from kubetune_trainer.data.packing import (
    batch_rows,
    epoch_rows,
    epoch_rows_compact,
    packing_efficiency,
)
from kubetune_trainer.errors import ConfigError

if TYPE_CHECKING:
    from numpy.typing import NDArray

SchedulerKind = Literal["cosine", "linear", "constant", "constant_with_warmup"]

# A micro-batch: rows of example indices. Packed: several examples per row; padded: one.
MicroBatch = list[list[int]]


class EpochBatches(Sequence[MicroBatch]):
    """An epoch's micro-batches built on demand from arrays (pack_rows_compact): the same
    micro-batches as batch_rows(epoch_rows(...)), in O(examples) int64 memory."""

    def __init__(
        self,
        members: np.ndarray,
        starts: np.ndarray,
        row_order: np.ndarray,
        batch_size: int,
        batches: int,
    ) -> None:
        self.members, self.starts, self.row_order = members, starts, row_order
        self.batch_size, self.batches = batch_size, batches

    def __len__(self) -> int:
        return self.batches

    def _batch(self, index: int) -> MicroBatch:
        rows = self.row_order[index * self.batch_size : (index + 1) * self.batch_size].tolist()
        starts = self.starts
        return [self.members[starts[r] : starts[r + 1]].tolist() for r in rows]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._batch(i) for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"micro-batch {index} of {len(self)}")
        return self._batch(index)

    def row_fill(self, lengths: np.ndarray) -> float:
        """packing_efficiency over the rows of this epoch's micro-batches."""
        rows = self.row_order[: self.batches * self.batch_size]
        if not len(rows):
            return 0.0
        used = np.add.reduceat(lengths[self.members], self.starts[:-1])[rows]
        longest = int(used.max())
        return float(used.sum()) / (longest * len(used)) if longest else 0.0


def too_few_batches(batches: int, world_size: int, batch_size: int, packing: bool) -> ConfigError:
    unit = "packed rows" if packing else "examples"
    most = batches * batch_size
    return ConfigError(
        f"the training data makes {batches} micro-batch(es) of batchSize={batch_size} {unit} "
        f"per epoch, fewer than the {world_size} processes that each need one in every step: "
        f"lower hyperparameters.batchSize to {max(1, most // world_size)} or less, run at most "
        f"{batches} process(es) (resources.gpus / processesPerNode x nodes), or add training data"
    )


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

    # An int64 array (a TokenStore's lengths) plans in arrays; a list, in lists.
    lengths: Sequence[int] | NDArray[np.int64]
    max_seq_length: int
    batch_size: int
    gradient_accumulation_steps: int
    seed: int
    epochs: float
    max_steps: int | None = None
    packing: bool = True
    world_size: int = 1
    _epochs: dict[int, Sequence[MicroBatch]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.lengths) == 0:
            raise ValueError("a training plan needs at least one example")
        self.steps_per_epoch = self.epoch_steps(0)
        self.total_steps = self._total_steps()

    @property
    def batches_per_step(self) -> int:
        return self.gradient_accumulation_steps * self.world_size

    def epoch_batches(self, epoch: int) -> Sequence[MicroBatch]:
        """Micro-batches of one epoch, in training order (cached).

        With lengths as a NumPy array (a TokenStore's) they are kept as arrays and built on
        demand (EpochBatches); with a list, as lists. Both give the same micro-batches."""
        if epoch not in self._epochs:
            if isinstance(self.lengths, np.ndarray):
                self._epochs[epoch] = self._compact_epoch(epoch)
                return self._epochs[epoch]
            if self.packing:
                rows = epoch_rows(self.lengths, self.max_seq_length, seed=self.seed, epoch=epoch)
            else:
                order = list(range(len(self.lengths)))
                random.Random(f"{self.seed}/{epoch}").shuffle(order)
                rows = [[i] for i in order]
            batches = batch_rows(rows, self.batch_size)
            if self.world_size > 1:
                if len(batches) < self.world_size:
                    raise too_few_batches(
                        len(batches), self.world_size, self.batch_size, self.packing
                    )
                # Every process must get a micro-batch in every step, or DDP waits forever.
                batches = batches[: len(batches) // self.world_size * self.world_size]
            self._epochs[epoch] = batches
        return self._epochs[epoch]

    def _compact_epoch(self, epoch: int) -> EpochBatches:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        if self.packing:
            members, starts, row_order = epoch_rows_compact(
                lengths, self.max_seq_length, seed=self.seed, epoch=epoch
            )
        else:
            order = array("q", range(len(lengths)))
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
            members = np.frombuffer(order, dtype=np.int64).copy()
            starts = np.arange(len(lengths) + 1, dtype=np.int64)
            row_order = np.arange(len(lengths), dtype=np.int64)
        batches = -(-len(row_order) // self.batch_size)
        if self.world_size > 1:
            if batches < self.world_size:
                raise too_few_batches(batches, self.world_size, self.batch_size, self.packing)
            batches = batches // self.world_size * self.world_size
        return EpochBatches(members, starts, row_order, self.batch_size, batches)

    def row_fill(self, epoch: int = 0) -> float:
        """Non-padding fraction of the epoch's packed rows (packing_efficiency)."""
        batches = self.epoch_batches(epoch)
        if isinstance(batches, EpochBatches):
            return batches.row_fill(np.asarray(self.lengths, dtype=np.int64))
        flat = [row for batch in batches for row in batch]
        return packing_efficiency(flat, cast(Sequence[int], self.lengths))

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
        batches = list(self.epoch_batches(epoch)[first : first + self.batches_per_step])
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
