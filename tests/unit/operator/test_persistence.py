"""Where Kopf keeps its handling state (persistence.py): the diff base in memory, so a handled
FineTuneJob costs no PATCH of Kopf's own; progress in annotations, without a lone marker."""

from __future__ import annotations

import copy
import json
from typing import Any

import kopf
from ftj_objects import UID, served

from kubetune_operator.persistence import MemoryDiffBase, ProgressAnnotations

PREFIX = "kubetune.dev"
RECORD = {"started": "2026-12-03T10:00:00.000000+00:00", "retries": 1, "success": False}


def _body(obj: dict[str, Any]) -> kopf.Body:
    return kopf.Body(copy.deepcopy(obj))


def test_a_new_finetunejob_has_no_diff_base_so_kopf_creates() -> None:
    storage = MemoryDiffBase(progress_prefix=PREFIX)
    assert storage.fetch(body=_body(served())) is None


def test_the_last_handled_spec_is_remembered_in_memory_not_in_the_patch() -> None:
    storage = MemoryDiffBase(progress_prefix=PREFIX)
    handled = _body(served(suspend=True))
    patch = kopf.Patch()
    storage.store(body=handled, patch=patch, essence=storage.build(body=handled))
    assert not patch  # no request of Kopf's own
    changed = _body(served(suspend=False, status={"phase": "Suspended", "observedGeneration": 1}))
    old = storage.fetch(body=changed)
    assert old is not None and old["spec"]["suspend"] is True  # Kopf's update handlers see it
    assert storage.build(body=changed)["spec"]["suspend"] is False

    storage.forget(UID)
    assert len(storage) == 0


def test_after_a_restart_a_handled_finetunejob_is_resumed_as_it_is() -> None:
    """An operator wrote its status before: no change is seen, so Kopf runs the resume handlers
    (which compare the Job with the spec, reconcile.follow_spec)."""
    storage = MemoryDiffBase(progress_prefix=PREFIX)
    body = _body(served(status={"phase": "Running", "observedGeneration": 1}))
    assert storage.fetch(body=body) == storage.build(body=body)


def test_a_handler_awaiting_a_retry_is_created_again_not_resumed() -> None:
    storage = MemoryDiffBase(progress_prefix=PREFIX)
    ftj = served(status={"phase": "Pending", "observedGeneration": 1})
    ftj["metadata"]["annotations"] = {
        f"{PREFIX}/created": json.dumps(RECORD),
        f"{PREFIX}/kopf-managed": "yes",
    }
    assert storage.fetch(body=_body(ftj)) is None

    # Other annotations under the same prefix are not Kopf's progress.
    ftj["metadata"]["annotations"] = {
        f"{PREFIX}/openai-job": '{"suffix": "x"}',
        f"{PREFIX}/note": "not json",
    }
    assert storage.fetch(body=_body(ftj)) is not None


def _first_try(storage: kopf.AnnotationsProgressStorage, body: kopf.Body) -> kopf.Patch:
    """What Kopf's progression does for a handler that succeeds at once: store, then purge."""
    patch = kopf.Patch()
    storage.store(key="created", record=RECORD, body=body, patch=patch)  # type: ignore[arg-type]
    storage.purge(key="created", body=body, patch=patch)  # type: ignore[arg-type]
    return patch


def test_a_handler_done_on_its_first_try_leaves_nothing_to_patch() -> None:
    body = _body(served())
    assert _first_try(kopf.AnnotationsProgressStorage(prefix=PREFIX), body)  # Kopf: the marker
    assert not _first_try(ProgressAnnotations(prefix=PREFIX), body)


def test_a_pending_retry_keeps_its_record_and_the_marker() -> None:
    storage = ProgressAnnotations(prefix=PREFIX)
    patch = kopf.Patch()
    body = _body(served())
    storage.store(key="created", record=RECORD, body=body, patch=patch)  # type: ignore[arg-type]
    annotations = patch["metadata"]["annotations"]
    assert set(annotations) == {f"{PREFIX}/created", f"{PREFIX}/kopf-managed"}


def test_the_essence_is_kopfs_built_without_copying_metadata_and_status() -> None:
    ftj = served(suspend=True, status={"phase": "Running", "observedGeneration": 1})
    ftj["metadata"]["labels"] = {"team": "a"}
    ftj["metadata"]["annotations"] = {
        "note": "kept",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
        f"{PREFIX}/kopf-managed": "yes",  # our Kopf state: left out
        f"{PREFIX}/created": json.dumps(RECORD),
    }
    ftj["metadata"]["managedFields"] = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    body = _body(ftj)
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="other.example").build(body=body)
    ours = MemoryDiffBase(progress_prefix=PREFIX).build(body=body)
    assert ours == kopfs
    assert ours == {
        "spec": ftj["spec"],
        "metadata": {"labels": {"team": "a"}, "annotations": {"note": "kept"}},
    }
    ours["spec"]["suspend"] = False
    assert body["spec"]["suspend"] is True  # a copy


def test_clearing_progress_copies_only_an_essence_that_holds_some() -> None:
    storage = ProgressAnnotations(prefix=PREFIX)
    plain = {"spec": {"suspend": True}, "metadata": {"annotations": {"note": "kept"}}}
    assert storage.clear(essence=plain) is plain  # type: ignore[arg-type]
    held = copy.deepcopy(plain)
    held["metadata"]["annotations"][f"{PREFIX}/created"] = json.dumps(RECORD)
    cleared = storage.clear(essence=held)  # type: ignore[arg-type]
    assert cleared == plain and f"{PREFIX}/created" in held["metadata"]["annotations"]


def test_the_annotation_earlier_versions_kept_the_diff_base_in_goes_with_a_handled_change() -> None:
    storage = MemoryDiffBase(progress_prefix=PREFIX)
    legacy = f"{PREFIX}/last-handled-configuration"
    ftj = served(status={"phase": "Running", "observedGeneration": 1})
    ftj["metadata"]["annotations"] = {legacy: '{"spec":{}}', f"{PREFIX}/kopf-managed": "yes"}
    body = _body(ftj)
    assert storage.fetch(body=body) == storage.build(body=body)  # not progress: resumed
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=storage.build(body=body))
    assert patch == {"metadata": {"annotations": {legacy: None}}}
