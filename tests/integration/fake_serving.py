"""Stand-ins for vLLM and the serving agent in the operator's serving tests (the e2e tests run
the real ones): a model server's pod keeps its real shape, only the programs are small.

    fake_serving.py vllm <vLLM's arguments>     answers /health, /v1/models and
                                                /v1/chat/completions ("<model> says hi")
    fake_serving.py fetch-model ...             exits 0 at once (nothing to fetch)
    fake_serving.py run                         the agent's loop: reads its desired ConfigMap
                                                with the pod's ServiceAccount token and reports
                                                every adapter Loaded (one whose name ends in
                                                -broken Failed) in its state ConfigMap

The agent uses exactly the Role the operator gave the server: `get` its desired ConfigMap,
`get`+`patch` its state ConfigMap. Only the standard library: it starts in milliseconds.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SA = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def vllm(args: list[str]) -> int:
    port = int(args[args.index("--port") + 1])
    base = args[args.index("--served-model-name") + 1]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *values: Any) -> None:
            pass

        def reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self.reply(200, {})
            elif self.path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": base, "object": "model"}]})
            else:
                self.reply(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            request = json.loads(self.rfile.read(length) or b"{}")
            model = request.get("model")
            self.reply(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": f"{model} says hi"},
                        }
                    ],
                },
            )

    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
    return 0


class Api:
    def __init__(self) -> None:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        self.base = f"https://{host}:{port}"
        self.token = (SA / "token").read_text().strip()
        self.context = ssl.create_default_context(cafile=str(SA / "ca.crt"))

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.base + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/merge-patch+json",
            },
        )
        try:
            with urllib.request.urlopen(request, context=self.context, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, None


def agent() -> int:
    api = Api()
    namespace, server = os.environ["POD_NAMESPACE"], os.environ["KUBETUNE_SERVER_NAME"]
    configmaps = f"/api/v1/namespaces/{namespace}/configmaps"
    vllm_url = os.environ["KUBETUNE_VLLM_URL"]
    last = None
    while True:
        code, desired_cm = api.call("GET", f"{configmaps}/{server}-desired")
        desired = json.loads((desired_cm or {}).get("data", {}).get("desired.json") or "{}")
        try:
            with urllib.request.urlopen(vllm_url + "/health", timeout=2):
                ready = True
        except OSError:
            ready = False
        adapters = {
            a["name"]: {
                "state": "Failed" if a["name"].endswith("-broken") else "Loaded",
                "uri": a["uri"],
                "message": "adapter_config.json does not match SHA256SUMS"
                if a["name"].endswith("-broken")
                else "",
            }
            for a in desired.get("adapters", [])
        }
        state = {"vllmReady": ready, "adapters": adapters, "desiredStatus": code}
        if state != last:
            document = {**state, "updated": datetime.now(UTC).isoformat()}
            patch = {"data": {"state.json": json.dumps(document)}}
            api.call("PATCH", f"{configmaps}/{server}-state", patch)
            last = state
        time.sleep(1)


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "vllm":
        return vllm(args)
    if mode == "fetch-model":
        print("fake fetch-model:", " ".join(args))
        return 0
    return agent()


if __name__ == "__main__":
    sys.exit(main())
