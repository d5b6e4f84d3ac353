"""Serving: the I/O around serving.py (plans, status) and serving_manifests.py (builders).

`reconcile_namespace` is level-based and idempotent, run for a namespace whenever something that
matters there changes (a FineTuneJob that asks to be served, a server's Deployment or pod) and
by a timer while a job waits to be served (the agent's state ConfigMap is read with a GET: the
operator may read ConfigMaps by name, not list or watch them). Each run:

1. decides which servers the namespace needs and what each holds (serving.plan_servers);
2. creates a missing server (identity, ConfigMaps, Service, Deployment), updates one whose pod
   template, owners or desired adapters changed, and scales to zero one no job wants;
3. writes each job's status.serving from the Deployment, its pods and the agent's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune_operator import serving
from kubetune_operator import serving_manifests as sm
from kubetune_operator.kube import Kube
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer.api import API_VERSION, PLURAL
from kubetune_trainer.kubeapi import object_path, path
from kubetune_trainer.serving import DESIRED_KEY, STATE_KEY, DesiredState, ServerState

log = logging.getLogger(__name__)

Body = Mapping[str, Any]
# The timer of every waiting job in a namespace would each reconcile it: once per this long.
MIN_INTERVAL_SECONDS = 2.0


@dataclass(frozen=True)
class ServingSeen:
    """Kopf's indices: FineTuneJobs, and the servers' Deployments and pods, keyed by
    (namespace, FineTuneJob name) and (namespace, server name)."""

    ftjs: Mapping[Any, Iterable[Body]]
    deployments: Mapping[Any, Iterable[Body]]
    pods: Mapping[Any, Iterable[Body]]

    def namespace_ftjs(self, namespace: str) -> dict[str, Body]:
        return {
            key[1]: body
            for key, bodies in self.ftjs.items()
            if key[0] == namespace
            for body in bodies
        }

    def servers(self, namespace: str) -> dict[str, Body]:
        return {
            key[1]: body
            for key, bodies in self.deployments.items()
            if key[0] == namespace
            for body in bodies
        }

    def ports(self) -> dict[str, int]:
        """Server name -> port, for every server in every namespace (ports are per node)."""
        out: dict[str, int] = {}
        for (_, name), bodies in self.deployments.items():
            for body in bodies:
                port = ((body.get("metadata") or {}).get("annotations") or {}).get(
                    sm.PORT_ANNOTATION
                )
                if port and port.isdigit():
                    out[name] = int(port)
        return out

    def server_pods(self, namespace: str, name: str) -> list[Body]:
        return list(self.pods.get((namespace, name)) or ())


@dataclass
class ServingMemory:
    """What this replica last wrote, so unchanged things are not written again."""

    desired: dict[tuple[str, str], str] = field(default_factory=dict)
    owners: dict[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    statuses: dict[tuple[str, str], dict[str, Any] | None] = field(default_factory=dict)
    last_run: dict[str, float] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, namespace: str) -> asyncio.Lock:
        return self.locks.setdefault(namespace, asyncio.Lock())


def relevant(ftj: Body) -> bool:
    """Whether a FineTuneJob's change may change what the namespace serves."""
    spec, status = ftj.get("spec") or {}, ftj.get("status") or {}
    enabled = bool((spec.get("serving") or {}).get("enabled"))
    if enabled:
        return status.get("phase") == "Succeeded"
    return bool(status.get("serving"))  # was served, or was told why not


async def reconcile_namespace(
    kube: Kube,
    settings: OperatorSettings,
    memory: ServingMemory,
    namespace: str,
    seen: ServingSeen,
    *,
    throttle: bool = False,
) -> None:
    async with memory.lock(namespace):
        now = time.monotonic()
        if throttle and now - memory.last_run.get(namespace, 0.0) < MIN_INTERVAL_SECONDS:
            return
        memory.last_run[namespace] = now
        ftjs = seen.namespace_ftjs(namespace)
        deployments = seen.servers(namespace)
        jobs = serving.assess_jobs(namespace, ftjs.values(), settings)
        if (
            not jobs
            and not deployments
            and not any((f.get("status") or {}).get("serving") for f in ftjs.values())
        ):
            return
        plans = serving.plan_servers(jobs, ftjs)
        ports = seen.ports()
        assigned: dict[str, int] = {}
        for name, plan in plans.items():
            port = serving.server_port(name, ports, settings)
            if port is None:
                continue
            ports[name] = assigned[name] = port
            await _ensure_server(kube, settings, memory, plan, port, deployments.get(name))
        for name, deployment in deployments.items():
            if name not in plans:
                await _idle_server(kube, memory, namespace, name, deployment)
        states = {name: await _read_state(kube, namespace, name) for name in deployments}
        for job in jobs:
            server = job.key.name if job.key is not None else ""
            observed = None
            if server in deployments:
                observed = serving.ServerObservation(
                    deployments[server], seen.server_pods(namespace, server), states.get(server)
                )
            status = serving.job_serving_status(
                job, observed, assigned.get(server), settings, namespace
            )
            value = status.model_dump(by_alias=True, mode="json")
            await _write_status(kube, memory, ftjs[job.name], value)
        asking = {job.name for job in jobs}
        for ftj_name, ftj in ftjs.items():
            if ftj_name not in asking and (ftj.get("status") or {}).get("serving"):
                await _write_status(kube, memory, ftj, None)  # serving turned off


async def _ensure_server(  # noqa: PLR0917 - the plan and what is known of its server
    kube: Kube,
    settings: OperatorSettings,
    memory: ServingMemory,
    plan: serving.ServerPlan,
    port: int,
    deployment: Body | None,
) -> None:
    namespace, name = plan.key.namespace, plan.name
    key = (namespace, name)
    objects = sm.children(plan, port, settings)
    wanted = objects[-1]
    owners = tuple(ref["uid"] for ref in sm.owner_references(plan.jobs))
    desired = plan.desired().to_json()
    if deployment is None:
        # What the pod needs first (its ServiceAccount, the RoleBinding after its Role), then
        # the Deployment; every create tolerates "already exists".
        sa, role, binding, desired_cm, state_cm, service, _ = objects
        await asyncio.gather(*(kube.create(o) for o in (sa, role, desired_cm, state_cm, service)))
        await kube.create(binding)
        await kube.create(wanted)
        log.info("created the vLLM server %s/%s for %d job(s)", namespace, name, len(owners))
        memory.desired[key], memory.owners[key] = desired, owners
        return
    meta = deployment.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    want_hash = wanted["metadata"]["annotations"][sm.TEMPLATE_HASH_ANNOTATION]
    replicas = (deployment.get("spec") or {}).get("replicas")
    current_owners = tuple(sorted(r.get("uid", "") for r in meta.get("ownerReferences") or []))
    patch: dict[str, Any] = {}
    if annotations.get(sm.TEMPLATE_HASH_ANNOTATION) != want_hash:
        patch = {
            "metadata": {"annotations": wanted["metadata"]["annotations"]},
            "spec": {"template": wanted["spec"]["template"]},
        }
        log.info("updating the vLLM server %s/%s (its pod restarts)", namespace, name)
    if replicas != 1:
        patch.setdefault("spec", {})["replicas"] = 1
    if memory.owners.get(key) != owners or current_owners != tuple(sorted(owners)):
        # Every object of the server has the same owners: the garbage collector removes them
        # together once the last job they serve is deleted.
        refs = wanted["metadata"]["ownerReferences"]
        for obj in objects[:-1]:
            await kube.merge_patch(object_path(obj), {"metadata": {"ownerReferences": refs}})
        patch.setdefault("metadata", {})["ownerReferences"] = refs
        memory.owners[key] = owners
    if patch:
        await kube.merge_patch(object_path(wanted), patch)
    if memory.desired.get(key) != desired:
        desired_cm = objects[3]
        updated = await kube.merge_patch(object_path(desired_cm), {"data": desired_cm["data"]})
        if updated is None:  # deleted by someone: make it again
            await kube.create(desired_cm)
        memory.desired[key] = desired


async def _idle_server(
    kube: Kube, memory: ServingMemory, namespace: str, name: str, deployment: Body
) -> None:
    """No job wants this server: unload everything and scale it to zero (the garbage collector
    deletes it with the last of its owners)."""
    key = (namespace, name)
    empty = DesiredState().to_json()
    if memory.desired.get(key) != empty:
        desired = path("v1", "configmaps", namespace, sm.desired_name(name))
        await kube.merge_patch(desired, {"data": {DESIRED_KEY: empty}})
        memory.desired[key] = empty
    if (deployment.get("spec") or {}).get("replicas") != 0:
        await kube.merge_patch(
            path("apps/v1", "deployments", namespace, name), {"spec": {"replicas": 0}}
        )
        log.info("scaled the vLLM server %s/%s to zero: no job asks for it", namespace, name)


async def _read_state(kube: Kube, namespace: str, name: str) -> ServerState | None:
    body = await kube.get(path("v1", "configmaps", namespace, sm.state_name(name)))
    text = ((body or {}).get("data") or {}).get(STATE_KEY)
    if not text:
        return None
    try:
        return ServerState.model_validate_json(text)
    except ValueError:
        log.warning("unreadable state of the vLLM server %s/%s", namespace, name)
        return None


async def _write_status(
    kube: Kube, memory: ServingMemory, ftj: Body, value: dict[str, Any] | None
) -> None:
    meta = ftj["metadata"]
    key = (meta["namespace"], meta["name"])
    current = (ftj.get("status") or {}).get("serving") or None
    compact = None if value is None else {k: v for k, v in value.items() if v is not None}
    # The watch may not have delivered this replica's last write yet: compare with both.
    if compact == current or (key in memory.statuses and memory.statuses[key] == compact):
        memory.statuses[key] = compact
        return
    # Merge patch: every field is sent (None clears one), so no stale endpoint survives.
    target = path(API_VERSION, PLURAL, meta["namespace"], meta["name"], "status")
    await kube.merge_patch(target, {"status": {"serving": value}})
    memory.statuses[key] = compact
