"""The scaling policy, a pure function: (metric history, spec, current replicas, memory, now) -> desired replicas
per role, with the reason and the figures behind each change.

Per role it first recommends a count from the latest smoothed metrics, then damps it the way the Kubernetes HPA
does, and finally enforces the spec's bounds:

- verifier: queue wait against `targets.queueWaitMs` and utilisation against `targets.gpuUtilizationPercent`
  (GPU utilisation where pods report one, else their busy fraction), each as `ceil(current * metric / target)`;
  with `speculationParallelism`, DSI's floor `ceil(t_target / (k * t_draft))`.
- drafter pools: their own utilisation, and CoSine's balance: a pool's drafting capacity must cover its share of
  `drafterVerifierBalance` x the verification throughput, grown as the verifiers' own recommendation grows.
- router, fusion: utilisation (busy fraction).
- idle fleet (no live request, nothing in flight or queued): every role goes to its minReplicas.
- damping: a tolerance band (no change while metric/target is within 1 +- tolerance); stabilisation windows
  (scale up only to the lowest recommendation of the last `up` seconds, down only to the highest of the last `down`
  seconds, and not before the window has been observed); at most `maxStep` replicas per change; after a change of
  one role, `cooldownSeconds` before it scales up again and `scaleDownCooldownSeconds` before it scales down (capacity
  is removed in fewer, larger steps than it is added).

`spec.<role>.replicas` is the user's request (`kubectl scale specfleet/NAME` sets the verifier's): when it changes,
the role jumps to it (within bounds) and autoscaling carries on from there after a cooldown; with autoscaling off it
is the count. Choosing which pods go on scale-down is `drain_plan`: they are drained first and removed only idle."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from specfleet_operator.metrics import MetricsSample, PodLoad, RoleLoad, verifier_queue_wait_ms
from specfleet_operator.spec import DRAFTER, VERIFIER, FleetSpec, RoleSpec

TOLERANCE = 0.1  # the hysteresis band: metric/target within 1 +- 0.1 changes nothing (the HPA's default)
SMOOTHING_S = 10.0  # metrics are averaged over the samples of the last 10 s before recommending
_MOST_REPLICAS = 1e6  # recommendations are capped here before the bounds apply (absurd figures stay finite)


@dataclass(frozen=True)
class Decision:
    """One change of one role's replica count."""

    time_s: float
    role: str
    from_replicas: int
    to_replicas: int
    reason: str
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyMemory:
    """What the policy remembers between calls (it returns the new memory; the caller keeps it).

    recommendations: role -> ((time_s, replicas), ...) over the longest stabilisation window;
    observed_since: role -> when recommendations for it started (a window counts only once fully observed);
    last_change_s: role -> time of its last change (cooldown); requested: role -> the spec replicas last seen."""

    recommendations: Mapping[str, tuple[tuple[float, int], ...]] = field(default_factory=dict)
    observed_since: Mapping[str, float] = field(default_factory=dict)
    last_change_s: Mapping[str, float] = field(default_factory=dict)
    requested: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyResult:
    desired: dict[str, int]
    decisions: tuple[Decision, ...]  # only the roles whose count changed
    reasons: dict[str, str]  # every role: why it has its count now
    memory: PolicyMemory


@dataclass(frozen=True)
class _Figures:
    """One role's load figures, averaged over the smoothing window."""

    utilization: float = 0.0  # percent
    queue_wait_ms: float | None = None
    tokens_per_s: float = 0.0
    busy_frac: float = 0.0
    step_ms: float | None = None
    serving: int = 0


def _figures(key: str, samples: Sequence[MetricsSample]) -> _Figures:
    loads: list[RoleLoad] = [s.role(key) for s in samples]
    waits = [verifier_queue_wait_ms(s) for s in samples] if key == VERIFIER else []
    known_waits = [w for w in waits if w is not None]
    steps = [load.step_ms for load in loads if load.step_ms is not None]
    count = len(loads)
    return _Figures(
        utilization=sum(load.utilization_percent for load in loads) / count,
        queue_wait_ms=sum(known_waits) / len(known_waits) if known_waits else None,
        tokens_per_s=sum(load.tokens_per_s for load in loads) / count,
        busy_frac=sum(load.busy_frac for load in loads) / count,
        step_ms=sum(steps) / len(steps) if steps else None,
        serving=len(loads[-1].serving),
    )


def _ratio_target(current: int, metric: float, target: float, tolerance: float) -> int:
    """HPA's rule: ceil(current * metric / target), unless the ratio is within the tolerance band."""
    ratio = metric / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return math.ceil(min(current * ratio, _MOST_REPLICAS) - 1e-9)


def _recommend(role: RoleSpec, current: int, figures: Mapping[str, _Figures], spec: FleetSpec,
               verifier_growth: float, tolerance: float) -> tuple[int, str, dict[str, float]]:
    """The raw recommendation for one role from its smoothed figures (before damping and bounds)."""
    targets = spec.autoscaling.targets
    mine = figures[role.key]
    base = max(current, 1)  # a role at 0 replicas with load still needs a ratio to grow from
    metrics = {"utilization_percent": round(mine.utilization, 2), "target_utilization_percent":
               targets.gpu_utilization_percent, "busy_frac": round(mine.busy_frac, 4),
               "tokens_per_s": round(mine.tokens_per_s, 3)}
    wants = {"utilisation": _ratio_target(base, mine.utilization, targets.gpu_utilization_percent, tolerance)}
    if role.key == VERIFIER:
        if mine.queue_wait_ms is not None:
            metrics.update(queue_wait_ms=round(mine.queue_wait_ms, 3), target_queue_wait_ms=targets.queue_wait_ms)
            wants["queue wait"] = _ratio_target(base, mine.queue_wait_ms, targets.queue_wait_ms, tolerance)
        draft_steps = [f.step_ms for key, f in figures.items() if spec.role(key).component == DRAFTER and f.step_ms]
        if spec.autoscaling.speculation_parallelism and mine.step_ms and draft_steps:
            t_draft = sum(draft_steps) / len(draft_steps)
            floor = math.ceil(min(mine.step_ms / (spec.autoscaling.k * t_draft), _MOST_REPLICAS) - 1e-9)
            metrics.update(t_target_ms=round(mine.step_ms, 3), t_draft_ms=round(t_draft, 3), dsi_floor=floor)
            wants["DSI floor ceil(t_target / (k * t_draft))"] = floor
    elif role.component == DRAFTER:
        verifier = figures[VERIFIER]
        pools = [f for key, f in figures.items() if spec.role(key).component == DRAFTER]
        drafted = sum(f.tokens_per_s for f in pools)
        # capacity is only measurable from a pod doing some work (below 1 % busy or 0.01 tok/s it is noise)
        if mine.tokens_per_s >= 0.01 and mine.busy_frac >= 0.01 and mine.serving and verifier.tokens_per_s > 0:
            per_pod_capacity = mine.tokens_per_s / (mine.serving * mine.busy_frac)  # drafted tokens/s at 100% busy
            share = mine.tokens_per_s / drafted
            needed = targets.drafter_verifier_balance * verifier.tokens_per_s * verifier_growth * share
            wants["CoSine balance"] = math.ceil(min(needed / per_pod_capacity, _MOST_REPLICAS) - 1e-9)
            metrics.update(verified_tokens_per_s=round(verifier.tokens_per_s, 3), verifier_growth=round(
                verifier_growth, 4), pool_share=round(share, 4), balance_target=targets.drafter_verifier_balance)
    reason, want = max(wants.items(), key=lambda item: item[1])
    return want, reason, metrics


def _stabilize(key: str, raw: int, current: int, memory: PolicyMemory, spec: FleetSpec, now: float) -> int:
    """HPA-style stabilisation over the remembered recommendations (raw already recorded in memory)."""
    up_s, down_s = spec.autoscaling.window_up_s, spec.autoscaling.window_down_s
    recs = memory.recommendations.get(key, ((now, raw),))
    since = memory.observed_since.get(key, now)
    up_values = [r for t, r in recs if t >= now - up_s] or [raw]
    down_values = [r for t, r in recs if t >= now - down_s] or [raw]
    lowest_up = min(up_values) if since <= now - up_s else current
    highest_down = max(down_values) if since <= now - down_s else current
    if lowest_up > current:
        return lowest_up
    if highest_down < current:
        return highest_down
    return current


def _remember(memory: PolicyMemory, key: str, raw: int, now: float, spec: FleetSpec) -> PolicyMemory:
    keep_s = max(spec.autoscaling.window_up_s, spec.autoscaling.window_down_s)
    recs = tuple((t, r) for t, r in memory.recommendations.get(key, ()) if t >= now - keep_s) + ((now, raw),)
    since = memory.observed_since.get(key, now)
    return replace(memory, recommendations={**memory.recommendations, key: recs},
                   observed_since={**memory.observed_since, key: since})


def _forget(memory: PolicyMemory, key: str) -> PolicyMemory:
    """Drop a role's recommendations (its count was set by hand: the old ones describe another count)."""
    return replace(memory, recommendations={k: v for k, v in memory.recommendations.items() if k != key},
                   observed_since={k: v for k, v in memory.observed_since.items() if k != key})


def decide(history: Sequence[MetricsSample], spec: FleetSpec, current: Mapping[str, int],
           memory: PolicyMemory | None = None, now: float = 0.0, tolerance: float = TOLERANCE,
           smoothing_s: float = SMOOTHING_S) -> PolicyResult:
    """Desired replicas for every role of `spec`; see the module docstring for the rules.

    history: samples, oldest first (only the last `smoothing_s` seconds before the newest are used);
    current: the replica counts the operator set last (missing roles start at their spec replicas)."""
    memory = memory or PolicyMemory()
    auto = spec.autoscaling
    latest = history[-1] if history else None
    window = [s for s in history if latest is not None and s.time_s >= latest.time_s - smoothing_s]
    idle = bool(window) and all(s.idle for s in window)
    figures = {key: _figures(key, window) for key in spec.role_keys} if window else {}

    desired: dict[str, int] = {}
    reasons: dict[str, str] = {}
    decisions: list[Decision] = []
    requested = dict(memory.requested)
    last_change = dict(memory.last_change_s)
    verifier_growth = 1.0

    # The verifier goes first: the drafter pools' balance follows the verifiers' recommendation (within bounds).
    for role in sorted(spec.roles, key=lambda r: r.key != VERIFIER):
        key = role.key
        before = current.get(key)
        count = role.clamp(role.replicas) if before is None else int(before)
        reason = "start: spec replicas" if before is None else "steady"
        metrics: dict[str, float] = {}
        adopted = key in requested and requested[key] != role.replicas
        if adopted:
            count, reason = role.clamp(role.replicas), f"spec replicas set to {role.replicas}"
            last_change[key] = now
            memory = _forget(memory, key)
        requested[key] = role.replicas
        if not auto.enabled:
            count, reason = role.clamp(role.replicas), "autoscaling off: spec replicas"
        elif figures and not adopted:  # a count set by hand this round stands until its cooldown ends
            if idle:
                raw, why = role.min_replicas, "idle: no live request, nothing in flight or queued"
                metrics = {"live_requests": 0.0}
            else:
                raw, why, metrics = _recommend(role, count, figures, spec, verifier_growth, tolerance)
            memory = _remember(memory, key, raw, now, spec)
            stable = _stabilize(key, raw, count, memory, spec, now)
            # a scale-down waits the longer cooldown: capacity is removed in fewer, larger steps (each change
            # restarts pods' share of work), while a scale-up only waits the short one
            cooldown_s = auto.cooldown_s if stable > count else auto.scale_down_cooldown_s
            cooling = key in last_change and now - last_change[key] < cooldown_s
            if stable != count and not cooling:
                step = max(-auto.max_step, min(auto.max_step, stable - count))
                count, reason = count + step, f"{why}: recommends {raw}, stabilised {stable}"
            elif stable != count:
                reason = f"cooldown: {why} recommends {raw}, next change after {cooldown_s} s"
            if key == VERIFIER:  # growth the pools must follow: what the verifiers may reach within their bounds,
                # by their stabilised recommendation (one noisy sample must not move the pools either)
                verifier_growth = max(role.clamp(stable), 1) / max(before or count, 1)
        bounded = role.clamp(count)
        if bounded != count:
            count, reason = bounded, f"{reason}; held to bounds [{role.min_replicas}, {role.max_replicas}]"
        desired[key], reasons[key] = count, reason
        if before is not None and count != before:
            last_change[key] = now
            decisions.append(Decision(now, key, int(before), count, reason, metrics))
    memory = replace(memory, requested=requested, last_change_s=last_change)
    ordered = {key: desired[key] for key in spec.role_keys}
    return PolicyResult(ordered, tuple(sorted(decisions, key=lambda d: spec.role_keys.index(d.role))), reasons,
                        memory)


@dataclass(frozen=True)
class DrainPlan:
    drain: tuple[str, ...] = ()  # mark draining now (the router stops sending to them)
    remove: tuple[str, ...] = ()  # drained, idle, past the grace period: safe to stop
    undrain: tuple[str, ...] = ()  # load came back: clear the mark instead of starting a new pod


def drain_plan(pods: Sequence[PodLoad], desired: int, drain_started_s: Mapping[str, float], now: float,
               grace_s: float) -> DrainPlan:
    """Which pods to drain, remove or put back to reach `desired` pods of one role without losing work.

    Pods already draining are retired first, then the ones with the least work. A pod is removed only when it has
    been draining for grace_s (the router and its last heartbeats have seen the mark) and reports no call in
    progress and nothing queued; pods unknown to drain_started_s count as just marked."""
    excess = len(pods) - max(0, desired)
    order = sorted(pods, key=lambda p: (not p.draining, p.inflight + p.queue_depth, p.pod))
    retire = order[:max(0, excess)]
    keep = order[max(0, excess):]
    drain = tuple(p.pod for p in retire if not p.draining)
    undrain = tuple(p.pod for p in keep if p.draining)
    remove = tuple(p.pod for p in retire if p.draining and p.idle
                   and now - drain_started_s.get(p.pod, now) >= grace_s)
    return DrainPlan(drain=drain, remove=remove, undrain=undrain)

