"""The fine-tuning recipe: one readable path from a TrainerConfig to a published adapter.

Shape (after torchtune's single-device recipes): `__init__` validates and fails fast, `setup()`
builds the parts in dependency order through small `_setup_*` steps, then `train()`,
`evaluate()`, `publish()` and `cleanup()`; `save_checkpoint()` is called by `train()`.

Why a plain PyTorch loop rather than the Hugging Face Trainer or TRL's SFTTrainer:
* packing with a 4D block-diagonal mask and restarting position_ids (data/packing.py) is a
  collate function here; in Trainer/TRL it means fighting their own packing, padding-free and
  collator logic, whose mask handling changes between releases;
* exact resume needs the data position as a pure function of the step (plan.py) plus every
  RNG state; Trainer's resume skips batches by re-iterating a sampler and does not cover our
  packing order;
* the loss is normalized by the trained tokens of the whole optimizer step (all micro-batches,
  all GPUs), which Trainer only approximates unless every model honours num_items_in_batch;
* status, checkpoint cadence, SIGTERM handling and evaluation against the base model are ours
  anyway, and a ~100-line loop keeps throughput under our control (no per-step host syncs
  except at log/checkpoint time).
`accelerate` handles what is generic: process group, device, DDP wrapping and gradient sync
skipping (no_sync) during accumulation when launched with several processes.

Order of `setup()`: data first (fetch + validate every record: a malformed line fails the job
in seconds, before the model is even downloaded), then model files, tokenizer, tokenization,
memory estimate from config.json (reported before any weight is loaded), model, optimizer,
and finally the checkpoint restore; the RNG states are restored last so that nothing drawn
during setup (adapter initialization) disturbs them.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, cast

import numpy as np
import torch
from accelerate import Accelerator

from kubetune_trainer import dpo, fsdp
from kubetune_trainer import estimate as mem
from kubetune_trainer.api import (
    MemoryEstimate,
    OutputStatus,
    ParameterCounts,
    Progress,
    TrainingMetrics,
)
from kubetune_trainer.checkpoint import (
    CheckpointPolicy,
    TrainerState,
    data_fingerprint,
    load_reference,
    load_training_state,
    read_state,
    restore_rng,
    save_reference,
    save_training_state,
    spec_differences,
    spec_hash,
    training_spec,
)
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import (
    Batch,
    DatasetError,
    Record,
    collate_packed,
    collate_padded,
    load_records,
    split_train_validation,
    tokenize_records,
)
from kubetune_trainer.data.preference import (
    PAIR_ROW_FACTOR,
    PairBatch,
    TokenizedPairs,
    collate_pairs,
    pair_text,
    tokenize_pairs,
)
from kubetune_trainer.data.records import (
    PREFERENCE_FORMATS,
    DataScan,
    RecordFormat,
    scan_records,
)
from kubetune_trainer.data.store import (
    ExampleChain,
    RecordStream,
    TokenStore,
    split_stream,
    tokenized_stores,
)
from kubetune_trainer.data.tokenize import Example, TokenizedDataset
from kubetune_trainer.distributed import (
    Strategy,
    choose_strategy,
    cpu_memory_limit,
    distributed_status,
)
from kubetune_trainer.errors import ConfigError, ModelError, Preempted
from kubetune_trainer.evaluation import (
    REPORT_JSON,
    REPORT_MD,
    EvalReport,
    ModelEval,
    Prompt,
    build_report,
    extra_prompt,
    generate_answers,
    record_prompt,
    validation_loss,
)
from kubetune_trainer.modeling import (
    Precision,
    attention_mask_dtype,
    causal_lm_loss,
    check_vocabulary,
    choose_precision,
    load_base_model,
    load_tokenizer,
    load_trainable,
    packing_keeps_sequences_apart,
    parameter_counts,
    prepare_for_training,
    read_model_config,
    save_trainable,
    supports_trained_logits,
)
from kubetune_trainer.ownership import Owner, claim_output
from kubetune_trainer.plan import MicroBatch, StepBatches, TrainingPlan, build_scheduler
from kubetune_trainer.preemption import SigtermFlag
from kubetune_trainer.publish import (
    MERGED_DIR,
    METRICS_FILE,
    TRAINER_CONFIG_FILE,
    original_dtype,
    save_adapter,
    save_full_model,
    save_merged,
    upload_outputs,
    write_json,
)
from kubetune_trainer.reporting import (
    ProgressSnapshot,
    StatusReporter,
    ThroughputWindow,
    log_every,
)
from kubetune_trainer.storage import Storage, StorageError, UploadedFile, checkpoint_uri
from kubetune_trainer.training_log import TrainingLog

log = logging.getLogger(__name__)

MAX_GRAD_NORM: Final = 1.0
ADAM_BETAS: Final = (0.9, 0.999)
# Log at least this often even when steps are slow.
LOG_INTERVAL_S: Final = 30.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def current_rss() -> int:
    """The process's resident memory now, in bytes (Linux /proc; the peak where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """This program's peak resident memory, in bytes.

    VmHWM, the high-water mark of this process's own address space. Not ru_maxrss: Linux carries
    the parent's high-water mark across fork/vfork + exec into it, so a trainer started from a
    large process (a test runner, a notebook, a launcher) would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, label): peak GPU allocation, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "GPU peak"
    return peak_rss(), "RSS peak"


def status_loss(loss: float) -> float:
    """A loss as the status shows it (the Loss printer column): 4 decimals; metrics.json keeps
    every loss at full precision."""
    return round(loss, 4)


def _status_rewards(metrics: dpo.DpoMetrics) -> dict[str, float]:
    """DPO training metrics as status fields (4 decimals, like the loss)."""
    return {
        "reward_chosen": round(metrics.reward_chosen, 4),
        "reward_rejected": round(metrics.reward_rejected, 4),
        "reward_margin": round(metrics.reward_margin, 4),
        "reward_accuracy": round(metrics.reward_accuracy, 4),
    }


def train_step(
    model: torch.nn.Module,
    micro_batches: Sequence[MicroBatch],
    collate: Callable[[MicroBatch], Batch],
    *,
    step_tokens: int,
    world_size: int,
    precision: Precision,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    params: Sequence[torch.nn.Parameter],
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
    trained_logits_only: bool = False,
    loss_fn: Callable[[torch.nn.Module, Any, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, int]:
    """One optimizer step over this process's micro-batches; (summed loss, real tokens).

    The loss is the summed token cross-entropy divided by the trained tokens of the whole step
    (`step_tokens`: every micro-batch on every process), so each token weighs the same however
    tokens fall into micro-batches, rows and GPUs; DDP averages gradients over processes, hence
    the world_size factor. The returned loss is this process's share of the step's mean token
    loss, kept on the device (no host sync). Micro-batches are collated one at a time, so only
    one attention mask exists at once. `no_sync` (DDP) skips the gradient all-reduce on every
    micro-batch but the last. `trained_logits_only`: the output head runs only at trained
    positions (modeling.causal_lm_loss; the same loss and gradients, less compute and memory).

    `loss_fn(model, batch, divisor)` replaces the token cross-entropy (objective dpo: dpo.DpoLoss,
    with `collate` giving PairBatch and `step_tokens` the step's number of pairs).
    """
    device = precision.device
    divisor = torch.tensor(step_tokens / world_size, device=device)
    loss_sum = torch.zeros((), device=device)
    tokens = 0
    for j, micro in enumerate(micro_batches):
        batch = collate(micro).to(device)
        last = j == len(micro_batches) - 1
        sync = no_sync() if no_sync is not None and world_size > 1 and not last else nullcontext()
        with sync:
            with precision.autocast():
                if loss_fn is not None:
                    loss = loss_fn(model, batch, divisor)
                else:
                    loss = causal_lm_loss(
                        model, batch, divisor, trained_logits_only=trained_logits_only
                    )
            torch.autograd.backward(scaler.scale(loss))
        loss_sum += loss.detach().float()
        tokens += batch.num_tokens
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, tokens


class FineTuneRecipe:
    """LoRA / QLoRA / full fine-tuning (SFT or DPO) of a causal LM from object storage."""

    # Set by setup(): records in lists (DPO, or streaming_data off) or streamed from disk, and
    # examples in lists or memory-mapped stores (data/store.py).
    train_records: Sequence[Record] | RecordStream
    validation_records: Sequence[Record] | RecordStream
    train_examples: TokenizedDataset | TokenStore
    validation_examples: TokenizedDataset | TokenStore
    _trained_tokens: Sequence[int]

    def __init__(
        self,
        config: TrainerConfig,
        *,
        env: Mapping[str, str] | None = None,
        preemption: SigtermFlag | None = None,
    ) -> None:
        self.config = config
        self.spec = config.spec
        self.env = os.environ if env is None else env
        self.work_dir = Path(config.work_dir)
        if not self.spec.output.uri.startswith("s3://"):
            raise ConfigError(
                f"output.uri {self.spec.output.uri}: this trainer publishes to s3:// only "
                "(checkpoints need object storage)"
            )
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.precision = choose_precision(self.spec, self.device)
        gpus = self.spec.resources.gpus
        if gpus > 1 and self.world_size == 1:
            log.warning(
                "resources.gpus is %d but the trainer runs as a single process, on one GPU: "
                "launch it as `torchrun --nproc-per-node=%d -m kubetune_trainer --config ...` "
                "(or `accelerate launch`) to train data-parallel",
                gpus,
                gpus,
            )
        self.reporter = StatusReporter.from_environment(
            config.job if self.is_main else None, self.env
        )
        # spec.distributed.strategy, decided in _setup_estimate (auto compares the estimate).
        self.strategy: Strategy = "single" if self.world_size == 1 else "ddp"
        self.reporter.report(distributed=distributed_status(self.env, self.world_size))
        self.preemption = preemption or SigtermFlag()
        # hyperparameters.packing, unless the model turns out not to keep packed sequences
        # apart (_setup_model); training and evaluation follow this.
        self.packing = self.spec.hyperparameters.packing
        # objective dpo: pairs instead of examples (data/preference.py, dpo.py).
        self.dpo = self.spec.objective == "dpo"
        self.dpo_loss: dpo.DpoLoss | None = None
        # Full fine-tuning with DPO: reference log-probabilities [pairs, 2], computed before the
        # first step (or restored from the checkpoint), for the training and validation pairs.
        self.reference_logps: dict[str, torch.Tensor] = {}
        self._window_dpo: list[list[float]] = []  # the window's per-step DPO sums
        self.eval_report: EvalReport | None = None
        self.memory_estimate: mem.MemoryEstimate | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._window_losses: list[float] = []
        self._pending_losses: list[tuple[int, torch.Tensor, float, torch.Tensor | None]] = []
        # Observers for benchmarks and tests (unset in jobs): called with each optimizer step's
        # planned micro-batches just before it runs, and once after the last step (before the
        # final checkpoint).
        self.before_step: Callable[[StepBatches], None] | None = None
        self.after_training: Callable[[], None] | None = None
        # SFT data streamed from disk into memory-mapped token arrays (data/store.py), cached in
        # the work dir; False keeps every record and example in Python lists (the path before
        # streaming, kept for DPO and for the benchmarks' side-by-side runs).
        self.streaming_data = True

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        disable: Any = hf_logging.disable_progress_bar  # untyped
        disable()  # tqdm bars are noise in `kubectl logs`
        seed_everything(self.spec.hyperparameters.seed)
        self._setup_storage()
        self._setup_output()
        self._setup_data()
        self._setup_model_files()
        self._setup_tokenizer()
        self._setup_examples()
        self._setup_plan()
        self._setup_estimate()
        self._setup_model()
        self._setup_optimizer()
        self._setup_resume()
        if self._resume_rng is not None:
            restore_rng(self._resume_rng)

    def _setup_storage(self) -> None:
        self.storage = Storage.from_trainer_config(self.config, env=self.env)
        # The history of progress reports (training_log.py), next to the output; rank 0 only.
        self.training_log = TrainingLog(self.storage, self.spec.output.uri, enabled=self.is_main)

    def _setup_output(self) -> None:
        """Claim output.uri for this job before anything is downloaded (ownership.py): a job
        whose output holds another job's files fails in seconds, and overwrites them only
        with output.overwrite. Rank 0 claims; the others write nothing there themselves."""
        self.owner = Owner.of(self.config.job)
        if not self.is_main:
            return
        output = self.spec.output.uri
        claim = claim_output(self.storage, output, self.owner, overwrite=self.spec.output.overwrite)
        log.info(
            "output %s: %s",
            output,
            {
                "claimed": f"claimed for {self.owner.describe()}",
                "ours": "already ours (a retry or resume of this job)",
                "overwritten": "previous contents deleted (output.overwrite) and claimed",
            }[claim],
        )

    def _fetch(self, uri: str, name: str, revision: str | None = None) -> Path:
        return self.storage.fetch(uri, self.work_dir / name, revision=revision)

    def _load_records(self, uri: str, local: Path, fmt: str) -> tuple[list[Record], RecordFormat]:
        try:
            dataset = load_records(local, cast(Any, fmt))
        except DatasetError as exc:
            # Name the user's URI, not the pod's download directory.
            raise DatasetError(str(exc).replace(str(local), uri)) from exc
        return dataset.records, dataset.format

    def _scan_records(self, uri: str, local: Path, fmt: str) -> DataScan:
        """Validate every record as _load_records does, keeping none of them in memory."""
        try:
            return scan_records(local, cast(Any, fmt))
        except DatasetError as exc:
            raise DatasetError(str(exc).replace(str(local), uri)) from exc

    def _stream_data(self) -> tuple[RecordStream, RecordStream | None]:
        """SFT data, validated now and streamed again by _setup_sft_examples."""
        ds, seed = self.spec.dataset, self.spec.hyperparameters.seed
        scan = self._scan_records(ds.train_uri, self._fetch(ds.train_uri, "data/train"), ds.format)
        self.format = scan.format
        if ds.validation_uri:
            local = self._fetch(ds.validation_uri, "data/validation")
            return RecordStream(scan), RecordStream(
                self._scan_records(ds.validation_uri, local, self.format)
            )
        if ds.validation_split > 0:
            return split_stream(scan, ds.validation_split, seed)
        return RecordStream(scan), None

    def _setup_data(self) -> None:
        """Fetch the data and validate every record (no tokenizer needed for that)."""
        self.reporter.report(stage="Fetching")
        ds, seed = self.spec.dataset, self.spec.hyperparameters.seed
        train: Sequence[Record] | RecordStream
        validation: Sequence[Record] | RecordStream
        if self.streaming_data and not self.dpo:
            train, streamed = self._stream_data()
            validation = [] if streamed is None else streamed
        else:
            train, self.format = self._load_records(
                ds.train_uri, self._fetch(ds.train_uri, "data/train"), ds.format
            )
            if ds.validation_uri:
                local = self._fetch(ds.validation_uri, "data/validation")
                validation, _ = self._load_records(ds.validation_uri, local, self.format)
            elif ds.validation_split > 0:
                train, validation = split_train_validation(train, ds.validation_split, seed=seed)
            else:
                validation = []
        first = (
            train.scan.first_location
            if isinstance(train, RecordStream)
            else train[0].location
            if train
            else "the data"
        )
        preference = self.format in PREFERENCE_FORMATS
        if preference != self.dpo:
            raise DatasetError(
                f"{ds.train_uri}: objective {self.spec.objective} trains on "
                + (
                    "preference pairs (formats preference, prompt-chosen-rejected)"
                    if self.dpo
                    else "chat, instruction, prompt-completion or text records"
                )
                + f", but the records are in {self.format} format (detected from {first}): "
                + ("set objective: dpo" if preference else "set objective: sft")
                + " or use other data"
            )
        self.train_records, self.validation_records = train, validation
        log.info(
            "data: %d training and %d validation records, format %s",
            len(train),
            len(validation),
            self.format,
        )

    def _setup_model_files(self) -> None:
        base = self.spec.base_model
        self.model_dir = self._fetch(base.uri, "model", base.revision)
        self.tokenizer_dir = (
            self._fetch(base.tokenizer_uri, "tokenizer", base.revision)
            if base.tokenizer_uri
            else self.model_dir
        )
        self.model_config = read_model_config(self.model_dir)

    def _setup_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(
            self.tokenizer_dir, trust_remote_code=self.spec.base_model.trust_remote_code
        )

    def _setup_examples(self) -> None:
        self.reporter.report(stage="Preparing")
        if self.dpo:
            self._setup_pairs()
        else:
            self._setup_sft_examples()
        # Prompts for the generation part of the evaluation: known before training, because
        # full fine-tuning answers them with the base model before the first step.
        ev = self.spec.evaluation
        self.eval_samples: list[Prompt] = []
        if ev.enabled and {"rougeL", "bleu"} & set(ev.metrics):
            for record in self.validation_records:
                if len(self.eval_samples) >= ev.sample_size:
                    break
                prompt = record_prompt(record, self.format, self.tokenizer)
                if prompt is not None:
                    self.eval_samples.append(prompt)
        prompt_format = self.format
        if self.dpo:  # extra prompts are wrapped like the pairs' prompts
            chat = pair_text(next(iter(self.train_records)).data, self.format).chat
            prompt_format = "chat" if chat else "prompt-completion"
        self.eval_prompts = (
            [extra_prompt(p, prompt_format, self.tokenizer) for p in ev.prompts]
            if ev.enabled
            else []
        )

    def _setup_pairs(self) -> None:
        """objective dpo: preference pairs, never truncated (data/preference.py)."""
        max_len = self.spec.dataset.max_seq_length
        self.train_pairs = tokenize_pairs(self.train_records, self.tokenizer, self.format, max_len)
        self.validation_pairs = tokenize_pairs(
            self.validation_records, self.tokenizer, self.format, max_len
        )
        self.train_examples = TokenizedDataset()
        self.validation_examples = TokenizedDataset()
        stats = self.train_pairs.stats
        if not self.train_pairs:
            raise DatasetError(
                f"{self.spec.dataset.train_uri}: no preference pair fits maxSeqLength={max_len} "
                f"(all {stats.too_long} have a prompt and answer longer): raise "
                "dataset.maxSeqLength"
            )
        skipped = stats.too_long + self.validation_pairs.stats.too_long
        log.log(
            logging.WARNING if skipped else logging.INFO,
            "tokenized: %d training pairs (%d tokens, %d trained), %d validation pairs, mean %.0f "
            "/ max %d tokens per answer sequence; %d training and %d validation pairs skipped: "
            "prompt + answer longer than maxSeqLength=%d (pairs are never truncated)",
            stats.pairs,
            stats.total_tokens,
            stats.trained_tokens,
            self.validation_pairs.stats.pairs,
            stats.mean_length,
            stats.max_length,
            stats.too_long,
            self.validation_pairs.stats.too_long,
            max_len,
        )
        # Each pair weighs the same in the loss (mean over the step's pairs).
        self._trained_tokens = [1] * len(self.train_pairs)

    def _setup_sft_examples(self) -> None:
        max_len = self.spec.dataset.max_seq_length
        self.train_pairs = TokenizedPairs()
        self.validation_pairs = TokenizedPairs()
        if isinstance(self.train_records, RecordStream):
            self._tokenize_to_stores()
        else:
            self.train_examples = tokenize_records(
                self.train_records, self.tokenizer, self.format, max_len
            )
            self.validation_examples = tokenize_records(
                self.validation_records, self.tokenizer, self.format, max_len
            )
        stats = self.train_examples.stats
        if not self.train_examples:
            raise DatasetError(
                f"{self.spec.dataset.train_uri}: no training record has a trained token left "
                f"(after truncation to maxSeqLength={max_len}): {stats.dropped} dropped"
            )
        log.info(
            "tokenized: %d examples, %d tokens (%d trained), mean %.0f / max %d tokens, "
            "%d truncated to %d, %d dropped",
            stats.examples,
            stats.total_tokens,
            stats.trained_tokens,
            stats.mean_length,
            stats.max_length,
            stats.truncated,
            max_len,
            stats.dropped,
        )
        self._trained_tokens = (
            cast(Sequence[int], self.train_examples.trained)
            if isinstance(self.train_examples, TokenStore)
            else [e.num_trained for e in self.train_examples]
        )

    def _tokenize_to_stores(self) -> None:
        """Stream the records through the tokenizer into memory-mapped stores in the work
        dir, or open the ones a previous attempt wrote for the same data, tokenizer and
        settings. On one node the first process writes them and the others wait and read."""
        ds = self.spec.dataset
        train = cast(RecordStream, self.train_records)
        validation = self.validation_records
        with self.accelerator.local_main_process_first():
            stores = tokenized_stores(
                train,
                validation if isinstance(validation, RecordStream) else None,
                cache_root=self.work_dir / "data" / "tokenized",
                tokenizer=self.tokenizer,
                tokenizer_dir=Path(self.tokenizer_dir),
                fmt=self.format,
                max_seq_length=ds.max_seq_length,
                split=None
                if ds.validation_uri
                else {"fraction": ds.validation_split, "seed": self.spec.hyperparameters.seed},
            )
        log.info(
            "tokenized %d records (cache %s): %s",
            stores.records,
            "hit" if stores.hit else "miss",
            stores.directory,
        )
        self.train_examples, self.validation_examples = stores.train, stores.validation

    @property
    def _unit_lengths(self) -> Sequence[int]:
        """Tokens of each training unit: an example, or a pair (both sequences); an int64
        array for examples on disk."""
        if not self.dpo and isinstance(self.train_examples, TokenStore):
            return cast(Sequence[int], self.train_examples.lengths)
        units = self.train_pairs if self.dpo else self.train_examples
        return [len(u) for u in units]

    def _sequences(self) -> Sequence[Example]:
        """Every training and validation sequence (both sides of each pair)."""
        if not self.dpo:
            return ExampleChain(self.train_examples, self.validation_examples)
        pairs = [*self.train_pairs, *self.validation_pairs]
        return [s for p in pairs for s in (p.chosen, p.rejected)]

    def _setup_plan(self) -> None:
        hp = self.spec.hyperparameters
        row_factor = PAIR_ROW_FACTOR if self.dpo else 1
        self.plan = TrainingPlan(
            lengths=self._unit_lengths,
            max_seq_length=self.spec.dataset.max_seq_length * row_factor,
            batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            seed=hp.seed,
            epochs=hp.epochs,
            max_steps=hp.max_steps,
            packing=self.packing,
            world_size=self.world_size,
        )
        rows = self.plan.epoch_batches(0)
        efficiency = self.plan.row_fill(0)
        unit = "pairs" if self.dpo else "examples"
        log.info(
            "plan: %d optimizer steps (%d per epoch), %d micro-batches of up to %d %s x %d "
            "tokens per epoch, %d accumulated per step x %d process(es); row fill %.0f%%",
            self.plan.total_steps,
            self.plan.steps_per_epoch,
            len(rows),
            hp.batch_size,
            f"packed rows of {unit}" if self.packing else unit,
            self.spec.dataset.max_seq_length * row_factor,
            hp.gradient_accumulation_steps,
            self.world_size,
            100 * efficiency,
        )

    def _setup_estimate(self) -> None:
        """Estimate GPU memory (host memory on CPU) from config.json and decide on gradient
        checkpointing."""
        spec, hp = self.spec, self.spec.hyperparameters
        try:
            shape = mem.ModelShape.from_config(self.model_config)
        except ValueError as exc:
            log.warning("no memory estimate: %s", exc)
            self.gradient_checkpointing = mem.resolve_gradient_checkpointing(
                hp.gradient_checkpointing, spec.method
            )
            self._choose_strategy(None, None)
            return
        seq = self.spec.dataset.max_seq_length
        if not self.packing:
            longest = (self.train_pairs if self.dpo else self.train_examples).stats.max_length
            seq = min(seq, longest)
        kwargs: dict[str, Any] = {
            "method": spec.method,
            "batch_size": hp.batch_size,
            "seq_length": seq,
            "lora_r": spec.lora.r,
            "target_modules": spec.lora.target_modules,
            "lora_dropout": spec.lora.dropout,
            "double_quant": spec.quantization.double_quant,
            "dpo_pairs": len(self.train_pairs) + len(self.validation_pairs) if self.dpo else None,
        }
        if self.device.type != "cuda":
            # The process's peak resident memory: fp32 everywhere, and what the process holds
            # before the model loads (with the libraries loading it already imported).
            import peft  # noqa: F401, PLC0415

            if spec.method == "qlora":
                import bitsandbytes  # noqa: F401, PLC0415
            kwargs.update(
                dtype_bytes=4,
                overhead=current_rss(),
                overhead_label="process before loading the model",
            )
        gpu_bytes = (
            int(torch.cuda.get_device_properties(self.device).total_memory)
            if self.device.type == "cuda"
            else None
        )
        without = mem.estimate_memory(shape, gradient_checkpointing=False, **kwargs)
        self.gradient_checkpointing = mem.resolve_gradient_checkpointing(
            hp.gradient_checkpointing,
            spec.method,
            estimate_without=without,
            gpu_memory_bytes=gpu_bytes,
        )
        estimate = (
            mem.estimate_memory(shape, gradient_checkpointing=True, **kwargs)
            if self.gradient_checkpointing
            else without
        )
        if self._choose_strategy(estimate.per_gpu, gpu_bytes) == "fsdp":
            estimate = mem.sharded(estimate, self.world_size, shape.layers)
        self.memory_estimate = estimate
        where = "per GPU" if gpu_bytes is not None else "for the process"
        log.info("memory estimate: %.2f GB %s (%s)", estimate.per_gpu / 1e9, where, estimate.basis)
        if gpu_bytes is not None and estimate.per_gpu > gpu_bytes:
            log.warning(
                "the estimate (%.1f GB) exceeds this GPU's %.1f GB: expect an out-of-memory error",
                estimate.per_gpu / 1e9,
                gpu_bytes / 1e9,
            )
        self.reporter.report(
            estimate=MemoryEstimate(
                gpu_memory_bytes=estimate.per_gpu * self.world_size,
                per_gpu=estimate.per_gpu,
                basis=estimate.basis[:1024],
            )
        )

    def _choose_strategy(self, replica_bytes: int | None, gpu_bytes: int | None) -> Strategy:
        """spec.distributed.strategy as a decision, reported to status.distributed. On CPU the
        estimate includes the process's own resident memory, which differs between processes:
        fsdp if any process finds that a replica does not fit, so that all decide alike."""
        limit = gpu_bytes
        if self.device.type != "cuda":
            limit = cpu_memory_limit(int(self.env.get("LOCAL_WORLD_SIZE") or 1))
        setting = self.spec.distributed.strategy
        strategy, reason = choose_strategy(
            setting,
            world_size=self.world_size,
            method=self.spec.method,
            replica_bytes=replica_bytes,
            memory_limit=limit,
            where="GPU" if self.device.type == "cuda" else "process (the pod's memory limit)",
        )
        if (
            setting == "auto"
            and self.world_size > 1
            and not self._all_processes_agree(strategy == "ddp")
        ):
            strategy = "fsdp"
            reason = "auto: the estimate of a whole replica exceeds the memory of another process"
        self.strategy = strategy
        log.info("distributed strategy: %s (%s)", strategy, reason)
        self.reporter.report(
            distributed=distributed_status(self.env, self.world_size, strategy, reason)
        )
        return strategy

    def _setup_model(self) -> None:
        self.reporter.report(stage="Loading")
        log.info(
            "loading the base model (%s, %s, gradient checkpointing %s)",
            self.spec.method,
            self.precision.load_dtype,
            "on" if self.gradient_checkpointing else "off",
        )
        base = load_base_model(self.model_dir, self.spec, self.precision)
        sequences = self._sequences()
        max_id = max(max(e.input_ids) for e in sequences)
        check_vocabulary(base, max_id)
        model = prepare_for_training(
            base, self.spec, gradient_checkpointing=self.gradient_checkpointing
        )
        self.mask_dtype = attention_mask_dtype(base, self.precision)
        # Before DDP wrapping: the probes are forward passes on this process alone (each
        # process decides the same way: same model, same examples).
        self.trained_logits_only = supports_trained_logits(model, self.precision)
        if self.packing and not self._all_processes_agree(
            packing_keeps_sequences_apart(
                model,
                sequences,
                int(self.tokenizer.pad_token_id),
                self.mask_dtype,
                self.precision,
            )
        ):
            self.packing = False
            self._setup_plan()  # one example per row
        self.trainable_params, self.total_params = parameter_counts(model)
        log.info(
            "parameters: %s trainable of %s (%.2f%%)",
            f"{self.trainable_params:,}",
            f"{self.total_params:,}",
            100 * self.trainable_params / max(1, self.total_params),
        )
        self.reporter.report(
            parameters=ParameterCounts(trainable=self.trainable_params, total=self.total_params)
        )
        if self.strategy == "fsdp":
            if self.device.type == "cuda":
                model.to(self.device)
            self.model = fsdp.shard_model(
                model, device=self.device, compute_dtype=self.precision.compute_dtype
            )
        else:
            # 4-bit models are placed by from_pretrained(device_map=...) and must not be moved.
            self.model = self.accelerator.prepare_model(
                model, device_placement=self.spec.method != "qlora"
            )
        if self.dpo:
            self._setup_dpo()

    def _setup_dpo(self) -> None:
        """The DPO loss and its reference: the adapter switched off (lora, qlora), or the
        log-probabilities precomputed before the first step (full; dpo.py)."""
        reference: dpo.ReferenceFn
        if self.spec.method == "full":

            def reference(pairs: PairBatch) -> torch.Tensor:
                return dpo.table_reference(self.reference_logps["train"])(pairs)

        else:
            reference = dpo.adapter_off_reference(
                self.unwrapped, self.precision, trained_logits_only=self.trained_logits_only
            )
        self.dpo_loss = dpo.DpoLoss(
            beta=self.spec.dpo.beta,
            label_smoothing=self.spec.dpo.label_smoothing,
            trained_logits_only=self.trained_logits_only,
            reference=reference,
        )

    def _agree(self, stop: bool, save: bool) -> tuple[bool, bool]:
        """Whether any process wants to stop (SIGTERM) or checkpoint (a time-based interval)
        after this step: all must do it at the same step, or one would wait in the checkpoint's
        collectives while the others wait in the next step's gradient sync. SIGTERM reaches
        the pods of a gang at different moments, and their clocks differ."""
        if self.world_size == 1:
            return stop, save
        flags = torch.tensor([int(stop), int(save)], device=self.device)
        agreed = self.accelerator.reduce(flags, reduction="sum").tolist()
        return agreed[0] > 0, agreed[1] > 0

    def _all_processes_agree(self, verdict: bool) -> bool:
        """True only if every process's verdict is True: data-parallel processes must plan
        the same steps (a process with other micro-batches would hang the gradient sync)."""
        if self.world_size == 1:
            return verdict
        votes = torch.tensor([int(verdict)], device=self.device)
        return bool(int(self.accelerator.reduce(votes, reduction="sum").item()) == self.world_size)

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without the DDP wrapper (for saving, evaluation, disable_adapter); an FSDP
        model is its own (fully_shard works in place; its weights are sharded DTensors)."""
        if self.strategy == "fsdp":
            return self.model
        return cast(torch.nn.Module, self.accelerator.unwrap_model(self.model))

    def _no_sync(self) -> AbstractContextManager[Any]:
        """No gradient synchronization for a micro-batch before the last of a step."""
        if self.strategy == "fsdp":
            return fsdp.no_gradient_sync(self.model)
        return cast(AbstractContextManager[Any], self.accelerator.no_sync(self.model))

    def _setup_optimizer(self) -> None:
        hp = self.spec.hyperparameters
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in trainable]
        # No weight decay on biases and norm weights (1-D), as usual for transformers.
        groups = [
            {"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=hp.learning_rate, betas=ADAM_BETAS
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            kind=hp.scheduler,
            total_steps=self.plan.total_steps,
            warmup_ratio=hp.warmup_ratio,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)

    def _data_fingerprint(self) -> str:
        """checkpoint.data_fingerprint of the training data. A TokenStore's was computed while
        it was written; hashing every example again cost each start of a run 8.5 s for 200k
        examples (57M tokens) on the 2-core VM."""
        if self.dpo:
            return data_fingerprint(s for p in self.train_pairs for s in (p.chosen, p.rejected))
        if isinstance(self.train_examples, TokenStore):
            return self.train_examples.fingerprint
        return data_fingerprint(self.train_examples)

    def _setup_resume(self) -> None:
        current = training_spec(self.spec)
        self.state = TrainerState(
            step=0,
            total_steps=self.plan.total_steps,
            epoch=0,
            batch_index=0,
            spec_hash=spec_hash(current),
            training_spec=current,
            data_fingerprint=self._data_fingerprint(),
        )
        found = self._verified_checkpoint()
        if found is None:
            log.info("no checkpoint under %s: training from step 0", self.spec.output.uri)
            return
        uri, local = found
        saved = read_state(local)
        differences = spec_differences(saved.training_spec, current)
        if differences:
            log.warning(
                "RESUMING FROM A CHECKPOINT WRITTEN WITH A DIFFERENT SPEC (%s): the result mixes "
                "two trainings. Differences (saved -> now): %s",
                uri,
                "; ".join(differences),
            )
        if saved.data_fingerprint != self.state.data_fingerprint:
            log.warning(
                "RESUMING ONTO DIFFERENT TRAINING DATA: the tokenized data differs from what the "
                "checkpoint at %s trained on, so the data position is meaningless",
                uri,
            )
        try:
            sharded = fsdp.is_sharded_checkpoint(local)
            if sharded:
                # Written by fsdp on any number of processes: resharded onto this run's.
                fsdp.load_sharded(self.unwrapped, self.optimizer, local, self.spec.method)
            elif self.strategy == "fsdp":
                raise ValueError(
                    "it was written without fsdp (whole weights), and fsdp resumes only its own "
                    "sharded checkpoints: set distributed.strategy to ddp to resume it"
                )
            else:
                load_trainable(self.unwrapped, local, self.spec.method)
            self._resume_rng = load_training_state(
                local,
                optimizer=None if sharded else self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
                device=self.device,
            )
            if self.dpo and self.spec.method == "full":
                # The base weights are gone: the reference comes back with the checkpoint.
                reference = load_reference(local)
                if reference is None or set(reference) != {"train", "validation"}:
                    raise ValueError("the checkpoint has no DPO reference log-probabilities")
                self.reference_logps = reference
        except (ModelError, RuntimeError, KeyError, ValueError) as exc:
            why = f" (spec differences: {'; '.join(differences)})" if differences else ""
            raise ConfigError(
                f"cannot resume from {uri}: {exc}{why}; use a new output.uri to start over"
            ) from exc
        if (saved.epoch, saved.batch_index) != self.plan.position(saved.step):
            log.warning(
                "checkpoint data position (epoch %d, micro-batch %d) differs from the plan's "
                "(epoch %d, micro-batch %d) for step %d",
                saved.epoch,
                saved.batch_index,
                *self.plan.position(saved.step),
                saved.step,
            )
        saved.total_steps = self.plan.total_steps
        saved.spec_hash, saved.training_spec = self.state.spec_hash, current
        saved.data_fingerprint = self.state.data_fingerprint
        self.state = saved
        log.info(
            "resuming from the checkpoint of step %d/%d (%s): epoch %d, micro-batch %d",
            saved.step,
            self.plan.total_steps,
            uri,
            saved.epoch,
            saved.batch_index,
        )

    def _verified_checkpoint(self) -> tuple[str, Path] | None:
        """(uri, local copy) of the newest of this job's complete checkpoints whose files match
        their recorded SHA-256; a corrupted one is skipped, loudly, for the one before."""
        output = self.spec.output.uri
        for step, uri in self.storage.complete_checkpoints(output, self.owner.uid):
            try:
                return uri, self.storage.fetch_checkpoint(
                    uri, self.work_dir / f"resume/step-{step}"
                )
            except StorageError as exc:
                if exc.reason != "StorageChecksumMismatch":
                    raise
                log.error("NOT RESUMING FROM A CORRUPTED CHECKPOINT: %s", exc)
        return None

    # ------------------------------------------------------------------------------ train

    def _pair_logps(self, model: torch.nn.Module, pairs: TokenizedPairs) -> torch.Tensor:
        """[pairs, 2] log-probabilities of the answers under `model` (eval mode, batched like
        training)."""
        return dpo.pair_logps(
            model,
            pairs,
            rows_per_batch=self.spec.hyperparameters.batch_size,
            max_seq_length=self.spec.dataset.max_seq_length,
            pad_token_id=int(self.tokenizer.pad_token_id),
            precision=self.precision,
            mask_dtype=self.mask_dtype,
            trained_logits_only=self.trained_logits_only,
            packing=self.packing,
        )

    def _precompute_reference(self) -> None:
        """DPO + full: the base model's log-probabilities of every pair, before they change."""
        started = time.monotonic()
        self.reference_logps = {
            "train": self._pair_logps(self.unwrapped, self.train_pairs),
            "validation": self._pair_logps(self.unwrapped, self.validation_pairs),
        }
        log.info(
            "reference log-probabilities of %d training and %d validation pairs computed in "
            "%.1fs (the base model is the DPO reference; full fine-tuning changes its weights)",
            len(self.train_pairs),
            len(self.validation_pairs),
            time.monotonic() - started,
        )

    def train(self) -> None:
        if self.dpo and self.spec.method == "full" and not self.reference_logps:
            self._precompute_reference()
        if (
            self.spec.method == "full"
            and self.spec.evaluation.enabled
            and self.state.base_eval is None
            and self.state.step == 0
        ):
            # Full fine-tuning overwrites the base weights: evaluate them first.
            self.reporter.report(stage="Evaluating")
            self.state.base_eval = asdict(self._evaluate_model(self.unwrapped))
        # The starting position goes out with the stage, so `kubectl get` shows 0/N (or the
        # resumed step) from the first moment, not only after the first progress interval.
        step, total, history = self.state.step, self.plan.total_steps, self.state.loss_history
        self.reporter.report(
            stage="Training",
            progress=Progress(
                epoch=round(self.plan.epoch_progress(step), 4),
                step=step,
                total_steps=total,
                percent=round(100.0 * step / total, 2) if total else 100.0,
                update_time=datetime.now(UTC).replace(microsecond=0),
            ),
            # A resumed job shows its last loss at once (even one resumed after its last step).
            metrics=TrainingMetrics(train_loss=status_loss(history[-1]["loss"]))
            if history
            else None,
        )
        if self.state.step >= self.plan.total_steps:
            log.info("training already complete (step %d)", self.state.step)
            return
        # QLoRA in eval mode silently skips gradient checkpointing: always train() first.
        self.model.train()
        self.preemption.install()  # already, when run by __main__ (from its first moment)
        # Inside the loop SIGTERM is a flag the loop checkpoints on; outside it, it stops.
        with self.preemption.deferred(lambda: self.state.step):
            self._train_loop()

    def _train_loop(self) -> None:
        state, total = self.state, self.plan.total_steps
        every = log_every(total)
        window = ThroughputWindow(state.step)
        policy = CheckpointPolicy(
            self.spec.checkpointing.interval_steps, self.spec.checkpointing.interval_minutes
        )
        last_log = time.monotonic()
        started = time.monotonic()
        log.info("training steps %d..%d of %d", state.step + 1, total, total)
        for index in range(state.step, total):
            planned = self.plan.step_batches(index)
            lr = float(self.scheduler.get_last_lr()[0])
            if self.before_step is not None:
                self.before_step(planned)
            loss, tokens, dpo_sums = self._train_step(planned)
            state.step = index + 1
            state.epoch, state.batch_index = planned.next_position
            state.tokens_seen += tokens
            window.add(tokens)
            self._pending_losses.append((state.step, loss, lr, dpo_sums))
            done = state.step == total
            if state.step % every == 0 or done or time.monotonic() - last_log >= LOG_INTERVAL_S:
                self._log_progress(window, lr)
                last_log = time.monotonic()
            stop, save = self._agree(self.preemption.is_set(), not done and policy.due(state.step))
            if stop:
                state.train_seconds += time.monotonic() - started
                uri = self.save_checkpoint()
                raise Preempted(state.step, uri, by_peer=not self.preemption.is_set())
            if save:
                state.train_seconds += time.monotonic() - started
                started = time.monotonic()
                try:
                    self.save_checkpoint()
                except StorageError as exc:
                    # Storage already retried; a lost periodic checkpoint only costs progress
                    # on a later failure, so keep training (the final one must succeed).
                    log.error("checkpoint of step %d not saved: %s", state.step, exc)
                policy.saved()
        state.train_seconds += time.monotonic() - started
        if self.after_training is not None:
            self.after_training()
        # A final checkpoint: a retry after a failure in evaluation or publishing goes
        # straight there instead of training again.
        self.save_checkpoint()

    def _collate_pairs(self, batch: MicroBatch) -> PairBatch:
        return collate_pairs(
            batch,
            self.train_pairs,
            int(self.tokenizer.pad_token_id),
            packing=self.packing,
            mask_dtype=self.mask_dtype,
        )

    def _collate(self, batch: MicroBatch) -> Batch:
        examples = self.train_examples
        pad = int(self.tokenizer.pad_token_id)
        if self.packing:
            rows = [[examples[i] for i in row] for row in batch]
            return collate_packed(rows, pad, mask_dtype=self.mask_dtype)
        return collate_padded([examples[row[0]] for row in batch], pad)

    def _train_step(self, planned: StepBatches) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """One optimizer step over this process's share of the step's micro-batches; (loss,
        tokens, the step's DPO sums over all processes or None)."""
        step_tokens = int(
            sum(self._trained_tokens[i] for b in planned.batches for r in b for i in r)
        )
        collate: Callable[[MicroBatch], Any] = (
            self._collate_pairs if self.dpo_loss is not None else self._collate
        )
        loss, tokens = train_step(
            self.model,
            planned.batches[self.rank :: self.world_size],
            collate,
            step_tokens=step_tokens,
            world_size=self.world_size,
            precision=self.precision,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            params=self.trainable,
            no_sync=self._no_sync,
            trained_logits_only=self.trained_logits_only,
            loss_fn=self.dpo_loss,
        )
        sums = None if self.dpo_loss is None else self.dpo_loss.take_step()
        if self.world_size > 1:
            loss = self.accelerator.reduce(loss, reduction="sum") / self.world_size
            tokens = int(self.accelerator.reduce(torch.tensor(tokens, device=self.device)).item())
            if sums is not None:
                sums = self.accelerator.reduce(sums, reduction="sum")
        return loss, tokens, sums

    def _drain_losses(self) -> None:
        """Move the per-step loss tensors to the history (one host sync for many steps)."""
        for step, loss, lr, dpo_sums in self._pending_losses:
            value = float(loss.item())
            entry: dict[str, float] = {"step": step, "loss": value, "lr": lr}
            if dpo_sums is not None:
                sums = [float(x) for x in dpo_sums.tolist()]
                self._window_dpo.append(sums)
                metrics = dpo.DpoMetrics.from_sums(sums).as_dict()
                entry.update({k: v for k, v in metrics.items() if k != "loss"})
            self.state.loss_history.append(entry)
            self._window_losses.append(value)
        self._pending_losses.clear()

    def _window_dpo_metrics(self) -> dpo.DpoMetrics | None:
        """The DPO means over the logging window's pairs (None for SFT)."""
        if not self._window_dpo:
            return None
        window, self._window_dpo = self._window_dpo, []
        return dpo.DpoMetrics.from_sums([sum(col) for col in zip(*window, strict=True)])

    def _log_progress(self, window: ThroughputWindow, lr: float) -> None:
        self._drain_losses()
        state = self.state
        rate, eta = window.close_window(state.step, self.plan.total_steps)
        memory, label = peak_memory(self.device)
        losses, self._window_losses = self._window_losses, []
        snapshot = ProgressSnapshot(
            step=state.step,
            total_steps=self.plan.total_steps,
            epoch=self.plan.epoch_progress(state.step),
            loss=sum(losses) / max(1, len(losses)),
            learning_rate=lr,
            tokens_per_second=rate,
            eta_seconds=eta,
            memory_bytes=memory,
            memory_label=label,
        )
        window_dpo = self._window_dpo_metrics()
        if self.is_main:
            line = snapshot.line()
            if window_dpo is not None:
                line += (
                    f" | rewards chosen {window_dpo.reward_chosen:.3f} rejected "
                    f"{window_dpo.reward_rejected:.3f} margin {window_dpo.reward_margin:.3f} "
                    f"accuracy {window_dpo.reward_accuracy:.2f}"
                )
            log.info("%s", line)
        self.reporter.report(
            progress=snapshot.progress(),
            metrics=TrainingMetrics(
                train_loss=status_loss(snapshot.loss),
                learning_rate=lr,
                tokens_per_second=round(rate, 1),
                peak_gpu_memory_bytes=memory if self.device.type == "cuda" else None,
                **({} if window_dpo is None else _status_rewards(window_dpo)),
            ),
        )
        self.training_log.train(
            step=state.step,
            total_steps=self.plan.total_steps,
            epoch=snapshot.epoch,
            train_loss=snapshot.loss,
            learning_rate=lr,
            tokens_per_second=rate,
            tokens_seen=state.tokens_seen,
            rewards=None if window_dpo is None else _status_rewards(window_dpo),
        )

    # ------------------------------------------------------------------------- checkpoint

    def save_checkpoint(self) -> str | None:
        """Save and publish the full training state at the current step; return its URI."""
        self._drain_losses()
        if self.strategy == "fsdp":
            return self._save_sharded_checkpoint()
        uri: str | None = None
        if self.is_main:
            started = time.monotonic()
            step = self.state.step
            local = self.work_dir / "checkpoints" / f"step-{step}"
            shutil.rmtree(local, ignore_errors=True)
            save_trainable(self.unwrapped, local, self.spec.method)
            if self.reference_logps:
                save_reference(local, self.reference_logps)
            save_training_state(
                local,
                state=self.state,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.scaler,
            )
            output = self.spec.output.uri
            uri = self.storage.publish_checkpoint(local, output, step, owner=self.owner.uid)
            pruned = self.storage.prune_checkpoints(
                output, self.spec.checkpointing.keep, owner=self.owner.uid
            )
            shutil.rmtree(local, ignore_errors=True)
            log.info(
                "checkpoint of step %d published to %s in %.1fs%s",
                step,
                uri,
                time.monotonic() - started,
                f" (pruned steps {pruned})" if pruned else "",
            )
        self.accelerator.wait_for_everyone()
        return uri

    def _save_sharded_checkpoint(self) -> str:
        """fsdp: every process writes its shard (fsdp.save_sharded) and uploads it; then rank 0
        uploads the rest (trainer state, RNG, schedule) and, last, the _COMPLETE marker that
        vouches for every process's files, so the checkpoint is complete only when whole. All
        processes learn the outcome (a failed upload anywhere fails the save everywhere alike,
        and the periodic-save caller keeps training in step)."""
        import torch.distributed as dist  # noqa: PLC0415

        started = time.monotonic()
        step, output = self.state.step, self.spec.output.uri
        uri = checkpoint_uri(output, step)
        local = self.work_dir / "checkpoints" / f"step-{step}-rank-{self.rank}"
        shutil.rmtree(local, ignore_errors=True)
        if self.is_main:  # a previous attempt's files at this step, before anyone uploads
            self.storage.clear_checkpoint(output, step)
        self.accelerator.wait_for_everyone()
        fsdp.save_sharded(self.model, self.optimizer, local, self.spec.method)
        uploaded: list[UploadedFile] | str = []
        if not self.is_main:
            try:
                uploaded = self.storage.upload_dir(local, uri)
            except StorageError as exc:
                uploaded = str(exc)
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, uploaded)
        failed = [(rank, e) for rank, e in enumerate(everyone) if isinstance(e, str)]
        outcome: list[str | None] = [None]
        if self.is_main and not failed:
            try:
                if self.reference_logps:
                    save_reference(local, self.reference_logps)
                save_training_state(
                    local, state=self.state, optimizer=None, scheduler=self.scheduler,
                    scaler=self.scaler,
                )  # fmt: skip
                others = [f for files in everyone[1:] for f in files]
                self.storage.publish_checkpoint(
                    local, output, step, owner=self.owner.uid, extra_files=others, clear=False
                )
                pruned = self.storage.prune_checkpoints(
                    output, self.spec.checkpointing.keep, owner=self.owner.uid
                )
                log.info(
                    "sharded checkpoint of step %d (%d processes) published to %s in %.1fs%s",
                    step,
                    self.world_size,
                    uri,
                    time.monotonic() - started,
                    f" (pruned steps {pruned})" if pruned else "",
                )
            except StorageError as exc:
                outcome = [str(exc)]
        dist.broadcast_object_list(outcome, src=0)
        shutil.rmtree(local, ignore_errors=True)
        error = outcome[0] or (f"process {failed[0][0]}: {failed[0][1]}" if failed else None)
        if error is not None:
            raise StorageError(
                f"sharded checkpoint of step {step} not published: {error}",
                uri=uri,
                reason="StorageUnavailable",
            )
        return uri

    # ------------------------------------------------------------------------- evaluation

    def _evaluate_model(self, model: torch.nn.Module) -> ModelEval:
        ev, ds = self.spec.evaluation, self.spec.dataset
        result = ModelEval()
        if self.validation_pairs:
            result.pair_logps = self._pair_logps(model, self.validation_pairs).tolist()
            result.tokens = self.validation_pairs.stats.trained_tokens
        if self.validation_examples and {"loss", "perplexity"} & set(ev.metrics):
            result.loss, result.tokens = validation_loss(
                model,
                self.validation_examples,
                rows_per_batch=self.spec.hyperparameters.batch_size,
                max_seq_length=ds.max_seq_length,
                pad_token_id=int(self.tokenizer.pad_token_id),
                precision=self.precision,
                mask_dtype=self.mask_dtype,
                trained_logits_only=self.trained_logits_only,
                packing=self.packing,
            )
        for prompts, answers in (
            (self.eval_samples, result.sample_answers),
            (self.eval_prompts, result.prompt_answers),
        ):
            if prompts:
                answers.extend(
                    generate_answers(
                        model,
                        prompts,
                        self.tokenizer,
                        max_new_tokens=ev.max_new_tokens,
                        precision=self.precision,
                    )
                )
        return result

    def evaluate(self) -> EvalReport | None:
        """Validation loss/perplexity and scored answers of the base and fine-tuned model."""
        # fsdp: every process runs the same evaluation (each forward pass gathers the
        # sharded weights from all of them); rank 0 reports.
        if not self.spec.evaluation.enabled or (not self.is_main and self.strategy != "fsdp"):
            return None
        self.reporter.report(stage="Evaluating")
        model = self.unwrapped
        tuned = self._evaluate_model(model)
        if self.spec.method == "full":
            base = ModelEval(**self.state.base_eval) if self.state.base_eval else ModelEval()
        else:
            with model.disable_adapter():  # type: ignore[operator]
                base = self._evaluate_model(model)
        if not self.is_main:
            return None
        if tuned.pair_logps is not None:
            self._score_pairs(base, tuned)
        report = build_report(
            samples=self.eval_samples,
            extra=self.eval_prompts,
            base=base,
            tuned=tuned,
            metrics=self.spec.evaluation.metrics,
        )
        self.eval_report = report
        log.info(
            "evaluation: loss %s -> %s, perplexity %s -> %s, ROUGE-L %s -> %s, BLEU %s -> %s "
            "(base -> fine-tuned)",
            *(
                "n/a" if v is None else f"{v:.4g}"
                for pair in (
                    (report.base.loss, report.fine_tuned.loss),
                    (report.base.perplexity, report.fine_tuned.perplexity),
                    (report.base.rouge_l, report.fine_tuned.rouge_l),
                    (report.base.bleu, report.fine_tuned.bleu),
                )
                for v in pair
            ),
        )
        preference: dict[str, Any] = {}
        if report.fine_tuned.preference_accuracy is not None:
            preference = {
                "preference_accuracy": report.fine_tuned.preference_accuracy,
                "base_preference_accuracy": report.base.preference_accuracy,
                "eval_reward_accuracy": report.fine_tuned.reward_accuracy,
            }
            log.info(
                "evaluation: preference accuracy %.3f -> %.3f on %d held-out pairs (base -> "
                "fine-tuned), reward accuracy %.3f, reward margin %.4f",
                report.base.preference_accuracy,
                report.fine_tuned.preference_accuracy,
                len(self.validation_pairs),
                report.fine_tuned.reward_accuracy,
                report.fine_tuned.reward_margin,
            )
        self.reporter.report(
            metrics=TrainingMetrics(
                eval_loss=report.fine_tuned.loss,
                perplexity=report.fine_tuned.perplexity,
                base_eval_loss=report.base.loss,
                base_perplexity=report.base.perplexity,
                rouge_l=report.fine_tuned.rouge_l,
                bleu=report.fine_tuned.bleu,
                eval_reward_margin=report.fine_tuned.reward_margin,
                **preference,
            ),
            urgent=True,
        )
        self.training_log.evaluation(
            step=self.state.step,
            eval_loss=report.fine_tuned.loss,
            perplexity=report.fine_tuned.perplexity,
            base_eval_loss=report.base.loss,
            base_perplexity=report.base.perplexity,
            preference=preference or None,
        )
        return report

    def _score_pairs(self, base: ModelEval, tuned: ModelEval) -> None:
        """DPO scores of both models on the held-out pairs, against the reference: the base
        model (the adapter off, or the log-probabilities precomputed before training)."""
        if self.spec.method == "full" and "validation" in self.reference_logps:
            reference = self.reference_logps["validation"]
        else:
            reference = torch.tensor(base.pair_logps)
        beta, smoothing = self.spec.dpo.beta, self.spec.dpo.label_smoothing
        for model, logps in ((base, reference), (tuned, torch.tensor(tuned.pair_logps))):
            scores = dpo.preference_eval(logps, reference, beta=beta, label_smoothing=smoothing)
            model.preference = {**asdict(scores), "reward_margin": scores.reward_margin}
            if "loss" in self.spec.evaluation.metrics:
                model.loss = scores.loss

    # ---------------------------------------------------------------------------- publish

    def metrics_summary(self) -> dict[str, Any]:
        state, report = self.state, self.eval_report
        history = state.loss_history
        tail = [h["loss"] for h in history[-max(1, log_every(self.plan.total_steps)) :]]
        memory, label = peak_memory(self.device)
        train_stats = (self.train_pairs if self.dpo else self.train_examples).stats
        validation_stats = (self.validation_pairs if self.dpo else self.validation_examples).stats
        return {
            "method": self.spec.method,
            "objective": self.spec.objective,
            "dpo": {
                "beta": self.spec.dpo.beta,
                "label_smoothing": self.spec.dpo.label_smoothing,
                "reference": "precomputed log-probabilities"
                if self.spec.method == "full"
                else "base model (adapter off)",
            }
            if self.dpo
            else None,
            "steps": state.step,
            "total_steps": self.plan.total_steps,
            "epochs": self.plan.epoch_progress(state.step),
            "train_loss": sum(tail) / len(tail) if tail else None,
            "train_loss_history": history,
            "eval": None
            if report is None
            else {"base": asdict(report.base), "fine_tuned": asdict(report.fine_tuned)},
            "tokens_seen": state.tokens_seen,
            "train_seconds": round(state.train_seconds, 3),
            "tokens_per_second": state.tokens_seen / state.train_seconds
            if state.train_seconds
            else None,
            "parameters": {"trainable": self.trainable_params, "total": self.total_params},
            "data": {
                "format": self.format,
                "train": train_stats.as_dict(),
                "validation": validation_stats.as_dict(),
            },
            "gradient_checkpointing": self.gradient_checkpointing,
            "packing": self.packing,
            "trained_logits_only": self.trained_logits_only,
            "compute_dtype": str(self.precision.compute_dtype or torch.float32),
            "memory_estimate_bytes": None
            if self.memory_estimate is None
            else self.memory_estimate.per_gpu,
            "peak_memory_bytes": memory,
            "peak_memory_kind": label,
        }

    def publish(self) -> OutputStatus | None:
        """Write the adapter or model, tokenizer, config, metrics, reports; upload; manifest."""
        # fsdp: the trainable weights gathered whole to rank 0 (a collective), as one process
        # would have them.
        gathered = (
            fsdp.full_trainable_state(self.model, self.spec.method)
            if self.strategy == "fsdp"
            else None
        )
        if not self.is_main:
            return None
        self.reporter.report(stage="Publishing")
        spec = self.spec
        out = self.work_dir / "output"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        dtype = original_dtype(self.model_config)
        if spec.method == "full":
            save_full_model(self.unwrapped, out, dtype, state_dict=gathered)
        else:
            save_adapter(self.unwrapped, out, spec.base_model.uri, state_dict=gathered)
        self.tokenizer.save_pretrained(str(out))
        write_json(out / TRAINER_CONFIG_FILE, self.config.model_dump(mode="json", by_alias=True))
        write_json(out / METRICS_FILE, self.metrics_summary())
        if self.eval_report is not None:
            (out / REPORT_JSON).write_text(self.eval_report.to_json(), encoding="utf-8")
            (out / REPORT_MD).write_text(self.eval_report.to_markdown(), encoding="utf-8")
        if spec.output.merge_adapter:
            save_merged(
                self.model_dir,
                out,
                out / MERGED_DIR,
                self.tokenizer,
                dtype=dtype,
                trust_remote_code=spec.base_model.trust_remote_code,
            )
        files = upload_outputs(self.storage, out, spec.output.uri)
        base_uri = spec.output.uri.rstrip("/")
        status = OutputStatus(
            adapter_uri=None if spec.method == "full" else base_uri,
            model_uri=base_uri
            if spec.method == "full"
            else (f"{base_uri}/{MERGED_DIR}" if spec.output.merge_adapter else None),
            files=[f.to_output_file() for f in files],
        )
        history = self.state.loss_history
        self.reporter.report(
            stage="Completed",
            output=status,
            progress=ProgressSnapshot(
                step=self.state.step,
                total_steps=self.plan.total_steps,
                epoch=self.plan.epoch_progress(self.state.step),
                loss=history[-1]["loss"] if history else float("nan"),
                learning_rate=0.0,
                tokens_per_second=0.0,
                eta_seconds=0,
            ).progress(),
            urgent=True,
        )
        return status

    def cleanup(self) -> None:
        self.preemption.uninstall()
        self.reporter.close()
        self.accelerator.end_training()
