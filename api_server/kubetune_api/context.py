"""What every endpoint shares: settings, the Kubernetes client, identity, the object store, the
model catalogue, and the few FineTuneJob reads that several endpoints make."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from kubetune_api import jobs
from kubetune_api.catalogue import CatalogueModel, by_uri
from kubetune_api.errors import ApiError
from kubetune_api.identity import Caller, Identity
from kubetune_api.kube import Kube
from kubetune_api.objectstore import ObjectStore
from kubetune_api.schemas import FineTuningJob
from kubetune_api.settings import ApiSettings
from kubetune_trainer.api import API_VERSION, PLURAL
from kubetune_trainer.kubeapi import path

log = logging.getLogger(__name__)

_OUTPUTS_CACHE: Final = 4096
_PARALLEL_READS: Final = 8


@dataclass
class Context:
    settings: ApiSettings
    kube: Kube
    identity: Identity
    store: ObjectStore
    models: Mapping[str, CatalogueModel]
    started: int
    # Outputs of finished jobs by FineTuneJob uid: final, so read from S3 once.
    _outputs: OrderedDict[str, jobs.Outputs] = field(default_factory=OrderedDict)
    _reads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(_PARALLEL_READS))

    @property
    def names_by_uri(self) -> dict[str, str]:
        return by_uri(dict(self.models))

    # ----------------------------------------------------------------- FineTuneJobs

    def ftj_path(self, namespace: str, name: str | None = None) -> str:
        return path(API_VERSION, PLURAL, namespace, name)

    async def get_job(self, caller: Caller, job_id: str) -> jobs.JobView:
        body = await self.kube.request(
            caller.token,
            "GET",
            self.ftj_path(caller.namespace, job_id),
            what=f"fine-tuning job {job_id} in namespace {caller.namespace}",
        )
        return jobs.JobView(body)

    async def list_jobs(self, caller: Caller, *, api_only: bool = False) -> list[jobs.JobView]:
        query = {"labelSelector": f"{jobs.CREATED_BY_LABEL}={jobs.CREATED_BY}"} if api_only else {}
        listing = await self.kube.request(
            caller.token,
            "GET",
            self.ftj_path(caller.namespace),
            query=query,
            what=f"fine-tuning jobs in namespace {caller.namespace}",
        )
        return [jobs.JobView(item) for item in listing.get("items") or []]

    def readable(self, job: jobs.JobView) -> bool:
        """Whether the server may read this job's output (objectstore.Layout.owns)."""
        return self.store.layout.owns(job.namespace, job.output_uri, job.storage_endpoint)

    # ------------------------------------------------------------------- its outputs

    async def outputs(self, job: jobs.JobView) -> jobs.Outputs:
        """Tokens trained and the results file of a finished job whose output the server may
        read; nothing for the others."""
        status = jobs.job_status(job)
        if status not in jobs.TERMINAL or not self.readable(job):
            return jobs.Outputs()
        cached = self._outputs.get(job.uid)
        if cached is not None:
            self._outputs.move_to_end(job.uid)
            return cached
        try:
            async with self._reads:
                records = await self.store.training_log(job.output_uri)
        except ApiError as err:  # the job still answers, without what the store would add
            log.warning("outputs of %s/%s not read: %s", job.namespace, job.name, err.message)
            return jobs.Outputs()
        found = jobs.Outputs()
        if records:
            tokens = [r.tokens_seen for r in records if r.type == "train" and r.tokens_seen]
            found = jobs.Outputs(
                trained_tokens=tokens[-1] if tokens else None,
                result_file=jobs.results_file_id(job.name),
            )
        self._outputs[job.uid] = found
        if len(self._outputs) > _OUTPUTS_CACHE:
            self._outputs.popitem(last=False)
        return found

    async def openai_job(self, job: jobs.JobView) -> FineTuningJob:
        return jobs.to_openai(job, self.models, self.names_by_uri, await self.outputs(job))

    def forget_outputs(self, uid: str) -> None:
        self._outputs.pop(uid, None)
