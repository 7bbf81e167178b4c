"""kopf handlers for SpecFleet resources, kept thin: parse the spec, apply the manifests, step the autoscaler,
patch the status, post events. The decisions are made in policy.py, the objects in manifests.py.

- create / update / resume: apply every role's ConfigMap, Service and Deployment (owned by the SpecFleet through
  ownerReferences), the Secrets the operator owns, and the status.
- a timer (every `autoscale_interval_s`): re-apply what drifted, run one autoscaling step (metrics from Redis ->
  policy -> Deployments, draining before scale-down), post an event per scaling decision, patch the status.
- delete (behind kopf's finalizer `specfleet.io/finalizer`): delete every object the fleet owns, so deletion
  cleans up without waiting for the garbage collector.

`make_registry()` builds a registry with a login of one's choosing (in-cluster service account or kubeconfig by
default; tests log in to a kmock server). Peering (one active operator) is set up by `specfleet operator run`."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

import kopf

from specfleet.state.connection import resolve_redis_url
from specfleet_operator.actuators import DRAIN_GRACE_S, Autoscaler, KubernetesActuator
from specfleet_operator.kube import KubeClient, KubeError
from specfleet_operator.manifests import (
    MANAGED_BY,
    fleet_manifests,
    internal_token_secret,
    internal_token_secret_name,
)
from specfleet_operator.policy import PolicyMemory
from specfleet_operator.spec import FleetSpec, SpecError
from specfleet_operator.status import fleet_status, ready_counts

GROUP, VERSION, PLURAL = "specfleet.io", "v1alpha1", "specfleets"
FINALIZER = "specfleet.io/finalizer"
OWNED_KINDS = ("Deployment", "Service", "ConfigMap", "Secret")
log = logging.getLogger("specfleet.operator")


class _Connection:
    """The API credentials kopf's login produced, shared by every object's handlers (kopf copies the memo per
    object shallowly, so this one holder is seen by all of them)."""

    def __init__(self) -> None:
        self.info: Any = None
        self._client: KubeClient | None = None

    def set(self, info: Any) -> None:
        self.info, self._client = info, None  # the old session is closed at cleanup; a re-login is rare

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def client(self) -> KubeClient:
        if self.info is None:
            raise kopf.TemporaryError("no Kubernetes credentials yet (login pending)", delay=2)
        if self._client is None:
            self._client = KubeClient.from_connection_info(self.info)
        return self._client


def default_login(**kwargs: Any) -> Any:
    """In-cluster service account first, then a kubeconfig (a developer's machine)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _fleet(name: str, spec: Any) -> FleetSpec:
    try:
        return FleetSpec.from_dict(name, dict(spec or {}))
    except SpecError as exc:
        raise kopf.PermanentError(f"invalid SpecFleet {name}: {exc}") from None


async def _redis_url(client: KubeClient, fleet: FleetSpec, namespace: str) -> str | None:
    """The URL the pods get (inline, or the Secret they read), else the operator's own: the file named by
    SPECFLEET_REDIS_URL_FILE (the chart mounts the Redis Secret) or SPECFLEET_REDIS_URL."""
    if fleet.redis_url:
        return fleet.redis_url
    try:
        secret = await client.get("Secret", namespace, fleet.redis_secret_name)
    except KubeError as exc:  # no RBAC for Secrets: fall back to the operator's environment
        log.debug("cannot read Secret %s/%s: %s", namespace, fleet.redis_secret_name, exc)
        secret = None
    value = ((secret or {}).get("data") or {}).get(fleet.redis_secret.key)
    if value:
        return base64.b64decode(value).decode()
    try:
        return resolve_redis_url(None, None)
    except ValueError as exc:
        log.warning("no Redis URL for SpecFleet %s: %s", fleet.name, exc)
        return None


async def _store(memo: Any, client: KubeClient, fleet: FleetSpec, namespace: str):
    """The fleet's StateStore (made once per object), or None when no Redis URL is known or Redis is away."""
    if getattr(memo, "store", None) is not None:
        return memo.store
    url = await _redis_url(client, fleet, namespace)
    if not url:
        return None
    from specfleet.state import DEFAULT_PREFIX, StateStore, connect

    # the services' prefix (`--key-prefix`, "sf" unless the chart sets another)
    store = StateStore(connect(url), prefix=os.environ.get("SPECFLEET_KEY_PREFIX", DEFAULT_PREFIX))
    if not await store.ping():
        await store.redis.aclose()
        return None
    memo.store = store
    return store


def _autoscaler(memo: Any, client: KubeClient, fleet: FleetSpec, namespace: str, status: Any) -> Autoscaler:
    """This object's Autoscaler, created on first use from the status (so a restarted operator resumes the counts
    and sees a spec change made while it was away); its spec is refreshed on every call."""
    autoscaler = getattr(memo, "autoscaler", None)
    if autoscaler is None:
        roles = dict((status or {}).get("roles") or {})
        current = {k: int(v["desired"]) for k, v in roles.items() if isinstance(v, dict) and "desired" in v}
        requested = {k: int(v["requested"]) for k, v in roles.items() if isinstance(v, dict) and "requested" in v}
        autoscaler = Autoscaler(fleet, KubernetesActuator(client, namespace, fleet), None, current,
                                PolicyMemory(requested=requested),
                                drain_grace_s=getattr(memo, "drain_grace_s", DRAIN_GRACE_S))
        memo.autoscaler = autoscaler
    autoscaler.spec = fleet
    autoscaler.actuator = KubernetesActuator(client, namespace, fleet)
    return autoscaler


def owned_selector(fleet_name: str) -> dict[str, str]:
    return {"specfleet.io/fleet": fleet_name, "app.kubernetes.io/managed-by": MANAGED_BY}


async def _apply_children(client: KubeClient, body: Any, fleet: FleetSpec, namespace: str,
                          desired: dict[str, int]) -> list[str]:
    """Create or patch every owned object (one list call per kind, writes only where something drifted); a
    Deployment that exists keeps its replicas (the autoscaler's)."""
    live: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in OWNED_KINDS:
        for obj in await client.list(kind, namespace, owned_selector(fleet.name)):
            live[kind, obj["metadata"]["name"]] = obj
    changed = []
    for obj in fleet_manifests(fleet, desired):
        obj["metadata"]["namespace"] = namespace
        kopf.adopt(obj, owner=body)
        current = live.get((obj["kind"], obj["metadata"]["name"]))
        if obj["kind"] == "Deployment" and current is not None and "replicas" in current.get("spec", {}):
            obj["spec"]["replicas"] = current["spec"]["replicas"]
        outcome = await client.apply(obj, namespace, live=current)
        if outcome != "unchanged":
            changed.append(f"{obj['kind']}/{obj['metadata']['name']} {outcome}")
    token_name = internal_token_secret_name(fleet.name)
    if ("Secret", token_name) not in live:  # created once: rotating it would cut the fleet's internal calls
        token = internal_token_secret(fleet, secrets.token_urlsafe(32))
        token["metadata"]["namespace"] = namespace
        kopf.adopt(token, owner=body)
        try:
            await client.create("Secret", namespace, token)
            changed.append(f"Secret/{token_name} created")
        except KubeError as exc:
            if exc.status != 409:  # 409: it exists (made by an earlier run); keep it
                raise
    return changed


async def _deployments(client: KubeClient, fleet: FleetSpec, namespace: str) -> list[dict[str, Any]]:
    return await client.list("Deployment", namespace, owned_selector(fleet.name))


def _lock(memo: Any) -> asyncio.Lock:
    """One lock per SpecFleet: kopf runs timers beside the change handlers, and both write the children."""
    if getattr(memo, "lock", None) is None:
        memo.lock = asyncio.Lock()
    return memo.lock


async def reconcile(body: Any, spec: Any, name: str, namespace: str, status: Any, memo: Any, patch: Any,
                    logger: logging.Logger, **_: Any) -> None:
    async with _lock(memo):
        if _deleting(body, memo):
            return
        await _reconcile(body, spec, name, namespace, status, memo, patch, logger)


async def _reconcile(body: Any, spec: Any, name: str, namespace: str, status: Any, memo: Any, patch: Any,
                     logger: logging.Logger) -> None:
    client = memo.connection.client()
    try:
        fleet = _fleet(name, spec)
    except kopf.PermanentError as exc:
        patch.status["conditions"] = fleet_status(FleetSpec.from_dict(name, {}), {}, {}, time.time(),
                                                  previous=status, problems=[("InvalidSpec", str(exc))])["conditions"]
        raise
    autoscaler = _autoscaler(memo, client, fleet, namespace, status)
    # counts taken from the spec now are what the spec requested: a later spec change must then read as a change
    # (adopted by the policy), even when it lands before the autoscaling timer's first step
    started = {key: fleet.role(key).replicas for key in fleet.role_keys
               if key not in autoscaler.desired and key not in autoscaler.memory.requested}
    if started:
        autoscaler.memory = dataclasses.replace(autoscaler.memory,
                                                requested={**autoscaler.memory.requested, **started})
    desired = {key: autoscaler.desired.get(key, fleet.role(key).clamp(fleet.role(key).replicas))
               for key in fleet.role_keys}
    autoscaler.desired = desired
    changed = await _apply_children(client, body, fleet, namespace, desired)
    if changed:
        logger.info("applied: %s", ", ".join(changed))
    ready = ready_counts(fleet, await _deployments(client, fleet, namespace))
    update = fleet_status(fleet, desired, ready, time.time(), generation=body.metadata.get("generation"),
                          previous=status, requested=autoscaler.memory.requested)
    # decisions are the autoscaling timer's to append: this handler's `status` may predate the timer's last patch,
    # and writing its (older) list back would erase a decision just recorded
    update.pop("decisions", None)
    patch.status.update(update)


def _deleting(body: Any, memo: Any) -> bool:
    """The SpecFleet is being deleted: handlers that write children must not run (they would re-create what the
    delete handler removed, and a failing step would hold the finalizer with retries)."""
    return bool(getattr(memo, "deleting", False) or body.get("metadata", {}).get("deletionTimestamp"))


async def autoscale(body: Any, spec: Any, name: str, namespace: str, status: Any, memo: Any, patch: Any,
                    logger: logging.Logger, **_: Any) -> None:
    async with _lock(memo):
        if _deleting(body, memo):
            return
        await _autoscale(body, spec, name, namespace, status, memo, patch, logger)


async def _autoscale(body: Any, spec: Any, name: str, namespace: str, status: Any, memo: Any, patch: Any,
                     logger: logging.Logger) -> None:
    client = memo.connection.client()
    fleet = _fleet(name, spec)
    autoscaler = _autoscaler(memo, client, fleet, namespace, status)
    problems: list[tuple[str, str]] = []
    autoscaler.store = await _store(memo, client, fleet, namespace)
    if autoscaler.store is None and fleet.autoscaling.enabled:
        problems.append(("MetricsUnavailable", "no Redis reachable for metrics: replica counts follow the spec"))
    await _apply_children(client, body, fleet, namespace, autoscaler.desired)  # repairs drift
    await autoscaler.actuator.refresh()  # one list of pods and one of Deployments for the whole step
    report = await autoscaler.step()
    for decision in report.decisions:
        kopf.info(body, reason="Scaled", message=f"{decision.role}: {decision.from_replicas} -> "
                                                 f"{decision.to_replicas} ({decision.reason})")
    for action, role, pod in report.actions:
        logger.debug("%s %s %s", action, role, pod)
    ready = ready_counts(fleet, autoscaler.actuator.deployments)
    patch.status.update(fleet_status(fleet, report.desired, ready, time.time(),
                                     generation=body.metadata.get("generation"), previous=status,
                                     sample=report.sample, decisions=report.decisions, problems=problems,
                                     requested=autoscaler.memory.requested))


async def cleanup(name: str, namespace: str, memo: Any, logger: logging.Logger, **_: Any) -> None:
    memo.deleting = True  # before the lock: a timer step queued behind it returns at once
    async with _lock(memo):  # after any step in progress, so nothing it writes outlives the deletion
        await _cleanup(name, namespace, memo, logger)


async def _cleanup(name: str, namespace: str, memo: Any, logger: logging.Logger) -> None:
    client = memo.connection.client()
    removed = 0
    for kind in OWNED_KINDS:
        for obj in await client.list(kind, namespace, owned_selector(name)):
            removed += await client.delete(kind, namespace, obj["metadata"]["name"])
    store = getattr(memo, "store", None)
    if store is not None:
        await store.redis.aclose()
        memo.store = None
    logger.info("deleted %d objects of SpecFleet %s", removed, name)


def make_registry(login: Callable[..., Any] = default_login, autoscale_interval_s: float = 10.0,
                  drain_grace_s: float = DRAIN_GRACE_S) -> kopf.OperatorRegistry:
    """A kopf registry with every SpecFleet handler; `login` returns a kopf.ConnectionInfo; drain_grace_s: how long
    a pod drains before it may be removed."""
    registry = kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="specfleet.io")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="specfleet.io", key="last-handled-configuration")
        settings.posting.level = logging.INFO  # kopf.info events: `kubectl describe` shows every decision
        settings.peering.mandatory = not settings.peering.standalone  # never two active operators
        if getattr(memo, "connection", None) is None:
            memo.connection = _Connection()
        memo.drain_grace_s = drain_grace_s

    @kopf.on.login(registry=registry)
    def log_in(memo: Any, **kwargs: Any) -> Any:
        info = login(memo=memo, **kwargs)
        if getattr(memo, "connection", None) is None:
            memo.connection = _Connection()
        memo.connection.set(info)
        return info

    @kopf.on.cleanup(registry=registry)
    async def close(memo: Any, **_: Any) -> None:
        if getattr(memo, "connection", None) is not None:
            await memo.connection.close()

    for decorator in (kopf.on.create, kopf.on.resume):
        decorator(*resource, registry=registry)(reconcile)
    kopf.on.update(*resource, field="spec", registry=registry)(reconcile)
    kopf.timer(*resource, interval=autoscale_interval_s, initial_delay=autoscale_interval_s / 2,
               backoff=autoscale_interval_s, registry=registry)(autoscale)
    kopf.on.delete(*resource, registry=registry)(cleanup)
    return registry
