"""Pure builders for a vLLM model server (serving.ServerPlan -> manifests). No I/O.

One server: a Deployment (init container fetch-model: the base model, or a full fine-tune, into
an emptyDir; the vLLM container; the serving agent sidecar), a Service, the two ConfigMaps the
operator and the agent talk through (kubetune_trainer.serving), and the agent's identity: a
ServiceAccount and a Role that may read the desired ConfigMap and patch the state ConfigMap,
by name, and nothing else.

Every object carries non-controller owner references to the FineTuneJobs it serves: deleting
the last of them deletes the server through the garbage collector (no finalizer); a server
that no job wants any more is scaled to zero replicas until then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from kubetune_operator.manifests import (
    SHM_SIZE_LIMIT,
    TMP_SIZE_LIMIT,
    TRAINER_UID,
    storage_env,
)
from kubetune_operator.serving import SERVICE_PORT, ServerPlan
from kubetune_operator.settings import MANAGED_BY, MANAGED_BY_LABEL, OperatorSettings
from kubetune_trainer.api import API_VERSION, KIND
from kubetune_trainer.config import PVC_ROOT
from kubetune_trainer.serving import (
    ADAPTERS_DIR,
    BASE_MODEL_DIR,
    COMPONENT,
    DESIRED_KEY,
    DESIRED_SUFFIX,
    MODELS_DIR,
    SERVER_LABEL,
    STATE_KEY,
    STATE_SUFFIX,
    ServerState,
    served_model_name,
    storage_json,
)

Body = dict[str, Any]

PORT_ANNOTATION: Final = "kubetune.dev/serving-port"
TEMPLATE_HASH_ANNOTATION: Final = "kubetune.dev/template-hash"
VLLM: Final = "vllm"
AGENT: Final = "agent"
FETCH: Final = "fetch-model"


def labels(plan: ServerPlan) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune-model-server",
        "app.kubernetes.io/instance": plan.name,
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/part-of": "kubetune",
        MANAGED_BY_LABEL: MANAGED_BY,
        SERVER_LABEL: plan.name,
    }


def owner_references(jobs: Sequence[Mapping[str, Any]]) -> list[Body]:
    """The FineTuneJobs served, as owners (none is the controller: the operator is)."""
    refs = {
        job["metadata"]["uid"]: {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job["metadata"]["name"],
            "uid": job["metadata"]["uid"],
        }
        for job in jobs
    }
    return sorted(refs.values(), key=lambda r: (r["name"], r["uid"]))


def _metadata(plan: ServerPlan, name: str, namespace: str) -> Body:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(plan),
        "ownerReferences": owner_references(plan.jobs),
    }


def desired_name(server: str) -> str:
    return server + DESIRED_SUFFIX


def state_name(server: str) -> str:
    return server + STATE_SUFFIX


# ------------------------------------------------------------------------ identity and state


def service_account(plan: ServerPlan) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(plan, plan.name, plan.key.namespace),
        "automountServiceAccountToken": False,  # mounted into the server pod only
    }


def role(plan: ServerPlan) -> Body:
    """The agent reads what to hold and reports what it holds: two ConfigMaps, by name."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(plan, plan.name, plan.key.namespace),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [desired_name(plan.name)],
                "verbs": ["get"],
            },
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [state_name(plan.name)],
                "verbs": ["get", "patch"],
            },
        ],
    }


def role_binding(plan: ServerPlan) -> Body:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(plan, plan.name, plan.key.namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": plan.name},
        "subjects": [
            {"kind": "ServiceAccount", "name": plan.name, "namespace": plan.key.namespace}
        ],
    }


def desired_config_map(plan: ServerPlan) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(plan, desired_name(plan.name), plan.key.namespace),
        "data": {DESIRED_KEY: plan.desired().to_json()},
    }


def state_config_map(plan: ServerPlan) -> Body:
    """Created empty by the operator (the agent may only patch it)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(plan, state_name(plan.name), plan.key.namespace),
        "data": {STATE_KEY: ServerState().to_json()},
    }


# ------------------------------------------------------------------------- Service and pods


def service(plan: ServerPlan) -> Body:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan, plan.name, plan.key.namespace),
        "spec": {
            "type": "ClusterIP",
            "selector": {SERVER_LABEL: plan.name},
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


_CONTAINER_SECURITY: Final = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def vllm_args(plan: ServerPlan, port: int, settings: OperatorSettings) -> list[str]:
    args = [
        "--model", BASE_MODEL_DIR,
        "--served-model-name", served_model_name(plan.key),
        "--host", "0.0.0.0",
        "--port", str(port),
    ]  # fmt: skip
    if plan.key.mode == "lora":
        args += [
            "--enable-lora",
            "--max-loras", str(settings.serving_max_loras),
            "--max-lora-rank", str(plan.max_lora_rank(settings)),
        ]  # fmt: skip
    return [*args, *settings.serving_args]


def pod_template(plan: ServerPlan, port: int, settings: OperatorSettings) -> Body:
    spec = plan.spec
    key = plan.key
    storage = [
        *storage_env(spec),
        {"name": "KUBETUNE_STORAGE", "value": storage_json(spec.storage)},
    ]
    models_mount = {"name": "models", "mountPath": MODELS_DIR}
    tmp_mount = {"name": "tmp", "mountPath": "/tmp"}
    # A pvc:// model is used in place (fetch-model links /models/base to it): vLLM mounts the
    # claim read-only at the same path as the init container.
    claim_volumes: list[Body] = []
    claim_mounts: list[Body] = []
    if key.model_uri.startswith("pvc://"):
        claim = key.model_uri.removeprefix("pvc://").split("/", 1)[0]
        claim_volumes = [
            {"name": "model-claim",
             "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        ]  # fmt: skip
        claim_mounts = [{"name": "model-claim", "mountPath": f"{PVC_ROOT}/{claim}",
                         "readOnly": True}]  # fmt: skip
    fetch = [*settings.serving_agent_command, "fetch-model", "--uri", key.model_uri,
             "--dest", BASE_MODEL_DIR]  # fmt: skip
    if key.revision:
        fetch += ["--revision", key.revision]
    if key.mode == "full":
        fetch.append("--verify-manifest")  # a full fine-tune's output has its SHA256SUMS
    vllm_env = [
        {"name": "HOME", "value": "/tmp"},  # vLLM's and torch's caches; the root is read-only
        {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
        *({"name": e.name, "value": e.value} for e in settings.serving_env),
    ]
    pull_secrets = [{"name": name} for name in settings.image_pull_secrets]
    return {
        "metadata": {"labels": labels(plan)},
        "spec": {
            **({"imagePullSecrets": pull_secrets} if pull_secrets else {}),
            "serviceAccountName": plan.name,
            "automountServiceAccountToken": True,  # the agent reads and writes its ConfigMaps
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": TRAINER_UID,
                "runAsGroup": TRAINER_UID,
                "fsGroup": TRAINER_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "initContainers": [
                {
                    "name": FETCH,
                    "image": settings.trainer_image,
                    "imagePullPolicy": settings.image_pull_policy,
                    "command": fetch,
                    "env": storage,
                    "volumeMounts": [models_mount, tmp_mount, *claim_mounts],
                    "securityContext": _CONTAINER_SECURITY,
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }
            ],
            "containers": [
                {
                    "name": VLLM,
                    "image": settings.serving_image,
                    "imagePullPolicy": settings.image_pull_policy,
                    "command": [*settings.serving_command, *vllm_args(plan, port, settings)],
                    "env": vllm_env,
                    "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
                    "readinessProbe": {
                        "httpGet": {"path": "/health", "port": "http"},
                        "periodSeconds": 5,
                        "failureThreshold": 3,
                    },
                    "resources": dict(settings.serving_resources),
                    "volumeMounts": [
                        {**models_mount, "readOnly": True},
                        tmp_mount,
                        {"name": "shm", "mountPath": "/dev/shm"},
                        *claim_mounts,
                    ],
                    "securityContext": _CONTAINER_SECURITY,
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                },
                {
                    "name": AGENT,
                    "image": settings.trainer_image,
                    "imagePullPolicy": settings.image_pull_policy,
                    "command": [*settings.serving_agent_command, "run"],
                    "env": [
                        *storage,
                        {"name": "KUBETUNE_SERVER_NAME", "value": plan.name},
                        {
                            "name": "POD_NAMESPACE",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                        },
                        {"name": "KUBETUNE_VLLM_URL", "value": f"http://127.0.0.1:{port}"},
                        {"name": "KUBETUNE_ADAPTER_DIR", "value": ADAPTERS_DIR},
                    ],
                    "resources": {
                        "requests": {"cpu": "100m", "memory": "256Mi"},
                        "limits": {"memory": "1Gi"},
                    },
                    "volumeMounts": [models_mount, tmp_mount],
                    "securityContext": _CONTAINER_SECURITY,
                },
            ],
            "volumes": [
                {"name": "models", "emptyDir": {"sizeLimit": spec.resources.scratch_size}},
                {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}},
                *claim_volumes,
            ],
        },
    }


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def deployment(plan: ServerPlan, port: int, settings: OperatorSettings) -> Body:
    template = pod_template(plan, port, settings)
    meta = _metadata(plan, plan.name, plan.key.namespace)
    meta["annotations"] = {
        PORT_ANNOTATION: str(port),
        TEMPLATE_HASH_ANNOTATION: template_hash(template),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {SERVER_LABEL: plan.name}},
            # One GPU server at a time: a rolling update would need a second GPU.
            "strategy": {"type": "Recreate"},
            "template": template,
        },
    }


def children(plan: ServerPlan, port: int, settings: OperatorSettings) -> list[Body]:
    """Creation order: identity and ConfigMaps first, the Deployment last."""
    return [
        service_account(plan),
        role(plan),
        role_binding(plan),
        desired_config_map(plan),
        state_config_map(plan),
        service(plan),
        deployment(plan, port, settings),
    ]
