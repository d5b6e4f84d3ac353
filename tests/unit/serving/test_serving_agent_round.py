"""Whole agent rounds with a fake vLLM and a fake API server, and outputs in local directories
(the agent fetches pvc:// and local outputs like s3:// ones, file by file against SHA256SUMS).
The real vLLM, API server and MinIO: tests/integration/test_serving_agent.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_serving.agent import Agent
from kubetune_serving.kube import KubeError
from kubetune_serving.settings import AgentSettings
from kubetune_serving.vllm import VllmError
from kubetune_trainer.serving import (
    DESIRED_KEY,
    STATE_KEY,
    DesiredAdapter,
    DesiredState,
    ServerState,
)
from kubetune_trainer.storage import (
    MANIFEST_NAME,
    Storage,
    UploadedFile,
    sha256_file,
    write_manifest,
)

SERVER = "kubetune-serve-0123456789"


class FakeConfigMaps:
    def __init__(self) -> None:
        self.maps: dict[str, dict[str, str]] = {f"{SERVER}-desired": {}, f"{SERVER}-state": {}}
        self.down = False
        self.patches = 0

    def data(self, name: str) -> dict[str, str] | None:
        if self.down:
            raise KubeError("GET configmap: connection refused")
        return dict(self.maps[name]) if name in self.maps else None

    def patch_data(self, name: str, data: dict[str, str]) -> None:
        if self.down:
            raise KubeError("PATCH configmap: connection refused")
        self.maps[name].update(data)
        self.patches += 1


class FakeVllm:
    """Holds adapters like vLLM: one load per name, refuses a rank above max_lora_rank."""

    def __init__(self, max_lora_rank: int = 8) -> None:
        self.loaded: dict[str, str] = {}
        self.up = True
        self.max_lora_rank = max_lora_rank
        self.loads = 0

    def health(self) -> str | None:
        return None if self.up else "cannot reach vLLM at http://127.0.0.1:8000/health"

    def adapters(self) -> dict[str, str]:
        if not self.up:
            raise VllmError("cannot reach vLLM")
        return dict(self.loaded)

    def load(self, name: str, path: str) -> None:
        assert name not in self.loaded, "vLLM refuses a second load of a name"
        rank = json.loads((Path(path) / "adapter_config.json").read_text())["r"]
        if rank > self.max_lora_rank:
            raise VllmError(
                f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}.", status=500
            )
        self.loaded[name] = path
        self.loads += 1

    def unload(self, name: str) -> bool:
        return self.loaded.pop(name, None) is not None

    def restart(self) -> None:
        self.loaded = {}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def publish(root: Path, name: str, rank: int = 8, weights: bytes = b"weights") -> str:
    """An adapter output as the trainer leaves it: files, then SHA256SUMS."""
    out = root / "outputs" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (out / "adapter_model.safetensors").write_bytes(weights)
    (out / "metrics.json").write_text("{}")
    (out / "checkpoints" / "step-000000001").mkdir(parents=True, exist_ok=True)
    (out / "checkpoints" / "step-000000001" / "state.pt").write_bytes(b"not listed")
    files = [
        UploadedFile(p.name, p.stat().st_size, sha256_file(p)) for p in out.iterdir() if p.is_file()
    ]
    (out / MANIFEST_NAME).write_bytes(write_manifest([f for f in files if f.path != MANIFEST_NAME]))
    return str(out) + "/"


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.configmaps = FakeConfigMaps()
        self.vllm = FakeVllm()
        self.clock = Clock()
        settings = AgentSettings(
            server_name=SERVER, namespace="team", adapter_dir=tmp_path / "adapters", recheck=60
        )
        storage = Storage(env={"AWS_ACCESS_KEY_ID": "k" * 8, "AWS_SECRET_ACCESS_KEY": "s" * 8})
        self.agent = Agent(
            settings,
            configmaps=self.configmaps,  # type: ignore[arg-type]
            vllm=self.vllm,  # type: ignore[arg-type]
            storage=storage,
            clock=self.clock,
        )
        self.uris: dict[str, str] = {}
        self.ranks: dict[str, int] = {}

    def publish(self, name: str, rank: int = 8, weights: bytes = b"weights") -> None:
        self.uris[name] = publish(self.root, name, rank, weights)
        self.ranks[name] = rank

    def want(self, *names: str) -> None:
        desired = DesiredState(
            adapters=[DesiredAdapter(name=n, uri=self.uris[n], rank=self.ranks[n]) for n in names]
        )
        self.configmaps.maps[f"{SERVER}-desired"] = {DESIRED_KEY: desired.to_json()}

    def state(self) -> ServerState:
        return ServerState.model_validate_json(self.configmaps.maps[f"{SERVER}-state"][STATE_KEY])

    def states(self) -> dict[str, str]:
        return {name: r.state for name, r in self.state().adapters.items()}


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    for name in ("a", "b"):
        w.publish(name, weights=name.encode() * 100)
    return w


def test_load_unload_and_files(world: World) -> None:
    world.want("a", "b")
    world.agent.round()
    assert world.states() == {"a": "Loaded", "b": "Loaded"}
    path = Path(world.vllm.loaded["a"])
    assert path.parent == world.root / "adapters" / "a"
    assert sorted(p.name for p in path.iterdir()) == [
        MANIFEST_NAME, "adapter_config.json", "adapter_model.safetensors", "metrics.json"
    ]  # fmt: skip
    assert world.state().adapters["a"].manifest_sha256 == path.name

    world.want("b")
    world.agent.round()
    assert set(world.vllm.loaded) == {"b"} and world.states() == {"b": "Loaded"}
    assert not (world.root / "adapters" / "a").exists()


def test_quiet_rounds_write_nothing(world: World) -> None:
    world.want("a")
    world.agent.round()
    patches = world.configmaps.patches
    for _ in range(3):
        world.agent.round()
    assert world.configmaps.patches == patches


def test_a_recreated_state_configmap_is_written_again(world: World) -> None:
    world.want("a")
    world.agent.round()
    world.configmaps.maps[f"{SERVER}-state"] = {}  # deleted and recreated empty
    world.agent.round()
    assert world.states() == {"a": "Loaded"}


def test_what_a_restarted_vllm_lost_is_loaded_again_from_the_checked_files(world: World) -> None:
    world.want("a")
    world.agent.round()
    world.vllm.up = False
    world.vllm.restart()
    world.agent.round()
    state = world.state()
    assert not state.vllm_ready and "not ready" in state.message
    assert world.states() == {"a": "Loading"}
    world.vllm.up = True
    world.agent.round()
    assert world.states() == {"a": "Loaded"} and world.vllm.loads == 2


def test_a_restarted_agent_adopts_what_vllm_holds(world: World, tmp_path: Path) -> None:
    world.want("a")
    world.agent.round()
    again = World(tmp_path)
    again.configmaps, again.vllm = world.configmaps, world.vllm
    again.agent.configmaps, again.agent.vllm = world.configmaps, world.vllm  # type: ignore[assignment]
    patches = world.configmaps.patches
    again.agent.round()
    assert world.vllm.loads == 1  # not loaded again
    assert world.configmaps.patches == patches  # the same state: nothing written


def test_an_unreachable_api_server_changes_nothing(world: World) -> None:
    world.want("a")
    world.agent.round()
    world.configmaps.maps[f"{SERVER}-desired"] = {DESIRED_KEY: DesiredState().to_json()}
    world.configmaps.down = True
    world.agent.round()  # no exception, nothing unloaded on a blip
    assert set(world.vllm.loaded) == {"a"}
    world.configmaps.down = False
    world.agent.round()
    assert world.vllm.loaded == {}


def test_a_missing_or_invalid_desired_state_unloads_nothing_and_says_why(world: World) -> None:
    world.want("a")
    world.agent.round()
    world.configmaps.maps[f"{SERVER}-desired"] = {DESIRED_KEY: '{"adapters": [{"name": 3}]}'}
    world.agent.round()
    assert set(world.vllm.loaded) == {"a"}
    assert "is not a DesiredState" in world.state().message
    assert world.states() == {"a": "Loaded"}
    del world.configmaps.maps[f"{SERVER}-desired"]
    world.agent.round()
    assert "does not exist (the operator creates it)" in world.state().message


def test_one_bad_adapter_fails_alone_and_is_retried_with_backoff(world: World) -> None:
    world.publish("wide", rank=16)
    world.publish("bad")
    (Path(world.uris["bad"]) / "adapter_model.safetensors").write_bytes(b"changed")
    world.want("a", "wide", "bad")
    world.agent.round()
    state = world.state()
    assert world.states() == {"a": "Loaded", "wide": "Failed", "bad": "Failed"}
    assert "LoRA rank 16 is greater than max_lora_rank 8." in state.adapters["wide"].message
    bad = state.adapters["bad"].message
    assert bad.startswith("checksum mismatch: adapter_model.safetensors has SHA-256"), bad
    assert not list((world.root / "adapters" / "bad").iterdir())  # nothing unverified kept

    world.vllm.max_lora_rank = 16  # e.g. fixed by hand; retried only after the backoff
    world.agent.round()
    assert world.states()["wide"] == "Failed"
    world.clock.now += 15
    world.agent.round()
    assert world.states() == {"a": "Loaded", "wide": "Loaded", "bad": "Failed"}


def test_a_republished_output_is_loaded_again_from_a_new_directory(world: World) -> None:
    world.want("a")
    world.agent.round()
    first = world.vllm.loaded["a"]
    world.publish("a", weights=b"retrained" * 10)
    world.agent.round()
    assert world.vllm.loaded["a"] == first  # not rechecked yet
    world.clock.now += 60
    world.agent.round()
    second = world.vllm.loaded["a"]
    assert second != first and not Path(first).exists()
    assert world.state().adapters["a"].manifest_sha256 == Path(second).name


def test_no_manifest_no_adapter_files_or_an_invalid_name_each_fail_with_a_reason(
    world: World,
) -> None:
    world.publish("nosums")
    (Path(world.uris["nosums"]) / MANIFEST_NAME).unlink()
    world.publish("notlora")
    out = Path(world.uris["notlora"])
    (out / "adapter_config.json").unlink()
    (out / MANIFEST_NAME).write_bytes(
        write_manifest([UploadedFile("metrics.json", 2, sha256_file(out / "metrics.json"))])
    )
    world.uris["Bad_Name"], world.ranks["Bad_Name"] = world.uris["a"], 8
    world.want("nosums", "notlora", "Bad_Name")
    world.agent.round()
    state = world.state()
    assert {n: r.state for n, r in state.adapters.items()} == dict.fromkeys(
        ("nosums", "notlora", "Bad_Name"), "Failed"
    )
    assert "SHA256SUMS does not exist" in state.adapters["nosums"].message
    assert "lists no adapter_config.json" in state.adapters["notlora"].message
    assert state.adapters["Bad_Name"].message == "Not a valid adapter name."
    assert world.vllm.loaded == {}
