"""Models: the base models of the catalogue, and the fine-tuned models of the caller's
namespace (one per succeeded FineTuneJob, named `ft:<base>:<namespace>:<suffix>:<job id>`).

Deleting a fine-tuned model marks its FineTuneJob (annotation openai.kubetune.dev/model-deleted,
a patch with the caller's token, so RBAC decides) and then deletes the job's output (adapter,
checkpoints, training log) from the API's store. The FineTuneJob itself stays, as a job does
after its model is deleted from OpenAI. Outputs outside the API's store (kubectl-applied jobs
writing elsewhere) are not the server's to delete.

Each model object carries `serving` (kubetune's addition; null when nothing serves it): a
fine-tuned model's status.serving phase, reason and message, or Serving for a base model whose
vLLM server runs in the namespace (routing.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from kubetune_api import jobs, routing
from kubetune_api.catalogue import CatalogueModel
from kubetune_api.context import Context
from kubetune_api.errors import ApiError, bad_request, not_found
from kubetune_api.identity import Caller
from kubetune_api.kube import FIELD_MANAGER
from kubetune_api.schemas import ListPage, ModelDeleted, ModelObject, ModelServing
from kubetune_trainer.kubeapi import MERGE_PATCH


class Models:
    def __init__(self, context: Context) -> None:
        self.context = context

    def _base(self, model: CatalogueModel, namespace_jobs: Sequence[jobs.JobView]) -> ModelObject:
        server = routing.base_server_job(namespace_jobs, model)
        serving = None
        if server is not None:
            serving = ModelServing(
                phase="Serving",
                reason="Serving",
                message=f"Served with the adapters of FineTuneJob {server.name}.",
            )
        return ModelObject(
            id=model.name, created=self.context.started, owned_by=model.owned_by, serving=serving
        )

    def _fine_tuned(self, job: jobs.JobView) -> ModelObject | None:
        if jobs.job_status(job) != "succeeded" or job.model_deleted:
            return None
        base = job.base_model(self.context.names_by_uri)
        finished = jobs.timestamp(job.status.get("completionTime"))
        status = routing.serving_status(job)
        serving = None
        if status.get("phase"):
            serving = ModelServing.model_validate(
                {k: str(status[k]) for k in ("phase", "reason", "message") if status.get(k)}
            )
        return ModelObject(
            id=jobs.fine_tuned_model_id(job, base),
            created=finished or jobs.timestamp(job.meta.get("creationTimestamp")) or 0,
            owned_by=job.namespace,
            serving=serving,
        )

    async def list_models(self, caller: Caller) -> ListPage[ModelObject]:
        namespace_jobs = jobs.newest_first(await self.context.list_jobs(caller))
        tuned = [self._fine_tuned(j) for j in namespace_jobs]
        base = [self._base(m, namespace_jobs) for m in self.context.models.values()]
        data = base + [m for m in tuned if m is not None]
        return ListPage[ModelObject](data=data)

    async def fine_tuned_job(self, caller: Caller, model_id: str) -> jobs.JobView:
        """The succeeded FineTuneJob behind a fine-tuned model of the caller's namespace."""
        parsed = jobs.parse_fine_tuned_model(model_id)
        missing = not_found(f"no model {model_id!r} in namespace {caller.namespace}", "model")
        if parsed is None or parsed[0] != caller.namespace:
            raise missing
        try:
            job = await self.context.get_job(caller, parsed[1])
        except ApiError as err:
            if err.status == 404:
                raise missing from None
            raise
        model = self._fine_tuned(job)
        if model is None or model.id != model_id:
            raise missing
        return job

    async def retrieve(self, caller: Caller, model_id: str) -> ModelObject:
        base = self.context.models.get(model_id)
        if base is not None:
            return self._base(base, await self.context.list_jobs(caller))
        model = self._fine_tuned(await self.fine_tuned_job(caller, model_id))
        assert model is not None
        return model

    async def delete(self, caller: Caller, model_id: str) -> ModelDeleted:
        if model_id in self.context.models:
            raise ApiError(
                403,
                f"{model_id} is a base model of the cluster's catalogue (the chart's "
                "apiServer.models): only its administrators can remove it",
                param="model",
                code="permission_denied",
            )
        job = await self.fine_tuned_job(caller, model_id)
        if not self.context.readable(job):
            raise bad_request(
                f"the output of job {job.name} ({job.output_uri}) is not in the API's store: "
                "delete it, or the FineTuneJob, with your own tools",
                param="model",
            )
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        await self.context.kube.request(
            caller.token,
            "PATCH",
            self.context.ftj_path(caller.namespace, job.name),
            body={"metadata": {"annotations": {jobs.MODEL_DELETED_ANNOTATION: stamp}}},
            query={"fieldManager": FIELD_MANAGER},
            content_type=MERGE_PATCH,
            what=f"fine-tuning job {job.name}",
        )
        await self.context.store.delete(job.output_uri)
        self.context.forget_outputs(job.uid)
        return ModelDeleted(id=model_id)
