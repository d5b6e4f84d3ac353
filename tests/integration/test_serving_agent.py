"""The serving agent against the real vLLM CPU engine, the local API server and MinIO.

Nothing is trained here: a tiny random-init Llama (head_dim 32, the smallest vLLM's CPU
attention runs) and LoRA adapters made with peft (random, non-zero B weights, so each adapter
changes the output) are published to MinIO like the trainer publishes them (files, then
SHA256SUMS). The base model comes to vLLM through `kubetune-serving-agent fetch-model`, as in
the init container; vLLM runs as a subprocess with --enable-lora (started twice per module:
once, and again for the restart test); the agent runs as `kubetune-serving-agent run` with a
token of a ServiceAccount that has exactly the Role the operator creates (agent_role below),
and nothing else.

Equality with transformers + peft: exact token ids of an 8-token greedy completion, both in
float32 (vLLM with --dtype float32), through the official openai client.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openai
import pytest
import torch
import yaml
from peft import PeftModel
from trainer_support import S3, build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from vllm_support import VllmServer, build_adapter

from kubetune_trainer import exitcodes
from kubetune_trainer.api import StorageConfig
from kubetune_trainer.publish import save_adapter, upload_outputs
from kubetune_trainer.serving import (
    DESIRED_KEY,
    STATE_KEY,
    DesiredAdapter,
    DesiredState,
    ServerState,
    storage_json,
)
from kubetune_trainer.storage import MANIFEST_NAME, Storage
from localenv.testing import DEV, Cluster, free_port, wait_until

pytest_plugins = ["trainer_fixtures"]
pytestmark = [pytest.mark.cluster, pytest.mark.slow]

torch.set_num_threads(1)

AGENT = [str(Path(sys.executable).parent / "kubetune-serving-agent")]
SERVED_BASE = "tiny-llama"
MAX_LORA_RANK = 8
MAX_NEW_TOKENS = 8
MESSAGES = [{"role": "user", "content": "count: one two three"}]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TIMINGS: dict[str, float] = {}


def agent_role(server: str) -> dict[str, Any]:
    """The serving agent's Role, exactly as the operator creates it (named after the server,
    like its ServiceAccount and RoleBinding)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": server},
        "rules": [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"],
             "resourceNames": [f"{server}-desired"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"],
             "resourceNames": [f"{server}-state"]},
        ],
    }  # fmt: skip


def tail(path: Path, lines: int = 40) -> str:
    return (
        "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
    )


# ------------------------------------------------------------------------------- the assets


@dataclass
class Assets:
    base_dir: Path  # the tiny Llama as built locally (the reference loads it from here)
    base_uri: str
    adapters: dict[str, Path]  # name -> local adapter directory
    uris: dict[str, str]  # name -> published output prefix
    ranks: dict[str, int]


@pytest.fixture(scope="module")
def storage(cluster: Cluster) -> Storage:
    config = StorageConfig(endpoint=cluster.s3_env["AWS_ENDPOINT_URL"])
    return Storage(config, env=cluster.s3_env, use_cache=False)


@pytest.fixture(scope="module")
def assets(s3: S3, storage: Storage, tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("serving-assets")
    base_dir = build_tiny_model(root / "base", heads=2)
    base_uri = s3.upload_dir(base_dir, "serving/models/tiny-llama") + "/"
    ranks = {"ada": 8, "bob": 8, "tampered": 8, "nosums": 8, "wide": 16}
    adapters: dict[str, Path] = {}
    uris: dict[str, str] = {}
    for seed, (name, rank) in enumerate(ranks.items(), start=1):
        local = build_adapter(
            base_dir, root / name, rank, seed, targets=LORA_TARGETS,
            save=lambda model, out: save_adapter(model, out, base_uri),  # as the trainer saves it
        )  # fmt: skip
        adapters[name] = local
        uris[name] = s3.uri(f"serving/outputs/{name}/")
        if name == "nosums":  # files without the manifest: an incomplete output
            s3.upload_dir(local, f"serving/outputs/{name}")
            continue
        upload_outputs(storage, local, uris[name])
    # Never fetched: not listed in SHA256SUMS (a checkpoint, the training log).
    s3.put("serving/outputs/ada/checkpoints/step-000000001/adapter_model.safetensors", b"x" * 64)
    s3.put("serving/outputs/ada/.kubetune/metrics.jsonl", b"{}\n")
    # Changed after publishing: same size, other bytes.
    weights = bytearray((adapters["tampered"] / "adapter_model.safetensors").read_bytes())
    weights[-100] ^= 0xFF
    s3.put("serving/outputs/tampered/adapter_model.safetensors", bytes(weights))
    return Assets(base_dir, base_uri, adapters, uris, ranks)


def reference_ids(assets: Assets, name: str | None) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy completion ids) from transformers (+ peft), float32."""
    tokenizer = AutoTokenizer.from_pretrained(assets.base_dir)
    prompt = list(
        tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    model: Any = AutoModelForCausalLM.from_pretrained(assets.base_dir, dtype=torch.float32)
    if name is not None:
        model = PeftModel.from_pretrained(model, str(assets.adapters[name]))
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return prompt, out[0, len(prompt) :].tolist()


def agent_env(cluster: Cluster, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "KUBECONFIG"))}
    config = StorageConfig(endpoint=cluster.s3_env["AWS_ENDPOINT_URL"])
    env.update(
        {
            "AWS_ACCESS_KEY_ID": cluster.s3_env["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": cluster.s3_env["AWS_SECRET_ACCESS_KEY"],
            "KUBETUNE_STORAGE": storage_json(config),
            **extra,
        }
    )
    return env


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pod's /models (an emptyDir shared by the three containers)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def vllm(
    cluster: Cluster, assets: Assets, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    # The init container: the base model from S3 into /models/base.
    started = time.monotonic()
    fetched = subprocess.run(
        [*AGENT, "fetch-model", "--uri", assets.base_uri, "--dest", str(models_dir / "base")],
        env=agent_env(cluster, {}), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr
    TIMINGS["fetch_model_s"] = time.monotonic() - started
    assert (models_dir / "base" / "config.json").is_file()
    server = VllmServer(
        models_dir / "base", SERVED_BASE, free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log",
        max_lora_rank=MAX_LORA_RANK, max_loras=2,
    )  # fmt: skip
    try:
        TIMINGS["vllm_start_to_ready_s"] = server.start().startup_s
        yield server
    finally:
        server.stop()
        print(f"\nserving timings (2-core VM): {json.dumps(TIMINGS, sort_keys=True)}")


# ------------------------------------------------------------------------------- the agent


@dataclass
class AgentRun:
    cluster: Cluster
    namespace: str
    server: str
    log_path: Path
    adapter_dir: Path
    process: subprocess.Popen[bytes]

    def set_desired(self, assets: Assets, *names: str) -> None:
        desired = DesiredState(
            adapters=[
                DesiredAdapter(name=n, uri=assets.uris[n], rank=assets.ranks[n]) for n in names
            ]
        )
        self.cluster.apply(configmap(f"{self.server}-desired", DESIRED_KEY, desired.to_json()),
                           self.namespace)  # fmt: skip

    def state_object(self) -> dict[str, Any]:
        return self.cluster.get("configmap", f"{self.server}-state", self.namespace)

    def state(self) -> ServerState | None:
        text = (self.state_object().get("data") or {}).get(STATE_KEY)
        return ServerState.model_validate_json(text) if text else None

    def wait_for(self, what: str, timeout: float = 120, **expected: str) -> ServerState:
        """Until vLLM is ready and each named adapter has the expected state (and no other
        adapter is reported)."""

        def check() -> ServerState | None:
            assert self.process.poll() is None, tail(self.log_path)
            state = self.state()
            if state is None or not state.vllm_ready:
                return None
            got = {name: report.state for name, report in state.adapters.items()}
            return state if got == expected else None

        try:
            return wait_until(check, timeout=timeout, what=what, interval=0.5)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nstate: {self.state()}\nagent:\n{tail(self.log_path)}"
            ) from None


def configmap(name: str, key: str, text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name},
        "data": {key: text},
    }


@pytest.fixture(scope="module")
def agent_namespace(cluster: Cluster) -> Iterator[str]:
    with cluster.namespace() as name:
        yield name


@pytest.fixture(scope="module")
def agent(
    cluster: Cluster,
    agent_namespace: str,
    vllm: VllmServer,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AgentRun]:
    """The agent with the operator's objects: its ServiceAccount, Role and RoleBinding, the
    desired ConfigMap (no adapters) and the state ConfigMap (an empty ServerState)."""
    server = f"kubetune-serve-{uuid.uuid4().hex[:10]}"
    account = server
    ns = agent_namespace
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": account},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
    }
    cluster.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}},
            agent_role(server),
            binding,
            configmap(f"{server}-desired", DESIRED_KEY, DesiredState().to_json()),
            configmap(f"{server}-state", STATE_KEY, ServerState().to_json()),
        ],
        ns,
    )
    # The pod's service account directory: a token of that account and the cluster's CA.
    sa_dir = tmp_path_factory.mktemp("serviceaccount")
    token = cluster.kubectl("create", "token", account, "-n", ns, "--duration", "2h").stdout
    (sa_dir / "token").write_text(token.strip())
    admin = yaml.safe_load(cluster.kubeconfig.read_text())["clusters"][0]["cluster"]
    shutil.copy(admin.get("certificate-authority") or DEV / "pki" / "ca.crt", sa_dir / "ca.crt")
    api = urlparse(admin["server"])
    adapter_dir = models_dir / "adapters"
    log_path = tmp_path_factory.mktemp("agent") / "agent.log"
    env = agent_env(
        cluster,
        {
            "KUBETUNE_SERVER_NAME": server,
            "POD_NAMESPACE": ns,
            "KUBETUNE_VLLM_URL": vllm.url,
            "KUBETUNE_ADAPTER_DIR": str(adapter_dir),
            "KUBETUNE_AGENT_INTERVAL": "1",
            "KUBETUNE_SA_DIR": str(sa_dir),
            "KUBERNETES_SERVICE_HOST": str(api.hostname),
            "KUBERNETES_SERVICE_PORT": str(api.port),
        },
    )
    with log_path.open("ab") as log:
        process = subprocess.Popen([*AGENT, "run"], stdout=log, stderr=subprocess.STDOUT, env=env)
    run = AgentRun(cluster, ns, server, log_path, adapter_dir, process)
    try:
        run.wait_for("vllmReady with no adapters", timeout=60)
        yield run
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def complete(vllm: VllmServer, model: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a greedy chat completion through the openai client."""
    response = vllm.client().chat.completions.create(
        model=model,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=MAX_NEW_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    extra = response.model_extra or {}
    choice_extra = response.choices[0].model_extra or {}
    return list(extra["prompt_token_ids"]), list(choice_extra["token_ids"])


def first_token_latency(vllm: VllmServer, model: str, runs: int = 5) -> float:
    """Median seconds from request to the first streamed token."""
    latencies = []
    client = vllm.client()
    for _ in range(runs):
        started = time.monotonic()
        stream = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                latencies.append(time.monotonic() - started)
                break
        stream.close()
    return sorted(latencies)[len(latencies) // 2]


# ----------------------------------------------------------------------------------- tests


def test_fetch_model_checks_a_full_fine_tunes_files_and_says_what_is_wrong(
    cluster: Cluster, s3: S3, storage: Storage, tmp_path: Path
) -> None:
    """fetch-model --verify-manifest: only the listed files, each checked; a changed file, a
    missing output and refused credentials each exit with the trainer's code and one line."""
    local = build_tiny_model(tmp_path / "full", heads=2)
    uri = s3.uri("serving/outputs/full/")
    upload_outputs(storage, local, uri)
    s3.put("serving/outputs/full/checkpoints/step-000000002/model.safetensors", b"x" * 64)
    env = agent_env(cluster, {"KUBETUNE_TERMINATION_LOG": str(tmp_path / "termination-log")})

    def fetch(source: str, dest: Path, run_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*AGENT, "fetch-model", "--uri", source, "--dest", str(dest), "--verify-manifest"],
            env=run_env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    ok = fetch(uri, tmp_path / "models" / "base", env)
    assert ok.returncode == 0, ok.stderr
    fetched = sorted(p.name for p in (tmp_path / "models" / "base").iterdir())
    assert fetched == sorted([*(p.name for p in local.iterdir()), MANIFEST_NAME])
    assert "files match its SHA256SUMS" in ok.stderr

    config = json.loads((local / "config.json").read_text())
    config["hidden_act"] = "gelu"
    s3.put("serving/outputs/full/config.json", json.dumps(config))
    bad = fetch(uri, tmp_path / "models" / "bad", env)
    assert bad.returncode == exitcodes.DATA_ERROR, bad.stderr
    message = (tmp_path / "termination-log").read_text()
    assert "checksum mismatch: config.json has SHA-256" in message, message
    assert not (tmp_path / "models" / "bad").exists()  # nothing unverified where vLLM looks

    missing = fetch(s3.uri("serving/outputs/never-published/"), tmp_path / "m", env)
    assert missing.returncode == exitcodes.INPUT_NOT_FOUND, missing.stderr
    assert "SHA256SUMS does not exist" in (tmp_path / "termination-log").read_text()

    secret = "wrong-secret-" + uuid.uuid4().hex
    denied = fetch(uri, tmp_path / "d", {**env, "AWS_SECRET_ACCESS_KEY": secret})
    assert denied.returncode == exitcodes.STORAGE_ERROR, denied.stderr
    written = (tmp_path / "termination-log").read_text()
    assert secret not in denied.stderr + denied.stdout + written
    assert env["AWS_ACCESS_KEY_ID"] not in denied.stderr + written


def test_agent_role_grants_only_its_two_configmaps(cluster: Cluster, agent: AgentRun) -> None:
    who = f"system:serviceaccount:{agent.namespace}:{agent.server}"

    def can(*args: str) -> bool:
        result = cluster.kubectl("auth", "can-i", *args, "-n", agent.namespace, "--as", who,
                                 check=False)  # fmt: skip
        return result.stdout.strip() == "yes"

    assert can("get", f"configmap/{agent.server}-desired")
    assert can("get", f"configmap/{agent.server}-state")
    assert can("patch", f"configmap/{agent.server}-state")
    assert not can("patch", f"configmap/{agent.server}-desired")
    assert not can("get", "configmap/other")
    assert not can("list", "configmaps")
    assert not can("get", "secrets")
    assert not can("get", "finetunejobs.kubetune.dev")


def test_desired_adapter_is_loaded_and_answers_like_transformers_with_peft(
    agent: AgentRun, vllm: VllmServer, assets: Assets
) -> None:
    started = time.monotonic()
    agent.set_desired(assets, "ada")
    state = agent.wait_for("ada Loaded", ada="Loaded")
    TIMINGS["adapter_desired_to_loaded_s"] = time.monotonic() - started
    report = state.adapters["ada"]
    assert report.uri == assets.uris["ada"]
    assert report.manifest_sha256 is not None
    directory = agent.adapter_dir / "ada" / report.manifest_sha256
    assert vllm.adapters() == {"ada": str(directory)}
    # Exactly the listed files, each as published: no checkpoint, no training log.
    listed = (directory / MANIFEST_NAME).read_bytes()
    assert hashlib.sha256(listed).hexdigest() == report.manifest_sha256
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [*(p.name for p in assets.adapters["ada"].iterdir()), MANIFEST_NAME]
    )

    prompt, reference = reference_ids(assets, "ada")
    served_prompt, served = complete(vllm, "ada")
    assert served_prompt == prompt
    assert served == reference  # exact ids, float32 on both sides
    _, base = reference_ids(assets, None)
    assert served != base, "the adapter changes nothing: the test would prove nothing"
    assert complete(vllm, SERVED_BASE)[1] == base
    TIMINGS["first_token_latency_adapter_s"] = first_token_latency(vllm, "ada")
    TIMINGS["first_token_latency_base_s"] = first_token_latency(vllm, SERVED_BASE)

    # Level-based, but quiet: nothing changes, nothing is written.
    version = agent.state_object()["metadata"]["resourceVersion"]
    time.sleep(3.5)
    assert agent.state_object()["metadata"]["resourceVersion"] == version


def test_two_adapters_each_answer_as_themselves(
    agent: AgentRun, vllm: VllmServer, assets: Assets
) -> None:
    agent.set_desired(assets, "ada", "bob")
    agent.wait_for("ada and bob Loaded", ada="Loaded", bob="Loaded")
    ada, bob = complete(vllm, "ada")[1], complete(vllm, "bob")[1]
    assert ada != bob
    assert ada == reference_ids(assets, "ada")[1]
    assert bob == reference_ids(assets, "bob")[1]


def test_adapter_no_longer_desired_is_unloaded_and_deleted(
    agent: AgentRun, vllm: VllmServer, assets: Assets
) -> None:
    agent.set_desired(assets, "bob")
    agent.wait_for("ada gone", bob="Loaded")
    wait_until(lambda: "ada" not in vllm.adapters(), timeout=10, what="ada unloaded")
    with pytest.raises(openai.NotFoundError):
        complete(vllm, "ada")
    assert not (agent.adapter_dir / "ada").exists()
    assert complete(vllm, "bob")[1] == reference_ids(assets, "bob")[1]


def test_bad_adapters_fail_with_a_reason_and_the_others_keep_serving(
    agent: AgentRun, vllm: VllmServer, assets: Assets
) -> None:
    """A changed file (named), a missing SHA256SUMS, a rank above --max-lora-rank (vLLM's own
    reason): each Failed on its own, bob still serves."""
    agent.set_desired(assets, "bob", "tampered", "nosums", "wide")
    state = agent.wait_for(
        "three failures", bob="Loaded", tampered="Failed", nosums="Failed", wide="Failed"
    )
    tampered = state.adapters["tampered"].message
    assert "checksum mismatch: adapter_model.safetensors has SHA-256" in tampered, tampered
    assert "SHA256SUMS does not exist" in state.adapters["nosums"].message
    wide = state.adapters["wide"].message
    assert "LoRA rank 16 is greater than max_lora_rank 8" in wide, wide
    assert set(vllm.adapters()) == {"bob"}
    assert not list((agent.adapter_dir / "tampered").iterdir())  # nothing unverified kept
    assert complete(vllm, "bob")[1] == reference_ids(assets, "bob")[1]


def test_adapters_are_reloaded_after_vllm_restarts(
    agent: AgentRun, vllm: VllmServer, assets: Assets
) -> None:
    agent.set_desired(assets, "bob")
    agent.wait_for("only bob", bob="Loaded")
    vllm.stop()

    def not_ready() -> bool:
        state = agent.state()
        return state is not None and not state.vllm_ready

    wait_until(not_ready, timeout=30, what="vllmReady false")
    state = agent.state()
    assert state is not None and state.adapters["bob"].state == "Loading"
    assert "vLLM is not ready" in state.message
    TIMINGS["vllm_restart_to_ready_s"] = vllm.start().startup_s
    started = time.monotonic()
    agent.wait_for("bob reloaded", bob="Loaded")
    TIMINGS["reload_after_restart_s"] = time.monotonic() - started
    assert complete(vllm, "bob")[1] == reference_ids(assets, "bob")[1]


def test_sigterm_stops_the_agent_cleanly(agent: AgentRun) -> None:
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(timeout=15) == 0
    assert "SIGTERM: stopping" in agent.log_path.read_text()
