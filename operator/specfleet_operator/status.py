"""The SpecFleet `.status`, built from what the operator knows (pure): desired counts per role, its Deployments'
ready replicas, the last metrics sample and scaling decisions, and any problem it hit.

Conditions: `Ready` (every role has as many ready pods as desired), `Scaling` (a role has not reached its desired
count yet), `Degraded` (the spec is invalid, Redis is unreachable so autoscaling is blind, or a role that should
run has no ready pod). Each keeps its lastTransitionTime until its status changes."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from specfleet_operator.manifests import object_name, verifier_selector
from specfleet_operator.metrics import MetricsSample, verifier_queue_wait_ms
from specfleet_operator.policy import Decision
from specfleet_operator.spec import DRAFTER, VERIFIER, FleetSpec

MAX_DECISIONS = 20


def iso(time_s: float) -> str:
    return datetime.datetime.fromtimestamp(time_s, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decision_record(decision: Decision) -> dict[str, Any]:
    return {"time": iso(decision.time_s), "role": decision.role, "from": decision.from_replicas,
            "to": decision.to_replicas, "reason": decision.reason, "metrics": dict(decision.metrics)}


def condition(previous: Sequence[Mapping[str, Any]], kind: str, status: bool, reason: str, message: str,
              now_s: float) -> dict[str, Any]:
    value = "True" if status else "False"
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == value else None
    return {"type": kind, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since or iso(now_s)}


def ready_counts(fleet: FleetSpec, deployments: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Ready replicas per role key from the fleet's Deployments (0 for a role whose Deployment is missing)."""
    by_name = {d.get("metadata", {}).get("name"): d for d in deployments}
    return {key: int((by_name.get(object_name(fleet.name, key)) or {}).get("status", {}).get("readyReplicas") or 0)
            for key in fleet.role_keys}


def fleet_status(fleet: FleetSpec, desired: Mapping[str, int], ready: Mapping[str, int], now_s: float, *,
                 generation: int | None = None, previous: Mapping[str, Any] | None = None,
                 sample: MetricsSample | None = None, decisions: Sequence[Decision] = (),
                 problems: Sequence[tuple[str, str]] = (),
                 requested: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The whole status to patch. problems: (reason, message) pairs that make the fleet Degraded; requested: the
    spec replicas the policy has seen per role (kept, so a restarted operator still notices a later change)."""
    previous = previous or {}
    requested = requested or {}
    old_conditions = previous.get("conditions") or []
    roles: dict[str, Any] = {key: {"desired": int(desired.get(key, 0)), "ready": int(ready.get(key, 0)),
                                   "requested": int(requested.get(key, fleet.role(key).replicas))}
                                   for key in fleet.role_keys}
    for gone in set(previous.get("roles") or {}) - set(roles):  # a removed pool: delete its entry (merge patch)
        roles[gone] = None
    total_desired = sum(int(desired.get(k, 0)) for k in fleet.role_keys)
    total_ready = sum(min(int(ready.get(k, 0)), int(desired.get(k, 0))) for k in fleet.role_keys)
    behind = [k for k in fleet.role_keys if int(ready.get(k, 0)) != int(desired.get(k, 0))]
    dead = [k for k in fleet.role_keys if int(desired.get(k, 0)) > 0 and int(ready.get(k, 0)) == 0]
    problems = list(problems) + [("NoReadyPods", f"{k} has no ready pod") for k in dead]
    status: dict[str, Any] = {
        "replicas": int(ready.get(VERIFIER, 0)),
        "selector": verifier_selector(fleet.name),
        "ready": f"{total_ready}/{total_desired}",
        "drafterReplicas": sum(int(ready.get(r.key, 0)) for r in fleet.roles if r.component == DRAFTER),
        "roles": roles,
        "conditions": [
            condition(old_conditions, "Ready", not behind and not problems,
                      "AllReplicasReady" if not behind else "ReplicasNotReady",
                      f"{total_ready}/{total_desired} pods ready" + (f"; waiting for {', '.join(behind)}"
                                                                     if behind else ""), now_s),
            condition(old_conditions, "Scaling", bool(behind), "Converging" if behind else "Stable",
                      ", ".join(f"{k}: {ready.get(k, 0)} -> {desired.get(k, 0)}" for k in behind) or
                      "every role at its desired count", now_s),
            condition(old_conditions, "Degraded", bool(problems), problems[0][0] if problems else "Healthy",
                      "; ".join(message for _, message in problems) or "no problem found", now_s),
        ],
        "decisions": ([*(previous.get("decisions") or []), *(decision_record(d) for d in decisions)]
                      )[-MAX_DECISIONS:],
    }
    if generation is not None:
        status["observedGeneration"] = int(generation)
    if sample is not None:
        wait = verifier_queue_wait_ms(sample)
        status["queueWaitMs"] = round(wait, 2) if wait is not None else 0.0
        if sample.acceptance is not None:
            status["acceptance"] = round(sample.acceptance, 3)
    return status
