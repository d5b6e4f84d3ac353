"""The FineTuneJob API (kubetune.dev/v1alpha1): the single source of truth for spec and status.

The operator generates the CRD's OpenAPI schema from these models (kubetune_operator.crd), the
trainer parses the spec it is handed with them, and both write status through them. Field
descriptions become `kubectl explain` text, so they are written for users.

Cross-field rules exist twice by necessity: as CEL (`x-kubernetes-validations`, enforced by the
API server) and as pydantic validators (enforced when the operator or trainer parses a spec).
Each rule is declared once as a `CelRule` whose message both sides use, next to its validator.

Only pydantic and the standard library may be imported here: the operator image has no torch.
"""

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal, Self, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

Method = Literal["lora", "qlora", "full"]
Objective = Literal["sft", "dpo"]
DatasetFormat = Literal[
    "auto",
    "chat",
    "instruction",
    "prompt-completion",
    "text",
    "preference",
    "prompt-chosen-rejected",
]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]
GradientCheckpointing = Literal["auto", "enabled", "disabled"]
AddressingStyle = Literal["path", "virtual", "auto"]
QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["bfloat16", "float16"]
EvalMetric = Literal["loss", "perplexity", "rougeL", "bleu"]
TolerationOperator = Literal["Exists", "Equal"]
TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]
Phase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Cancelled", "Suspended"]
Stage = Literal[
    "Fetching", "Preparing", "Loading", "Training", "Evaluating", "Publishing", "Completed"
]
ConditionStatus = Literal["True", "False", "Unknown"]

_M = TypeVar("_M", bound=BaseModel)
JsonDict = dict[str, Any]  # a JSON-schema fragment (pydantic's own alias is not exported)


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry; `message` is also the pydantic error text."""

    rule: str
    message: str
    field_path: str | None = None
    reason: str | None = None

    def schema(self) -> JsonDict:
        out: JsonDict = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _validations(*rules: CelRule) -> JsonDict:
    return {"x-kubernetes-validations": [r.schema() for r in rules]}


def _section(factory: type[_M], description: str) -> Any:
    """A nested object that defaults to `{}` so the API server fills in every nested default."""
    return Field(
        default_factory=factory, description=description, json_schema_extra={"default": {}}
    )


# --- String formats. Anchored, and written in the regex subset shared by Go (API server) and Rust
# (pydantic-core): explicit ASCII classes rather than \w or \s, whose Unicode meaning differs.
# Paths have no empty segments ("a//b"): two spellings of one location would slip past the
# overlap rules below, and the trainer could not store both "a/b" and "a//b" as local files.
_PATH = r"(/([^/]+/)*[^/]*)?"
_S3 = rf"s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9]{_PATH}"
_PVC = rf"pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?{_PATH}"
_HF = r"hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
MODEL_URI_PATTERN = f"^({_S3}|{_PVC}|{_HF})$"
DATA_URI_PATTERN = f"^({_S3}|{_PVC})$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A Kubernetes resource.Quantity in its usual spellings: 4, 500m, 1.5, 64Gi, 128M, 1e9.
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
# A subset of Go's time.ParseDuration: hours, minutes, seconds in that order (24h, 90m, 1h30m).
DURATION_PATTERN = r"^([0-9]{1,5}h)?([0-9]{1,7}m)?([0-9]{1,9}s)?$"
_DURATION_PARTS = re.compile(r"([0-9]+)([hms])")
_DURATION_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}

ModelUri = Annotated[str, Field(max_length=2048, pattern=MODEL_URI_PATTERN)]
DataUri = Annotated[str, Field(max_length=2048, pattern=DATA_URI_PATTERN)]
Quantity = Annotated[str, Field(max_length=64, pattern=QUANTITY_PATTERN)]
Name = Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
ShortText = Annotated[str, Field(max_length=1024)]
Prompt = Annotated[str, Field(min_length=1, max_length=16384)]
ModuleName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.*-]+$")]
SecretKey = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
# A label key: an optional DNS-subdomain prefix and "/", then a name of at most 63 characters.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LabelKey = Annotated[str, Field(min_length=1, max_length=317, pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegFloat = Annotated[float, Field(ge=0)]


def duration_seconds(value: str) -> int:
    """Seconds in a duration accepted by DURATION_PATTERN ("1h30m" -> 5400)."""
    return sum(int(n) * _DURATION_UNIT_SECONDS[u] for n, u in _DURATION_PARTS.findall(value))


# Guarded by the pattern so a malformed value gets only the pattern's error, not a CEL
# conversion error as well.
TIMEOUT_POSITIVE = CelRule(
    rule=f"!self.matches('{DURATION_PATTERN}') || duration(self) > duration('0s')",
    message="timeout must be longer than 0s",
)


def _positive_duration(value: str) -> str:
    if duration_seconds(value) == 0:
        raise ValueError(TIMEOUT_POSITIVE.message)
    return value


Duration = Annotated[
    str,
    Field(min_length=2, max_length=32, pattern=DURATION_PATTERN),
    AfterValidator(_positive_duration),
]


def _unique(values: list[str]) -> list[str]:
    # Mirrors x-kubernetes-list-type: set, which the API server enforces.
    duplicates = sorted({v for v in values if values.count(v) > 1})
    if duplicates:
        raise ValueError(f"duplicate entries: {', '.join(duplicates)}")
    return values


class _SpecModel(BaseModel):
    """Base for user-written objects: camelCase, strict types, unknown fields rejected.

    Strict mode mirrors the API server, which rejects "2" where an integer is expected.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )


class _StatusModel(BaseModel):
    """Base for status objects, written by the operator and trainer; tolerant of newer fields."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


# ----------------------------------------------------------------------------------------- spec


class BaseModelSource(_SpecModel):
    """The pretrained model to fine-tune."""

    uri: ModelUri = Field(
        description=(
            "Where the pretrained model (Hugging Face layout: config.json, safetensors weights, "
            "tokenizer files) lives. s3://bucket/prefix reads from the S3-compatible store in "
            "spec.storage; pvc://claim/path reads from a PersistentVolumeClaim mounted read-only; "
            "hf://org/name resolves only from the Hugging Face cache already in the trainer "
            "image or volume: the pod never downloads from the Hub."
        )
    )
    revision: Annotated[str, Field(min_length=1, max_length=255)] | None = Field(
        default=None,
        description=(
            "Branch, tag or commit of an hf:// model to use from the offline cache. "
            "Ignored for s3:// and pvc:// models. Default: the cache's main revision."
        ),
    )
    trust_remote_code: bool = Field(
        default=False,
        description=(
            "Run Python code shipped with the model (custom architectures). Default false: "
            "enable only for models you trust, since the code runs inside the training pod "
            "with its storage credentials."
        ),
    )
    tokenizer_uri: ModelUri | None = Field(
        default=None,
        description=(
            "Load the tokenizer from here instead of from uri (same schemes as uri). "
            "Default: the tokenizer stored with the model."
        ),
    )


VALIDATION_URI_DIFFERS = CelRule(
    rule="!has(self.validationUri) || self.validationUri != self.trainUri",
    message=(
        "dataset.validationUri must differ from dataset.trainUri: evaluating on the training "
        "data hides overfitting"
    ),
    field_path=".validationUri",
)


class DatasetSource(_SpecModel):
    """Training data and how to read it."""

    model_config = ConfigDict(json_schema_extra=_validations(VALIDATION_URI_DIFFERS))

    train_uri: DataUri = Field(
        description=(
            "Training data: one file or a prefix/directory of files (JSON Lines, JSON or "
            "Parquet, chosen by file extension), as s3://bucket/key or pvc://claim/path."
        )
    )
    validation_uri: DataUri | None = Field(
        default=None,
        description=(
            "Held-out validation data in the same formats. When unset, validationSplit of the "
            "training data is held out instead."
        ),
    )
    validation_split: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description=(
            "Fraction of the training records held out for validation when validationUri is "
            "unset (default 0.05). 0 disables validation, and with it eval loss, perplexity and "
            "early problem detection; larger values leave less data to train on."
        ),
    )
    format: DatasetFormat = Field(
        default="auto",
        description=(
            "Record layout. chat: a messages list of {role, content}, rendered with the model's "
            "chat template, training on the assistant messages; instruction: instruction, "
            "optional input and output, training on output; prompt-completion: prompt and "
            "completion, training on completion; text: a text field, trained on in full. "
            "Preference pairs (objective dpo): preference, the hosted fine-tuning API's layout "
            "(input.messages, preferred_output and non_preferred_output, each one assistant "
            "message); prompt-chosen-rejected: prompt, chosen and rejected, as plain strings or "
            "as message lists rendered with the chat template. auto (default) detects the "
            "format from the first valid record; every record must then have that format."
        ),
    )
    max_seq_length: int = Field(
        default=2048,
        ge=16,
        le=131072,
        description=(
            "Longest sequence in tokens; longer records are truncated (default 2048). With "
            "objective dpo a prompt with its chosen or its rejected answer must fit: longer pairs "
            "are skipped (never truncated, which would bias the preference) and counted in the "
            "logs and metrics.json. Memory use grows with it: raise it only as far as your "
            "data needs."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.validation_uri is not None and self.validation_uri == self.train_uri:
            raise ValueError(VALIDATION_URI_DIFFERS.message)
        return self


ALL_LINEAR_ALONE = CelRule(
    rule="!self.exists(m, m == 'all-linear') || size(self) == 1",
    message=(
        "lora.targetModules: 'all-linear' already selects every linear layer and must be the "
        "only entry"
    ),
)


def _all_linear_alone(modules: list[str]) -> list[str]:
    if "all-linear" in modules and len(modules) > 1:
        raise ValueError(ALL_LINEAR_ALONE.message)
    return modules


TargetModules = Annotated[
    list[ModuleName], AfterValidator(_unique), AfterValidator(_all_linear_alone)
]


class LoraConfig(_SpecModel):
    """Low-rank adapter settings, used by method lora and qlora."""

    r: int = Field(
        default=16,
        ge=1,
        le=1024,
        description=(
            "Adapter rank (default 16). Higher ranks can learn more but train more parameters "
            "and use more memory; 8-64 covers most tasks."
        ),
    )
    alpha: int = Field(
        default=32,
        ge=1,
        le=4096,
        description=(
            "Scaling numerator: the adapter's update is scaled by alpha/r (default 32, i.e. 2x "
            "at r=16). Raise it together with r to keep the effective step size."
        ),
    )
    dropout: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description=(
            "Dropout on the adapter input during training (default 0.05). Higher values "
            "regularize small datasets at the cost of slower convergence."
        ),
    )
    target_modules: TargetModules = Field(
        default=["all-linear"],
        min_length=1,
        max_length=64,
        description=(
            "Module names (or name suffixes such as q_proj, v_proj) that get adapters. "
            "all-linear (default) adapts every linear layer except the output head, which "
            "usually trains best; naming fewer modules trains fewer parameters. all-linear "
            "must be the only entry when used."
        ),
        json_schema_extra={
            "x-kubernetes-list-type": "set",
            **_validations(ALL_LINEAR_ALONE),
        },
    )


class QuantizationConfig(_SpecModel):
    """How the frozen base model is quantized; used by method qlora only."""

    bits: Literal[4] = Field(
        default=4,
        description="Bits per base-model weight. Only 4 (QLoRA) is supported.",
    )
    quant_type: QuantType = Field(
        default="nf4",
        description=(
            "4-bit data type: nf4 (default, NormalFloat, matches normally distributed weights "
            "and usually loses less quality) or fp4."
        ),
    )
    double_quant: bool = Field(
        default=True,
        description=(
            "Also quantize the quantization constants (default true): saves about 0.4 bits per "
            "weight at a small compute cost."
        ),
    )
    compute_dtype: ComputeDtype = Field(
        default="bfloat16",
        description=(
            "Data type the dequantized weights are computed in: bfloat16 (default; Ampere or "
            "newer GPUs) or float16 (older GPUs, with a higher risk of overflow)."
        ),
    )


class DpoConfig(_SpecModel):
    """Direct Preference Optimization settings, used by objective dpo only."""

    beta: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description=(
            "Strength of the pull towards the reference model (default 0.1): the implicit "
            "reward of an answer is beta x its log-probability gain over the reference. Lower "
            "values let the model move further from the reference; 0.1-0.5 is typical."
        ),
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        # Inclusive, as TRL's range: with an exclusive 0.5 the API server refuses the CRD (it
        # compares the integer default 0 with int(0.5); see crd._check_default_against_bounds).
        le=0.5,
        description=(
            "Assumed share of pairs whose preference label is wrong (conservative DPO; default "
            "0). Between 0 and 0.5: a little smoothing, such as 0.1, keeps noisy labels from "
            "pushing the rewards apart without limit."
        ),
    )


class Hyperparameters(_SpecModel):
    """Optimizer and schedule settings."""

    epochs: float = Field(
        default=3.0,
        gt=0,
        le=1000,
        description=(
            "Passes over the training data (default 3; fractions allowed). Ignored when "
            "maxSteps is set. Too many epochs on a small dataset overfits: watch evalLoss."
        ),
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Stop after this many optimizer steps; overrides epochs. Default: unset, epochs decide."
        ),
    )
    learning_rate: float = Field(
        default=2e-4,
        gt=0,
        le=1,
        description=(
            "Peak learning rate (default 2e-4, suited to LoRA/QLoRA). Full fine-tuning usually "
            "needs 10-100x less, for example 1e-5; DPO on a pretrained model less still (about "
            "5e-6 for LoRA, 5e-7 for full)."
        ),
    )
    batch_size: int = Field(
        default=4,
        ge=1,
        le=1024,
        description=(
            "Rows per GPU per forward pass (micro-batch; default 4). With packing on, a row "
            "holds several records packed up to maxSeqLength tokens; with packing off, one "
            "record padded to the longest in the batch. With objective dpo a row holds "
            "preference pairs instead (both answers of a pair, up to 2 x maxSeqLength tokens "
            "packed; one pair unpacked). Lower it if the job runs out of GPU memory and raise "
            "gradientAccumulationSteps to keep the effective batch."
        ),
    )
    gradient_accumulation_steps: int = Field(
        default=4,
        ge=1,
        le=1024,
        description=(
            "Micro-batches accumulated per optimizer step (default 4). Effective batch = "
            "batchSize x gradientAccumulationSteps x GPUs."
        ),
    )
    warmup_ratio: float = Field(
        default=0.03,
        ge=0,
        le=0.5,
        description=(
            "Fraction of the steps over which the learning rate ramps up from 0 (default 0.03)."
        ),
    )
    scheduler: Scheduler = Field(
        default="cosine",
        description=(
            "Learning-rate schedule after warmup: cosine (default) or linear decay to 0, "
            "constant (no warmup), or constant_with_warmup."
        ),
    )
    weight_decay: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="AdamW weight decay (default 0). Small values such as 0.01 regularize.",
    )
    seed: int = Field(
        default=42,
        ge=0,
        le=4294967295,
        description=(
            "Random seed for data shuffling, the validation split and weight initialization "
            "(default 42). Same seed and inputs give the same split."
        ),
    )
    packing: bool = Field(
        default=True,
        description=(
            "Pack several short sequences into each batch row without padding (default true). "
            "Attention stays within each sequence, so results match unpacked training while "
            "wasting no compute on padding. A model that cannot keep packed sequences apart "
            "(checked when it loads) trains unpacked, with a warning. Disable only to debug."
        ),
    )
    gradient_checkpointing: GradientCheckpointing = Field(
        default="auto",
        description=(
            "Recompute activations in the backward pass instead of storing them: saves much "
            "memory for about 20-30% more compute. auto (default) enables it when the memory "
            "estimate says the job would not fit otherwise."
        ),
    )


class OutputTarget(_SpecModel):
    """Where the result is written."""

    uri: DataUri = Field(
        description=(
            "Destination prefix (s3://bucket/prefix or pvc://claim/path) for the adapter "
            "(lora, qlora) or the full weights (full), plus tokenizer, training metrics and a "
            "manifest with checksums. It belongs to this FineTuneJob: a job refuses a prefix "
            "that holds files it did not write (another job's output or checkpoints, or "
            "anything else) unless overwrite is true, and resumes only from its own "
            "checkpoints. It must not equal, contain or lie inside the base model's or the "
            "datasets' locations."
        )
    )
    overwrite: bool = Field(
        default=False,
        description=(
            "When uri already holds files this FineTuneJob did not write (for example the "
            "output of an earlier FineTuneJob of the same name), delete them before training "
            "instead of failing with reason OutputExists. Default false: nothing is ever "
            "overwritten silently."
        ),
    )
    merge_adapter: bool = Field(
        default=False,
        description=(
            "Also write the base model with the adapter merged in (lora, qlora), ready to "
            "serve without PEFT, under <uri>/merged. Default false: the merged copy is as "
            "large as the base model. Not valid with method full."
        ),
    )


class SecretKeySelector(_SpecModel):
    """A Secret in the job's namespace holding S3 credentials."""

    name: Name = Field(description="Name of the Secret, in the FineTuneJob's namespace.")
    access_key_id_key: SecretKey = Field(
        default="AWS_ACCESS_KEY_ID",
        description="Key in the Secret that holds the access key ID (default AWS_ACCESS_KEY_ID).",
    )
    secret_access_key_key: SecretKey = Field(
        default="AWS_SECRET_ACCESS_KEY",
        description=(
            "Key in the Secret that holds the secret access key (default AWS_SECRET_ACCESS_KEY)."
        ),
    )


ENDPOINT_PATTERN = r"^https?://[^/ ]+(/.*)?$"
# An endpoint is quoted in messages, logs and Events: credentials in it would leak there.
ENDPOINT_WITHOUT_CREDENTIALS = CelRule(
    rule=r"!self.matches('^https?://[^/]*@')",
    message=(
        "storage.endpoint must not carry credentials (user:password@host): put them in the "
        "Secret named by storage.credentialsSecretRef"
    ),
)


def _endpoint_without_credentials(endpoint: str) -> str:
    if re.match(r"^https?://[^/]*@", endpoint):
        raise ValueError(ENDPOINT_WITHOUT_CREDENTIALS.message)
    return endpoint


Endpoint = Annotated[
    str,
    Field(max_length=2048, pattern=ENDPOINT_PATTERN),
    AfterValidator(_endpoint_without_credentials),
]


class StorageConfig(_SpecModel):
    """How to reach the S3-compatible object store used by s3:// URIs."""

    endpoint: Endpoint | None = Field(
        default=None,
        description=(
            "URL of the S3-compatible endpoint, for example http://minio.storage:9000, without "
            "credentials. When unset the operator's configured default endpoint applies."
        ),
        json_schema_extra=_validations(ENDPOINT_WITHOUT_CREDENTIALS),
    )
    retry_timeout: Duration = Field(
        default="2m",
        description=(
            "How long an unreachable, failing (5xx) or throttling store is retried, with "
            "backoff, before the attempt fails with reason StorageUnreachable (default 2m); the "
            "pod is then retried up to maxRetries times. Access denied and missing objects "
            "fail at once: retrying cannot fix them."
        ),
        json_schema_extra=_validations(TIMEOUT_POSITIVE),
    )
    region: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default="us-east-1",
        description="Region sent with requests (default us-east-1, which most S3-compatible "
        "stores accept).",
    )
    addressing_style: AddressingStyle = Field(
        default="path",
        description=(
            "path (default): https://endpoint/bucket/key, which self-hosted stores such as "
            "MinIO need; virtual: https://bucket.endpoint/key, as AWS prefers; auto lets the "
            "client choose."
        ),
    )
    credentials_secret_ref: SecretKeySelector | None = Field(
        default=None,
        description=(
            "Secret with the access keys. The operator never reads it: the keys reach the "
            "training pod as secretKeyRef environment variables. When unset the pod uses "
            "ambient credentials (for example workload identity) or anonymous access."
        ),
    )


TOLERATION_EXISTS_NO_VALUE = CelRule(
    rule="self.operator != 'Exists' || !has(self.value) || self.value == ''",
    message="toleration value must be empty when operator is Exists",
    field_path=".value",
)
TOLERATION_EMPTY_KEY_EXISTS = CelRule(
    rule="(has(self.key) && self.key != '') || self.operator == 'Exists'",
    message="toleration operator must be Exists when key is empty (it then matches every taint)",
    field_path=".operator",
)
TOLERATION_SECONDS_NO_EXECUTE = CelRule(
    rule="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
    message="toleration tolerationSeconds requires effect NoExecute",
    field_path=".tolerationSeconds",
)


class Toleration(_SpecModel):
    """A Kubernetes toleration for the training pod (same fields as in a Pod spec)."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            TOLERATION_EXISTS_NO_VALUE, TOLERATION_EMPTY_KEY_EXISTS, TOLERATION_SECONDS_NO_EXECUTE
        )
    )

    key: LabelKey | None = Field(
        default=None,
        description="Taint key to tolerate; empty with operator Exists tolerates every taint.",
    )
    operator: TolerationOperator = Field(
        default="Equal",
        description="Equal (default): key and value must match; Exists: any value matches.",
    )
    value: LabelValue | None = Field(
        default=None, description="Taint value to match with operator Equal."
    )
    effect: TaintEffect | None = Field(
        default=None,
        description="Taint effect to tolerate; unset tolerates all effects.",
    )
    toleration_seconds: int | None = Field(
        default=None,
        description=(
            "With effect NoExecute: how long the pod stays bound after the taint appears. "
            "Unset: forever."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.operator == "Exists" and self.value:
            raise ValueError(TOLERATION_EXISTS_NO_VALUE.message)
        if not self.key and self.operator != "Exists":
            raise ValueError(TOLERATION_EMPTY_KEY_EXISTS.message)
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(TOLERATION_SECONDS_NO_EXECUTE.message)
        return self


PROCESSES_PER_GPU = CelRule(
    rule="!has(self.processesPerNode) || self.gpus == 0 || self.processesPerNode == self.gpus",
    message=(
        "resources.processesPerNode must equal resources.gpus when the pods have GPUs: one "
        "trainer process per GPU"
    ),
    field_path=".processesPerNode",
)
LABEL_KEYS_VALID = CelRule(
    rule=f"self.all(k, k.matches(r'{LABEL_KEY_PATTERN}'))",
    message=(
        "nodeSelector keys must be label keys: an optional DNS-subdomain prefix and '/', then "
        "at most 63 characters (letters, digits, '-', '_', '.'), starting and ending "
        "alphanumeric"
    ),
)


def _label_keys(selector: dict[str, str]) -> dict[str, str]:
    # The map's keys: pydantic's key pattern would not reach the CRD (no propertyNames in a
    # structural schema), so the rule is CEL there and this check here.
    bad = sorted(k for k in selector if len(k) > 317 or not re.fullmatch(LABEL_KEY_PATTERN, k))
    if bad:
        raise ValueError(f"{LABEL_KEYS_VALID.message} (got {', '.join(map(repr, bad))})")
    return selector


NodeSelector = Annotated[dict[str, LabelValue], AfterValidator(_label_keys)]


class ComputeResources(_SpecModel):
    """Accelerators, CPU, memory and placement of the training pods."""

    model_config = ConfigDict(json_schema_extra=_validations(PROCESSES_PER_GPU))

    gpus: int = Field(
        default=1,
        ge=0,
        le=16,
        description=(
            "GPUs per training pod, all on one node (default 1). 0 trains on CPU, which only "
            "suits tiny models and smoke tests. More than 1 trains data-parallel."
        ),
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Training pods, one per node, trained as one data-parallel gang (default 1): an "
            "Indexed Job with a headless Service, torchrun on each pod, a rendezvous on the "
            "first. Every pod gets gpus, cpu and memory; if one fails, the whole gang restarts "
            "from the last checkpoint."
        ),
    )
    processes_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "Trainer processes per pod. Default: one per GPU, or 1 on CPU. More than one on CPU "
            "(data-parallel over gloo) is for tests and debugging."
        ),
    )
    gpu_resource_name: Annotated[
        str,
        Field(
            max_length=317,
            pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        ),
    ] = Field(
        default="nvidia.com/gpu",
        description=(
            "Extended resource name the GPUs are requested as (default nvidia.com/gpu; for "
            "example nvidia.com/mig-3g.40gb for a MIG slice)."
        ),
    )
    cpu: Quantity | None = Field(
        default=None,
        description=(
            "CPU request of the training container (Kubernetes quantity such as 8 or 3500m). "
            "No CPU limit is set, so data loading can use idle cores. Unset: the namespace "
            "default."
        ),
    )
    memory: Quantity | None = Field(
        default=None,
        description=(
            "Memory request and limit of the training container (quantity such as 64Gi). Size "
            "it for loading the model and dataset in host memory; exceeding it kills the pod. "
            "Unset: the namespace default."
        ),
    )
    node_selector: NodeSelector = Field(
        default={},
        max_length=64,
        description=(
            "Node labels the training pod must be scheduled on (default none). Keys and values "
            "must be valid label keys and values."
        ),
        json_schema_extra=_validations(LABEL_KEYS_VALID),
    )
    tolerations: list[Toleration] = Field(
        default=[],
        max_length=32,
        description="Taints the training pod tolerates, for example those on GPU nodes.",
    )
    priority_class_name: Name | None = Field(
        default=None,
        description="PriorityClass of the training pod. Unset: the cluster default.",
    )

    def processes(self) -> int:
        """Trainer processes per pod: processesPerNode, else one per GPU (1 on CPU)."""
        return self.processes_per_node or max(self.gpus, 1)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (
            self.processes_per_node is not None
            and self.gpus
            and self.processes_per_node != self.gpus
        ):
            raise ValueError(PROCESSES_PER_GPU.message)
        return self

    scratch_size: Quantity = Field(
        default="200Gi",
        description=(
            "Size limit of the pod's scratch volume at /workspace, which holds the downloaded "
            "model and data, checkpoints before upload and the outputs (default 200Gi: a 70B "
            "model in 16 bits and its checkpoint). A pod that writes more is evicted."
        ),
    )


SAMPLES_FOR_TEXT_METRICS = CelRule(
    rule=(
        "(has(self.enabled) && !self.enabled) || !has(self.metrics) || "
        "!self.metrics.exists(m, m == 'rougeL' || m == 'bleu') || "
        "!has(self.sampleSize) || self.sampleSize > 0"
    ),
    message=(
        "evaluation.sampleSize must be at least 1 when evaluation.metrics includes rougeL or "
        "bleu: they score generated answers to validation prompts"
    ),
    field_path=".sampleSize",
)

EvalMetrics = Annotated[list[EvalMetric], AfterValidator(_unique)]


class EvaluationConfig(_SpecModel):
    """Evaluation of the base model and the fine-tuned model after training."""

    model_config = ConfigDict(json_schema_extra=_validations(SAMPLES_FOR_TEXT_METRICS))

    enabled: bool = Field(
        default=True,
        description=(
            "Evaluate after training (default true). Costs a pass over the validation data and "
            "some generation; the base model is evaluated too, so the gain is visible in status."
        ),
    )
    prompts: list[Prompt] = Field(
        default=[],
        max_length=32,
        description=(
            "Extra prompts (at most 32) to generate answers for with the fine-tuned model; the "
            "answers are written next to the output for inspection."
        ),
    )
    sample_size: int = Field(
        default=8,
        ge=0,
        le=256,
        description=(
            "Validation records whose prompts get generated answers, scored by rougeL and bleu "
            "(default 8). More samples give steadier scores but take longer."
        ),
    )
    max_new_tokens: int = Field(
        default=128,
        ge=1,
        le=8192,
        description="Longest generated answer in tokens (default 128).",
    )
    metrics: EvalMetrics = Field(
        default=["loss", "perplexity", "rougeL", "bleu"],
        max_length=4,
        description=(
            "Metrics to report: loss and perplexity on the validation data, rougeL and bleu on "
            "generated answers (default all four)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        text_metrics = {"rougeL", "bleu"} & set(self.metrics)
        if self.enabled and text_metrics and self.sample_size == 0:
            raise ValueError(SAMPLES_FOR_TEXT_METRICS.message)
        return self


class CheckpointingConfig(_SpecModel):
    """Intermediate checkpoints, which let a retried pod resume instead of starting over."""

    interval_steps: int | None = Field(
        default=None,
        ge=1,
        description="Save a checkpoint every this many optimizer steps. Default: unset.",
    )
    interval_minutes: int = Field(
        default=30,
        ge=0,
        le=10080,
        description=(
            "Also save a checkpoint when this many minutes passed since the last one (default "
            "30; 0 disables time-based checkpoints). Each save pauses training briefly."
        ),
    )
    keep: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Newest checkpoints kept; older ones are deleted (default 2).",
    )
    grace_period_seconds: int = Field(
        default=120,
        ge=10,
        le=86400,
        description=(
            "Seconds a stopping training pod (suspend, preemption, node drain) gets to save a "
            "checkpoint before it is killed: the pod's terminationGracePeriodSeconds (default "
            "120). Raise it for large full fine-tuning states or slow object stores."
        ),
    )


class DistributedConfig(_SpecModel):
    """How a job with several trainer processes (resources.gpus > 1 or nodes > 1) splits the
    work."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description=(
            "auto (default): fsdp when the memory estimate of a whole model replica with its "
            "gradients and optimizer state exceeds one GPU's memory (on CPU: the pod's memory "
            "limit shared by its processes; none known: ddp), else ddp. ddp: every process "
            "holds the whole model and averages gradients (fastest when it fits). fsdp: "
            "parameters, gradients and optimizer state are sharded over all processes "
            "(PyTorch FSDP2), one decoder layer gathered at a time; checkpoints are sharded "
            "and resume on any number of processes. Not for method qlora (4-bit weights cannot "
            "be sharded). One process trains alone whatever this says."
        ),
    )


class ServingConfig(_SpecModel):
    """Serve the result with vLLM once the job has succeeded (docs/serving.md)."""

    enabled: bool = Field(
        default=False,
        description=(
            "Serve the fine-tuned model once the job has Succeeded (default false): a LoRA or "
            "QLoRA adapter is loaded at run time into the namespace's vLLM server for the same "
            "base model (started when none runs; shared by all its adapters); a full "
            "fine-tune gets a server of its own. status.serving says where and under which "
            "model name, or why not. Can change at any time."
        ),
    )
    promotion_gate: Literal["none", "evalLoss"] = Field(
        default="none",
        description=(
            "none (default): serve whenever the job succeeded. evalLoss: serve only if the "
            "fine-tuned model's validation loss is below the base model's (needs evaluation "
            "with the loss metric); otherwise status.serving says it was not promoted."
        ),
    )


PREFERENCE_FORMATS: Final = ("preference", "prompt-chosen-rejected")
_PREFERENCE_LIST = "[" + ", ".join(f"'{f}'" for f in PREFERENCE_FORMATS) + "]"
OBJECTIVE_MATCHES_FORMAT = CelRule(
    rule=(
        f"self.objective == 'dpo' ? self.dataset.format in ['auto', "
        f"{_PREFERENCE_LIST[1:-1]}] : !(self.dataset.format in {_PREFERENCE_LIST})"
    ),
    message=(
        "dataset.format must be a preference format (preference, prompt-chosen-rejected or "
        "auto) with objective dpo, and must not be one with objective sft"
    ),
    field_path=".dataset.format",
)
MERGE_NEEDS_ADAPTER = CelRule(
    rule="self.method != 'full' || !self.output.mergeAdapter",
    message="output.mergeAdapter must be false for method full: there is no adapter to merge",
    field_path=".output.mergeAdapter",
)

FSDP_NEEDS_UNQUANTIZED = CelRule(
    rule=(
        "self.method != 'qlora' || !has(self.distributed) || !has(self.distributed.strategy) "
        "|| self.distributed.strategy != 'fsdp'"
    ),
    message=(
        "distributed.strategy fsdp does not support method qlora (4-bit weights cannot be "
        "sharded): use strategy ddp or auto, or method lora"
    ),
    field_path=".distributed.strategy",
)


def as_directory(uri: str) -> str:
    """A location as a directory prefix: "s3://b/x" and "s3://b/x/" name the same place."""
    return uri if uri.endswith("/") else uri + "/"


def locations_overlap(a: str, b: str) -> bool:
    """Whether one location equals or contains the other. Locations are object prefixes, so
    s3://b/x contains s3://b/x/y but not s3://b/x-old (URIs have no empty path segments)."""
    a, b = as_directory(a), as_directory(b)
    return a.startswith(b) or b.startswith(a)


def _cel_directory(expr: str) -> str:
    return f"({expr}.endsWith('/') ? {expr} : {expr} + '/')"


# The inputs the output must stay clear of: (CEL path below spec, required).
OUTPUT_CLEAR_OF: Final = (
    ("baseModel.uri", True),
    ("baseModel.tokenizerUri", False),
    ("dataset.trainUri", True),
    ("dataset.validationUri", False),
)


def _output_clear_of(path: str, required: bool) -> CelRule:
    # Each URI is read once and bound by a one-element comprehension (CRD rules have no
    # cel.bind): every field access below spec costs the API server a copy of spec's whole
    # property list (apiextensions-apiserver's Structural.Properties), eight per rule before.
    out, inp = _cel_directory("o"), _cel_directory("i")
    overlap = f"{out}.startsWith({inp}) || {inp}.startsWith({out})"
    guard = "" if required else f"!has(self.{path}) || "
    return CelRule(
        rule=f"{guard}[self.output.uri].all(o, [self.{path}].all(i, !({overlap})))",
        message=(
            f"output.uri must not equal, contain or lie inside {path}: the job would write its "
            "outputs over or among its inputs"
        ),
        field_path=".output.uri",
    )


OUTPUT_CLEAR_OF_INPUTS: Final = tuple(_output_clear_of(p, r) for p, r in OUTPUT_CLEAR_OF)
CANCEL_IS_FINAL = CelRule(
    rule="!oldSelf.cancel || self.cancel",
    message=(
        "cancel cannot be set back to false: a cancelled FineTuneJob stays cancelled; create a "
        "new FineTuneJob to train again"
    ),
    field_path=".cancel",
)


class FineTuneSpec(_SpecModel):
    """The desired fine-tuning run."""

    model_config = ConfigDict(
        json_schema_extra=_validations(
            OBJECTIVE_MATCHES_FORMAT,
            MERGE_NEEDS_ADAPTER,
            FSDP_NEEDS_UNQUANTIZED,
            *OUTPUT_CLEAR_OF_INPUTS,
            CANCEL_IS_FINAL,
        )
    )

    base_model: BaseModelSource = Field(description="The pretrained model to fine-tune.")
    dataset: DatasetSource = Field(description="Training and validation data.")
    method: Method = Field(
        default="lora",
        description=(
            "lora (default): train small low-rank adapters on a frozen 16-bit model. qlora: the "
            "same on a 4-bit quantized model (bitsandbytes NF4/FP4), using about a third of the "
            "GPU memory, somewhat slower; also trains on CPU (resources.gpus 0). full: train all "
            "weights; best quality headroom but needs several times the memory and writes a "
            "full model. Independent of objective: each method trains sft or dpo."
        ),
    )
    objective: Objective = Field(
        default="sft",
        description=(
            "What the model learns. sft (default): supervised fine-tuning, to reproduce the "
            "answers of chat, instruction, prompt-completion or text records. dpo: Direct "
            "Preference Optimization on preference pairs (formats preference and "
            "prompt-chosen-rejected): to prefer the chosen answer over the rejected one, "
            "relative to a reference model (settings in dpo). The reference is the base model: "
            "for lora and qlora the same weights with the adapter switched off (no second "
            "copy in memory); for full, whose weights change, the reference log-probabilities "
            "of every pair are computed once before the first step and kept with the "
            "checkpoints."
        ),
    )
    lora: LoraConfig = _section(LoraConfig, "Adapter settings for method lora and qlora.")
    quantization: QuantizationConfig = _section(
        QuantizationConfig, "Quantization of the base model for method qlora."
    )
    dpo: DpoConfig = _section(DpoConfig, "Preference optimization settings for objective dpo.")
    hyperparameters: Hyperparameters = _section(
        Hyperparameters, "Optimizer and schedule; the defaults suit LoRA on a few thousand records."
    )
    output: OutputTarget = Field(description="Where the trained adapter or model is written.")
    storage: StorageConfig = _section(
        StorageConfig, "Connection to the S3-compatible store used by every s3:// URI."
    )
    resources: ComputeResources = _section(
        ComputeResources, "GPUs, CPU, memory and scheduling of the training pod."
    )
    image: Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^ ]+$")] | None = Field(
        default=None,
        description="Trainer container image. Unset: the image the operator is configured with.",
    )
    evaluation: EvaluationConfig = _section(
        EvaluationConfig, "Evaluation of the base and fine-tuned models after training."
    )
    checkpointing: CheckpointingConfig = _section(
        CheckpointingConfig, "Intermediate checkpoints for resuming after a pod failure."
    )
    distributed: DistributedConfig = _section(
        DistributedConfig, "How several trainer processes share the model: ddp or fsdp."
    )
    serving: ServingConfig = _section(
        ServingConfig, "Serving the fine-tuned model with vLLM once the job has succeeded."
    )
    cancel: bool = Field(
        default=False,
        description=(
            "Cancel the job (default false): its training pod is stopped and the job ends in "
            "phase Cancelled, keeping its status and whatever it published. Cannot be set back "
            "to false. Unlike deleting the FineTuneJob, the record stays."
        ),
    )
    suspend: bool = Field(
        default=False,
        description=(
            "Suspend the job (default false): its pod is deleted and it resumes from the last "
            "checkpoint when set back to false. Can change at any time. With queueName, the "
            "job's Kueue Workload is deactivated instead (freeing its quota) and queues again "
            "when resumed."
        ),
    )
    max_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description=(
            "Times a failed training pod is retried, resuming from the last checkpoint "
            "(default 2). Can change at any time."
        ),
    )
    timeout: Duration | None = Field(
        default=None,
        description=(
            "Fail the job when it has run this long, as hours, minutes and seconds such as "
            "24h, 90m or 1h30m. Unset: no limit. Can change at any time."
        ),
        json_schema_extra=_validations(TIMEOUT_POSITIVE),
    )
    queue_name: Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN)] | None = Field(
        default=None,
        description=(
            "Kueue LocalQueue to admit the job through, set as the kueue.x-k8s.io/queue-name "
            "label on the training Job. Unset: the job starts without queueing."
        ),
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        preference = self.dataset.format in PREFERENCE_FORMATS
        if (self.objective == "dpo" and not preference and self.dataset.format != "auto") or (
            self.objective == "sft" and preference
        ):
            raise ValueError(OBJECTIVE_MATCHES_FORMAT.message)
        if self.method == "full" and self.output.merge_adapter:
            raise ValueError(MERGE_NEEDS_ADAPTER.message)
        if self.method == "qlora" and self.distributed.strategy == "fsdp":
            raise ValueError(FSDP_NEEDS_UNQUANTIZED.message)
        inputs = {
            "baseModel.uri": self.base_model.uri,
            "baseModel.tokenizerUri": self.base_model.tokenizer_uri,
            "dataset.trainUri": self.dataset.train_uri,
            "dataset.validationUri": self.dataset.validation_uri,
        }
        for (path, _), rule in zip(OUTPUT_CLEAR_OF, OUTPUT_CLEAR_OF_INPUTS, strict=True):
            location = inputs[path]
            if location is not None and locations_overlap(self.output.uri, location):
                raise ValueError(rule.message)
        return self

    def timeout_seconds(self) -> int | None:
        """The timeout in seconds (for the Job's activeDeadlineSeconds), or None."""
        return None if self.timeout is None else duration_seconds(self.timeout)


# --------------------------------------------------------------------------------------- status


class Condition(_StatusModel):
    """A standard Kubernetes condition (the metav1.Condition shape)."""

    type: Annotated[
        str,
        Field(
            max_length=316,
            pattern=(
                r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
            ),
        ),
    ] = Field(description="Condition type in CamelCase, such as Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: NonNegInt | None = Field(
        default=None, description="metadata.generation the condition was computed for."
    )
    last_transition_time: datetime = Field(description="When status last changed.")
    reason: Annotated[
        str,
        Field(min_length=1, max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"),
    ] = Field(description="Machine-readable CamelCase reason for the last transition.")
    message: Annotated[str, Field(max_length=32768)] = Field(
        description="Human-readable details of the last transition; may be empty."
    )


class Progress(_StatusModel):
    """Training progress, reported by the trainer."""

    epoch: NonNegFloat | None = Field(default=None, description="Current epoch, fractional.")
    step: NonNegInt | None = Field(default=None, description="Optimizer steps completed.")
    total_steps: NonNegInt | None = Field(default=None, description="Optimizer steps planned.")
    percent: float | None = Field(
        default=None, ge=0, le=100, description="Share of the planned steps done, 0-100."
    )
    eta_seconds: NonNegInt | None = Field(
        default=None, description="Estimated seconds until training finishes."
    )
    update_time: datetime | None = Field(
        default=None, description="When the trainer last reported progress."
    )


class TrainingMetrics(_StatusModel):
    """Latest training metrics and the evaluation results."""

    train_loss: float | None = Field(
        default=None, description="Training loss, averaged over the latest logging window."
    )
    eval_loss: float | None = Field(
        default=None,
        description=(
            "Validation loss of the fine-tuned model (with objective dpo the DPO loss on the "
            "held-out pairs, whose base value is ln 2)."
        ),
    )
    perplexity: NonNegFloat | None = Field(
        default=None, description="Validation perplexity of the fine-tuned model."
    )
    base_eval_loss: float | None = Field(
        default=None, description="Validation loss of the base model, for comparison."
    )
    base_perplexity: NonNegFloat | None = Field(
        default=None, description="Validation perplexity of the base model, for comparison."
    )
    rouge_l: NonNegFloat | None = Field(
        default=None, description="ROUGE-L F1 of generated answers against references, 0-1."
    )
    bleu: NonNegFloat | None = Field(
        default=None, description="BLEU of generated answers against references, 0-100."
    )
    reward_chosen: float | None = Field(
        default=None,
        description=(
            "DPO: mean implicit reward of the chosen answers (beta x log-probability gain over "
            "the reference), over the latest logging window."
        ),
    )
    reward_rejected: float | None = Field(
        default=None,
        description="DPO: mean implicit reward of the rejected answers, latest logging window.",
    )
    reward_margin: float | None = Field(
        default=None,
        description="DPO: mean reward of chosen minus rejected answers, latest logging window.",
    )
    reward_accuracy: NonNegFloat | None = Field(
        default=None,
        description=(
            "DPO: share of training pairs whose chosen answer has the higher reward, latest "
            "logging window, 0-1."
        ),
    )
    preference_accuracy: NonNegFloat | None = Field(
        default=None,
        description=(
            "DPO: share of held-out pairs to which the fine-tuned model gives the chosen answer "
            "a higher log-probability than the rejected one, 0-1."
        ),
    )
    base_preference_accuracy: NonNegFloat | None = Field(
        default=None,
        description="DPO: the same share for the base model, for comparison.",
    )
    eval_reward_accuracy: NonNegFloat | None = Field(
        default=None,
        description=(
            "DPO: share of held-out pairs whose chosen answer has the higher implicit reward "
            "(the fine-tuned model moved the pair the right way, relative to the base), 0-1."
        ),
    )
    eval_reward_margin: float | None = Field(
        default=None,
        description="DPO: mean reward margin (chosen minus rejected) on the held-out pairs.",
    )
    learning_rate: NonNegFloat | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: NonNegFloat | None = Field(
        default=None, description="Training throughput over all GPUs, in tokens per second."
    )
    peak_gpu_memory_bytes: NonNegInt | None = Field(
        default=None, description="Peak GPU memory allocated on any GPU, in bytes."
    )


class ParameterCounts(_StatusModel):
    """Model size."""

    trainable: NonNegInt | None = Field(default=None, description="Trainable parameters.")
    total: NonNegInt | None = Field(default=None, description="All parameters of the model.")


class MemoryEstimate(_StatusModel):
    """The operator's GPU memory estimate, made before the pod starts."""

    gpu_memory_bytes: NonNegInt | None = Field(
        default=None, description="Estimated GPU memory for the whole job, in bytes."
    )
    per_gpu: NonNegInt | None = Field(
        default=None, description="Estimated GPU memory per GPU, in bytes."
    )
    basis: ShortText | None = Field(
        default=None,
        description="What the estimate assumed, such as parameter count, dtype and batch shape.",
    )


class DistributedStatus(_StatusModel):
    """How the run is spread over pods and processes, as the trainer found it."""

    nodes: PosInt | None = Field(default=None, description="Training pods in the gang.")
    processes_per_node: PosInt | None = Field(
        default=None, description="Trainer processes per pod (one per GPU)."
    )
    world_size: PosInt | None = Field(
        default=None, description="Trainer processes in all: nodes times processesPerNode."
    )
    strategy: Literal["single", "ddp", "fsdp"] | None = Field(
        default=None,
        description=(
            "single: one process; ddp: every process holds the whole model and averages "
            "gradients; fsdp: parameters, gradients and optimizer state are sharded over the "
            "processes."
        ),
    )
    reason: ShortText | None = Field(
        default=None,
        description="Why this strategy: the spec's choice, or what auto compared.",
    )


class OutputFile(_StatusModel):
    """One published file."""

    path: Annotated[str, Field(max_length=4096)] = Field(
        description="Path relative to spec.output.uri."
    )
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="SHA-256 of the content, hex."
    )
    size: NonNegInt = Field(description="Size in bytes.")


class OutputStatus(_StatusModel):
    """What the job published."""

    adapter_uri: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None, description="Where the adapter was written (lora, qlora)."
    )
    model_uri: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None,
        description="Where full weights were written (method full, or the merged adapter).",
    )
    files: list[OutputFile] = Field(
        default_factory=list, description="Every published file with its checksum and size."
    )


ServingPhase = Literal["Pending", "Starting", "Loading", "Serving", "NotServed", "Failed"]


class ServingStatus(_StatusModel):
    """Where the fine-tuned model is served, or why it is not (spec.serving)."""

    phase: ServingPhase | None = Field(
        default=None,
        description=(
            "Pending (waiting for the job to succeed), Starting (the vLLM server starts), "
            "Loading (the adapter is being fetched and loaded), Serving, NotServed (the "
            "promotion gate refused it, or serving was turned off) or Failed."
        ),
    )
    reason: ShortText | None = Field(default=None, description="CamelCase reason for the phase.")
    message: ShortText | None = Field(default=None, description="What happened, for a human.")
    server: Name | None = Field(
        default=None, description="The vLLM server (Deployment and Service) that serves it."
    )
    endpoint: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None,
        description="Base URL of the OpenAI-compatible API that serves it (ends in /v1).",
    )
    model: Annotated[str, Field(max_length=253)] | None = Field(
        default=None, description="The model name to request at the endpoint."
    )


class FineTuneStatus(_StatusModel):
    """Observed state, written by the operator and the trainer; fields appear once known."""

    phase: Phase | None = Field(
        default=None,
        description=(
            "Lifecycle phase: Pending, Queued (waiting for quota), Running, Succeeded, Failed, "
            "Cancelled or Suspended."
        ),
    )
    stage: Stage | None = Field(
        default=None,
        description=(
            "What the trainer is doing: Fetching inputs, Preparing data, Loading the model, "
            "Training, Evaluating, Publishing outputs; Completed once the outputs are published."
        ),
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Standard conditions; Ready is True once the output is published.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    observed_generation: NonNegInt | None = Field(
        default=None, description="metadata.generation the operator last acted on."
    )
    start_time: datetime | None = Field(
        default=None,
        description=("When the trainer container first ran."),
    )
    completion_time: datetime | None = Field(
        default=None, description="When the job succeeded, failed or was cancelled."
    )
    job_name: Name | None = Field(
        default=None, description="Name of the batch/v1 Job running the trainer."
    )
    progress: Progress | None = Field(default=None, description="Training progress.")
    metrics: TrainingMetrics | None = Field(
        default=None, description="Latest training and evaluation metrics."
    )
    parameters: ParameterCounts | None = Field(
        default=None, description="Trainable and total parameter counts."
    )
    estimate: MemoryEstimate | None = Field(
        default=None, description="GPU memory estimate made before scheduling."
    )
    distributed: DistributedStatus | None = Field(
        default=None, description="Nodes, processes and parallelism of the running trainer."
    )
    output: OutputStatus | None = Field(default=None, description="Published files.")
    serving: ServingStatus | None = Field(
        default=None, description="Where the fine-tuned model is served (spec.serving)."
    )
    message: ShortText | None = Field(
        default=None, description="Human-readable summary of the current state."
    )
    reason: ShortText | None = Field(
        default=None, description="Machine-readable CamelCase reason for the current phase."
    )


# ----------------------------------------------------------------------------------------- root

# Fields that may change once the training Job exists; everything else in spec is frozen then.
MUTABLE_FIELDS = ("suspend", "cancel", "max_retries", "timeout", "queue_name", "serving")


def _spec_unchanged(name: str) -> str:
    field = FineTuneSpec.model_fields[name]
    alias = field.alias or name
    new, old = f"self.spec.{alias}", f"oldSelf.spec.{alias}"
    if field.is_required() or field.default is not None or field.default_factory is not None:
        return f"{new} == {old}"  # always present once defaulted
    return f"has({new}) == has({old}) && (!has({new}) || {new} == {old})"


def _immutability_rule() -> CelRule:
    frozen = [n for n in FineTuneSpec.model_fields if n not in MUTABLE_FIELDS]
    unchanged = " && ".join(_spec_unchanged(n) for n in frozen)
    return CelRule(
        # From the moment the operator created the Job (status.jobName), not only once the
        # pod ran: the Job's pod template and the trainer config are built from the spec, and
        # a later change would reach the config but not the pod (or neither), silently.
        rule=f"!has(oldSelf.status) || !has(oldSelf.status.jobName) || ({unchanged})",
        message=(
            "spec is immutable once the training Job exists (status.jobName is set): only "
            "suspend, cancel, maxRetries, timeout and queueName may change; create a new "
            "FineTuneJob to train with other settings"
        ),
        field_path=".spec",
        reason="FieldValueForbidden",
    )


SPEC_IMMUTABLE_FIELDS = _immutability_rule()


class FineTuneJob(BaseModel):
    """Fine-tunes a pretrained LLM (LoRA, QLoRA or full) on a dataset in object storage and
    publishes the result. The operator runs it as a batch/v1 Job."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        json_schema_extra=_validations(SPEC_IMMUTABLE_FIELDS),
    )

    api_version: str = Field(default=API_VERSION, description="kubetune.dev/v1alpha1")
    kind: str = Field(default=KIND, description="FineTuneJob")
    metadata: dict[str, Any] = Field(default={}, description="Standard object metadata.")
    spec: FineTuneSpec = Field(description="The desired fine-tuning run.")
    status: FineTuneStatus | None = Field(
        default=None, description="Observed state, written by the operator and the trainer."
    )
