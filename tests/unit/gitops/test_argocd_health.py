"""The Argo CD health check (Lua) maps FineTuneJob statuses to Argo CD health states.

Runs the shipped script in a real Lua interpreter (lupa), the way Argo CD runs it: with the
resource as the global `obj` and the returned table as the health. The statuses are the
operator's own (status.conditions and phase_of), so a change of the conditions shows here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lupa
import pytest

from kubetune_operator import status as operator_status

SCRIPT = (
    Path(__file__).resolve().parents[3] / "examples/gitops/argocd/finetunejob-health.lua"
).read_text()
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval(f"function(obj)\n{SCRIPT}\nend")
    result = check(lua.table_from(obj, recursive=True))
    return str(result["status"]), str(result["message"])


def ftj(
    phase: str | None,
    reason: str = "Why",
    message: str = "what",
    *,
    generation: int = 1,
    ready: operator_status.Readiness | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A FineTuneJob with the status the operator writes for this phase."""
    obj: dict[str, Any] = {"metadata": {"name": "j", "generation": generation}, "spec": {}}
    if phase is None:
        return obj
    verdict = operator_status.Verdict(phase, reason, message)  # type: ignore[arg-type]
    conditions = operator_status.conditions(verdict, generation, [], NOW, ready=ready)
    obj["status"] = {
        "observedGeneration": generation,
        "phase": operator_status.phase_of(conditions),
        "reason": reason,
        "message": message,
        "conditions": conditions,
        **extra,
    }
    return obj


@pytest.mark.parametrize(
    ("obj", "expected", "message"),
    [
        (ftj(None), "Progressing", "Waiting for the kubetune operator"),
        (ftj("Pending"), "Progressing", "Pending"),
        (ftj("Queued"), "Progressing", "Queued"),
        (
            ftj("Running", stage="Training", progress={"percent": 42.4}),
            "Progressing",
            "Running (Training) 42%",
        ),
        (ftj("Succeeded", "Succeeded", "eval loss 1.2"), "Healthy", "eval loss 1.2"),
        (ftj("Failed", "OOMKilled", "try method qlora"), "Degraded", "OOMKilled: try method qlora"),
        (ftj("Cancelled", "CancelRequested", "spec.cancel"), "Degraded", "CancelRequested"),
        (ftj("Suspended", "Suspended", "spec.suspend"), "Suspended", "spec.suspend"),
        (
            ftj("Succeeded", ready=operator_status.Readiness(
                False, "AdapterLoading", "loading the adapter", waiting=True)),
            "Progressing",
            "Succeeded, not ready: AdapterLoading: loading the adapter",
        ),
        (
            ftj("Succeeded", ready=operator_status.Readiness(True, "Serving", "served as m")),
            "Healthy",
            "served as m",
        ),
    ],
)  # fmt: skip
def test_conditions_map_to_health(obj: dict[str, Any], expected: str, message: str) -> None:
    got, text = health(obj)
    assert got == expected
    assert message in text


def test_a_stalled_job_is_degraded_whatever_its_phase() -> None:
    obj = ftj("Pending")
    obj["status"]["conditions"].append(
        {"type": "Stalled", "status": "True", "reason": "InvalidSpec", "message": "x"}
    )
    assert health(obj) == ("Degraded", "InvalidSpec: x")


def test_new_generation_not_yet_observed_is_progressing() -> None:
    obj = ftj("Succeeded", generation=3)
    obj["status"]["observedGeneration"] = 2
    assert health(obj) == ("Progressing", "Waiting for the operator to observe generation 3")
