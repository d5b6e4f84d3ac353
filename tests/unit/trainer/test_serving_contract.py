"""The serving contract shared by the operator and the serving agent (kubetune_trainer.serving)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_trainer.api import FineTuneSpec
from kubetune_trainer.serving import (
    DesiredAdapter,
    DesiredState,
    ServerState,
    max_lora_rank,
    promotion,
    served_model_name,
    server_key,
)

BASE = {
    "baseModel": {"uri": "s3://models/llama"},
    "dataset": {"trainUri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/job-a"},
    "storage": {"endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "s3"}},
    "serving": {"enabled": True},
}


def spec(**patch: Any) -> FineTuneSpec:
    body = {**BASE, **patch}
    return FineTuneSpec.model_validate(body)


def test_adapters_of_one_base_share_a_server_and_full_fine_tunes_do_not() -> None:
    a = server_key("team", "a", spec())
    b = server_key("team", "b", spec(output={"uri": "s3://out/job-b"}, lora={"r": 64}))
    assert a == b and a.name == b.name and a.name.startswith("kubetune-serve-")
    assert len(a.name) <= 63
    # The base as a directory: a trailing slash is the same base.
    assert server_key("team", "c", spec(baseModel={"uri": "s3://models/llama/"})) == a
    assert served_model_name(a) == "s3://models/llama/"
    # Another namespace has its own server (of the same name: names are per namespace).
    assert server_key("other-team", "a", spec()) != a
    others = [
        server_key("team", "a", spec(baseModel={"uri": "s3://models/qwen"})),
        server_key("team", "a", spec(storage={"credentialsSecretRef": {"name": "other"}})),
    ]
    assert len({a.name, *(k.name for k in others)}) == 3
    full = server_key("team", "f", spec(method="full"))
    assert full.mode == "full" and full.name != a.name
    assert served_model_name(full) == "f" and full.model_uri == "s3://out/job-a/"


@pytest.mark.parametrize(
    ("serving", "status", "serve", "reason"),
    [
        ({"enabled": False}, {"phase": "Succeeded"}, False, "NotRequested"),
        ({"enabled": True}, {"phase": "Running"}, False, "WaitingForTraining"),
        ({"enabled": True}, {"phase": "Succeeded"}, True, "Promoted"),
        ({"enabled": True, "promotionGate": "evalLoss"},
         {"phase": "Succeeded", "metrics": {"evalLoss": 1.2, "baseEvalLoss": 2.5}}, True,
         "Promoted"),
        ({"enabled": True, "promotionGate": "evalLoss"},
         {"phase": "Succeeded", "metrics": {"evalLoss": 2.5, "baseEvalLoss": 2.5}}, False,
         "PromotionGateRefused"),
        ({"enabled": True, "promotionGate": "evalLoss"}, {"phase": "Succeeded", "metrics": {}},
         False, "PromotionGateNoEvaluation"),
    ],
)  # fmt: skip
def test_the_promotion_gate(serving: Any, status: Any, serve: bool, reason: str) -> None:
    verdict = promotion(spec(serving=serving), status)
    assert (verdict.serve, verdict.reason) == (serve, reason)
    if reason == "PromotionGateRefused":
        assert "2.5000 is not below the base model's 2.5000" in verdict.message


def test_max_lora_rank_is_the_smallest_vllm_value_that_holds_every_adapter() -> None:
    assert max_lora_rank([], cap=64) == 8
    assert max_lora_rank([4, 16], cap=64) == 16
    assert max_lora_rank([17], cap=64) == 32
    assert max_lora_rank([100], cap=64) == 64  # capped: that adapter is refused
    assert max_lora_rank([600], cap=512) == 512


def test_the_documents_round_trip() -> None:
    desired = DesiredState(adapters=[DesiredAdapter(name="a", uri="s3://out/a/", rank=16)])
    assert DesiredState.model_validate_json(desired.to_json()) == desired
    state = ServerState.model_validate_json(
        '{"vllmReady": true, "adapters": {"a": {"state": "Loaded", "uri": "s3://out/a/",'
        ' "manifestSha256": "ab"}}, "unknownField": 1}'
    )
    assert state.vllm_ready and state.adapters["a"].state == "Loaded"
    assert '"vllmReady": true' in state.to_json()
