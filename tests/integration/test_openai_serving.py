"""Chat completions and completions through the OpenAI-compatible API, answered by the real vLLM
CPU engine (issue #14, the API half: the hosted-API script's last step).

Real parts: the control plane (RBAC, TokenRequest, SelfSubjectReview), `kubetune-api` as a
subprocess with the chart's settings, vLLM's OpenAI server from its own virtualenv serving a
tiny Llama under its base URI (as the operator starts it) with a LoRA adapter loaded at run
time (as the serving agent loads it), and the official `openai` client. The operator's part
(tests/integration/test_operator.py has it) is played here by the admin: FineTuneJobs created
and their status patched (`--subresource=status`) to Succeeded with status.serving as the
operator writes it, pointing at this vLLM.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai_support import ApiServerProcess, api_server_env, install_user_role, user_token
from operator_harness import install_crds
from trainer_support import build_tiny_model
from vllm_support import VllmServer, build_adapter

from kubetune_api.inference import ROUTE_CACHE_SECONDS
from localenv.testing import Cluster, free_port, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BASE = "tiny-llama"
BASE_URI = "s3://kubetune/serving-test/tiny-llama"  # never read: vLLM has the files locally
SERVED_BASE = BASE_URI + "/"  # kubetune_trainer.serving.served_model_name: the URI as directory
MODELS = [{"name": BASE, "uri": BASE_URI, "spec": {"resources": {"gpus": 0}}}]
MESSAGES = [{"role": "user", "content": "count: one two three"}]
PROMPT = "count: four five"
# Greedy and a fixed length, so answers through the API and straight from vLLM are comparable.
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


@dataclass
class Env:
    cluster: Cluster
    vllm: VllmServer
    server: ApiServerProcess
    ns_a: str
    ns_b: str
    alice: str  # kubetune-user in ns_a
    bob: str  # kubetune-user in ns_b
    nobody: str  # a ServiceAccount in ns_a without any role
    down_port: int  # nothing listens there

    def client(self, token: str | None = None, project: str | None = None) -> OpenAI:
        return OpenAI(base_url=self.server.base_url, api_key=token or self.alice,
                      project=project, max_retries=0, timeout=120)  # fmt: skip

    def direct(self) -> OpenAI:
        """vLLM itself, without the API in between."""
        return OpenAI(base_url=self.vllm.base_url, api_key="none", max_retries=0, timeout=120)


def finetunejob(name: str, *, method: str = "lora", enabled: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {"baseModel": {"uri": BASE_URI}, "method": method,
                 "dataset": {"trainUri": "s3://kubetune/serving-test/train.jsonl"},
                 "output": {"uri": f"s3://kubetune/serving-test/{name}/"},
                 "resources": {"gpus": 0}, "serving": {"enabled": enabled}},
    }  # fmt: skip


def play_operator(
    cluster: Cluster, namespace: str, name: str, serving: dict[str, Any] | None,
    phase: str = "Succeeded", **spec: Any,
) -> None:  # fmt: skip
    """A FineTuneJob with the status the operator would give it."""
    cluster.apply(finetunejob(name, **spec), namespace)
    status: dict[str, Any] = {"phase": phase}
    if phase == "Succeeded":
        status["completionTime"] = "2026-12-01T00:00:00Z"
    if serving is not None:
        status["serving"] = serving
    cluster.kubectl("patch", "ftj", name, "-n", namespace, "--subresource=status",
                    "--type=merge", "-p", json.dumps({"status": status}))  # fmt: skip


def serving_at(endpoint: str, model: str) -> dict[str, Any]:
    return {"phase": "Serving", "reason": "Serving", "message": f"Served as {model}.",
            "server": "kubetune-serve-0123456789", "endpoint": endpoint, "model": model}  # fmt: skip


@pytest.fixture(scope="module")
def env(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("serving")
    base = build_tiny_model(workdir / "model", heads=2)
    adapter = build_adapter(base, workdir / "adapter")
    vllm = VllmServer(base, SERVED_BASE, free_port(), workdir / "vllm.log")
    install_crds(cluster)
    with (
        install_user_role(cluster) as role,
        cluster.namespace() as ns_a,
        cluster.namespace() as ns_b,
    ):
        tokens = {
            "alice": user_token(cluster, ns_a, "alice", role),
            "bob": user_token(cluster, ns_b, "bob", role),
            "nobody": user_token(cluster, ns_a, "nobody", None),
        }
        port = free_port()
        server = ApiServerProcess(
            port,
            api_server_env(cluster, port=port, prefix="openai-serving", models=MODELS,
                           workdir=workdir, max_upload_bytes=1024),
            workdir / "api.log",
        )  # fmt: skip
        try:
            vllm.start()
            # The agent loads each adapter under its FineTuneJob's name.
            for name in ("served", "bobs"):
                vllm.load_adapter(name, adapter)
            down = free_port()
            play_operator(cluster, ns_a, "served", serving_at(vllm.base_url, "served"))
            play_operator(cluster, ns_b, "bobs", serving_at(vllm.base_url, "bobs"))
            # A full fine-tune (its own server, so it does not serve the base) that is down.
            play_operator(cluster, ns_a, "down", serving_at(f"http://127.0.0.1:{down}/v1", "down"),
                          method="full")  # fmt: skip
            play_operator(cluster, ns_a, "loading", {
                "phase": "Loading", "reason": "AdapterLoading", "server": "kubetune-serve-0123456789",
                "message": "Fetching the adapter, checking it against SHA256SUMS and loading it."})  # fmt: skip
            play_operator(cluster, ns_a, "refused", {
                "phase": "NotServed", "reason": "PromotionGateRefused",
                "message": "Not promoted: the fine-tuned validation loss 2.5000 is not below the "
                           "base model's 2.4000 (spec.serving.promotionGate: evalLoss)."})  # fmt: skip
            play_operator(cluster, ns_a, "training", {
                "phase": "Pending", "reason": "WaitingForTraining",
                "message": "The model is served once the job has succeeded."}, phase="Running")  # fmt: skip
            play_operator(cluster, ns_a, "unasked", None, enabled=False)
            server.start()
            yield Env(cluster, vllm, server, ns_a, ns_b, down_port=down, **tokens)
        finally:
            server.stop()
            vllm.stop()


def fine_tuned(env: Env, job: str, token: str | None = None) -> str:
    """The id the issue's script has: `job.fine_tuned_model`."""
    model = env.client(token).fine_tuning.jobs.retrieve(job).fine_tuned_model
    assert model is not None
    return model


def chat_text(client: OpenAI, model: str, **kwargs: Any) -> tuple[str, Any]:
    answer = client.chat.completions.create(model=model, messages=MESSAGES, **GREEDY, **kwargs)
    return answer.choices[0].message.content or "", answer


# ---------------------------------------------------------------------- the last step


def test_a_fine_tuned_models_chat_completion_is_vllms_answer_under_the_clients_id(
    env: Env,
) -> None:
    model = fine_tuned(env, "served")
    assert model == f"ft:{BASE}:{env.ns_a}::served"
    text, answer = chat_text(env.client(), model)
    direct, _ = chat_text(env.direct(), "served")
    assert text and text == direct
    assert answer.model == model  # not vLLM's name for it
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    # The FineTuneJob's plain name (what vLLM calls the adapter) names the same model.
    by_name, answer = chat_text(env.client(), "served")
    assert by_name == text and answer.model == "served"
    # The adapter changes the answer: the request went to it, not to the base model.
    base, _ = chat_text(env.direct(), SERVED_BASE)
    assert base != text


def test_streaming_yields_chunks_as_vllm_makes_them_and_adds_up_to_the_answer(env: Env) -> None:
    model = fine_tuned(env, "served")
    client = env.client()
    text, _ = chat_text(client, model)
    chunks, arrivals = [], []
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **GREEDY)
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2
    assert "".join(pieces) == text
    assert {c.model for c in chunks} == {model}
    assert chunks[-1].choices[0].finish_reason == "length"
    # Incremental: a long generation's chunks arrive spread out like vLLM's own, not at once.
    long = {**GREEDY, "max_tokens": 200}

    def spread(client: OpenAI, name: str) -> float:
        times = [time.monotonic() for _ in client.chat.completions.create(
            model=name, messages=MESSAGES, stream=True, **long)]  # fmt: skip
        return times[-2] - times[0]  # first chunk to last content chunk

    direct, routed = spread(env.direct(), "served"), spread(client, model)
    assert routed > 0.5 * direct, (routed, direct)
    # Usage at the end of a stream, as the client asks for it.
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)  # fmt: skip
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 8
    # A client that leaves mid-stream: the API drops vLLM's stream and carries on.
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **long)
    for _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    assert chat_text(client, model)[0] == text


def test_completions_plain_and_streamed(env: Env) -> None:
    model = fine_tuned(env, "served")
    client = env.client()
    answer = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
    direct = env.direct().completions.create(model="served", prompt=PROMPT, **GREEDY)
    assert answer.model == model
    assert answer.choices[0].text == direct.choices[0].text != ""
    chunks = list(client.completions.create(model=model, prompt=PROMPT, stream=True, **GREEDY))
    assert {c.model for c in chunks} == {model}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == answer.choices[0].text


def test_the_base_model_is_served_by_its_catalogue_name(env: Env) -> None:
    client = env.client()
    text, answer = chat_text(client, BASE)
    direct, _ = chat_text(env.direct(), SERVED_BASE)
    assert text == direct and answer.model == BASE
    completion = client.completions.create(model=BASE, prompt=PROMPT, **GREEDY)
    assert completion.model == BASE and completion.choices[0].text


def test_models_say_what_is_served(env: Env) -> None:
    client = env.client()
    models = {m.id: m for m in client.models.list()}
    served = f"ft:{BASE}:{env.ns_a}::served"
    assert models[served].serving["phase"] == "Serving"
    assert models[BASE].serving["phase"] == "Serving"
    assert "served" in models[BASE].serving["message"]
    loading = models[f"ft:{BASE}:{env.ns_a}::loading"].serving
    assert (loading["phase"], loading["reason"]) == ("Loading", "AdapterLoading")
    assert models[f"ft:{BASE}:{env.ns_a}::unasked"].serving is None
    assert client.models.retrieve(served).serving["phase"] == "Serving"
    assert client.models.retrieve(BASE).serving["phase"] == "Serving"
    # Bob's namespace serves its own adapter, which Alice does not see.
    assert not [m for m in models if f":{env.ns_b}:" in m]


# ---------------------------------------------------------------------------------- errors


def raises(kind: type[openai.APIStatusError], call: Callable[[], Any]) -> openai.APIStatusError:
    with pytest.raises(kind) as err:
        call()
    assert isinstance(err.value.body, dict) and err.value.body["message"]
    return err.value


def test_models_that_are_not_served_say_why(env: Env) -> None:
    client = env.client()
    chat = client.chat.completions.create

    def ask(model: str, **kwargs: Any) -> Callable[[], Any]:
        return lambda: chat(model=model, messages=MESSAGES, **GREEDY, **kwargs)

    err = raises(openai.NotFoundError, ask("no-such-model"))
    assert (err.code, err.param) == ("model_not_found", "model")
    raises(openai.NotFoundError, ask(f"ft:{BASE}:{env.ns_a}::no-such-job"))
    raises(openai.NotFoundError, ask(f"ft:{BASE}:{env.ns_a}::training"))  # no model yet
    # Still loading: 503, worth retrying (Retry-After), with status.serving's reason.
    err = raises(openai.InternalServerError, ask(fine_tuned(env, "loading")))
    assert err.status_code == 503 and err.code == "model_not_ready"
    assert "AdapterLoading" in err.message and "SHA256SUMS" in err.message
    assert err.response.headers["retry-after"] == "5"
    # Refused by the promotion gate: 409 with the gate's reason and message.
    err = raises(openai.ConflictError, ask(fine_tuned(env, "refused"), stream=True))
    assert err.code == "model_not_served"
    assert "PromotionGateRefused" in err.message and "not below the base" in err.message
    err = raises(openai.ConflictError, ask("training"))  # by name: still training
    assert "WaitingForTraining" in err.message
    err = raises(openai.ConflictError, ask(fine_tuned(env, "unasked")))
    assert "spec.serving.enabled" in err.message
    # vLLM's own refusals come back as they are, in OpenAI's shape.
    err = raises(openai.BadRequestError, lambda: chat(model=fine_tuned(env, "served"),
                                                      messages=MESSAGES, max_tokens=100_000))  # fmt: skip
    assert err.param == "max_tokens" and "max_model_len" in err.message
    raises(openai.BadRequestError, lambda: client.completions.create(model=BASE, prompt=""))


def test_the_model_server_being_down_is_a_clear_503_not_a_500(env: Env) -> None:
    client = env.client()
    model = fine_tuned(env, "down")
    for stream in (False, True):
        err = raises(openai.InternalServerError, lambda s=stream: client.chat.completions.create(
            model=model, messages=MESSAGES, stream=s, **GREEDY))  # fmt: skip
        assert err.status_code == 503 and err.code == "model_server_unreachable"
        assert f"127.0.0.1:{env.down_port}" in err.message and model in err.message
    assert "Traceback" not in env.server.tail(400)


def test_a_model_server_slower_than_the_timeout_is_a_504(env: Env, tmp_path: Path) -> None:
    port = free_port()
    impatient = dict(env.server.env, KUBETUNE_API_PORT=str(port),
                     KUBETUNE_API_INFERENCE_TIMEOUT="0.05")  # fmt: skip
    server = ApiServerProcess(port, impatient, tmp_path / "api.log").start()
    try:
        client = OpenAI(base_url=server.base_url, api_key=env.alice, max_retries=0)
        err = raises(openai.InternalServerError, lambda: client.chat.completions.create(
            model="served", messages=MESSAGES, **{**GREEDY, "max_tokens": 300}))  # fmt: skip
        assert err.status_code == 504 and err.code == "model_server_timeout"
        assert "0.05 s" in err.message
    finally:
        server.stop()
    assert "Traceback" not in server.tail(200)


def test_a_change_of_status_serving_is_seen_within_seconds(env: Env) -> None:
    """Routes are cached for ROUTE_CACHE_SECONDS: a model the operator stops serving answers
    409 soon after; one whose server moved answers from the new place at once after the old
    one failed."""
    client = env.client()
    play_operator(env.cluster, env.ns_a, "moving", serving_at(env.vllm.base_url, "served"),
                  method="full")  # fmt: skip
    assert chat_text(client, "moving")[1].model == "moving"
    gone = {
        "phase": "NotServed",
        "reason": "NotRequested",
        "message": "spec.serving.enabled is false.",
    }
    env.cluster.kubectl("patch", "ftj", "moving", "-n", env.ns_a, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {"serving": gone}}))  # fmt: skip

    def refused() -> bool:
        try:
            chat_text(client, "moving")
        except openai.ConflictError as err:
            return "NotRequested" in err.message
        return False

    wait_until(refused, ROUTE_CACHE_SECONDS + 5, "the change to reach the API", 0.5)
    # Served again, elsewhere (here: nowhere), then back: a failure drops the cached route.
    down = serving_at(f"http://127.0.0.1:{env.down_port}/v1", "served")
    env.cluster.kubectl("patch", "ftj", "moving", "-n", env.ns_a, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {"serving": down}}))  # fmt: skip
    raises(openai.InternalServerError, lambda: chat_text(client, "moving"))
    back = serving_at(env.vllm.base_url, "served")
    env.cluster.kubectl("patch", "ftj", "moving", "-n", env.ns_a, "--subresource=status",
                        "--type=merge", "-p", json.dumps({"status": {"serving": back}}))  # fmt: skip
    assert chat_text(client, "moving")[1].model == "moving"


def test_other_namespaces_models_are_invisible_and_rbac_decides(env: Env) -> None:
    alice, bob = env.client(env.alice), env.client(env.bob)
    bobs = fine_tuned(env, "bobs", env.bob)
    assert chat_text(bob, bobs)[1].model == bobs  # Bob's adapter, for Bob
    for model in (bobs, "bobs"):
        err = raises(openai.NotFoundError, lambda m=model: chat_text(alice, m))
        assert err.code == "model_not_found"
    raises(openai.NotFoundError, lambda: chat_text(bob, fine_tuned(env, "served")))
    # Naming the other namespace as project, or a key without rights: 403 from RBAC.
    for model in ("served", BASE):
        raises(openai.PermissionDeniedError, lambda m=model: chat_text(
            env.client(env.bob, project=env.ns_a), m))  # fmt: skip
        raises(openai.PermissionDeniedError, lambda m=model: chat_text(env.client(env.nobody), m))
    raises(openai.AuthenticationError, lambda: chat_text(env.client("not-a-token"), BASE))


# ------------------------------------------------------------------------- what it costs


def medians(calls: dict[str, Callable[[], Any]], n: int = 20) -> dict[str, float]:
    """Median seconds of each call, run in turns so that the machine's load hits all alike."""
    for call in calls.values():
        call()  # warm: connections, caches
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def test_routing_adds_little_to_a_request(env: Env, record_property: Any) -> None:
    """The median of 20 (KUBETUNE_ROUTING_SAMPLES) short chat completions through the API and
    straight to vLLM, in turns: what the API adds to a request once the caller's route is
    cached (identity and route from their caches, the forwarding), and what one FineTuneJob
    read costs (each caller, model and namespace pays it every ROUTE_CACHE_SECONDS). Printed
    for the benchmarks."""
    model = fine_tuned(env, "served")
    short = {"temperature": 0, "max_tokens": 1}
    routed, direct = env.client(), env.direct()

    def ask(client: OpenAI, name: str) -> Callable[[], Any]:
        return lambda: client.chat.completions.create(model=name, messages=MESSAGES, **short)

    samples = int(os.environ.get("KUBETUNE_ROUTING_SAMPLES", "20"))
    found = medians({"fine-tuned": ask(routed, model), "direct": ask(direct, "served"),
                     "base": ask(routed, BASE), "direct base": ask(direct, SERVED_BASE),
                     # What a route costs when it is not cached: one FineTuneJob read.
                     "retrieve": lambda: routed.models.retrieve(model)}, samples)  # fmt: skip
    added = {"fine-tuned": found["fine-tuned"] - found["direct"],
             "base": found["base"] - found["direct base"]}  # fmt: skip
    for name, seconds in added.items():
        record_property(f"routing_added_ms_{name}", round(seconds * 1000, 1))
    ms = {k: f"{v * 1000:.1f} ms" for k, v in found.items()}
    plus = {k: f"+{v * 1000:.1f} ms" for k, v in added.items()}
    print(f"\nrouting, median of {samples}: a fine-tuned model {ms['fine-tuned']} through the "
          f"API vs {ms['direct']} direct to vLLM ({plus['fine-tuned']}); a base model "
          f"{ms['base']} vs {ms['direct base']} ({plus['base']}); routes cached; one "
          f"FineTuneJob read (models.retrieve): {ms['retrieve']}")  # fmt: skip
    assert max(added.values()) < 0.25, found


def test_the_api_log_has_no_traceback(env: Env) -> None:
    log = Path(env.server.log_path).read_text(errors="replace")
    assert "Traceback" not in log, env.server.tail(100)
