"""Routing completions to vLLM (kubetune_api.routing): which server holds a model, why one is
not served, and the rewrites of requests, answers, stream events and errors. Pure, no cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune_api.catalogue import parse_catalogue
from kubetune_api.errors import ApiError
from kubetune_api.jobs import JobView
from kubetune_api.routing import (
    EventRewriter,
    Route,
    base_route,
    job_route,
    requested_model,
    rewrite_model,
    stream_error,
    upstream_body,
    upstream_error,
    valid_endpoint,
)

BASE_URI = "s3://kubetune/quickstart/model"
MODELS = parse_catalogue([{"name": "tiny-llama", "uri": BASE_URI}])
TINY = MODELS["tiny-llama"]
ENDPOINT = "http://kubetune-serve-ab12cd34ef.team-a.svc:8000/v1"


def serving(phase: str, **fields: str) -> dict[str, Any]:
    return {"phase": phase, **fields}


def ftj(
    name: str = "ftjob-1",
    *,
    serving_status: dict[str, Any] | None = None,
    phase: str = "Succeeded",
    created: str = "2025-01-02T03:04:05Z",
    **spec: Any,
) -> JobView:
    status: dict[str, Any] = {"phase": phase}
    if serving_status is not None:
        status["serving"] = serving_status
    body_spec = {"baseModel": {"uri": BASE_URI + "/"}, "serving": {"enabled": True}, **spec}
    meta = {"name": name, "namespace": "team-a", "creationTimestamp": created}
    return JobView({"metadata": meta, "spec": body_spec, "status": status})


def served(name: str = "ftjob-1", endpoint: str = ENDPOINT, **spec: Any) -> JobView:
    status = serving("Serving", reason="Serving", endpoint=endpoint, model=name)
    return ftj(name, serving_status=status, **spec)


def error_of(call: Any, *args: Any) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args)
    return err.value


# ------------------------------------------------------------------------------ requests


def test_the_requested_model_is_a_nonempty_string_of_an_object() -> None:
    assert requested_model({"model": "ft:a:b::c", "messages": []}) == "ft:a:b::c"
    for body in ([], "x", {}, {"model": ""}, {"model": 3}, {"model": "m" * 257}):
        err = error_of(requested_model, body)
        assert err.status == 400
    assert error_of(requested_model, {"messages": []}).param == "model"


def test_the_forwarded_body_differs_only_in_its_model() -> None:
    body = {"model": "ft:x", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_tokens": 3, "ignore_eos": True}  # fmt: skip
    forwarded = upstream_body(body, Route("ft:x", ENDPOINT, "ftjob-1"))
    assert forwarded == {**body, "model": "ftjob-1"}
    assert body["model"] == "ft:x"  # the caller's body is left alone


# ------------------------------------------------------------------------ fine-tuned models


def test_a_serving_job_routes_to_its_endpoint_under_its_served_name() -> None:
    route = job_route(served(endpoint=ENDPOINT + "/"), "ft:tiny-llama:team-a::ftjob-1")
    assert route == Route("ft:tiny-llama:team-a::ftjob-1", ENDPOINT, "ftjob-1")


@pytest.mark.parametrize(
    ("status", "code", "http", "words"),
    [
        (serving("Starting", reason="ServerStarting", message="The vLLM server is starting."),
         "model_not_ready", 503, ["Starting, ServerStarting", "is starting"]),
        (serving("Loading", reason="AdapterLoading", message="Fetching the adapter."),
         "model_not_ready", 503, ["Loading", "Fetching the adapter"]),
        (serving("Pending", reason="WaitingForTraining", message="Once the job has succeeded."),
         "model_not_served", 409, ["Pending, WaitingForTraining"]),
        (serving("NotServed", reason="PromotionGateRefused",
                 message="the fine-tuned validation loss 2.1 is not below the base model's 2.0"),
         "model_not_served", 409, ["PromotionGateRefused", "not below the base"]),
        (serving("Failed", reason="AdapterLoadFailed", message="could not load the adapter"),
         "model_not_served", 409, ["Failed, AdapterLoadFailed", "could not load"]),
        (serving("Serving", reason="Serving"),  # no endpoint: a malformed status
         "model_not_ready", 503, ["no usable endpoint"]),
    ],
)  # fmt: skip
def test_a_model_not_served_says_why_with_status_servings_reason_and_message(
    status: dict[str, Any], code: str, http: int, words: list[str]
) -> None:
    err = error_of(job_route, ftj(serving_status=status), "ft:m")
    assert (err.status, err.code) == (http, code)
    assert all(w in err.message for w in words), err.message
    assert "ft:m" in err.message
    # 503 is worth retrying soon (the client does, honouring Retry-After); 409 is final.
    assert (err.headers()["x-should-retry"] == "true") == (http == 503)
    assert ("Retry-After" in err.headers()) == (http == 503)


def test_a_job_that_does_not_ask_to_be_served_says_how_to_ask() -> None:
    err = error_of(job_route, ftj(serving={"enabled": False}), "ft:m")
    assert (err.status, err.code) == (409, "model_not_served")
    assert "spec.serving.enabled" in err.message and "kubectl patch ftj ftjob-1" in err.message
    err = error_of(job_route, ftj(), "ft:m")  # asked, but the operator has said nothing yet
    assert (err.status, err.code) == (503, "model_not_ready")


@pytest.mark.parametrize(
    "endpoint",
    ["ftp://host/v1", "http:///v1", "http://host:8000/", "http://host:8000/v2",
     "http://user:pw@host/v1", "http://host/v1?x=1", "http://host:99999/v1", "/v1", "", None, 7],
)  # fmt: skip
def test_only_an_http_endpoint_ending_in_v1_is_used(endpoint: Any) -> None:
    assert not valid_endpoint(endpoint)
    status = serving("Serving", endpoint=endpoint, model="ftjob-1")
    assert error_of(job_route, ftj(serving_status=status), "ft:m").status == 503


def test_endpoints_as_the_operator_writes_them_are_valid() -> None:
    for url in (ENDPOINT, "http://127.0.0.1:18101/v1", "https://10.0.0.7:8000/v1/"):
        assert valid_endpoint(url)


# ------------------------------------------------------------------------------ base models


def test_a_base_model_is_served_by_the_server_of_its_newest_serving_adapter() -> None:
    older = served("older", "http://127.0.0.1:18101/v1")
    newer = ftj("newer", serving_status=serving("Serving", endpoint="http://127.0.0.1:18102/v1",
                                                 model="newer"),
                created="2025-02-01T00:00:00Z")  # fmt: skip
    route = base_route([older, newer], TINY, "team-a")
    # Under the base URI as a directory: what served_model_name gives vLLM.
    assert route == Route("tiny-llama", "http://127.0.0.1:18102/v1", BASE_URI + "/")


def test_only_lora_and_qlora_jobs_of_the_same_base_serve_it() -> None:
    others = [
        served("full", method="full"),  # a full fine-tune's server holds only itself
        served("elsewhere", baseModel={"uri": "s3://kubetune/other-model/"}),
        served("pinned", baseModel={"uri": BASE_URI, "revision": "v2"}),
    ]
    assert error_of(base_route, others, TINY, "team-a").status == 409
    route = base_route([*others, served("q", method="qlora", baseModel={"uri": BASE_URI})],
                       TINY, "team-a")  # fmt: skip
    assert route.endpoint == ENDPOINT and route.served == BASE_URI + "/"


def test_a_base_model_not_served_says_why() -> None:
    err = error_of(base_route, [], TINY, "team-a")
    assert (err.status, err.code, err.param) == (409, "model_not_served", "model")
    assert "tiny-llama" in err.message and "team-a" in err.message
    assert "spec.serving.enabled" in err.message
    status = serving("Starting", reason="ServerStarting", message="The vLLM server is starting.")
    starting = ftj("starting", serving_status=status)
    refused = ftj("refused", serving_status=serving("NotServed", reason="PromotionGateRefused"))
    err = error_of(base_route, [refused, starting], TINY, "team-a")
    assert (err.status, err.code) == (503, "model_not_ready")
    assert "starting" in err.message and "ServerStarting" in err.message


# ---------------------------------------------------------------------------------- answers


def test_answers_carry_the_model_id_the_client_asked_for() -> None:
    answer = {"id": "chatcmpl-1", "model": "s3://kubetune/quickstart/model/", "choices": []}
    assert rewrite_model(answer, "tiny-llama") == {**answer, "model": "tiny-llama"}
    assert rewrite_model([1], "x") == [1] and rewrite_model({"a": 1}, "x") == {"a": 1}


def chunk(content: str, model: str = "ftjob-1") -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {"content": content}}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def events(data: bytes) -> list[Any]:
    out = []
    for event in data.decode().split("\n\n"):
        if event.startswith("data: ") and not event.startswith("data: [DONE]"):
            out.append(json.loads(event[6:]))
        elif event:
            out.append(event)
    return out


def test_stream_events_are_rewritten_one_by_one_however_the_bytes_arrive() -> None:
    stream = chunk("one") + b": keep-alive\n\n" + chunk(" two\u00e9") + b"data: [DONE]\n\n"
    whole = EventRewriter("ft:m").feed(stream)
    assert [e if isinstance(e, str) else e["model"] for e in events(whole)] == [
        "ft:m", ": keep-alive", "ft:m", "data: [DONE]",
    ]  # fmt: skip
    assert events(whole)[2]["choices"][0]["delta"]["content"] == " two\u00e9"
    # Byte by byte: nothing goes out before an event is complete, then exactly that event.
    rewriter, out = EventRewriter("ft:m"), []
    for i in range(len(stream)):
        piece = rewriter.feed(stream[i : i + 1])
        if piece:
            assert piece.endswith(b"\n\n") and piece.count(b"\n\n") == 1
        out.append(piece)
    assert b"".join(out) + rewriter.flush() == whole


def test_crlf_framing_an_unterminated_last_event_and_odd_events_pass() -> None:
    rewriter = EventRewriter("ft:m")
    crlf = chunk("a").replace(b"\n\n", b"\r\n\r\n")
    assert events(rewriter.feed(crlf))[0]["model"] == "ft:m"
    assert rewriter.feed(b'data: {"model": "x"}') == b""
    assert events(rewriter.flush()) == [{"model": "ft:m"}]
    assert rewriter.flush() == b""
    for odd in (b"data: not json\n\n", b'data: {"no": "model"}\n\n', b"event: x\ndata: 1\n\n",
                b'data: {"a":1}\ndata: {"model":"m"}\n\n'):  # fmt: skip
        assert EventRewriter("ft:m").feed(odd) == odd


def test_an_error_after_the_stream_started_is_an_event_the_client_raises() -> None:
    err = ApiError(503, "gone", code="model_server_unreachable")
    (event,) = events(stream_error(err))
    assert event["error"]["message"] == "gone" and event["error"]["code"] == err.code


# ----------------------------------------------------------------------------------- errors


ROUTE = Route("ft:tiny-llama:team-a::ftjob-1", ENDPOINT, "ftjob-1")


def test_vllms_errors_keep_their_status_and_message_in_openais_shape() -> None:
    body = {"error": {"message": "max_tokens=100000 cannot be greater than max_model_len=512.",
                      "type": "BadRequestError", "param": "max_tokens", "code": 400}}  # fmt: skip
    err = upstream_error(400, json.dumps(body), ROUTE)
    assert (err.status, err.param, err.code) == (400, "max_tokens", "invalid_request")
    assert err.body()["error"]["type"] == "invalid_request_error"
    assert err.message == body["error"]["message"]
    missing = {"error": {"message": "The model `ftjob-1` does not exist.", "code": 404}}
    err = upstream_error(404, json.dumps(missing), ROUTE)
    assert (err.status, err.code) == (404, "model_not_found")
    assert err.message == f"The model `{ROUTE.requested}` does not exist."  # the client's id
    err = upstream_error(500, json.dumps({"error": {"message": "EngineCore died"}}), ROUTE)
    assert (err.status, err.code) == (500, "model_server_error")
    assert err.message == "the model server: EngineCore died"
    err = upstream_error(422, json.dumps({"detail": [{"loc": ["body"], "msg": "bad"}]}), ROUTE)
    assert err.status == 422 and "bad" in err.message
    err = upstream_error(502, "<html>Bad Gateway</html>", ROUTE)
    assert err.status == 502 and "Bad Gateway" in err.message
    assert upstream_error(302, "", ROUTE).status == 502
