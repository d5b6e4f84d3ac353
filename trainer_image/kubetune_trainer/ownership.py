"""A FineTuneJob owns its output prefix: it never resumes another job's checkpoints, and never
overwrites or republishes another job's output without being told to.

The claim is an object, `<output>/.kubetune/owner.json` (the FineTuneJob's namespace, name and
uid), created before anything else is written there, with an S3 conditional write so that two
jobs racing for the same prefix cannot both win. At start a job finds one of:

- nothing under the prefix: it claims it and trains from step 0;
- its own claim (a retried or resumed pod of the same FineTuneJob): it resumes;
- anything else: another job's claim (an earlier FineTuneJob of the same name has another uid),
  or objects no job claimed. Then it stops with OutputExists, naming what it found, unless
  spec.output.overwrite is true, in which case it deletes the prefix and claims it.

A run without a FineTuneJob (`kubetune-trainer --config` on a workstation) claims the prefix as
"standalone": running it again resumes, and a FineTuneJob refuses that prefix like any other.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from kubetune_trainer.config import JobIdentity
from kubetune_trainer.errors import OutputExists
from kubetune_trainer.storage import S3Uri, Storage, StorageError
from kubetune_trainer.training_log import LOG_DIR

log = logging.getLogger(__name__)

OWNER_FILE: Final = "owner.json"
STANDALONE: Final = "standalone"
Claim = Literal["claimed", "ours", "overwritten"]


@dataclass(frozen=True)
class Owner:
    """Who may write an output prefix: a FineTuneJob (by uid), or a standalone run."""

    uid: str
    namespace: str | None = None
    name: str | None = None

    @classmethod
    def of(cls, job: JobIdentity | None) -> Owner:
        if job is None:
            return cls(uid=STANDALONE)
        return cls(uid=job.uid, namespace=job.namespace, name=job.name)

    def describe(self) -> str:
        if self.uid == STANDALONE:
            return "a standalone run (kubetune-trainer --config)"
        return f"FineTuneJob {self.namespace}/{self.name} (uid {self.uid})"


def owner_uri(output_uri: str) -> str:
    return str(S3Uri.parse(output_uri).join(LOG_DIR, OWNER_FILE))


def read_owner(storage: Storage, output_uri: str) -> tuple[Owner, str] | None:
    """The claim on `output_uri` and when it was made, or None when there is none."""
    try:
        data = json.loads(storage.read_bytes(owner_uri(output_uri)))
        owner = Owner(uid=str(data["uid"]), namespace=data.get("namespace"), name=data.get("name"))
        return owner, str(data.get("claimedAt", "an unknown time"))
    except StorageError as exc:
        if exc.reason == "StorageNotFound":
            return None
        raise
    except (ValueError, KeyError, TypeError):
        return Owner(uid="unreadable claim"), "an unknown time"


def claim_output(storage: Storage, output_uri: str, me: Owner, *, overwrite: bool) -> Claim:
    """Make `me` the owner of `output_uri` or raise OutputExists (see the module docstring)."""
    found = read_owner(storage, output_uri)
    if found is not None and found[0].uid == me.uid:
        return "ours"
    if found is not None:
        what = f"the output of {found[0].describe()}, claimed at {found[1]}"
    else:
        objects = storage.list(output_uri)
        what = (
            f"{len(objects)} object(s) no FineTuneJob claimed (for example {objects[0].path})"
            if objects
            else ""
        )
    claim: Claim = "claimed"
    if what:
        if not overwrite:
            raise OutputExists(
                f"output.uri {output_uri} already holds {what}. Nothing was overwritten and no "
                "checkpoint of it is resumed: choose another output.uri, delete what is there, "
                "or set spec.output.overwrite: true to replace it"
            )
        deleted = storage.delete_prefix(output_uri)
        log.warning(
            "output.overwrite: deleted %d object(s) under %s (%s) before training",
            deleted,
            output_uri,
            what,
        )
        claim = "overwritten"
    document = {**asdict(me), "claimedAt": datetime.now(UTC).isoformat(timespec="seconds")}
    body = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    if not storage.create_bytes(owner_uri(output_uri), body, "application/json"):
        # Another job claimed it between our look and our write.
        winner = read_owner(storage, output_uri)
        if winner is None or winner[0].uid != me.uid:
            who = winner[0].describe() if winner else "another job"
            raise OutputExists(
                f"output.uri {output_uri} was just claimed by {who}: two jobs must not share "
                "an output location; choose another output.uri"
            )
        return "ours"
    return claim
