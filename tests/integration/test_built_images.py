"""The real images, built from the Dockerfiles and run the way the chart runs them.

`make images BASE=local VARIANT=cpu` builds the three Dockerfiles FROM a local Debian bookworm
base (tests/localenv/images.py; podman, no registry). Then:
- the operator image runs with host networking against the local API server, logged in the way
  a pod is (the chart ServiceAccount's token and CA mounted at the in-cluster path), read-only
  and non-root, and reconciles a FineTuneJob until its (stand-in) trainer pod has succeeded;
- `make images REGISTRY=...` pushes to a registry (a local one), the image pulled back from it
  runs, and the chart pointed at it (image.repository) deploys exactly the pushed reference;
- the trainer image runs `kubetune-trainer --config` as UID 65532 on a read-only root filesystem
  with tmpfs /workspace and /tmp, as the operator's pod spec has it, trains the tiny Llama from
  the local S3 and publishes its adapter there;
- the API server image runs read-only and non-root as the chart's pod does (catalogue and the
  cluster's CA mounted, tmpfs /tmp, no Kubernetes credential of its own) and serves the official
  openai client with a user's token: files to the local S3, fine-tuning jobs as FineTuneJobs
  created through the local API server with that token's rights.

A cold build (base root filesystem, ~3 GB of wheels) takes minutes; a cached one seconds
(docs/images.md has the numbers).
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai import AuthenticationError, OpenAI, PermissionDeniedError
from openai_support import chat_lines, install_user_role, user_token
from operator_harness import CHART, FAKE_TRAINER, PEERING_LIFETIME, install_crds
from trainer_support import S3, THREAD_ENV, jsonl, records, trainer_config
from unit.operator.invalid_manifests import VALID_MANIFEST

from kubetune_trainer import exitcodes
from kubetune_trainer.storage import MANIFEST_NAME, verify_manifest
from localenv.images import (
    LocalImages,
    Podman,
    app_version,
    build,
    build_local_images,
    local_registry,
)
from localenv.testing import Cluster, free_port, wait_until

pytest_plugins = ["trainer_fixtures"]
# A cold build downloads ~3 GB of wheels and installs them (docs/images.md); the first test
# waits for it.
BUILD_TIMEOUT = 1500
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.images,
    pytest.mark.timeout(BUILD_TIMEOUT + 300),
]
UID = "65532"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# What the operator's pod spec and the chart's securityContext impose (manifests.job(),
# charts/kubetune/values.yaml), as podman flags.
RESTRICTED_RUN = (
    "--read-only", "--user", f"{UID}:{UID}", "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges", "--network", "host",
)  # fmt: skip
podman = Podman()


@pytest.fixture(scope="module")
def images() -> LocalImages:
    built = build_local_images(timeout=BUILD_TIMEOUT)
    print(f"images built in {built.seconds:.0f} s: {built.operator}, {built.trainer}, {built.api}")
    return built


@contextmanager
def chart_identity(cluster: Cluster, watched: str, directory: Path) -> Iterator[str]:
    """The chart's RBAC for an operator watching one namespace (operator.watchNamespaces), and
    its ServiceAccount's token, the cluster CA and namespace laid out as in a pod, in
    `directory`; yields the API server's port."""
    with cluster.namespace() as namespace:
        release = f"kt-{uuid.uuid4().hex[:6]}"
        rendered = subprocess.run(
            [str(cluster.bin / "helm"), "template", release, str(CHART), "--namespace", namespace,
             "--set", f"operator.watchNamespaces={{{watched}}}",
             "--show-only", "templates/rbac.yaml"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        for doc in docs:
            if doc["kind"] in {"ServiceAccount", "Role", "RoleBinding"}:
                doc["metadata"].setdefault("namespace", namespace)
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
        )
        account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
        try:
            token = cluster.kubectl("create", "token", account, "-n", namespace).stdout.strip()
            admin = json.loads(cluster.kubeconfig.read_text())["clusters"][0]["cluster"]
            directory.mkdir(mode=0o755)
            (directory / "token").write_text(token)
            (directory / "ca.crt").write_bytes(Path(admin["certificate-authority"]).read_bytes())
            (directory / "namespace").write_text(namespace)
            for path in directory.iterdir():
                path.chmod(0o644)  # readable by the image's non-root user
            yield str(admin["server"]).rsplit(":", 1)[1]
        finally:
            selector = f"app.kubernetes.io/instance={release}"
            cluster.kubectl("delete", "clusterrole,clusterrolebinding", "-l", selector,
                            "--wait=false", check=False)  # fmt: skip


# ------------------------------------------------------------------------------- the operator


def test_operator_image_runs_non_root_without_torch(images: LocalImages) -> None:
    config = podman.config(images.operator)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["kubetune-operator"]
    code = "import importlib.util as u, kubetune_operator; print(u.find_spec('torch'))"
    out = podman.check("run", "--rm", *RESTRICTED_RUN, "--entrypoint", "python",
                       images.operator, "-c", code)  # fmt: skip
    assert out.strip() == "None"


def test_operator_image_reconciles_a_finetunejob_with_the_charts_identity(
    cluster: Cluster, images: LocalImages, tmp_path: Path
) -> None:
    install_crds(cluster)
    with (
        cluster.namespace(RESTRICTED) as namespace,
        chart_identity(cluster, namespace, tmp_path / "sa") as port,
        podman.container() as container_name,
    ):
        settings = {
            "KUBETUNE_NAMESPACES": namespace,
            "KUBETUNE_TRAINER_COMMAND": json.dumps(["python", str(FAKE_TRAINER), "--config"]),
            "KUBETUNE_METRICS_PORT": str(free_port()),
            "KUBETUNE_HEALTH_PORT": str(free_port()),
            "KUBETUNE_PEERING_LIFETIME": str(PEERING_LIFETIME),
            "KUBETUNE_LOG_FORMAT": "json",
        }
        env = {**settings, "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        podman.check(
            "run", "--detach", "--name", container_name, *RESTRICTED_RUN,
            "--volume", f"{tmp_path / 'sa'}:{SA_DIR}:ro",
            *[f"--env={k}={v}" for k, v in env.items()],
            images.operator,
        )  # fmt: skip

        def logs() -> str:
            result = podman.run("logs", container_name)
            return result.stdout + result.stderr

        def succeeded() -> dict[str, Any] | None:
            status = cluster.get("ftj", "from-image", namespace).get("status") or {}
            return status if status.get("phase") == "Succeeded" else None

        try:
            wait_until(lambda: "Resuming operations" in logs(), 60, "the operator to start")
            cluster.apply(finetunejob("from-image"), namespace)
            status = wait_until(succeeded, 120, "the FineTuneJob to succeed")
        except AssertionError as err:
            raise AssertionError(f"{err}\noperator log:\n{logs()[-4000:]}") from None
        job = cluster.get("job", "from-image-train", namespace)
        assert job["metadata"]["ownerReferences"][0]["name"] == "from-image"
        assert status["reason"] == "Succeeded"
        # The container's only credential is the chart ServiceAccount's token: what it created,
        # it created with the chart's RBAC.
        records_about_job = [
            json.loads(line)
            for line in logs().splitlines()
            if line.startswith("{") and '"from-image"' in line
        ]
        assert records_about_job, "the operator's JSON log says nothing about the job"
        events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
        said = "Created training Job"  # in the first phase's Event
        posted = [e for e in json.loads(events)["items"] if said in e.get("message", "")]
        sources = [e.get("reportingComponent") or e["source"].get("component") for e in posted]
        assert sources == ["kubetune-operator"]
        # Host networking: the liveness endpoint answers on the host's port.
        health = f"http://127.0.0.1:{settings['KUBETUNE_HEALTH_PORT']}/healthz"
        with urllib.request.urlopen(health, timeout=5) as response:
            assert response.status == 200


def finetunejob(name: str) -> dict[str, Any]:
    """A FineTuneJob the stand-in trainer (fake_trainer.py) completes in two seconds."""
    manifest = copy.deepcopy(VALID_MANIFEST)
    manifest["metadata"] = {"name": name}
    manifest["spec"]["baseModel"] = {"uri": "s3://fake/succeed-2"}
    return manifest


# -------------------------------------------------------------------------------- the trainer


def test_trainer_cpu_image_leaves_out_only_gpu_code_paths(images: LocalImages) -> None:
    config = podman.config(images.trainer)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["kubetune-trainer"]
    code = (
        "import importlib.util as u, torch, transformers, peft\n"
        "print(torch.__version__, transformers.__version__, u.find_spec('triton'))"
    )
    out = podman.check("run", "--rm", *RESTRICTED_RUN, "--entrypoint", "python",
                       images.trainer, "-c", code)  # fmt: skip
    torch_version, transformers_version, triton = out.split()[-3:]
    lock = (Path(__file__).resolve().parents[2] / "requirements" / "trainer.txt").read_text()
    assert f"torch=={torch_version.split('+')[0]} " in lock
    assert f"transformers=={transformers_version} " in lock
    assert triton == "None"


def test_trainer_image_trains_from_and_to_s3_as_non_root_on_a_read_only_root(
    cluster: Cluster,
    images: LocalImages,
    s3: S3,
    base_model_uri: str,
    tmp_path: Path,
) -> None:
    key = f"out/image-{uuid.uuid4().hex[:6]}"
    train = s3.put("data/image/train.jsonl", jsonl(records("chat", 48, seed=7)))
    config = trainer_config(
        base_model_uri=base_model_uri,
        train_uri=train,
        output_uri=s3.uri(key),
        work_dir=Path("/workspace/work"),
        hyperparameters={"epochs": 2, "batchSize": 4, "learningRate": 0.01},
        dataset={"maxSeqLength": 64},
    )
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps(config))
    config_dir.chmod(0o755)
    (config_dir / "config.json").chmod(0o644)
    termination_log = tmp_path / "termination-log"
    termination_log.touch(mode=0o666)
    termination_log.chmod(0o666)
    env = {**cluster.s3_env, **THREAD_ENV, "HOME": "/tmp", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    with podman.container() as name:
        result = podman.run(
            "run", "--name", name, *RESTRICTED_RUN,
            "--tmpfs", "/workspace:rw,mode=1777", "--tmpfs", "/tmp:rw,mode=1777",
            "--volume", f"{config_dir}:/etc/kubetune:ro",
            "--volume", f"{termination_log}:/dev/termination-log",
            *[f"--env={k}={v}" for k, v in env.items()],
            images.trainer, "--config", "/etc/kubetune/config.json",
            timeout=600,
        )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == exitcodes.OK, output[-4000:]
    print(f"trainer container ran in {time.monotonic() - started:.0f} s")
    message = termination_log.read_text().strip()
    assert message.startswith(f"succeeded: published to {s3.uri(key)}"), message

    local = s3.download_dir(key, tmp_path / "published")
    assert {"adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME} <= {
        p.name for p in local.iterdir()
    }
    assert verify_manifest((local / MANIFEST_NAME).read_bytes(), local) >= 3
    metrics = json.loads((local / "metrics.json").read_text())
    assert metrics["steps"] == metrics["total_steps"] > 0
    assert metrics["eval"]["fine_tuned"]["loss"] < metrics["eval"]["base"]["loss"]


# ------------------------------------------------------------------------- the API server


def test_api_image_serves_a_users_token_through_the_local_api_server(
    cluster: Cluster, images: LocalImages, tmp_path: Path
) -> None:
    config = podman.config(images.api)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["kubetune-api"]
    code = "import importlib.util as u, kubetune_api.app; print(u.find_spec('torch'))"
    out = podman.check("run", "--rm", *RESTRICTED_RUN, "--entrypoint", "python",
                       images.api, "-c", code)  # fmt: skip
    assert out.strip() == "None"

    install_crds(cluster)
    # The chart's ConfigMaps, mounted read-only where the chart mounts them.
    models_dir, ca_dir = tmp_path / "models", tmp_path / "kubernetes"
    for directory in (models_dir, ca_dir):
        directory.mkdir(mode=0o755)
    catalogue = [{"name": "tiny-llama", "uri": "s3://kubetune/models/tiny-llama/"}]
    (models_dir / "models.json").write_text(json.dumps(catalogue))
    admin = json.loads(cluster.kubeconfig.read_text())["clusters"][0]["cluster"]
    (ca_dir / "ca.crt").write_bytes(Path(admin["certificate-authority"]).read_bytes())
    for path in (models_dir / "models.json", ca_dir / "ca.crt"):
        path.chmod(0o644)  # readable by the image's non-root user
    port, prefix = free_port(), f"api-image-{uuid.uuid4().hex[:8]}"
    s3 = cluster.s3_env
    env = {  # what charts/kubetune/templates/api-deployment.yaml sets
        "KUBETUNE_API_PORT": str(port),
        "KUBETUNE_API_BUCKET": s3["KUBETUNE_S3_BUCKET"],
        "KUBETUNE_API_PREFIX": prefix,
        "KUBETUNE_API_STORAGE_ENDPOINT": s3["AWS_ENDPOINT_URL"],
        "KUBETUNE_API_MODELS_FILE": "/etc/kubetune-api/models/models.json",
        "KUBETUNE_API_KUBERNETES_CA_FILE": "/etc/kubetune-api/kubernetes/ca.crt",
        "KUBETUNE_API_LOG_FORMAT": "json",
        "AWS_ACCESS_KEY_ID": s3["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3["AWS_SECRET_ACCESS_KEY"],
        # The in-cluster discovery a pod gets (host networking here: the API server's port).
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(admin["server"]).rsplit(":", 1)[1],
    }
    with (
        install_user_role(cluster) as role,
        cluster.namespace() as namespace,
        podman.container() as container_name,
    ):
        token = user_token(cluster, namespace, "alice", role)
        podman.check(
            "run", "--detach", "--name", container_name, *RESTRICTED_RUN,
            "--tmpfs", "/tmp:rw,mode=1777",
            "--volume", f"{models_dir}:/etc/kubetune-api/models:ro",
            "--volume", f"{ca_dir}:/etc/kubetune-api/kubernetes:ro",
            *[f"--env={k}={v}" for k, v in env.items()],
            images.api,
        )  # fmt: skip

        def logs() -> str:
            result = podman.run("logs", container_name)
            return result.stdout + result.stderr

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        try:
            wait_until(healthy, 60, "the API server image to answer /healthz")
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token,
                            max_retries=0, timeout=30)  # fmt: skip
            assert "tiny-llama" in {m.id for m in client.models.list()}
            upload = client.files.create(
                file=("training_data.jsonl", chat_lines(20)), purpose="fine-tune"
            )
            job = client.fine_tuning.jobs.create(training_file=upload.id, model="tiny-llama")
            # The server has no credential of its own: a token without the role, or no valid
            # token at all, gets nothing.
            nobody = user_token(cluster, namespace, "nobody", None)
            for key, refused in ((nobody, PermissionDeniedError), ("x", AuthenticationError)):
                other = OpenAI(base_url=client.base_url, api_key=key, max_retries=0, timeout=30)
                with pytest.raises(refused):
                    other.fine_tuning.jobs.create(training_file=upload.id, model="tiny-llama")
        except Exception as err:
            raise AssertionError(f"{err}\nAPI server log:\n{logs()[-4000:]}") from err
        # The job is a FineTuneJob in the token's namespace, made with the token's rights.
        ftj = cluster.get("ftj", job.id, namespace)
        assert ftj["spec"]["baseModel"]["uri"] == catalogue[0]["uri"]
        uploaded = ftj["spec"]["dataset"]["trainUri"]
        assert uploaded.startswith(f"s3://{env['KUBETUNE_API_BUCKET']}/{prefix}/{namespace}/")
        assert len(client.fine_tuning.jobs.list().data) == 1


# ------------------------------------------------------------------------ your own registry


def test_make_images_pushes_to_a_registry_the_chart_can_point_at(
    cluster: Cluster, images: LocalImages, tmp_path: Path
) -> None:
    """The README's path for a platform team, with the (small) operator image."""
    with local_registry(tmp_path, free_port()) as address:
        repository = f"{address}/platform"
        env = {"BASE": "local", "IMAGES": "operator", "REGISTRY": repository,
               "PUSH_ARGS": "--tls-verify=false"}  # fmt: skip
        build(env, timeout=300)
        pushed = f"{repository}/operator:{app_version()}"
        podman.check("rmi", pushed)  # what runs next comes from the registry
        podman.check("pull", "--quiet", "--tls-verify=false", pushed)
        assert podman.config(pushed)["Entrypoint"] == ["kubetune-operator"]
        out = podman.check("run", "--rm", *RESTRICTED_RUN, "--entrypoint", "python", pushed,
                           "-c", "import kubetune_operator.handlers; print('ok')")  # fmt: skip
        assert out.strip() == "ok"
        podman.check("rmi", pushed)

    rendered = subprocess.run(
        [str(cluster.bin / "helm"), "template", "kt", str(CHART),
         "--set", f"image.repository={repository}/operator",
         "--set", f"trainer.image.repository={repository}/trainer",
         "--show-only", "templates/deployment.yaml"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (deployment,) = [d for d in yaml.safe_load_all(rendered) if d]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == pushed
    trainer_image = {e["name"]: e.get("value") for e in container["env"]}["KUBETUNE_TRAINER_IMAGE"]
    assert trainer_image == f"{repository}/trainer:{app_version()}"
