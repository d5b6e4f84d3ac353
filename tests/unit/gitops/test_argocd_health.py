"""The Argo CD health check (Lua) maps FineTuneJob statuses to Argo CD health states.

Runs the shipped script in a real Lua interpreter (lupa), the way Argo CD runs it: with the
resource as the global `obj` and the returned table as the health.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa
import pytest

SCRIPT = (
    Path(__file__).resolve().parents[3] / "examples/gitops/argocd/finetunejob-health.lua"
).read_text()


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval(f"function(obj)\n{SCRIPT}\nend")
    result = check(lua.table_from(obj, recursive=True))
    return str(result["status"]), str(result["message"])


def ftj(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "j", "generation": generation}, "spec": {}}
    if status is not None:
        obj["status"] = {"observedGeneration": generation, **status}
    return obj


@pytest.mark.parametrize(
    ("status", "expected", "message"),
    [
        (None, "Progressing", "Waiting for the kubetune operator"),
        ({"phase": "Pending"}, "Progressing", "Pending"),
        ({"phase": "Queued"}, "Progressing", "Queued"),
        (
            {"phase": "Running", "stage": "Training", "progress": {"percent": 42.4}},
            "Progressing",
            "Running (Training) 42%",
        ),
        ({"phase": "Succeeded", "message": "eval loss 1.2"}, "Healthy", "eval loss 1.2"),
        (
            {"phase": "Failed", "reason": "OOMKilled", "message": "try method qlora"},
            "Degraded",
            "OOMKilled: try method qlora",
        ),
        ({"phase": "Cancelled"}, "Degraded", "Cancelled"),
        ({"phase": "Suspended"}, "Suspended", "Suspended"),
        (
            {
                "phase": "Pending",
                "conditions": [
                    {"type": "Stalled", "status": "True", "reason": "InvalidSpec", "message": "x"}
                ],
            },
            "Degraded",
            "InvalidSpec: x",
        ),
    ],
)
def test_phase_maps_to_health(status: dict[str, Any] | None, expected: str, message: str) -> None:
    got, text = health(ftj(status))
    assert got == expected
    assert message in text


def test_new_generation_not_yet_observed_is_progressing() -> None:
    obj = ftj({"phase": "Succeeded"}, generation=3)
    obj["status"]["observedGeneration"] = 2
    assert health(obj) == ("Progressing", "Waiting for the operator to observe generation 3")
