"""StatusReporter against a real HTTP server standing in for the Kubernetes API server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from kubetune_trainer.api import Progress, TrainingMetrics
from kubetune_trainer.config import JobIdentity
from kubetune_trainer.kubeapi import InCluster
from kubetune_trainer.reporting import (
    FIELD_MANAGER,
    TRAINER_OWNED_FIELDS,
    ProgressSnapshot,
    StatusReporter,
    log_every,
    merge_patch,
)

JOB = JobIdentity(namespace="team-a", name="ftj-1", uid="uid-1")
STATUS_PATH = "/apis/kubetune.dev/v1alpha1/namespaces/team-a/finetunejobs/ftj-1/status"


@dataclass
class FakeApiServer:
    """Records requests; answers PATCH with `patch_status` and GET with the object."""

    server: ThreadingHTTPServer
    requests: list[dict[str, Any]] = field(default_factory=list)
    patch_status: int = 200
    uid: str = "uid-1"
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def patches(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["method"] == "PATCH"]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    state: dict[str, FakeApiServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def _record(self, method: str) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urlsplit(self.path)
            request = {
                "method": method,
                "path": url.path,
                "query": parse_qs(url.query),
                "headers": dict(self.headers),
                "body": json.loads(body) if body else None,
            }
            fake = state["fake"]
            with fake.lock:
                fake.requests.append(request)
            return request

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._record("GET")
            self._reply(200, {"metadata": {"name": "ftj-1", "uid": state["fake"].uid}})

        def do_PATCH(self) -> None:
            self._record("PATCH")
            code = state["fake"].patch_status
            self._reply(code, {"kind": "Status", "code": code})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["fake"] = FakeApiServer(server)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state["fake"]
    server.shutdown()
    server.server_close()


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("token-1\n")
    return path


def reporter(api: FakeApiServer, token: Path, interval: float = 0.3) -> StatusReporter:
    return StatusReporter(JOB, InCluster(api.url, token), interval=interval, request_timeout=2)


def test_patch_is_a_merge_patch_of_trainer_owned_fields_only(
    api: FakeApiServer, token: Path
) -> None:
    r = reporter(api, token)
    r.report(stage="Training", progress=Progress(step=3, total_steps=10, percent=30.0))
    r.report(metrics=TrainingMetrics(train_loss=1.5, learning_rate=1e-4))
    r.close()

    patches = api.patches()
    assert patches, api.requests
    for p in patches:
        assert p["path"] == STATUS_PATH
        assert p["headers"]["Content-Type"] == "application/merge-patch+json"
        assert p["headers"]["Authorization"] == "Bearer token-1"
        assert p["query"] == {"fieldManager": [FIELD_MANAGER]}
        assert set(p["body"]) == {"status"}
        assert set(p["body"]["status"]) <= TRAINER_OWNED_FIELDS
    merged: dict[str, Any] = {}
    for p in patches:
        merged = merge_patch(merged, p["body"]["status"])
    assert merged == {
        "stage": "Training",
        "progress": {"step": 3, "totalSteps": 10, "percent": 30.0},  # camelCase, no nulls
        "metrics": {"trainLoss": 1.5, "learningRate": 1e-4},
    }
    # The uid is checked once, before the first patch.
    assert [r["method"] for r in api.requests][:2] == ["GET", "PATCH"]


def test_operator_owned_fields_are_refused(api: FakeApiServer, token: Path) -> None:
    r = reporter(api, token)
    for field_name in ("phase", "conditions", "message", "reason"):
        with pytest.raises(ValueError, match="may not write"):
            r.queue({field_name: "x"})
    r.close()
    assert api.patches() == []


def test_updates_are_throttled_and_the_latest_values_win(api: FakeApiServer, token: Path) -> None:
    r = reporter(api, token, interval=0.5)
    r.report(stage="Training")  # a stage change goes out at once
    assert r.flush(5)
    sent_before = len(api.patches())
    started = time.monotonic()
    for step in range(1, 51):
        r.report(progress=Progress(step=step, total_steps=50))
    queued_for = time.monotonic() - started
    assert queued_for < 0.2  # report() never waits on the API
    time.sleep(0.8)
    throttled = api.patches()[sent_before:]
    assert 1 <= len(throttled) <= 2, [p["body"] for p in throttled]
    r.close()
    final = api.patches()[-1]["body"]["status"]
    assert final["progress"]["step"] == 50


def test_api_errors_are_swallowed_and_the_fields_are_sent_later(
    api: FakeApiServer, token: Path
) -> None:
    api.patch_status = 500
    r = reporter(api, token, interval=0.2)
    r.report(stage="Loading", metrics=TrainingMetrics(train_loss=2.0))
    assert not r.flush(3)  # one failed attempt, no exception
    assert r.failed >= 1 and r.sent == 0
    api.patch_status = 200
    token.write_text("token-2\n")  # rotated on disk: read again for every request
    r.report(progress=Progress(step=1, total_steps=2))
    assert r.flush(3)
    r.close()
    last = api.patches()[-1]
    assert last["headers"]["Authorization"] == "Bearer token-2"
    # What failed before is resent together with what came after.
    assert last["body"]["status"]["metrics"] == {"trainLoss": 2.0}
    assert last["body"]["status"]["progress"]["step"] == 1


def test_an_unreachable_api_server_never_raises(token: Path) -> None:
    r = StatusReporter(JOB, InCluster("http://127.0.0.1:9", token), interval=0.1, request_timeout=1)
    r.report(stage="Training", progress=Progress(step=1))
    assert not r.flush(3)
    r.close(timeout=3)
    assert r.failed >= 1


def test_a_recreated_finetunejob_is_never_patched(api: FakeApiServer, token: Path) -> None:
    api.uid = "uid-of-a-new-object"
    r = reporter(api, token)
    r.report(stage="Training")
    r.flush(3)
    r.report(progress=Progress(step=2))
    r.close()
    assert api.patches() == []
    assert not r.enabled


def test_without_a_cluster_the_reporter_only_logs(tmp_path: Path) -> None:
    assert InCluster.from_env({}) is None
    env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert InCluster.from_env({**env, "KUBETUNE_SA_DIR": str(tmp_path)}) is None  # no token
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("ca")
    found = InCluster.from_env({**env, "KUBETUNE_SA_DIR": str(tmp_path)})
    assert found == InCluster("https://10.0.0.1:443", tmp_path / "token", tmp_path / "ca.crt")
    v6_env = {**env, "KUBERNETES_SERVICE_HOST": "fd00::1", "KUBETUNE_SA_DIR": str(tmp_path)}
    v6 = InCluster.from_env(v6_env)
    assert v6 is not None and v6.url == "https://[fd00::1]:443"

    quiet = StatusReporter.from_environment(JOB, env={})
    assert not quiet.enabled
    quiet.report(stage="Training", progress=Progress(step=1))
    assert quiet.flush() is True
    quiet.close()


def test_progress_line_and_cadence() -> None:
    snap = ProgressSnapshot(
        step=150,
        total_steps=600,
        epoch=1.25,
        loss=1.23456,
        learning_rate=1.5e-4,
        tokens_per_second=12345.6,
        eta_seconds=3725,
        memory_bytes=5 * 1024**3,
    )
    assert snap.line() == (
        "step 150/600 (25.0%) | epoch 1.25 | loss 1.2346 | lr 0.00015 | 12,346 tok/s "
        "| GPU peak 5.00 GiB | eta 1:02:05"
    )
    progress = snap.progress()
    assert (progress.step, progress.total_steps, progress.percent) == (150, 600, 25.0)
    assert progress.eta_seconds == 3725 and progress.update_time is not None
    assert log_every(40) == 1 and log_every(600) == 6
