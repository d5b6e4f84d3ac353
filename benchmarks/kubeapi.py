"""Raw access to the local API server for the benchmarks: requests with the admin kubeconfig,
and watch streams timestamped on arrival (time.monotonic or time.time, as the caller asks).

Plain HTTPS rather than a generated client: the benchmarks process thousands of events on the
same two cores as the control plane, so the watching side should cost as little as possible.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import requests
import yaml


def log(message: str) -> None:
    print(f"kubeapi: {message}", file=sys.stderr, flush=True)


class Api:
    """Plain HTTPS to the API server with the admin kubeconfig (exempt from flow control)."""

    def __init__(self, kubeconfig: Path) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        user = config["users"][0]["user"]
        self.server = cluster["server"]
        self.session = requests.Session()
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would replace the cluster's CA
        self.session.verify = cluster["certificate-authority"]
        self.session.cert = (user["client-certificate"], user["client-key"])
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=32)
        self.session.mount("https://", adapter)

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request; 429 and 503 (e.g. "storage is (re)initializing" right after a CRD
        changed) are retried for up to a minute, honouring Retry-After."""
        kwargs.setdefault("timeout", 60)
        deadline = time.monotonic() + 60
        while True:
            response = self.session.request(method, self.server + path, **kwargs)
            if response.status_code not in (429, 503) or time.monotonic() > deadline:
                return response
            time.sleep(float(response.headers.get("Retry-After") or 1))

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.call(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return dict(response.json())

    def flowcontrol_counts(self, prefix: str) -> dict[str, float]:
        """apiserver_flowcontrol_dispatched_requests_total of our FlowSchemas, by schema."""
        text = self.call("GET", "/metrics").text
        head = f'apiserver_flowcontrol_dispatched_requests_total{{flow_schema="{prefix}'
        counts: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(head):
                schema = line[len(head) - len(prefix) :].split('"', 1)[0]
                counts[schema[len(prefix) :]] = float(line.rsplit(" ", 1)[1])
        return counts


class Watch(threading.Thread):
    """A raw watch stream of one collection: on_event(type, object, arrival time by `clock`)."""

    def __init__(
        self,
        api: Api,
        path: str,
        on_event: Callable[[str, dict[str, Any], float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(daemon=True)
        self.api, self.path, self.on_event, self.clock = api, path, on_event, clock
        self.resource_version = str(api.json("GET", path)["metadata"]["resourceVersion"])
        self.stopping = threading.Event()
        self.response: requests.Response | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            params = {
                "watch": "1",
                "resourceVersion": self.resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": "290",
            }
            try:
                self.response = self.api.call(
                    "GET", self.path, params=params, stream=True, timeout=(10, 330)
                )
                # chunk_size=None: each event as soon as its chunk arrives (typed as int).
                for line in self.response.iter_lines(chunk_size=None):  # type: ignore[call-overload]
                    seen = self.clock()
                    if not line:
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":  # 410 Gone: relist from now
                        self.resource_version = str(
                            self.api.json("GET", self.path)["metadata"]["resourceVersion"]
                        )
                        break
                    self.resource_version = obj.get("metadata", {}).get(
                        "resourceVersion", self.resource_version
                    )
                    if event.get("type") != "BOOKMARK":
                        self.on_event(str(event.get("type")), obj, seen)
            except Exception as err:
                if not self.stopping.is_set():
                    log(f"watch {self.path}: {err!r}; reconnecting")
                    time.sleep(0.5)

    def stop(self) -> None:
        """End the stream at once: shut the socket down under the reading thread (closing the
        response from here would wait for that thread)."""
        self.stopping.set()
        if self.response is not None:
            connection = getattr(self.response.raw, "connection", None)
            sock = getattr(connection, "sock", None)
            with suppress(OSError):
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
        self.join(timeout=10)
