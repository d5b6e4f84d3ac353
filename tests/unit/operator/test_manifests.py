"""The children a FineTuneJob turns into: exactly these objects, deterministic names, a
PSS-restricted pod, and a trainer that may touch nothing but its own job's status."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from ftj_objects import NAMESPACE, UID, served
from invalid_manifests import FULL_MANIFEST, VALID_MANIFEST

from kubetune_operator import manifests
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer import exitcodes
from kubetune_trainer.config import CONFIG_PATH, TrainerConfig

SETTINGS = OperatorSettings(default_storage_endpoint="http://minio.storage:9000")
IMAGE = SETTINGS.trainer_image
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

FORMATS = ["auto", "chat", "instruction", "prompt-completion", "text"]
OWNER = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "name": "support-lora",
    "uid": UID,
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "app.kubernetes.io/name": "kubetune-trainer",
    "app.kubernetes.io/instance": "support-lora",
    "app.kubernetes.io/component": "trainer",
    "app.kubernetes.io/part-of": "kubetune",
    "app.kubernetes.io/managed-by": "kubetune",
    "kubetune.dev/finetunejob": "support-lora",
}
METADATA = {
    "namespace": NAMESPACE,
    "labels": LABELS,
    "annotations": {"kubetune.dev/finetunejob": "support-lora"},
    "ownerReferences": [OWNER],
}
BASE_MOUNTS = [
    {"name": "config", "mountPath": "/etc/kubetune", "readOnly": True},
    {"name": "work", "mountPath": "/workspace"},
    {"name": "tmp", "mountPath": "/tmp"},
    {"name": "shm", "mountPath": "/dev/shm"},
]
BASE_VOLUMES = [
    {
        "name": "config",
        "downwardAPI": {
            "items": [
                {
                    "path": "config.json",
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['kubetune.dev/trainer-config']"
                    },
                }
            ]
        },
    },
    # Every scratch volume has a size limit; /workspace's is spec.resources.scratchSize.
    {"name": "work", "emptyDir": {"sizeLimit": "200Gi"}},
    {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
]
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}
BASE_ENV = [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "HOME", "value": "/tmp"}]
POD_FAILURE_POLICY = {
    "rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {
            "action": "Ignore",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [76]},
        },
        {
            "action": "FailJob",
            "onExitCodes": {
                "containerName": "trainer",
                "operator": "In",
                "values": sorted(exitcodes.PERMANENT),
            },
        },
    ]
}


def target(manifest: dict[str, Any] | None = None, **spec: Any) -> manifests.Target:
    return manifests.target(served(manifest, **spec), SETTINGS)


def minimal_job(method: str = "lora", **overrides: Any) -> dict[str, Any]:
    """The Job for VALID_MANIFEST (with `method`), written out in full but for its config."""
    config = manifests.render_config(target(method=method))
    expected: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "support-lora-train", **METADATA},
        "spec": {
            "suspend": False,
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": 2,
            "podFailurePolicy": POD_FAILURE_POLICY,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {
                    "labels": LABELS,
                    "annotations": {
                        "kubetune.dev/finetunejob": "support-lora",
                        "kubetune.dev/trainer-config": config,
                    },
                },
                "spec": {
                    "restartPolicy": "Never",
                    "terminationGracePeriodSeconds": 120,
                    "serviceAccountName": "kubetune-trainer",
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "securityContext": POD_SECURITY,
                    "containers": [
                        {
                            "name": "trainer",
                            "image": IMAGE,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["kubetune-trainer", "--config", CONFIG_PATH],
                            "env": BASE_ENV,
                            "resources": {
                                "requests": {"nvidia.com/gpu": "1"},
                                "limits": {"nvidia.com/gpu": "1"},
                            },
                            "volumeMounts": BASE_MOUNTS,
                            "securityContext": CONTAINER_SECURITY,
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                        }
                    ],
                    "volumes": BASE_VOLUMES,
                },
            },
        },
    }
    expected["spec"].update(overrides)
    return expected


# ------------------------------------------------------------------------------------- the Job


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_job_is_the_same_for_every_method_but_its_config(method: str) -> None:
    # The method only changes what the trainer does (it reads it from the config), not the pod.
    assert manifests.job(target(method=method), SETTINGS) == minimal_job(method)


def test_job_for_every_spec_field() -> None:
    job = manifests.job(target(FULL_MANIFEST), SETTINGS)
    # spec.suspend is true: no queue label yet, or Kueue would admit and start the Job.
    assert job["metadata"]["labels"] == LABELS
    spec = job["spec"]
    # A queueName alone would also suspend it (Kueue admits it).
    assert (spec["suspend"], spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (True, 0, 5400)
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {
            "key": "maintenance",
            "operator": "Equal",
            "value": "soon",
            "effect": "NoExecute",
            "tolerationSeconds": 3600,
        },
    ]
    assert pod["priorityClassName"] == "training-low"
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/kubetune-trainer:v0.1.0"
    assert container["resources"] == {
        "requests": {"cpu": "3500m", "memory": "64Gi", "nvidia.com/mig-3g.40gb": "2"},
        "limits": {"memory": "64Gi", "nvidia.com/mig-3g.40gb": "2"},  # no CPU limit
    }
    assert container["env"] == [
        *BASE_ENV,
        {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "accessKey"}},
        },
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "secretKey"}},
        },
    ]
    # pvc:// inputs are mounted read-only under PVC_ROOT/<claim>.
    assert pod["volumes"] == [
        *BASE_VOLUMES,
        {"name": "pvc-0", "persistentVolumeClaim": {"claimName": "datasets"}},
        {"name": "pvc-1", "persistentVolumeClaim": {"claimName": "models"}},
    ]
    assert container["volumeMounts"] == [
        *BASE_MOUNTS,
        {"name": "pvc-0", "mountPath": "/mnt/pvc/datasets", "readOnly": True},
        {"name": "pvc-1", "mountPath": "/mnt/pvc/models", "readOnly": True},
    ]


def test_output_claim_is_writable_even_when_also_an_input() -> None:
    t = target(
        dataset={"trainUri": "pvc://shared/train.jsonl"},
        output={"uri": "pvc://shared/out"},
    )
    assert manifests.pvc_claims(t.spec) == {"shared": False}
    mounts = manifests.job(t, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert mounts["volumeMounts"][-1] == {
        "name": "pvc-0",
        "mountPath": "/mnt/pvc/shared",
        "readOnly": False,
    }


def test_queue_name_suspends_the_job_for_kueue() -> None:
    job = manifests.job(target(queueName="gpu-queue"), SETTINGS)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # Only the Job carries the queue label; the pods do not.
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    # Created suspended, it is left out of Kueue's sight until resumed.
    held = manifests.job(target(queueName="gpu-queue", suspend=True), SETTINGS)
    assert held["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in held["metadata"]["labels"]


def test_cpu_only_job_requests_no_gpu() -> None:
    job = manifests.job(target(resources={"gpus": 0, "memory": "8Gi"}), SETTINGS)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"memory": "8Gi"}, "limits": {"memory": "8Gi"}}


def test_trainer_command_is_configurable_without_changing_the_job() -> None:
    settings = OperatorSettings(trainer_command=("python", "/stand-in.py", "--config"))
    job = manifests.job(manifests.target(served(), settings), settings)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "/stand-in.py", "--config", CONFIG_PATH]
    expected = minimal_job()["spec"]["template"]["spec"]["containers"][0]
    assert {k: v for k, v in container.items() if k != "command"} == {
        k: v for k, v in expected.items() if k != "command"
    }


def test_pod_meets_pod_security_restricted() -> None:
    """The checks of the PSS "restricted" profile that apply to this pod."""
    pod = manifests.job(target(FULL_MANIFEST), SETTINGS)["spec"]["template"]["spec"]
    allowed_volumes = {
        "configMap", "downwardAPI", "emptyDir", "persistentVolumeClaim", "projected", "secret"
    }  # fmt: skip
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= allowed_volumes, volume
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security.get("privileged") is not True
        assert security["readOnlyRootFilesystem"] is True
        assert "ports" not in container
        # With a read-only root, everything the trainer writes goes to an emptyDir.
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        assert {"/workspace", "/tmp"} <= writable


def test_pod_failure_policy_fails_fast_on_permanent_exit_codes() -> None:
    policy = manifests.job(target(), SETTINGS)["spec"]["podFailurePolicy"]
    ignore, peer_lost, fail = policy["rules"]
    # Disruptions first: a preempted pod never uses up a retry, whatever its exit code.
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert peer_lost["action"] == "Ignore"
    assert peer_lost["onExitCodes"]["values"] == [exitcodes.PEER_LOST]
    assert not set(exitcodes.IGNORED) & set(exitcodes.PERMANENT)
    assert fail["action"] == "FailJob"
    assert set(fail["onExitCodes"]["values"]) == set(exitcodes.PERMANENT)
    assert {exitcodes.DATA_ERROR, exitcodes.CONFIG_ERROR} <= set(fail["onExitCodes"]["values"])
    assert 1 not in fail["onExitCodes"]["values"]  # a crash is retried
    assert 137 not in fail["onExitCodes"]["values"]  # so is a kill


# --------------------------------------------------------------------------- config and RBAC


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("data_format", FORMATS)
def test_the_job_carries_a_valid_trainer_config(method: str, data_format: str) -> None:
    t = target(method=method, dataset={**VALID_MANIFEST["spec"]["dataset"], "format": data_format})
    template = manifests.job(t, SETTINGS)["spec"]["template"]
    text = template["metadata"]["annotations"]["kubetune.dev/trainer-config"]
    assert len(text) < 8192  # a small part of the 256 KiB annotations may hold
    config = TrainerConfig.model_validate_json(text)
    assert config.job is not None
    assert (config.job.namespace, config.job.name, config.job.uid) == (
        NAMESPACE,
        "support-lora",
        UID,
    )
    assert config.spec.method == method
    assert config.spec.dataset.format == data_format
    assert config.work_dir == "/workspace"


def test_config_has_the_operators_defaults_filled_in() -> None:
    config = manifests.trainer_config(target())
    assert config.spec.storage.endpoint == "http://minio.storage:9000"
    assert config.spec.image == IMAGE
    assert config.spec.resources.gpu_resource_name == "nvidia.com/gpu"
    # Everything else is the spec as the API server defaulted it.
    spec = served()["spec"]
    dumped = config.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    assert {k: v for k, v in dumped.items() if k not in ("storage", "image")} == {
        k: v for k, v in spec.items() if k != "storage"
    }


def test_explicit_settings_win_over_operator_defaults() -> None:
    t = target(
        storage={"endpoint": "https://s3.example"},
        image="registry.example/trainer:v2",
        resources={"gpuResourceName": "nvidia.com/mig-1g.10gb"},
    )
    amd = OperatorSettings(default_gpu_resource_name="amd.com/gpu")
    assert t.spec.storage.endpoint == "https://s3.example"
    assert t.spec.image == "registry.example/trainer:v2"
    assert manifests.target(served(), amd).spec.resources.gpu_resource_name == "amd.com/gpu"
    explicit = manifests.target(served(resources={"gpuResourceName": "x.io/tpu"}), amd)
    assert explicit.spec.resources.gpu_resource_name == "x.io/tpu"


def test_config_rendering_is_deterministic() -> None:
    assert manifests.render_config(target()) == manifests.render_config(target())
    assert json.loads(manifests.render_config(target()))["kind"] == "TrainerConfig"


def test_the_namespaces_trainers_may_get_and_patch_finetunejob_status_only() -> None:
    account, role, binding = manifests.trainer_identity(NAMESPACE)
    identity = {"name": "kubetune-trainer", "namespace": NAMESPACE}
    for obj in (account, role, binding):
        assert {k: obj["metadata"][k] for k in identity} == identity
        assert "ownerReferences" not in obj["metadata"]  # shared by the namespace's jobs
    # Which job's status: the chart's admission policy (templates/trainer-status-policy.yaml).
    assert role["rules"] == [
        {"apiGroups": ["kubetune.dev"], "resources": ["finetunejobs/status"],
         "verbs": ["get", "patch"]}
    ]  # fmt: skip
    assert binding["roleRef"]["name"] == "kubetune-trainer"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kubetune-trainer", "namespace": NAMESPACE}
    ]
    assert account["automountServiceAccountToken"] is False  # the pod mounts it explicitly


def test_a_finetunejob_has_one_child_its_job() -> None:
    (child,) = manifests.children(target(), SETTINGS)
    assert child["kind"] == "Job"
    assert child["metadata"]["ownerReferences"] == [OWNER]
    assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"


# ------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("length", [1, 10, 57, 58, 63, 64, 100, 253])
def test_names_are_deterministic_dns_labels(length: int) -> None:
    name = ("a" * (length - 1) + "z") if length > 1 else "z"
    names = manifests.Names.of(name)
    assert names == manifests.Names.of(name)
    assert len(names.job) <= 63 and DNS_LABEL.match(names.job), names.job
    label = manifests.truncate(name)
    assert len(label) <= 63 and LABEL_VALUE.match(label)
    if length <= 57:
        assert names.job == f"{name}-train"


def test_long_names_that_share_a_prefix_stay_distinct() -> None:
    first, second = "x" * 70 + "-one", "x" * 70 + "-two"
    assert manifests.Names.of(first).job != manifests.Names.of(second).job
    assert manifests.truncate(first) != manifests.truncate(second)


def test_long_dotted_names_keep_the_full_name_in_an_annotation() -> None:
    name = "team.a." + "b" * 120
    t = manifests.target(served(name=name), SETTINGS)
    job = manifests.job(t, SETTINGS)
    assert len(job["metadata"]["labels"]["kubetune.dev/finetunejob"]) <= 63
    assert manifests.ftj_name_of(job) == name
    assert manifests.ftj_name_of({"metadata": job["spec"]["template"]["metadata"]}) == name


# ---------------------------------------------------------------------------------- updates


def test_settings_patch_carries_the_mutable_fields() -> None:
    patch = manifests.job_settings_patch(target(maxRetries=5, timeout="2h", queueName="q"))
    assert patch == {
        "metadata": {"labels": {"kueue.x-k8s.io/queue-name": "q"}},
        "spec": {"backoffLimit": 5, "activeDeadlineSeconds": 7200},
    }
    # Unset values are removed from the Job (merge-patch null).
    cleared = manifests.job_settings_patch(target())
    assert cleared["spec"]["activeDeadlineSeconds"] is None
    assert cleared["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] is None


QUEUE = "kueue.x-k8s.io/queue-name"


@pytest.mark.parametrize(
    ("ftj", "job", "expected"),
    [
        # (spec.suspend, spec.queueName), (Job suspended, its queue label), (patch, active)
        ((True, None), (False, None), ({"spec": {"suspend": True}}, None)),
        ((False, None), (True, None), ({"spec": {"suspend": False}}, None)),
        ((True, None), (True, None), (None, None)),
        ((False, None), (False, None), (None, None)),
        # Kueue manages the Job (it carries the label): its Workload is deactivated, because
        # Kueue unsuspends any admitted Job; Kueue then suspends it.
        ((True, "q"), (False, "q"), (None, False)),
        ((True, "q"), (True, "q"), (None, False)),
        # Resumed: the Workload is activated and Kueue admits (and unsuspends) the Job.
        ((False, "q"), (True, "q"), (None, True)),
        # Created suspended, so not yet queued: resuming hands it to Kueue by its label.
        ((False, "q"), (True, None), ({"metadata": {"labels": {QUEUE: "q"}}}, None)),
        # The queue was changed, or removed, while suspended.
        ((False, "r"), (True, "q"), ({"metadata": {"labels": {QUEUE: "r"}}}, True)),
        (
            (False, None),
            (True, "q"),
            ({"metadata": {"labels": {QUEUE: None}}, "spec": {"suspend": False}}, True),
        ),
    ],
)
def test_suspend_follows_spec_and_kueue(
    ftj: tuple[bool, str | None],
    job: tuple[bool, str | None],
    expected: tuple[dict[str, Any] | None, bool | None],
) -> None:
    (suspend, queue), (job_suspended, job_queue) = ftj, job
    spec = target(suspend=suspend, **({"queueName": queue} if queue else {})).spec
    body = {
        "metadata": {"labels": {QUEUE: job_queue} if job_queue else {}},
        "spec": {"suspend": job_suspended},
    }
    assert (manifests.suspend_patch(spec, body), manifests.workload_active(spec, body)) == expected


@pytest.mark.parametrize("queue", [None, "q"])
def test_cancel_halts_the_job_like_suspend_for_good(queue: str | None) -> None:
    spec = target(cancel=True, **({"queueName": queue} if queue else {})).spec
    running = {"metadata": {"labels": {QUEUE: queue} if queue else {}}, "spec": {"suspend": False}}
    if queue is None:
        assert manifests.suspend_patch(spec, running) == {"spec": {"suspend": True}}
    else:  # Kueue's Job: its Workload is deactivated (Kueue suspends it, the quota frees up)
        assert manifests.workload_active(spec, running) is False
    created = manifests.job(manifests.Target("x", NAMESPACE, UID, spec), SETTINGS)
    assert created["spec"]["suspend"] is True
    assert QUEUE not in created["metadata"]["labels"]


def test_grace_period_scratch_size_and_job_ttl_are_configurable() -> None:
    t = target(checkpointing={"gracePeriodSeconds": 900}, resources={"scratchSize": "1Ti"})
    settings = OperatorSettings(job_ttl_seconds=600)
    job = manifests.job(t, settings)
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "1Ti"}
    assert all("sizeLimit" in v["emptyDir"] for v in volumes.values() if "emptyDir" in v)
    assert job["spec"]["ttlSecondsAfterFinished"] == 600


def test_settings_patch_leaves_the_queue_label_to_resuming_while_suspended() -> None:
    patch = manifests.job_settings_patch(target(suspend=True, queueName="q", maxRetries=1))
    assert patch == {"spec": {"backoffLimit": 1, "activeDeadlineSeconds": None}}


def test_builders_do_not_mutate_their_input() -> None:
    ftj = served(FULL_MANIFEST)
    before = copy.deepcopy(ftj)
    manifests.children(manifests.target(ftj, SETTINGS), SETTINGS)
    assert ftj == before


def test_default_credentials_secret_applies_only_to_jobs_without_one() -> None:
    settings = OperatorSettings(default_credentials_secret="team-s3")
    plain = served()
    plain["spec"]["storage"].pop("credentialsSecretRef", None)
    job = manifests.job(manifests.target(plain, settings), settings)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-s3",
        "key": "AWS_ACCESS_KEY_ID",
    }
    own = served(storage={"credentialsSecretRef": {"name": "mine"}})
    job = manifests.job(manifests.target(own, settings), settings)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    # Without the setting, a job without a Secret gets no credential variables at all.
    job = manifests.job(manifests.target(plain, SETTINGS), SETTINGS)
    names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "AWS_ACCESS_KEY_ID" not in names


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_several_gpus_run_one_trainer_process_per_gpu(gpus: int) -> None:
    job = manifests.job(target(resources={"gpus": gpus}), SETTINGS)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-3:] == ["kubetune-trainer", "--config", CONFIG_PATH]
    if gpus > 1:
        # kubetune-launch, not torchrun: torchrun exits 1 for any failure, and a data error
        # on 4 GPUs must still fail at once (PERMANENT) instead of being retried.
        assert command[:6] == ["kubetune-launch", "--grace-seconds=120", "--standalone",
                               "--nnodes=1", "--nproc-per-node=4", "--no-python"]  # fmt: skip
    else:
        assert command == ["kubetune-trainer", "--config", CONFIG_PATH]


def test_processes_per_node_on_cpu_trains_data_parallel_over_gloo() -> None:
    job = manifests.job(target(resources={"gpus": 0, "processesPerNode": 3}), SETTINGS)
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--nproc-per-node=3" in command and "--standalone" in command


def test_several_nodes_run_as_one_indexed_gang_behind_a_headless_service() -> None:
    t = target(resources={"gpus": 8, "nodes": 4})
    service, job = manifests.children(t, SETTINGS)
    # The Service comes first: the pods' names must resolve when the rendezvous starts.
    assert service["kind"] == "Service" and service["metadata"]["name"] == "support-lora-workers"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"kubetune.dev/finetunejob": "support-lora",
                                           "app.kubernetes.io/managed-by": "kubetune"}  # fmt: skip
    assert service["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (4, 4, "Indexed")
    # One retry is one gang restart: the peers of a failed pod exit PEER_LOST, which is ignored.
    assert spec["backoffLimit"] == 2
    assert spec["podFailurePolicy"] == POD_FAILURE_POLICY
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "support-lora-workers"
    # Every pod gets the per-node resources.
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    command = pod["containers"][0]["command"]
    assert command == [
        "kubetune-launch",
        "--grace-seconds=120",
        "--nnodes=4",
        "--nproc-per-node=8",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=support-lora-train-0.support-lora-workers",
        "--master-port=29500",
        "--no-python",
        "kubetune-trainer",
        "--config",
        CONFIG_PATH,
    ]


def test_a_single_node_job_has_no_service_and_is_not_indexed() -> None:
    (job,) = manifests.children(target(), SETTINGS)
    assert "completionMode" not in job["spec"]
    assert "subdomain" not in job["spec"]["template"]["spec"]


def test_the_rendezvous_port_is_spread_over_a_range_by_job() -> None:
    """On the process node every pod shares one network: two gangs need two ports."""
    settings = OperatorSettings(rendezvous_ports="30000-30999")
    ports = set()
    for uid in ("a", "b", "c", "d", "e", "f"):
        manifest = served(resources={"gpus": 0, "nodes": 2})
        manifest["metadata"]["uid"] = uid
        t = manifests.target(manifest, settings)
        port = manifests.rendezvous_port(t, settings)
        assert 30000 <= port <= 30999
        assert port == manifests.rendezvous_port(t, settings)  # stable for the job
        ports.add(port)
    assert len(ports) > 1
    with pytest.raises(ValueError):
        OperatorSettings(rendezvous_ports="30999-30000")


def test_image_pull_secrets_reach_training_and_serving_pods() -> None:
    from kubetune_operator import serving, serving_manifests  # noqa: PLC0415

    settings = OperatorSettings(image_pull_secrets=("regcred", "mirror"))
    pod = manifests.job(target(), settings)["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    assert "imagePullSecrets" not in manifests.job(target(), SETTINGS)["spec"]["template"]["spec"]
    ftj = served(serving={"enabled": True}, status={"phase": "Succeeded"})
    jobs = serving.assess_jobs(NAMESPACE, [ftj], settings)
    (plan,) = serving.plan_servers(jobs, {ftj["metadata"]["name"]: ftj}).values()
    server_pod = serving_manifests.deployment(plan, 8000, settings)["spec"]["template"]["spec"]
    assert server_pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
