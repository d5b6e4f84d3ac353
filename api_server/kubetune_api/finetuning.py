"""Fine-tuning jobs: create, list, retrieve, cancel, pause, resume, events, checkpoints.

Every FineTuneJob and Event request carries the caller's token (kube.py), so RBAC decides who
may create, read or change which job; the server adds no permission of its own. Cancel sets
spec.cancel (the operator stops the pod and the phase becomes Cancelled), pause and resume set
spec.suspend; both are merge patches with strict field validation, so a cluster whose CRD lacks
a field says so instead of dropping it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from typing import Any, Final

from pydantic import ValidationError

from kubetune_api import events, jobs
from kubetune_api.context import Context
from kubetune_api.errors import ApiError, bad_request, conflict, from_validation
from kubetune_api.files import Files
from kubetune_api.hyperparameters import resolve, resolve_beta
from kubetune_api.identity import Caller
from kubetune_api.kube import FIELD_MANAGER
from kubetune_api.pagination import limit_of, paginate
from kubetune_api.schemas import (
    CheckpointMetrics,
    FineTuningJob,
    JobCheckpoint,
    JobCreate,
    JobEvent,
    ListPage,
    StoredFile,
)
from kubetune_trainer.api import PREFERENCE_FORMATS
from kubetune_trainer.kubeapi import MERGE_PATCH, path
from kubetune_trainer.training_log import EvalRecord, TrainRecord

MAX_PAGE: Final = 1000
# method.type -> the FineTuneJob's spec.objective
OBJECTIVES: Final = {"supervised": "sft", "dpo": "dpo"}
_METADATA_PARAM = "metadata["


def metadata_filter(query: Mapping[str, str]) -> dict[str, str]:
    """`metadata[k]=v` query parameters (how the client sends `metadata={"k": "v"}`)."""
    wanted = {}
    for key, value in query.items():
        if key.startswith(_METADATA_PARAM) and key.endswith("]"):
            wanted[key[len(_METADATA_PARAM) : -1]] = value
    return wanted


def objective_of(request: JobCreate) -> str:
    """The FineTuneJob objective the request's method asks for; 400 for what cannot run."""
    if request.integrations:
        raise bad_request(
            "integrations are not supported: training metrics are in the job's events and "
            "results file",
            param="integrations",
        )
    if request.method is None:
        return "sft"
    kind = request.method.type
    if kind not in OBJECTIVES:
        what = {"reinforcement": "reinforcement fine-tuning"}.get(kind, repr(kind))
        raise bad_request(
            f"method.type {kind!r} is not supported: the kubetune trainer does supervised "
            f"fine-tuning (method.type 'supervised') and preference tuning (method.type "
            f"'dpo'), not {what}",
            param="method.type",
            code="unsupported_method",
        )
    others = [
        name
        for name in ("supervised", "dpo", "reinforcement")
        if name != kind and getattr(request.method, name) is not None
    ]
    if others:
        raise bad_request(
            f"method: only method.{kind} may be given with type {kind!r} (got method.{others[0]})",
            param=f"method.{others[0]}",
        )
    return OBJECTIVES[kind]


def check_file_formats(objective: str, training: StoredFile, validation: StoredFile | None) -> None:
    """Preference pairs train with dpo, everything else with supervised: said at create time,
    not as a failed job (the FineTuneJob schema would refuse the pair too, less clearly)."""
    for param, stored in (("training_file", training), ("validation_file", validation)):
        if stored is None:
            continue
        pairs = stored.format in PREFERENCE_FORMATS
        if objective == "dpo" and not pairs:
            raise bad_request(
                f"{param} {stored.id} holds {stored.format} records; method.type 'dpo' trains "
                'on preference pairs: {"input": {"messages": [...]}, "preferred_output": [...], '
                '"non_preferred_output": [...]} or prompt/chosen/rejected records',
                param=param,
                code="invalid_file_format",
            )
        if objective == "sft" and pairs:
            raise bad_request(
                f"{param} {stored.id} holds preference pairs ({stored.format}); they train "
                "with method={'type': 'dpo'}, or upload chat records for supervised fine-tuning",
                param=param,
                code="invalid_file_format",
            )


def _checkpoint_metrics(step: int, records: list[TrainRecord | EvalRecord]) -> CheckpointMetrics:
    train = [r for r in records if isinstance(r, TrainRecord) and r.step <= step]
    evaluation = [r for r in records if isinstance(r, EvalRecord) and r.step == step]
    return CheckpointMetrics(
        step=step,
        train_loss=train[-1].train_loss if train else None,
        full_valid_loss=evaluation[-1].eval_loss if evaluation else None,
    )


class FineTuning:
    def __init__(self, context: Context, files: Files) -> None:
        self.context = context
        self.files = files

    # ------------------------------------------------------------------ create

    async def create(self, caller: Caller, body: Any, idempotency_key: str | None) -> FineTuningJob:
        context = self.context
        # Before reading any file, so the namespace's file ids are not an oracle for others.
        await context.identity.require(caller, "create", "create fine-tuning jobs")
        try:
            request = JobCreate.model_validate(body)
        except ValidationError as err:
            raise from_validation(err) from None
        objective = objective_of(request)
        model = context.models.get(request.model)
        if model is None:
            offered = ", ".join(context.models) or "none"
            raise bad_request(
                f"model {request.model!r} is not offered by this cluster (base models: "
                f"{offered}; GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        training = await self.files.stored(caller, request.training_file, "training_file")
        validation = None
        if request.validation_file is not None:
            validation = await self.files.stored(caller, request.validation_file, "validation_file")
            if validation.format != training.format:
                raise bad_request(
                    f"validation_file {validation.id} holds {validation.format} records but "
                    f"training_file {training.id} holds {training.format} records",
                    param="validation_file",
                    code="invalid_validation_file",
                )
        check_file_formats(objective, training, validation)
        given, param = request.hyperparameters, "hyperparameters"
        method = request.method
        beta = None
        if method is not None and method.supervised and method.supervised.hyperparameters:
            given, param = method.supervised.hyperparameters, "method.supervised.hyperparameters"
        if objective == "dpo":
            dpo = method.dpo.hyperparameters if method and method.dpo else None
            if dpo is not None:
                given, param = dpo, "method.dpo.hyperparameters"
            beta = resolve_beta(dpo.beta if dpo else "auto", "method.dpo.hyperparameters.beta")
        resolved = resolve(
            given,
            examples=training.records or 1,
            model_max_batch=model.max_batch_size,
            model_learning_rate=model.learning_rate,
            param=param,
        )
        new = jobs.NewJob(
            name=jobs.new_job_name(caller.namespace, idempotency_key),
            namespace=caller.namespace,
            model=model,
            training=training,
            validation=validation,
            resolved=resolved,
            seed=request.seed if request.seed is not None else secrets.randbelow(2**31),
            suffix=request.suffix,
            metadata=request.metadata,
            credentials_secret=context.settings.job_credentials_secret,
            idempotency_key=idempotency_key,
            objective=objective,
            beta=beta,
        )
        manifest = jobs.finetunejob(new, context.store.layout)
        try:
            created = await context.kube.request(
                caller.token,
                "POST",
                context.ftj_path(caller.namespace),
                body=manifest,
                query={"fieldManager": FIELD_MANAGER, "fieldValidation": "Strict"},
                what="fine-tuning job",
            )
        except ApiError as err:
            if err.status != 409 or not idempotency_key:
                raise
            # A retried request: the job its first attempt created, if it is that one.
            existing = await context.get_job(caller, new.name)
            digest = jobs.idempotency_digest(idempotency_key)
            if existing.annotations.get(jobs.IDEMPOTENCY_ANNOTATION) != digest:
                raise
            return await context.openai_job(existing)
        return await context.openai_job(jobs.JobView(created))

    # -------------------------------------------------------------------- read

    async def retrieve(self, caller: Caller, job_id: str) -> FineTuningJob:
        return await self.context.openai_job(await self.context.get_job(caller, job_id))

    async def list_jobs(self, caller: Caller, query: Mapping[str, str]) -> ListPage[FineTuningJob]:
        limit = limit_of(query, 20, MAX_PAGE)
        views = jobs.newest_first(await self.context.list_jobs(caller))
        wanted = metadata_filter(query)
        if wanted:
            views = [v for v in views if jobs.metadata_matches(v, wanted)]
        page = paginate(views, after=query.get("after"), limit=limit, key=lambda v: v.name)
        data = await asyncio.gather(*(self.context.openai_job(v) for v in page.data))
        return ListPage[FineTuningJob](
            data=list(data), has_more=page.has_more, first_id=page.first_id, last_id=page.last_id
        )

    # ----------------------------------------------------------------- change

    async def _patch_spec(
        self, caller: Caller, job: jobs.JobView, spec: dict[str, Any]
    ) -> FineTuningJob:
        body = await self.context.kube.request(
            caller.token,
            "PATCH",
            self.context.ftj_path(caller.namespace, job.name),
            body={"spec": spec},
            query={"fieldManager": FIELD_MANAGER, "fieldValidation": "Strict"},
            content_type=MERGE_PATCH,
            what=f"fine-tuning job {job.name}",
        )
        return await self.context.openai_job(jobs.JobView(body))

    async def _changeable(self, caller: Caller, job_id: str, action: str) -> jobs.JobView:
        job = await self.context.get_job(caller, job_id)
        status = jobs.job_status(job)
        if status in ("succeeded", "failed") or (status == "cancelled" and action != "cancel"):
            raise conflict(f"cannot {action} job {job_id}: it has already {status}")
        return job

    async def cancel(self, caller: Caller, job_id: str) -> FineTuningJob:
        job = await self._changeable(caller, job_id, "cancel")
        if job.spec.get("cancel"):
            return await self.context.openai_job(job)
        return await self._patch_spec(caller, job, {"cancel": True})

    async def pause(self, caller: Caller, job_id: str) -> FineTuningJob:
        job = await self._changeable(caller, job_id, "pause")
        if job.spec.get("suspend"):
            return await self.context.openai_job(job)
        return await self._patch_spec(caller, job, {"suspend": True})

    async def resume(self, caller: Caller, job_id: str) -> FineTuningJob:
        job = await self._changeable(caller, job_id, "resume")
        if not job.spec.get("suspend"):
            return await self.context.openai_job(job)
        return await self._patch_spec(caller, job, {"suspend": False})

    # ------------------------------------------------------- events, checkpoints

    async def _records(self, job: jobs.JobView) -> list[TrainRecord | EvalRecord]:
        """The training log, when the server may and can read it; status events stay
        available when it cannot (the store's failure is in the server's log)."""
        if not self.context.readable(job):
            return []
        try:
            return await self.context.store.training_log(job.output_uri) or []
        except ApiError:
            return []

    async def _kube_events(self, caller: Caller, job: jobs.JobView) -> list[dict[str, Any]]:
        """The FineTuneJob's Events; none for a caller who may read jobs but not Events."""
        try:
            listing = await self.context.kube.request(
                caller.token,
                "GET",
                path("v1", "events", caller.namespace),
                query={"fieldSelector": f"involvedObject.uid={job.uid}"},
                what="events",
            )
        except ApiError as err:
            if err.status != 403:
                raise
            return []
        return list(listing.get("items") or [])

    async def events(
        self, caller: Caller, job_id: str, query: Mapping[str, str]
    ) -> ListPage[JobEvent]:
        limit = limit_of(query, 20, MAX_PAGE)
        job = await self.context.get_job(caller, job_id)
        kube_events, records = await asyncio.gather(
            self._kube_events(caller, job), self._records(job)
        )
        openai = await self.context.openai_job(job)
        merged = events.job_events(job, kube_events, records, openai.fine_tuned_model)
        return paginate(merged, after=query.get("after"), limit=limit, key=lambda e: e.id)

    async def checkpoints(
        self, caller: Caller, job_id: str, query: Mapping[str, str]
    ) -> ListPage[JobCheckpoint]:
        """The trainer's complete checkpoints, newest first (the trainer keeps the newest
        spec.checkpointing.keep)."""
        limit = limit_of(query, 10, MAX_PAGE)
        job = await self.context.get_job(caller, job_id)
        found: list[JobCheckpoint] = []
        if self.context.readable(job):
            checkpoints, records = await asyncio.gather(
                self.context.store.checkpoints(job.output_uri), self._records(job)
            )
            base = job.base_model(self.context.names_by_uri)
            model = jobs.fine_tuned_model_id(job, base)
            for ckpt in reversed(checkpoints):
                found.append(
                    JobCheckpoint(
                        id=f"ftckpt-{job.name}-{ckpt.step}",
                        created_at=ckpt.created_at,
                        fine_tuned_model_checkpoint=f"{model}:ckpt-step-{ckpt.step}",
                        fine_tuning_job_id=job.name,
                        metrics=_checkpoint_metrics(ckpt.step, records),
                        step_number=ckpt.step,
                    )
                )
        return paginate(found, after=query.get("after"), limit=limit, key=lambda c: c.id)
