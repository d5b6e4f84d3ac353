"""Pure builders: a FineTuneJob (as the API server returns it) + the operator's settings ->
the manifests of its children. No I/O here; reconcile.py sends what these return.

One child per FineTuneJob: the batch/v1 Job running the trainer, with an owner reference to the
FineTuneJob (deleting it deletes the Job through the garbage collector). The trainer config
travels in the Job itself, as an annotation of its pod template that a downwardAPI volume puts
at CONFIG_PATH: it is built once from the spec, like the pod, and cannot drift from it.

The trainer's identity is per namespace, created once (trainer_identity): the ServiceAccount
kubetune-trainer and a Role to get and patch FineTuneJob status. That the token of a trainer
pod patches only the FineTuneJob whose Job made the pod is enforced by the chart's
ValidatingAdmissionPolicy (templates/trainer-status-policy.yaml), on the pod-name claim of the
pod's bound token against the FineTuneJob's status.jobName.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubetune_operator.settings import MANAGED_BY, MANAGED_BY_LABEL, OperatorSettings
from kubetune_trainer import exitcodes
from kubetune_trainer.api import (
    API_VERSION,
    GROUP,
    KIND,
    KUEUE_QUEUE_LABEL,
    PLURAL,
    FineTuneSpec,
    SecretKeySelector,
)
from kubetune_trainer.config import (
    CONFIG_DIR,
    CONFIG_KEY,
    CONFIG_PATH,
    PVC_ROOT,
    WORK_DIR,
    JobIdentity,
    TrainerConfig,
)

Body = dict[str, Any]

FTJ_LABEL = f"{GROUP}/finetunejob"  # label (63-char safe) and annotation (full name)
CONTAINER = "trainer"
# The API default of spec.resources.gpuResourceName (see OperatorSettings.default_gpu_...).
API_DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# The trainer runs as this non-root user, the trainer image's own USER (trainer_image/Dockerfile).
# PSS "restricted" needs runAsNonRoot; a fixed UID makes that hold for any image given in
# spec.image, including ones whose USER is root. fsGroup lets it write to output PVCs.
TRAINER_UID = 65532
MAX_NAME = 63  # Job names become label values (job-name); keep every child name a DNS label
_HASH_LEN = 8


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def truncate(text: str, limit: int = MAX_NAME) -> str:
    """`text` if it fits, else a prefix + a hash of the whole: deterministic and unique."""
    if len(text) <= limit:
        return text
    prefix = text[: limit - _HASH_LEN - 1].rstrip("-.")
    return f"{prefix}-{_hash(text)}"


def child_name(ftj_name: str, suffix: str) -> str:
    """`<ftj>-<suffix>`, at most 63 characters; long FineTuneJob names get a hash."""
    full = f"{ftj_name}-{suffix}"
    if len(full) <= MAX_NAME:
        return full
    keep = MAX_NAME - len(suffix) - _HASH_LEN - 2
    return f"{ftj_name[:keep].rstrip('-.')}-{_hash(ftj_name)}-{suffix}"


# The trainer's identity in every namespace with FineTuneJobs (ServiceAccount, Role, binding).
TRAINER_ACCOUNT = "kubetune-trainer"
# The pod template annotation holding the TrainerConfig (see the module docstring).
CONFIG_ANNOTATION = f"{GROUP}/trainer-config"


@dataclass(frozen=True)
class Names:
    """The deterministic names of a FineTuneJob's children: re-running never makes new ones."""

    job: str

    @classmethod
    def of(cls, ftj_name: str) -> Names:
        return cls(job=child_name(ftj_name, "train"))


@dataclass(frozen=True)
class Target:
    """What the builders need from a FineTuneJob: identity and the effective spec."""

    name: str
    namespace: str
    uid: str
    spec: FineTuneSpec  # with the operator's defaults applied (effective_spec)

    @property
    def names(self) -> Names:
        return Names.of(self.name)


def parse_spec(ftj: Mapping[str, Any]) -> FineTuneSpec:
    """The spec as the models read it; raises pydantic.ValidationError for an invalid one."""
    return FineTuneSpec.model_validate(ftj.get("spec"))


def effective_spec(spec: FineTuneSpec, settings: OperatorSettings) -> FineTuneSpec:
    """Fill in what the user left to the operator: image, storage endpoint and credentials
    Secret, GPU resource name.

    Why the GPU name is remapped: the CRD defaults gpuResourceName to nvidia.com/gpu, so the
    operator cannot tell "unset" from an explicit nvidia.com/gpu. On clusters configured with
    another default, the API default is read as "unset"; there nvidia.com/gpu does not exist.
    """
    storage = spec.storage
    if storage.endpoint is None and settings.default_storage_endpoint:
        storage = storage.model_copy(update={"endpoint": settings.default_storage_endpoint})
    if storage.credentials_secret_ref is None and settings.default_credentials_secret:
        ref = SecretKeySelector(name=settings.default_credentials_secret)
        storage = storage.model_copy(update={"credentials_secret_ref": ref})
    resources = spec.resources
    if resources.gpu_resource_name == API_DEFAULT_GPU_RESOURCE:
        resources = resources.model_copy(
            update={"gpu_resource_name": settings.default_gpu_resource_name}
        )
    return spec.model_copy(
        update={
            "image": spec.image or settings.trainer_image,
            "storage": storage,
            "resources": resources,
        }
    )


def target(
    ftj: Mapping[str, Any], settings: OperatorSettings, parsed: FineTuneSpec | None = None
) -> Target:
    """`parsed`: the FineTuneJob's spec if the caller has parsed it already."""
    meta = ftj["metadata"]
    return Target(
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        spec=effective_spec(parsed if parsed is not None else parse_spec(ftj), settings),
    )


# ------------------------------------------------------------------------------ shared parts


def labels(t: Target) -> dict[str, str]:
    instance = truncate(t.name)
    return {
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/part-of": "kubetune",
        MANAGED_BY_LABEL: MANAGED_BY,
        FTJ_LABEL: instance,
    }


def child_annotations(t: Target) -> dict[str, str]:
    # Label values stop at 63 characters; the annotation carries the full FineTuneJob name
    # that Job and pod events are mapped back with.
    return {FTJ_LABEL: t.name}


def owner_reference(t: Target) -> Body:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": t.name,
        "uid": t.uid,
        "controller": True,
        # Foreground deletion of the FineTuneJob waits for its children (observable as
        # phase Cancelled while the training pod shuts down).
        "blockOwnerDeletion": True,
    }


def _metadata(t: Target, name: str) -> Body:
    return {
        "name": name,
        "namespace": t.namespace,
        "labels": labels(t),
        "annotations": child_annotations(t),
        "ownerReferences": [owner_reference(t)],
    }


def ftj_name_of(child: Mapping[str, Any]) -> str | None:
    """The FineTuneJob a Job or pod belongs to (from the annotation this module sets)."""
    meta = child.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(FTJ_LABEL) or (meta.get("labels") or {}).get(
        FTJ_LABEL
    )
    return str(name) if name else None


# ------------------------------------------------------------------------------------ config


def trainer_config(t: Target) -> TrainerConfig:
    return TrainerConfig(
        job=JobIdentity(namespace=t.namespace, name=t.name, uid=t.uid),
        spec=t.spec,
        work_dir=WORK_DIR,
    )


def render_config(t: Target) -> str:
    """The TrainerConfig as the pod annotation carries it: compact JSON. The spec as it was
    when the Job was made: the fields that may change later (maxRetries, timeout, suspend,
    cancel, queueName, serving) act on the Job and the operator, not on the trainer."""
    # exclude_none: an absent optional field reads back as None, and the document stays short.
    data = trainer_config(t).model_dump(by_alias=True, exclude_none=True, mode="json")
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


# ------------------------------------------------------------------------------ identity


def _identity_metadata(namespace: str) -> Body:
    return {
        "name": TRAINER_ACCOUNT,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/name": "kubetune-trainer",
            "app.kubernetes.io/component": "trainer",
            "app.kubernetes.io/part-of": "kubetune",
            MANAGED_BY_LABEL: MANAGED_BY,
        },
    }


def trainer_identity(namespace: str) -> list[Body]:
    """The trainers' ServiceAccount, Role and RoleBinding of a namespace, in creation order.

    The Role grants get and patch of FineTuneJob status in the namespace; the chart's
    ValidatingAdmissionPolicy narrows the patch to the FineTuneJob whose Job runs the pod.
    The operator can create this Role because it holds both verbs itself (RBAC escalation
    prevention: one can only grant what one has). Shared by the namespace's jobs, so no owner.
    """
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _identity_metadata(namespace),
        # The token is mounted only into trainer pods (their pod spec asks for it).
        "automountServiceAccountToken": False,
    }
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _identity_metadata(namespace),
        "rules": [
            {
                "apiGroups": [GROUP],
                "resources": [f"{PLURAL}/status"],
                "verbs": ["get", "patch"],
            }
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _identity_metadata(namespace),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": TRAINER_ACCOUNT,
        },
        "subjects": [{"kind": "ServiceAccount", "name": TRAINER_ACCOUNT, "namespace": namespace}],
    }
    return [account, role, binding]


# ------------------------------------------------------------------------------------ the Job


def pvc_claims(spec: FineTuneSpec) -> dict[str, bool]:
    """PersistentVolumeClaims named by pvc:// URIs -> whether the pod may only read them."""
    read_only: dict[str, bool] = {}
    inputs = [
        spec.base_model.uri,
        spec.base_model.tokenizer_uri,
        spec.dataset.train_uri,
        spec.dataset.validation_uri,
    ]
    for uri in inputs:
        if uri and uri.startswith("pvc://"):
            read_only.setdefault(_claim(uri), True)
    if spec.output.uri.startswith("pvc://"):
        read_only[_claim(spec.output.uri)] = False
    return read_only


def _claim(uri: str) -> str:
    return uri.removeprefix("pvc://").split("/", 1)[0]


def halted(spec: FineTuneSpec) -> bool:
    """Whether the training pod must not run: suspended (for now) or cancelled (for good)."""
    return spec.suspend or spec.cancel


def job_suspended(spec: FineTuneSpec) -> bool:
    """Suspend at creation when asked to, or when Kueue must admit the Job first."""
    return halted(spec) or spec.queue_name is not None


def _resources(spec: FineTuneSpec) -> Body:
    compute = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if compute.cpu:
        requests["cpu"] = compute.cpu  # no CPU limit: data loading may use idle cores
    if compute.memory:
        requests["memory"] = limits["memory"] = compute.memory
    if compute.gpus:
        requests[compute.gpu_resource_name] = limits[compute.gpu_resource_name] = str(compute.gpus)
    out: Body = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def storage_env(spec: FineTuneSpec) -> list[Body]:
    """PYTHONUNBUFFERED, HOME and the S3 keys (secretKeyRef) of a container that reads the
    job's storage: the trainer, and a model server's init container and agent."""
    env: list[Body] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},  # logs reach `kubectl logs` at once
        {"name": "HOME", "value": "/tmp"},  # the root file system is read-only
    ]
    ref = spec.storage.credentials_secret_ref
    if ref is not None:
        # The operator never reads the Secret: the kubelet injects the keys into the pod. A
        # missing Secret shows as CreateContainerConfigError, which status.py explains.
        for var, key in (
            ("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key),
        ):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}})
    return env


# Size limits of the scratch volumes other than /workspace (spec.resources.scratchSize): a
# runaway writer is evicted instead of filling the node's disk or memory.
TMP_SIZE_LIMIT = "4Gi"  # Python, torch and Triton temporary files
SHM_SIZE_LIMIT = "2Gi"  # NCCL's shared-memory transport; counts against the memory limit


def _volumes(t: Target) -> tuple[list[Body], list[Body]]:
    volumes: list[Body] = [
        {
            "name": "config",
            "downwardAPI": {
                "items": [
                    {
                        "path": CONFIG_KEY,
                        "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"},
                    }
                ]
            },
        },
        {"name": "work", "emptyDir": {"sizeLimit": t.spec.resources.scratch_size}},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
        # PyTorch data-loader workers and NCCL exchange tensors through /dev/shm, which is
        # only 64 MiB in a container by default.
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE_LIMIT}},
    ]
    mounts: list[Body] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "work", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    for index, (claim, read_only) in enumerate(sorted(pvc_claims(t.spec).items())):
        name = f"pvc-{index}"  # claim names may be longer than a volume name may be
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": name, "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only})
    return volumes, mounts


def pod_failure_policy() -> Body:
    return {
        "rules": [
            # Preemption, node drain, eviction: not the trainer's fault, and no retry is used up
            # (the next pod resumes from the last checkpoint). First, so it wins over exit codes.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            # A process of a gang that stopped because a peer did (multi-node): the peer's pod
            # carries the real exit code and is counted; this one is only replaced.
            {
                "action": "Ignore",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": sorted(exitcodes.IGNORED),
                },
            },
            # Bad config or data: a retry cannot help, fail the whole Job at once.
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": sorted(exitcodes.PERMANENT),
                },
            },
        ]
    }


def workers_service_name(t: Target) -> str:
    """The headless Service of a multi-node job: its pods' DNS names live under it."""
    return child_name(t.name, "workers")


def rendezvous_port(t: Target, settings: OperatorSettings) -> int:
    """The first pod's rendezvous port: the setting's port, or one of its range by the job's
    uid (pods that share a node's network need one per job)."""
    low, high = settings.rendezvous_port_range
    return low + int(hashlib.sha256(t.uid.encode()).hexdigest(), 16) % (high - low + 1)


def trainer_command(t: Target, settings: OperatorSettings) -> list[str]:
    """The trainer's command line: one process, or kubetune-launch (torchrun keeping the
    trainer's exit codes, reasons and grace period) starting one per GPU (or per
    processesPerNode) on each of the job's pods.

    Several processes train data-parallel (DDP through accelerate; torchrun sets RANK,
    WORLD_SIZE, LOCAL_RANK); `--no-python` runs the console script (or a test's stand-in) as
    given. Several pods (resources.nodes): an Indexed Job whose pod of index i is node i, all
    meeting at the first pod's stable DNS name under the headless Service (torchrun's static
    rendezvous: a c10d store on node 0, ranks in node order, so rank 0 is always pod 0).
    """
    spec = t.spec
    command = [*settings.trainer_command, CONFIG_PATH]
    nodes, per_node = spec.resources.nodes, spec.resources.processes()
    if nodes == 1 and per_node == 1:
        return command
    launcher = ["kubetune-launch", f"--grace-seconds={spec.checkpointing.grace_period_seconds}"]
    if nodes == 1:
        return [*launcher, "--standalone", "--nnodes=1", f"--nproc-per-node={per_node}",
                "--no-python", *command]  # fmt: skip
    first = f"{t.names.job}-0.{workers_service_name(t)}"
    return [
        *launcher,
        f"--nnodes={nodes}",
        f"--nproc-per-node={per_node}",
        "--node-rank=$(JOB_COMPLETION_INDEX)",  # set by the Job controller, expanded by the kubelet
        f"--master-addr={first}",
        f"--master-port={rendezvous_port(t, settings)}",
        "--no-python",
        *command,
    ]


def workers_service(t: Target) -> Body:
    """Headless: each pod of the Indexed Job is <job>-<index>.<service>, also before it is
    ready (the rendezvous happens before any readiness)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(t, workers_service_name(t)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {FTJ_LABEL: truncate(t.name), MANAGED_BY_LABEL: MANAGED_BY},
        },
    }


def job(t: Target, settings: OperatorSettings) -> Body:
    spec = t.spec
    volumes, mounts = _volumes(t)
    job_labels = labels(t)
    if spec.queue_name and not halted(spec):
        # Suspended at creation: Kueue must not see the Job yet (it would admit and start it);
        # resuming adds the label (suspend_patch).
        job_labels[KUEUE_QUEUE_LABEL] = spec.queue_name
    container: Body = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        # Explicit command: the trainer does not depend on the image's ENTRYPOINT (and the
        # local process node, which runs no images, can run it).
        "command": trainer_command(t, settings),
        "env": storage_env(spec),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
        # The trainer writes one actionable line there on a known error; on a crash the end of
        # its log (the traceback) is used instead.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: Body = {
        "restartPolicy": "Never",  # retries are new pods, counted by backoffLimit
        # SIGTERM (suspend, preemption, drain) makes the trainer checkpoint and exit; this is
        # how long it has before SIGKILL.
        "terminationGracePeriodSeconds": spec.checkpointing.grace_period_seconds,
        "serviceAccountName": TRAINER_ACCOUNT,
        "automountServiceAccountToken": True,  # the trainer reports status with this token
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in settings.image_pull_secrets]
    compute = spec.resources
    if compute.node_selector:
        pod_spec["nodeSelector"] = dict(compute.node_selector)
    if compute.tolerations:
        pod_spec["tolerations"] = [
            tol.model_dump(by_alias=True, exclude_none=True) for tol in compute.tolerations
        ]
    if compute.priority_class_name:
        pod_spec["priorityClassName"] = compute.priority_class_name
    nodes = spec.resources.nodes
    if nodes > 1:
        pod_spec["subdomain"] = workers_service_name(t)
    job_spec: Body = {
        "suspend": job_suspended(spec),
        "completions": nodes,
        "parallelism": nodes,
        # A gang restart costs one retry: the peers that stop with it exit PEER_LOST (ignored).
        "backoffLimit": spec.max_retries,
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {
                "labels": labels(t),
                "annotations": {**child_annotations(t), CONFIG_ANNOTATION: render_config(t)},
            },
            "spec": pod_spec,
        },
    }
    if nodes > 1:
        # Pod i is node i (JOB_COMPLETION_INDEX); a failed pod is replaced with the same index.
        job_spec["completionMode"] = "Indexed"
    timeout = spec.timeout_seconds()
    if timeout is not None:
        job_spec["activeDeadlineSeconds"] = timeout
    # The finished Job and its pods go after a while; the FineTuneJob keeps its status and the
    # output (a terminal phase is final, so the Job's absence then changes nothing).
    job_spec["ttlSecondsAfterFinished"] = settings.job_ttl_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**_metadata(t, t.names.job), "labels": job_labels},
        "spec": job_spec,
    }


def children(t: Target, settings: OperatorSettings) -> list[Body]:
    """What the operator creates for one FineTuneJob: its Job, and for several nodes the
    headless Service first (the namespace's trainer identity comes first, once per namespace:
    trainer_identity)."""
    if t.spec.resources.nodes > 1:
        return [workers_service(t), job(t, settings)]
    return [job(t, settings)]


# ------------------------------------------------------------------------- updates of a Job


def job_settings_patch(t: Target) -> Body:
    """Merge patch carrying the settings that may change while the Job exists.

    maxRetries, timeout and queueName stay mutable once the Job exists (api.py MUTABLE_FIELDS);
    suspend and cancel have their own patch (suspend_patch), because Kueue owns suspend.
    While the job is halted the queue label is left alone: resuming sets it.
    """
    timeout = t.spec.timeout_seconds()
    patch: Body = {"spec": {"backoffLimit": t.spec.max_retries, "activeDeadlineSeconds": timeout}}
    if not halted(t.spec):
        patch["metadata"] = {"labels": {KUEUE_QUEUE_LABEL: t.spec.queue_name}}
    return patch


def settings_differ(t: Target, job_body: Mapping[str, Any]) -> bool:
    """Whether the Job's mutable settings (job_settings_patch) differ from the spec's."""
    wanted = job_settings_patch(t)
    spec = job_body.get("spec") or {}
    labels = (job_body.get("metadata") or {}).get("labels") or {}
    return any(spec.get(key) != value for key, value in wanted["spec"].items()) or any(
        labels.get(key) != value
        for key, value in ((wanted.get("metadata") or {}).get("labels") or {}).items()
    )


def suspension_differs(
    spec: FineTuneSpec, job_body: Mapping[str, Any], workload: Mapping[str, Any] | None
) -> bool:
    """Whether the Job (or its Kueue Workload) does not follow spec.suspend and spec.cancel."""
    if suspend_patch(spec, job_body) is not None:
        return True
    active = workload_active(spec, job_body)
    if active is None or workload is None:
        return False
    return bool((workload.get("spec") or {}).get("active", True)) != active


def queued_by_kueue(job_body: Mapping[str, Any]) -> bool:
    """Whether Kueue manages this Job: it carries the queue label."""
    return KUEUE_QUEUE_LABEL in ((job_body.get("metadata") or {}).get("labels") or {})


def suspend_patch(spec: FineTuneSpec, job_body: Mapping[str, Any]) -> Body | None:
    """The Job patch that makes it follow spec.suspend (and spec.cancel, which suspends it for
    good), or None when nothing is to change.

    Kueue owns spec.suspend of the Jobs it manages: it unsuspends any Job whose Workload is
    admitted, whoever suspended it. So for a queued Job suspending means deactivating its
    Workload (workload_active; Kueue then stops the Job and frees the quota), not patching the
    Job; resuming means carrying the queue label (Kueue then admits and starts it).
    """
    suspended = bool((job_body.get("spec") or {}).get("suspend"))
    label = ((job_body.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL)
    if halted(spec):
        if label is not None or suspended:  # Kueue's Job: see workload_active
            return None
        return {"spec": {"suspend": True}}
    if spec.queue_name is not None:
        if label == spec.queue_name:
            return None
        return {"metadata": {"labels": {KUEUE_QUEUE_LABEL: spec.queue_name}}}
    patch: Body = {}
    if label is not None:  # the queueName was removed while suspended
        patch["metadata"] = {"labels": {KUEUE_QUEUE_LABEL: None}}
    if suspended:
        patch["spec"] = {"suspend": False}
    return patch or None


def workload_active(spec: FineTuneSpec, job_body: Mapping[str, Any]) -> bool | None:
    """The spec.active the Job's Kueue Workloads must have, or None when Kueue does not
    manage the Job: inactive while the job is suspended or cancelled."""
    if not queued_by_kueue(job_body):
        return None
    return not halted(spec)
