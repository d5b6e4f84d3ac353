"""The agent's pure logic: desired + what vLLM holds + its records -> actions and reports."""

from __future__ import annotations

import math

from kubetune_serving.plan import (
    FIRST_RETRY_S,
    LOADED_MESSAGE,
    MAX_RETRY_S,
    Failure,
    Held,
    changed,
    failed,
    plan,
    recover,
    reports,
    stamp,
    valid_name,
    version_dir,
)
from kubetune_trainer.serving import AdapterReport, DesiredAdapter, ServerState

ROOT = "/models/adapters"
SHA_A, SHA_B = "a" * 64, "b" * 64


def want(name: str, rank: int = 8, uri: str | None = None) -> DesiredAdapter:
    return DesiredAdapter(name=name, uri=uri or f"s3://out/{name}/", rank=rank)


def held(name: str, sha: str = SHA_A, checked: float = 0.0) -> Held:
    return Held(sha, version_dir(ROOT, name, sha), checked)


def test_missing_adapters_are_loaded_and_undesired_ones_unloaded() -> None:
    p = plan(
        [want("a"), want("b")],
        served={"b": version_dir(ROOT, "b", SHA_B), "old": "/models/adapters/old/x"},
        held={"b": held("b", SHA_B)},
        failures={},
        now=10,
        recheck_after=60,
    )
    assert [d.name for d in p.load] == ["a"]
    assert p.unload == ("old",)
    assert p.recheck == ()


def test_an_adapter_vllm_lost_or_holds_from_elsewhere_is_loaded_again() -> None:
    records = {"a": held("a"), "b": held("b")}
    # a: vLLM restarted and holds nothing; b: held from a directory the agent did not load.
    p = plan([want("a"), want("b")], {"b": "/elsewhere"}, records, {}, now=1, recheck_after=60)
    assert [d.name for d in p.load] == ["a", "b"]
    assert p.unload == ()


def test_loaded_adapters_have_their_manifest_rechecked_when_due() -> None:
    served = {"a": version_dir(ROOT, "a", SHA_A)}
    fresh = plan([want("a")], served, {"a": held("a", checked=50)}, {}, now=100, recheck_after=60)
    assert fresh.load == () and fresh.recheck == ()
    due = plan([want("a")], served, {"a": held("a", checked=30)}, {}, now=100, recheck_after=60)
    assert [d.name for d in due.recheck] == ["a"] and due.load == ()


def test_a_failed_adapter_waits_for_its_retry_unless_its_entry_changed() -> None:
    failure = failed(want("a"), "checksum mismatch", None, now=100)
    assert failure.retry_at == 100 + FIRST_RETRY_S and failure.state == "Failed"
    args = {"served": {}, "held": {}, "failures": {"a": failure}, "recheck_after": 60}
    assert plan([want("a")], now=101, **args).load == ()  # type: ignore[arg-type]
    assert plan([want("a")], now=failure.retry_at, **args).load == (want("a"),)  # type: ignore[arg-type]
    # Another rank or output: a new adapter as far as the failure goes.
    assert plan([want("a", rank=16)], now=101, **args).load == (want("a", rank=16),)  # type: ignore[arg-type]


def test_retries_back_off_to_ten_minutes_and_restart_for_a_changed_entry() -> None:
    failure: Failure | None = None
    delays = []
    for attempt in range(8):
        failure = failed(want("a"), "no", failure, now=attempt * 1000.0)
        delays.append(failure.retry_at - attempt * 1000.0)
    assert delays[:4] == [15, 30, 60, 120] and delays[-1] == MAX_RETRY_S
    assert failure is not None and failure.attempts == 8
    again = failed(want("a", uri="s3://out/other/"), "no", failure, now=0)
    assert again.attempts == 1
    assert failed(want("a"), "store down", None, now=0, transient=True).state == "Loading"


def test_reports_say_loaded_loading_or_failed_per_desired_adapter() -> None:
    served = {"a": version_dir(ROOT, "a", SHA_A), "stale": "/x"}
    failures = {"c": failed(want("c"), "vLLM refused the adapter: rank", None, now=0)}
    notes = {"b": "Fetching the adapter and checking its SHA256SUMS."}
    got = reports([want("a"), want("b"), want("c")], served, {"a": held("a")}, failures, notes)
    assert got == {
        "a": AdapterReport(
            state="Loaded", uri="s3://out/a/", message=LOADED_MESSAGE, manifest_sha256=SHA_A
        ),
        "b": AdapterReport(state="Loading", uri="s3://out/b/", message=notes["b"]),
        "c": AdapterReport(
            state="Failed", uri="s3://out/c/", message="vLLM refused the adapter: rank"
        ),
    }


def test_nothing_is_loaded_while_vllm_is_not_ready_but_failures_stay() -> None:
    failures = {"c": failed(want("c"), "bad", None, now=0)}
    got = reports([want("a"), want("c")], None, {"a": held("a")}, failures, {})
    assert got["a"].state == "Loading" and "vLLM" in got["a"].message
    assert got["c"].state == "Failed"


def test_a_failure_of_an_earlier_entry_does_not_stick_to_a_new_one() -> None:
    failures = {"a": failed(want("a", uri="s3://out/old/"), "bad", None, now=0)}
    assert reports([want("a")], {}, {}, failures, {})["a"].state == "Loading"


def test_the_agent_recognises_only_its_own_version_directories() -> None:
    mine = version_dir(ROOT, "a", SHA_A)
    assert recover("a", mine, ROOT) == Held(SHA_A, mine, -math.inf)
    assert recover("a", version_dir(ROOT, "b", SHA_A), ROOT) is None  # another adapter's
    assert recover("a", "/models/adapters/a/latest", ROOT) is None
    assert recover("a", "/somewhere/else", ROOT) is None


def test_adapter_names_are_finetunejob_names() -> None:
    assert valid_name("my-job.v2") and valid_name("a")
    for bad in ("", "..", "../etc", "a/b", "Upper", "-a", "a-", "x" * 254):
        assert not valid_name(bad), bad


def test_state_is_written_only_when_something_but_the_times_changed() -> None:
    first = stamp(
        ServerState(
            vllm_ready=True,
            adapters={"a": AdapterReport(state="Loading", uri="s3://out/a/")},
        ),
        None,
        "2026-01-01T00:00:00Z",
    )
    assert first.updated == first.adapters["a"].updated == "2026-01-01T00:00:00Z"
    same = ServerState(
        vllm_ready=True, adapters={"a": AdapterReport(state="Loading", uri="s3://out/a/")}
    )
    assert not changed(same, first)
    loaded = ServerState(
        vllm_ready=True,
        adapters={
            "a": AdapterReport(state="Loaded", uri="s3://out/a/", manifest_sha256=SHA_A),
            "b": AdapterReport(state="Loading", uri="s3://out/b/"),
        },
    )
    assert changed(loaded, first)
    second = stamp(loaded, first, "2026-01-01T00:01:00Z")
    assert second.updated == second.adapters["a"].updated == "2026-01-01T00:01:00Z"
    # b unchanged in a third version keeps its time.
    third = stamp(
        ServerState(vllm_ready=False, message="vLLM is not ready", adapters=dict(second.adapters)),
        second,
        "2026-01-01T00:02:00Z",
    )
    assert third.updated == "2026-01-01T00:02:00Z"
    assert third.adapters["b"].updated == "2026-01-01T00:01:00Z"
