"""Where Kopf keeps its handling state: the diff base in memory, handler progress in annotations.

Kopf's default is to remember the last handled spec (its diff base) in an annotation, written
with one more PATCH of the FineTuneJob after every handling cycle: a write to etcd, a watch
event fanned out to every watcher, and one more event for the operator to process, per
FineTuneJob. That annotation only matters after a restart, to tell which spec fields changed
while no operator was watching, and the operator does not need it there: after a restart or
failover it reconciles each existing Job with its FineTuneJob's spec, level-based
(reconcile.follow_spec). So the diff base lives in this process:

- an object this process handled: the spec it last handled (update handlers get their diff);
- an object an operator handled before (it has a status) and with no handler in progress: its
  current spec, so Kopf sees no change and runs the resume handlers (which reconcile);
- otherwise (never handled, or a handler's retry is pending in the progress annotations):
  nothing, so Kopf runs the creation handlers (which are idempotent).

Handler progress (retries, back-off) still lives in annotations, where Kopf needs it to wake a
delayed handler; Kopf's marker annotation is only written with a record that stays.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, cast

import kopf


class MemoryDiffBase(kopf.DiffBaseStorage):
    """The last handled essence of each object, by uid, in this process only."""

    def __init__(self, progress_prefix: str) -> None:
        super().__init__()
        self._progress_prefix = f"{progress_prefix}/"
        self._legacy = f"{progress_prefix}/last-handled-configuration"
        # Compact JSON: a FineTuneJob's essence is ~1-2 KB, so 1,000 cost ~2 MB.
        self._essences: dict[str, str] = {}

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        """Kopf's essence, without first deep-copying what it then throws away.

        Kopf builds it on every event of the object from a deep copy of the whole body, its
        metadata (managedFields) and status included, then deletes those: 14% of the operator's
        CPU under a burst of FineTuneJobs (py-spy). The same essence from the parts it keeps.
        """
        if extra_fields:  # a handler on a status field: Kopf's own way
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        kept: dict[str, Any] = {k: v for k, v in body.items() if k not in ("metadata", "status")}
        kept["metadata"] = {key: meta[key] for key in ("labels", "annotations") if key in meta}
        return super().build(body=kopf.Body(cast(kopf.RawBody, kept)))

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        uid = body.metadata.uid or ""
        stored = self._essences.get(uid)
        if stored is not None:
            return json.loads(stored)  # type: ignore[no-any-return]
        if body.status.get("observedGeneration") is None or self._in_progress(body):
            return None
        return self.build(body=body)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._essences[body.metadata.uid or ""] = json.dumps(essence, separators=(",", ":"))
        # The annotation earlier versions kept the diff base in is never updated now: removed
        # when a spec change is handled (one patch, once per such object), not left to mislead.
        if self._legacy in body.metadata.annotations:
            patch.metadata.annotations[self._legacy] = None

    def forget(self, uid: str) -> None:
        """The object is gone (keeps the map bounded by the objects that exist)."""
        self._essences.pop(uid, None)

    def __len__(self) -> int:
        return len(self._essences)

    def _in_progress(self, body: kopf.Body) -> bool:
        """Whether Kopf's progress annotations hold a record (a handler awaits a retry)."""
        marker = f"{self._progress_prefix}kopf-managed"
        return any(
            key.startswith(self._progress_prefix) and key != marker and _is_progress_record(value)
            for key, value in body.metadata.annotations.items()
        )


def _is_progress_record(value: str) -> bool:
    """Kopf's progress records are JSON objects with a "started" time; other annotations
    under the same prefix (the API server's, a user's) are not."""
    try:
        record: Any = json.loads(value)
    except ValueError:
        return False
    return isinstance(record, dict) and "started" in record


class ProgressAnnotations(kopf.AnnotationsProgressStorage):
    """Kopf's annotation progress storage, minus a write for nothing.

    Kopf adds its `<prefix>/kopf-managed` marker with the first progress record it writes. A
    handler that succeeds on its first try has its record written and purged in the same
    cycle, and the marker alone would still cost a PATCH of the object.
    """

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        """The essence without progress annotations. Kopf deep-copies both essences for this on
        every event of the object, also when there is nothing to remove (almost always)."""
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        if not any(key.startswith(f"{self.prefix}/") for key in annotations):
            return essence  # fresh from fetch or build: shared with nothing
        return super().clear(essence=essence)

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        super().purge(key=key, body=body, patch=patch)
        marker = f"{self.prefix}/kopf-managed"
        annotations = patch.get("metadata", {}).get("annotations", {})
        if marker in annotations and marker not in body.metadata.annotations:
            records = [k for k, v in annotations.items() if k != marker and v is not None]
            if not records:
                # And the parents it leaves empty: an empty patch is no request.
                del annotations[marker]
                if not annotations:
                    del patch["metadata"]["annotations"]
                if not patch["metadata"]:
                    del patch["metadata"]
