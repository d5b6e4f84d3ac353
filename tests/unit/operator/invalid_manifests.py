"""FineTuneJob manifests the API server must reject, each with a substring its error must contain.

The unit tests check that the pydantic models reject every one as well; the cluster integration
tests `kubectl apply --dry-run=server` each one against a real API server with the CRD installed.
Substrings follow the API server's wording: the field path for schema errors
("spec.method: Unsupported value"), the rule's message for CEL errors.

Every manifest is complete and otherwise valid: it is VALID_MANIFEST with one change.
"""

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

Manifest = dict[str, Any]

DELETE = object()  # in a patch: remove the key

VALID_MANIFEST: Manifest = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "valid-minimal"},
    "spec": {
        "baseModel": {"uri": "s3://models/qwen2.5-0.5b"},
        "dataset": {"trainUri": "s3://datasets/support/train.jsonl"},
        "output": {"uri": "s3://outputs/support-lora"},
    },
}

# Every spec field set (and a full status): must be accepted as it is.
FULL_MANIFEST: Manifest = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "valid-full"},
    "spec": {
        "baseModel": {
            "uri": "hf://Qwen/Qwen2.5-0.5B-Instruct",
            "revision": "main",
            "trustRemoteCode": False,
            "tokenizerUri": "pvc://models/tokenizers/qwen",
        },
        "dataset": {
            "trainUri": "pvc://datasets/support/train/",
            "validationUri": "s3://datasets/support/val.parquet",
            "validationSplit": 0,
            "format": "preference",
            "maxSeqLength": 4096,
        },
        "method": "qlora",
        "objective": "dpo",
        "dpo": {"beta": 0.25, "labelSmoothing": 0.1},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]},
        "quantization": {
            "bits": 4,
            "quantType": "fp4",
            "doubleQuant": False,
            "computeDtype": "float16",
        },
        "hyperparameters": {
            "epochs": 1.5,
            "maxSteps": 500,
            "learningRate": 1e-4,
            "batchSize": 2,
            "gradientAccumulationSteps": 8,
            "warmupRatio": 0.1,
            "scheduler": "constant_with_warmup",
            "weightDecay": 0.01,
            "seed": 7,
            "packing": False,
            "gradientCheckpointing": "enabled",
        },
        "output": {"uri": "s3://outputs/support-qlora", "mergeAdapter": True},
        "storage": {
            "endpoint": "http://minio.storage.svc:9000",
            "region": "eu-west-1",
            "addressingStyle": "virtual",
            "credentialsSecretRef": {
                "name": "s3-credentials",
                "accessKeyIdKey": "accessKey",
                "secretAccessKeyKey": "secretKey",
            },
        },
        "resources": {
            "gpus": 2,
            "gpuResourceName": "nvidia.com/mig-3g.40gb",
            "cpu": "3500m",
            "memory": "64Gi",
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {
                    "key": "maintenance",
                    "operator": "Equal",
                    "value": "soon",
                    "effect": "NoExecute",
                    "tolerationSeconds": 3600,
                },
            ],
            "priorityClassName": "training-low",
        },
        "image": "registry.example/kubetune-trainer:v0.1.0",
        "evaluation": {
            "enabled": True,
            "prompts": ["How do I reset my password?"],
            "sampleSize": 16,
            "maxNewTokens": 256,
            "metrics": ["loss", "rougeL"],
        },
        "checkpointing": {"intervalSteps": 100, "intervalMinutes": 0, "keep": 3},
        "suspend": True,
        "maxRetries": 0,
        "timeout": "1h30m",
        "queueName": "team-a",
    },
    "status": {
        "phase": "Succeeded",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "observedGeneration": 1,
                "lastTransitionTime": "2025-01-01T02:00:00Z",
                "reason": "OutputPublished",
                "message": "",
            }
        ],
        "observedGeneration": 1,
        "startTime": "2025-01-01T00:00:00Z",
        "completionTime": "2025-01-01T02:00:00Z",
        "jobName": "valid-full-trainer",
        "progress": {
            "epoch": 1.5,
            "step": 500,
            "totalSteps": 500,
            "percent": 100.0,
            "etaSeconds": 0,
            "updateTime": "2025-01-01T01:50:00Z",
        },
        "metrics": {
            "trainLoss": 0.91,
            "evalLoss": 1.02,
            "perplexity": 2.77,
            "baseEvalLoss": 1.6,
            "basePerplexity": 4.95,
            "rougeL": 0.41,
            "bleu": 22.5,
            "learningRate": 0.0,
            "tokensPerSecond": 5120.5,
            "peakGpuMemoryBytes": 21474836480,
        },
        "parameters": {"trainable": 8798208, "total": 502830976},
        "estimate": {
            "gpuMemoryBytes": 30000000000,
            "perGpu": 15000000000,
            "basis": "0.5B params, 4-bit base, r=32, batch 2x4096",
        },
        "output": {
            "adapterUri": "s3://outputs/support-qlora/adapter",
            "modelUri": "s3://outputs/support-qlora/merged",
            "files": [
                {"path": "adapter/adapter_model.safetensors", "sha256": "0" * 64, "size": 35}
            ],
        },
        "message": "Training finished; eval loss 1.02 (base 1.60).",
        "reason": "Succeeded",
    },
}

# Status that marks a job as started: from then on only suspend, maxRetries, timeout and
# queueName may change (apply it through the status subresource).
WITH_JOB_STATUS: Manifest = {"phase": "Pending", "jobName": "started-train"}


class InvalidManifest(NamedTuple):
    id: str
    manifest: Manifest
    expected: str  # substring of the API server's error message
    # The error comes from strict field validation (kubectl's default, fieldValidation=Strict);
    # under Warn or Ignore the API server prunes the field and accepts the object.
    strict_only: bool = False


def merged(base: Mapping[str, Any], patch: Mapping[str, Any], delete: object = DELETE) -> Manifest:
    """`patch` merged into a copy of `base`; a key whose value is `delete` is removed (pass
    delete=None for a JSON merge patch, RFC 7386)."""
    out = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if value is delete:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value, delete)
        else:
            out[key] = copy.deepcopy(value)
    return out


def job(name: str, spec_patch: Manifest) -> Manifest:
    """VALID_MANIFEST named `name`, with `spec_patch` merged into its spec."""
    manifest = merged(VALID_MANIFEST, {"spec": spec_patch})
    manifest["metadata"] = {"name": name}
    return manifest


def _case(
    name: str, spec_patch: Manifest, expected: str, strict_only: bool = False
) -> InvalidManifest:
    return InvalidManifest(name, job(name, spec_patch), expected, strict_only)


_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

INVALID_MANIFESTS: list[InvalidManifest] = [
    InvalidManifest(
        "no-spec",
        {k: v for k, v in job("no-spec", {}).items() if k != "spec"},
        "spec: Required value",
    ),
    _case("no-base-model", {"baseModel": DELETE}, "spec.baseModel: Required value"),
    _case("no-output-uri", {"output": {"uri": DELETE}}, "spec.output.uri: Required value"),
    _case("base-model-gs", {"baseModel": {"uri": "gs://models/llama"}}, "spec.baseModel.uri"),
    _case(
        "tokenizer-https",
        {"baseModel": {"tokenizerUri": "https://huggingface.co/gpt2"}},
        "spec.baseModel.tokenizerUri",
    ),
    _case("train-uri-hf", {"dataset": {"trainUri": "hf://org/data"}}, "spec.dataset.trainUri"),
    _case(
        "train-uri-no-bucket", {"dataset": {"trainUri": "s3:///x.jsonl"}}, "spec.dataset.trainUri"
    ),
    _case("output-uri-hf", {"output": {"uri": "hf://org/out"}}, "spec.output.uri"),
    _case(
        "validation-split-large",
        {"dataset": {"validationSplit": 0.6}},
        "spec.dataset.validationSplit",
    ),
    _case(
        "dataset-format-unknown",
        {"dataset": {"format": "sharegpt"}},
        "spec.dataset.format: Unsupported value",
    ),
    _case("max-seq-length-small", {"dataset": {"maxSeqLength": 8}}, "spec.dataset.maxSeqLength"),
    _case(
        "max-seq-length-string",
        {"dataset": {"maxSeqLength": "2048"}},
        "spec.dataset.maxSeqLength",
    ),
    _case(
        "validation-equals-train",
        {"dataset": {"validationUri": "s3://datasets/support/train.jsonl"}},
        "dataset.validationUri must differ from dataset.trainUri",
    ),
    _case("method-unknown", {"method": "dora"}, "spec.method: Unsupported value"),
    _case("lora-rank-zero", {"lora": {"r": 0}}, "spec.lora.r"),
    _case("lora-dropout-one", {"lora": {"dropout": 1.0}}, "spec.lora.dropout"),
    _case(
        "all-linear-mixed",
        {"lora": {"targetModules": ["all-linear", "q_proj"]}},
        "'all-linear' already selects every linear layer",
    ),
    _case(
        "target-modules-duplicate",
        {"lora": {"targetModules": ["q_proj", "q_proj"]}},
        "spec.lora.targetModules[1]: Duplicate value",
    ),
    _case(
        "quantization-8-bit",
        {"method": "qlora", "quantization": {"bits": 8}},
        "spec.quantization.bits: Unsupported value",
    ),
    _case(
        "dpo-on-sft-format",
        {"objective": "dpo", "dataset": {"format": "chat"}},
        "dataset.format must be a preference format",
    ),
    _case(
        "sft-on-preference-format",
        {"dataset": {"format": "prompt-chosen-rejected"}},
        "dataset.format must be a preference format",
    ),
    _case(
        "objective-unknown",
        {"objective": "ppo"},
        "spec.objective: Unsupported value",
    ),
    _case(
        "dpo-beta-zero",
        {"objective": "dpo", "dpo": {"beta": 0}},
        "spec.dpo.beta",
    ),
    _case(
        "dpo-label-smoothing-above-half",
        {"objective": "dpo", "dpo": {"labelSmoothing": 0.6}},
        "spec.dpo.labelSmoothing",
    ),
    _case(
        "full-merge-adapter",
        {"method": "full", "output": {"mergeAdapter": True}},
        "output.mergeAdapter must be false for method full",
    ),
    _case(
        "qlora-fsdp",
        {"method": "qlora", "distributed": {"strategy": "fsdp"}},
        "distributed.strategy fsdp does not support method qlora",
    ),
    _case(
        "distributed-strategy-unknown",
        {"distributed": {"strategy": "zero3"}},
        "spec.distributed.strategy",
    ),
    _case(
        "output-overwrites-base",
        {"output": {"uri": "s3://models/qwen2.5-0.5b"}},
        "output.uri must not equal, contain or lie inside baseModel.uri",
    ),
    _case(
        "output-is-base-with-a-slash",
        {"output": {"uri": "s3://models/qwen2.5-0.5b/"}},
        "output.uri must not equal, contain or lie inside baseModel.uri",
    ),
    _case(
        "output-inside-train-prefix",
        {
            "dataset": {"trainUri": "s3://datasets/support/"},
            "output": {"uri": "s3://datasets/support/out"},
        },
        "output.uri must not equal, contain or lie inside dataset.trainUri",
    ),
    _case(
        "output-contains-validation-data",
        {"dataset": {"validationUri": "s3://outputs/support-lora/val.jsonl"}},
        "output.uri must not equal, contain or lie inside dataset.validationUri",
    ),
    _case(
        "output-contains-tokenizer",
        {"baseModel": {"tokenizerUri": "s3://outputs/support-lora/tokenizer"}},
        "output.uri must not equal, contain or lie inside baseModel.tokenizerUri",
    ),
    _case(
        "output-is-bucket-of-base",
        {"output": {"uri": "s3://models/"}},
        "output.uri must not equal, contain or lie inside baseModel.uri",
    ),
    _case(
        "uri-empty-path-segment",
        {"dataset": {"trainUri": "s3://datasets//support/train.jsonl"}},
        "spec.dataset.trainUri",
    ),
    _case(
        "learning-rate-zero",
        {"hyperparameters": {"learningRate": 0}},
        "spec.hyperparameters.learningRate",
    ),
    _case("epochs-negative", {"hyperparameters": {"epochs": -1}}, "spec.hyperparameters.epochs"),
    _case("max-steps-zero", {"hyperparameters": {"maxSteps": 0}}, "spec.hyperparameters.maxSteps"),
    _case(
        "warmup-large",
        {"hyperparameters": {"warmupRatio": 0.9}},
        "spec.hyperparameters.warmupRatio",
    ),
    _case(
        "scheduler-unknown",
        {"hyperparameters": {"scheduler": "cosine_with_restarts"}},
        "spec.hyperparameters.scheduler: Unsupported value",
    ),
    _case("endpoint-no-scheme", {"storage": {"endpoint": "minio:9000"}}, "spec.storage.endpoint"),
    _case(
        "endpoint-with-credentials",
        {"storage": {"endpoint": "https://AKEY:s3cret@s3.example.com"}},
        "storage.endpoint must not carry credentials",
    ),
    _case(
        "addressing-style-unknown",
        {"storage": {"addressingStyle": "dns"}},
        "spec.storage.addressingStyle: Unsupported value",
    ),
    _case(
        "secret-ref-no-name",
        {"storage": {"credentialsSecretRef": {"accessKeyIdKey": "id"}}},
        "spec.storage.credentialsSecretRef.name: Required value",
    ),
    _case("gpus-17", {"resources": {"gpus": 17}}, "spec.resources.gpus"),
    _case(
        "node-selector-key-invalid",
        {"resources": {"nodeSelector": {"gpu type!": "h100"}}},
        "nodeSelector keys must be label keys",
    ),
    _case(
        "node-selector-key-long-name",
        {"resources": {"nodeSelector": {"example.com/" + "n" * 64: "x"}}},
        "nodeSelector keys must be label keys",
    ),
    _case(
        "node-selector-value-invalid",
        {"resources": {"nodeSelector": {"nvidia.com/gpu.product": "H100 80GB"}}},
        "spec.resources.nodeSelector.nvidia.com/gpu.product",
    ),
    _case(
        "toleration-key-invalid",
        {"resources": {"tolerations": [{**_TOLERATION, "key": "gpu/type/x"}]}},
        "spec.resources.tolerations[0].key",
    ),
    _case(
        "toleration-value-invalid",
        {"resources": {"tolerations": [{"key": "k", "operator": "Equal", "value": "a b"}]}},
        "spec.resources.tolerations[0].value",
    ),
    _case(
        "scratch-size-not-quantity",
        {"resources": {"scratchSize": "big"}},
        "spec.resources.scratchSize",
    ),
    _case(
        "storage-retry-zero",
        {"storage": {"retryTimeout": "0s"}},
        "timeout must be longer than 0s",
    ),
    _case(
        "grace-period-short",
        {"checkpointing": {"gracePeriodSeconds": 1}},
        "spec.checkpointing.gracePeriodSeconds",
    ),
    _case("memory-not-quantity", {"resources": {"memory": "lots"}}, "spec.resources.memory"),
    _case(
        "toleration-exists-value",
        {"resources": {"tolerations": [{**_TOLERATION, "value": "true"}]}},
        "toleration value must be empty when operator is Exists",
    ),
    _case(
        "toleration-no-key-equal",
        {"resources": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
        "toleration operator must be Exists when key is empty",
    ),
    _case(
        "toleration-seconds-no-schedule",
        {"resources": {"tolerations": [{**_TOLERATION, "tolerationSeconds": 60}]}},
        "toleration tolerationSeconds requires effect NoExecute",
    ),
    _case(
        "toleration-effect-unknown",
        {"resources": {"tolerations": [{**_TOLERATION, "effect": "Sometimes"}]}},
        "spec.resources.tolerations[0].effect: Unsupported value",
    ),
    _case(
        "prompts-33",
        {"evaluation": {"prompts": [f"prompt {i}" for i in range(33)]}},
        "spec.evaluation.prompts: Too many",
    ),
    _case(
        "eval-metric-unknown",
        {"evaluation": {"metrics": ["accuracy"]}},
        "spec.evaluation.metrics[0]: Unsupported value",
    ),
    _case(
        "rouge-without-samples",
        {"evaluation": {"sampleSize": 0}},
        "evaluation.sampleSize must be at least 1",
    ),
    _case("max-retries-11", {"maxRetries": 11}, "spec.maxRetries"),
    _case("timeout-days", {"timeout": "1d"}, "spec.timeout"),
    _case("timeout-zero", {"timeout": "0s"}, "timeout must be longer than 0s"),
    _case("queue-name-invalid", {"queueName": "Team A"}, "spec.queueName"),
    _case(
        "unknown-field",
        {"dataset": {"trainURI": "s3://datasets/x.jsonl"}},
        'unknown field "spec.dataset.trainURI"',
        strict_only=True,
    ),
]

# Updates of a job whose training Job exists (VALID_MANIFEST with WITH_JOB_STATUS): each changes a
# setting that shapes the pod or the trainer config and must be rejected with IMMUTABLE_EXPECTED.
IMMUTABLE_EXPECTED = "spec is immutable once the training Job exists"
FORBIDDEN_UPDATES_WITH_JOB: list[InvalidManifest] = [
    InvalidManifest(f"update-{name}", merged(VALID_MANIFEST, {"spec": patch}), IMMUTABLE_EXPECTED)
    for name, patch in [
        ("lora-rank", {"lora": {"r": 8}}),
        ("method", {"method": "full"}),
        ("image", {"image": "registry.example/kubetune-trainer:v2"}),
        ("gpus", {"resources": {"gpus": 2}}),
        ("node-selector", {"resources": {"nodeSelector": {"pool": "h100"}}}),
        ("output", {"output": {"uri": "s3://outputs/elsewhere"}}),
    ]
]
# ...and these change only the settings that stay mutable, so they must be accepted.
ALLOWED_UPDATES_WITH_JOB: list[Manifest] = [
    merged(VALID_MANIFEST, {"spec": patch})
    for patch in [
        {"suspend": True},
        {"maxRetries": 5, "timeout": "2h", "queueName": "team-a"},
        {"cancel": True},
    ]
]

# Outputs next to their inputs, never on, in or around them: locations are object prefixes, so a
# shared leading string is not containment. Both the API server and the models must accept these.
OUTPUTS_BESIDE_INPUTS: list[Manifest] = [
    job(name, patch)
    for name, patch in [
        ("output-beside-base", {"output": {"uri": "s3://models/qwen2.5-0.5b-lora"}}),
        ("output-beside-train", {"output": {"uri": "s3://datasets/support/train"}}),
        (
            "output-beside-validation",
            {"dataset": {"validationUri": "s3://outputs/support-lora.val.jsonl"}},
        ),
        (
            "output-beside-tokenizer",
            {"baseModel": {"tokenizerUri": "s3://outputs/support-lora-tokenizer/"}},
        ),
        ("output-in-another-bucket", {"output": {"uri": "s3://models-out/qwen2.5-0.5b"}}),
    ]
]
