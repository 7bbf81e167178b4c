"""The autoscaling control loop and the actuators it drives: Kubernetes Deployments, or local processes
(`specfleet up --autoscale` supplies a `LocalActuator`). One loop for both, so a local run exercises the same code.

Each step reads a metrics sample from Redis, asks the pure policy for desired replicas, and converges every role:
new replicas are started at once; surplus ones are first marked draining in Redis (the router stops sending to them
and their health turns NOT_SERVING), and are stopped only once they have been draining for a grace period and
report no call in flight and nothing queued. A drained pod that is needed again is put back instead of starting a
new one. Nothing in flight is lost."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from specfleet_operator.metrics import MetricsSample, PodLoad, read_sample
from specfleet_operator.policy import SMOOTHING_S, Decision, PolicyMemory, decide, drain_plan
from specfleet_operator.spec import FleetSpec, component_of

if TYPE_CHECKING:
    from specfleet.state import StateStore
    from specfleet_operator.kube import KubeClient

log = logging.getLogger("specfleet.operator.autoscale")
HISTORY_S = 60.0  # metric samples kept (the policy smooths over the newest few seconds of them)
DRAIN_GRACE_S = 6.0  # > 2 heartbeat intervals: the router and the pod have both seen the mark before removal
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


class LocalActuator(Protocol):
    """What the loop needs from whatever runs replicas. Role keys: router, fusion, verifier, drafter-<pool>.
    Methods may be plain or async."""

    def replicas(self, role: str) -> list[str] | Awaitable[list[str]]:
        """The heartbeat ids (pod names) of the role's running replicas, draining ones included."""

    def start_replica(self, role: str) -> None | Awaitable[None]:
        """Start one more replica of the role."""

    def drain_and_stop(self, role: str, pod: str) -> None | Awaitable[None]:
        """Stop a replica the loop has drained (it has nothing in flight): gracefully, e.g. SIGTERM with a grace."""


async def _call(result: Any) -> Any:
    return await result if inspect.isawaitable(result) else result


@dataclass
class StepReport:
    """What one control step saw and did."""

    sample: MetricsSample | None
    desired: dict[str, int]
    reasons: dict[str, str]
    decisions: tuple[Decision, ...]
    actions: list[tuple[str, str, str]] = field(default_factory=list)  # (action, role, pod)


class Autoscaler:
    """The control loop's state for one fleet: metric history, policy memory, drain bookkeeping."""

    def __init__(self, spec: FleetSpec, actuator: LocalActuator, store: StateStore | None = None,
                 current: dict[str, int] | None = None, memory: PolicyMemory | None = None,
                 drain_grace_s: float = DRAIN_GRACE_S, clock: Callable[[], float] = time.time,
                 smoothing_s: float = SMOOTHING_S):
        # smoothing_s: the policy averages metrics over this much of the newest history (`decide(smoothing_s=)`)
        self.spec, self.actuator, self.store = spec, actuator, store
        self.smoothing_s = smoothing_s
        self.desired: dict[str, int] = dict(current or {})
        self.memory = memory or PolicyMemory()
        self.history: deque[MetricsSample] = deque()
        self.drain_started: dict[str, dict[str, float]] = {}  # role -> pod -> when this loop marked it draining
        self.drain_grace_s, self.clock = drain_grace_s, clock

    async def step(self) -> StepReport:
        now = self.clock()
        sample = None
        if self.store is not None:
            try:
                sample = await read_sample(self.store, time_s=now)
            except Exception as exc:  # Redis away: keep the counts, scale on the next good sample
                log.warning("fleet %s: no metrics this step (%s)", self.spec.name, exc)
        if sample is not None:
            self.history.append(sample)
        while self.history and self.history[0].time_s < now - HISTORY_S:
            self.history.popleft()
        result = decide(list(self.history) if sample is not None else [], self.spec, self.desired, self.memory, now,
                        smoothing_s=self.smoothing_s)
        self.desired, self.memory = result.desired, result.memory
        report = StepReport(sample, dict(result.desired), result.reasons, result.decisions)
        for role in self.spec.roles:
            await self._converge(role.key, result.desired[role.key], sample, now, report)
        return report

    async def _converge(self, key: str, desired: int, sample: MetricsSample | None, now: float,
                        report: StepReport) -> None:
        pods = list(await _call(self.actuator.replicas(key)))
        beats = {p.pod: p for p in sample.role(key).pods} if sample is not None else {}
        loads = [beats.get(pod, PodLoad(pod)) for pod in pods]
        started = self.drain_started.setdefault(key, {})
        for pod in [p for p in started if p not in pods]:  # gone by other means (crash, eviction)
            del started[pod]
        # draining as this loop knows it (marks it set) or as Redis says (marks from an earlier operator run,
        # whose grace period counts from now)
        loads = [replace(p, draining=p.draining or p.pod in started) for p in loads]
        for load in loads:
            if load.draining:
                started.setdefault(load.pod, now)
        if self.store is None:  # no Redis, no drain marks: stop surplus replicas gracefully (SIGTERM + grace)
            surplus = sorted(loads, key=lambda p: (p.inflight + p.queue_depth, p.pod))[:max(0, len(pods) - desired)]
            for pod in [p.pod for p in surplus]:
                await _call(self.actuator.drain_and_stop(key, pod))
                report.actions.append(("stop", key, pod))
        else:
            plan = drain_plan(loads, desired, started, now, self.drain_grace_s)
            component = component_of(key)
            for pod in plan.undrain:
                await self.store.set_draining(component, pod, False)
                started.pop(pod, None)
                report.actions.append(("undrain", key, pod))
            for pod in plan.drain:
                await self.store.set_draining(component, pod, True)
                started[pod] = now
                report.actions.append(("drain", key, pod))
            for pod in plan.remove:
                await _call(self.actuator.drain_and_stop(key, pod))
                await self.store.set_draining(component, pod, False)  # the id may come back (a restarted pod)
                started.pop(pod, None)
                report.actions.append(("stop", key, pod))
        for _ in range(desired - len(pods)):
            await _call(self.actuator.start_replica(key))
            report.actions.append(("start", key, ""))


async def autoscale_loop(store: StateStore | None, spec: FleetSpec, actuator: LocalActuator, interval_s: float,
                         stop_event: asyncio.Event, on_step: Callable[[StepReport], Any] | None = None,
                         current: dict[str, int] | None = None, smoothing_s: float = SMOOTHING_S) -> Autoscaler:
    """Run control steps every interval_s until stop_event is set; returns the Autoscaler (its final state).

    on_step (plain or async) sees every StepReport: log decisions, post events, record a benchmark."""
    autoscaler = Autoscaler(spec, actuator, store, current, smoothing_s=smoothing_s)
    while not stop_event.is_set():
        try:
            report = await autoscaler.step()
            if on_step is not None:
                await _call(on_step(report))
        except Exception:  # one bad step (an actuator error) must not end autoscaling
            log.exception("fleet %s: autoscaling step failed; retrying in %.1f s", spec.name, interval_s)
        try:
            await asyncio.wait_for(stop_event.wait(), timeout=interval_s)
        except TimeoutError:
            pass
    return autoscaler


class KubernetesActuator:
    """Replicas are a role's Deployment pods. Starting one raises the Deployment's replicas; stopping a drained pod
    gives it the lowest pod-deletion-cost and lowers replicas, so the ReplicaSet removes exactly that pod.

    `refresh()` lists the fleet's pods and Deployments once; the step then reads that snapshot (and keeps it up to
    date with its own writes) instead of asking the API server per role."""

    def __init__(self, client: KubeClient, namespace: str, spec: FleetSpec):
        self.client, self.namespace, self.spec = client, namespace, spec
        self.pods: list[dict[str, Any]] = []
        self.deployments: list[dict[str, Any]] = []
        self._fresh = False

    def _deployment_name(self, role: str) -> str:
        from specfleet_operator.manifests import object_name

        return object_name(self.spec.name, role)

    async def refresh(self) -> None:
        from specfleet_operator.manifests import MANAGED_BY

        fleet = {"specfleet.io/fleet": self.spec.name}
        self.pods = [p for p in await self.client.list("Pod", self.namespace, fleet)
                     if not p.get("metadata", {}).get("deletionTimestamp")]
        self.deployments = await self.client.list("Deployment", self.namespace,
                                                  {**fleet, "app.kubernetes.io/managed-by": MANAGED_BY})
        self._fresh = True

    def _deployment(self, role: str) -> dict[str, Any] | None:
        name = self._deployment_name(role)
        return next((d for d in self.deployments if d.get("metadata", {}).get("name") == name), None)

    async def _scale_by(self, role: str, delta: int) -> None:
        if not self._fresh:
            await self.refresh()
        live = self._deployment(role)
        name = self._deployment_name(role)
        if live is None:
            raise RuntimeError(f"Deployment {self.namespace}/{name} is missing: the reconcile handler recreates it")
        replicas = max(0, int(live.get("spec", {}).get("replicas", 0)) + delta)
        await self.client.patch("Deployment", self.namespace, name, {"spec": {"replicas": replicas}})
        live.setdefault("spec", {})["replicas"] = replicas

    async def replicas(self, role: str) -> list[str]:
        """As many names as the Deployment asks for: its newest pods that are not terminating (during a rollout
        the old ReplicaSet's surplus pods are not counted), padded with `<deployment>-pending-N` for pods not
        created yet, so a slow start is not mistaken for a missing replica."""
        from specfleet_operator.kube import matches
        from specfleet_operator.manifests import selector_labels

        if not self._fresh:
            await self.refresh()
        selector = selector_labels(self.spec.name, self.spec.role(role))
        pods = [p for p in self.pods if matches(p["metadata"].get("labels"), selector)]
        pods.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]), reverse=True)
        wanted = int((self._deployment(role) or {}).get("spec", {}).get("replicas", 0))
        names = sorted(p["metadata"]["name"] for p in pods[:wanted])
        return names + [f"{self._deployment_name(role)}-pending-{i}" for i in range(max(0, wanted - len(names)))]

    async def start_replica(self, role: str) -> None:
        await self._scale_by(role, +1)

    async def drain_and_stop(self, role: str, pod: str) -> None:
        if not pod.startswith(f"{self._deployment_name(role)}-pending-"):
            await self.client.patch("Pod", self.namespace, pod, {"metadata": {"annotations": {DELETION_COST:
                                                                                              "-1000000"}}})
            self.pods = [p for p in self.pods if p["metadata"]["name"] != pod]
        await self._scale_by(role, -1)
