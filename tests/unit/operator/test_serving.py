"""Serving, pure: which servers a namespace needs, what they hold, their manifests, and each
job's status.serving from what is observed."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from ftj_objects import NAMESPACE, served

from kubetune_operator import serving
from kubetune_operator import serving_manifests as sm
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.serving import AdapterReport, DesiredState, ServerState

SETTINGS = OperatorSettings(default_credentials_secret="s3-credentials")
SUCCEEDED = {"phase": "Succeeded", "metrics": {"evalLoss": 1.0, "baseEvalLoss": 2.0}}
Obj = dict[str, Any]


def job(name: str, uid: str, status: Obj | None = None, **spec: Any) -> Obj:
    spec.setdefault("serving", {"enabled": True})
    spec.setdefault("output", {"uri": f"s3://outputs/{name}"})
    ftj = served(name=name, status=copy.deepcopy(SUCCEEDED if status is None else status), **spec)
    ftj["metadata"]["uid"] = uid
    return ftj


def plans(*ftjs: Obj, settings: OperatorSettings = SETTINGS) -> dict[str, serving.ServerPlan]:
    jobs = serving.assess_jobs(NAMESPACE, ftjs, settings)
    return serving.plan_servers(jobs, {f["metadata"]["name"]: f for f in ftjs})


def test_adapters_of_one_base_share_one_server_a_full_fine_tune_has_its_own() -> None:
    a, b = job("a", "uid-a"), job("b", "uid-b", lora={"r": 32})
    full = job("full", "uid-f", method="full")
    waiting = job("later", "uid-l", status={"phase": "Running"})
    off = job("off", "uid-o", serving={"enabled": False})
    found = plans(a, b, full, waiting, off)
    assert len(found) == 2
    lora = next(p for p in found.values() if p.key.mode == "lora")
    assert [x.name for x in lora.desired().adapters] == ["a", "b"]
    assert [x.uri for x in lora.adapters] == ["s3://outputs/a/", "s3://outputs/b/"]
    assert lora.max_lora_rank(SETTINGS) == 32  # the largest adapter, rounded to vLLM's values
    assert {j["metadata"]["name"] for j in lora.jobs} == {"a", "b"}
    solo = next(p for p in found.values() if p.key.mode == "full")
    assert solo.adapters == [] and [j["metadata"]["name"] for j in solo.jobs] == ["full"]


def test_the_servers_manifests() -> None:
    (plan,) = plans(job("a", "uid-a"), job("b", "uid-b")).values()
    deployment = sm.deployment(plan, 18101, SETTINGS)
    owners = deployment["metadata"]["ownerReferences"]
    assert [(o["name"], o["uid"]) for o in owners] == [("a", "uid-a"), ("b", "uid-b")]
    assert not any(o.get("controller") for o in owners)
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == [
        "kubetune-serving-agent", "fetch-model", "--uri", "s3://models/qwen2.5-0.5b/",
        "--dest", "/models/base"]  # fmt: skip
    vllm, agent = pod["containers"]
    command = vllm["command"]
    assert command[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--served-model-name") + 1] == "s3://models/qwen2.5-0.5b/"
    assert command[command.index("--port") + 1] == "18101"
    assert command[command.index("--max-lora-rank") + 1] == "16"
    assert "--enable-lora" in command
    assert vllm["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in vllm["env"]
    assert vllm["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    agent_env = {e["name"]: e for e in agent["env"]}
    assert agent_env["KUBETUNE_VLLM_URL"]["value"] == "http://127.0.0.1:18101"
    assert agent_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
    # Pod Security "restricted" for every container.
    for container in [init, vllm, agent]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] and not security["allowPrivilegeEscalation"]
        assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    # The agent may read its desired ConfigMap and patch its state ConfigMap, nothing else.
    role = sm.role(plan)
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"],
         "resourceNames": [f"{plan.name}-desired"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"],
         "resourceNames": [f"{plan.name}-state"], "verbs": ["get", "patch"]},
    ]  # fmt: skip
    desired = DesiredState.model_validate_json(sm.desired_config_map(plan)["data"]["desired.json"])
    assert [a.name for a in desired.adapters] == ["a", "b"]
    # The template hash changes exactly when the pod changes.
    bigger = plans(job("a", "uid-a"), job("c", "uid-c", lora={"r": 64}))
    (grown,) = bigger.values()
    assert sm.deployment(grown, 18101, SETTINGS)["metadata"]["annotations"] != deployment[
        "metadata"]["annotations"]  # fmt: skip
    same = sm.deployment(plan, 18101, SETTINGS)["metadata"]["annotations"]
    assert same == deployment["metadata"]["annotations"]


def test_ports_are_per_server_from_a_range_or_one_for_all() -> None:
    ranged = OperatorSettings(serving_ports="18100-18102")
    assert serving.server_port("new", {"old": 18100}, ranged) == 18101
    assert serving.server_port("old", {"old": 18100}, ranged) == 18100
    full = {"a": 18100, "b": 18101, "c": 18102}
    assert serving.server_port("d", full, ranged) is None
    assert serving.server_port("d", full, OperatorSettings()) == 8000


def _ready_pod(ip: str = "10.1.2.3") -> Obj:
    return {
        "metadata": {"name": "p"},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
    }


def status_of(ftj: Obj, observed: serving.ServerObservation | None, **settings: Any) -> Any:
    config = OperatorSettings(**settings)
    (assessed,) = serving.assess_jobs(NAMESPACE, [ftj], config)
    return serving.job_serving_status(assessed, observed, 18101, config, NAMESPACE)


def test_status_follows_the_server_and_the_adapter() -> None:
    ftj = job("a", "uid-a")
    deployment = {"metadata": {"name": "s"}, "spec": {"replicas": 1}}
    assert status_of(ftj, None).phase == "Starting"
    starting = serving.ServerObservation(deployment, [], None)
    assert status_of(ftj, starting).reason == "ServerStarting"
    loading = serving.ServerObservation(deployment, [_ready_pod()], ServerState(vllm_ready=True))
    assert status_of(ftj, loading).phase == "Loading"
    state = ServerState(
        vllm_ready=True, adapters={"a": AdapterReport(state="Loaded", uri="s3://outputs/a/")}
    )
    up = status_of(ftj, serving.ServerObservation(deployment, [_ready_pod()], state))
    assert (up.phase, up.model) == ("Serving", "a")
    assert up.endpoint == f"http://{up.server}.{NAMESPACE}.svc:8000/v1"
    local = status_of(
        ftj, serving.ServerObservation(deployment, [_ready_pod("127.0.0.1")], state),
        serving_address="pod",
    )  # fmt: skip
    assert local.endpoint == "http://127.0.0.1:18101/v1"
    failed = ServerState(
        vllm_ready=True,
        adapters={"a": AdapterReport(state="Failed", uri="u", message="adapter_model.safetensors "
                                     "does not match SHA256SUMS")},
    )  # fmt: skip
    broken = status_of(ftj, serving.ServerObservation(deployment, [_ready_pod()], failed))
    assert (broken.phase, broken.reason) == ("Failed", "AdapterLoadFailed")
    assert "SHA256SUMS" in broken.message


@pytest.mark.parametrize(
    ("container", "reason"),
    [
        ({"name": "vllm", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
          "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}},
         "ServerOutOfMemory"),
        ({"name": "vllm", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
          "lastState": {"terminated": {"exitCode": 1, "message": "ValueError: bad model"}}},
         "ServerFailing"),
    ],
)  # fmt: skip
def test_a_failing_server_says_why(container: Obj, reason: str) -> None:
    pod = {"metadata": {"name": "p"}, "status": {"containerStatuses": [container]}}
    observed = serving.ServerObservation({"metadata": {}}, [pod], None)
    result = status_of(job("a", "uid-a"), observed)
    assert (result.phase, result.reason) == ("Failed", reason)


def test_a_gate_that_refuses_and_a_rank_above_the_maximum_are_not_served() -> None:
    worse = job("worse", "uid-w", status={"phase": "Succeeded",
                "metrics": {"evalLoss": 3.0, "baseEvalLoss": 2.0}},
                serving={"enabled": True, "promotionGate": "evalLoss"})  # fmt: skip
    result = status_of(worse, None)
    assert (result.phase, result.reason) == ("NotServed", "PromotionGateRefused")
    assert plans(worse) == {}
    wide = job("wide", "uid-x", lora={"r": 128})
    result = status_of(wide, None)
    assert (result.phase, result.reason) == ("NotServed", "AdapterRankTooLarge")
    assert "rank 128 is above the servers' maximum 64" in result.message
    assert plans(wide) == {}


def test_a_pvc_base_model_is_mounted_read_only_where_fetch_model_links_it() -> None:
    ftj = job("p", "uid-p", baseModel={"uri": "pvc://models/llama-3"})
    (plan,) = plans(ftj).values()
    pod = sm.deployment(plan, 8000, SETTINGS)["spec"]["template"]["spec"]
    (claim,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    init, vllm = pod["initContainers"][0], pod["containers"][0]
    for container in (init, vllm):
        mount = next(m for m in container["volumeMounts"] if m["name"] == claim["name"])
        assert mount == {"name": claim["name"], "mountPath": "/mnt/pvc/models", "readOnly": True}
