"""Scores autoscaling policies on load traces: SLO attainment (share of requests whose latency per output token
meets the SLO), GPU-hours, scaling actions, direction reversals, the time from a surge's start to the first
scale-up and p99 latency per token.

The fleet is a CoSine deployment whose per-verifier capacity and per-token latency come from the event core
(`engine.simulate` on one replica, saturated and nearly idle); the hours-long ramp then runs as a fluid queue in
1-second ticks (a backlog of tokens served at capacity x ready replicas), which is what makes 1,000 replicas over
an hour cheap. New replicas become ready after a provisioning delay (a GPU pod pulls its image and loads weights);
removed ones stop taking work at once (drained) and are paid for until their in-flight requests are done.

Policies: static at the trace's peak and at its mean load, a plain threshold rule, three baselines as Kubernetes
would run them (the HPA on GPU utilisation, KEDA on queue length, Knative's KPA on concurrency), and the operator's
own `specfleet_operator.policy.decide`, driven through `OperatorPolicy` with the metrics its heartbeats would carry.
`score_policies` scores them on one ramp; `score_grid` on every trace x fleet scale, averaged over seeds."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from specfleet_operator.simulator.costs import CostModel
from specfleet_operator.simulator.engine import saturated_tokens_per_s, simulate
from specfleet_operator.simulator.systems import build
from specfleet_operator.simulator.traces import AUTOSCALE_TRACES, Trace, make

POLICIES = ("static-peak", "static-mean", "threshold", "hpa-gpu-util", "keda-queue", "knative-kpa", "operator",
            "ideal-reactive")
BASELINES = POLICIES[:6]  # what a platform team would deploy instead; "ideal-reactive" is a reference, not a policy
PEAK_SHARE = 0.8  # every scored trace's peak needs this share of the most replicas


@dataclass(frozen=True)
class FleetModel:
    """What one verifier replica (with its drafter share) delivers, measured with the event core."""

    capacity_tokens_per_s: float  # saturated: every slot busy
    idle_s_per_token: float  # one request alone
    full_s_per_token: float  # a full batch
    step_ms: float  # verifier round at a full batch
    draft_step_ms: float
    gpus_per_replica: float
    target_gpus: float


def measure_fleet(costs: CostModel, seed: int = 0, system: str = "cosine") -> FleetModel:
    sys_ = build(system, costs)
    per_request = costs.request.output_tokens_mean
    capacity = saturated_tokens_per_s(sys_, seed)
    quiet_rate = 0.1 * 1e3 / (per_request * float(costs.target.ms(1, 1)))  # one request in flight 10% of the time
    lonely = make("steady", costs, quiet_rate, 20 / quiet_rate, seed)  # ~20 requests
    quiet = simulate(sys_, lonely, 1, seed=seed).summary()
    return FleetModel(capacity_tokens_per_s=capacity, idle_s_per_token=quiet["p50_tpot_ms"] / 1e3,
                      full_s_per_token=costs.max_batch / capacity,
                      step_ms=float(costs.target.ms(costs.max_batch * (1 + costs.k), costs.max_batch)),
                      draft_step_ms=float(costs.drafter.ms(1, 1)), gpus_per_replica=sys_.gpus_per_replica(),
                      target_gpus=costs.target_gpus)


@dataclass(frozen=True)
class Observation:
    """What a policy sees at a control tick (the figures the pods' heartbeats and the queue stream report)."""

    time_s: float
    ready: int  # serving replicas
    requested: int  # replicas asked for (ready + provisioning)
    utilization_percent: float
    queue_wait_ms: float
    tokens_per_s: float
    live_requests: int
    queued_requests: float = 0.0  # waiting for a slot: backlog tokens / mean output tokens
    inflight_requests: float = 0.0  # decoding, by Little's law: recent tokens served per s x seconds per token
    offered_tokens_per_s: float = 0.0  # output tokens of the requests arriving in this second

    @property
    def concurrency(self) -> float:
        """Requests in the system (in flight + queued): what Knative's queue-proxy counts, KEDA's queue metric."""
        return self.inflight_requests + self.queued_requests


class StaticPolicy:
    def __init__(self, replicas: int):
        self.replicas = replicas

    def decide(self, obs: Observation) -> int:
        return self.replicas


def static_replicas(trace: Trace, capacity_tokens_per_s: float, low: int, high: int, statistic: str) -> int:
    """Replicas that carry the trace's `statistic` load at `capacity_tokens_per_s` per replica, within [low, high]:
    "peak" (the highest 60-s moving average of arriving output tokens/s), "mean", or "initial" (the first 60 s)."""
    ticks = max(1, int(math.ceil(trace.duration_s)))
    tick_of = np.minimum(trace.arrival_s.astype(np.int64), ticks - 1)
    per_s = np.bincount(tick_of, weights=trace.output_tokens, minlength=ticks).astype(float)
    window = min(60, ticks)
    if statistic == "peak":
        load = float(np.convolve(per_s, np.ones(window) / window, mode="valid").max())
    elif statistic == "mean":
        load = float(per_s.sum() / trace.duration_s)
    elif statistic == "initial":
        load = float(per_s[:window].mean())
    else:
        raise ValueError(f"unknown statistic {statistic!r}; choose peak, mean or initial")
    return max(low, min(high, math.ceil(load / capacity_tokens_per_s)))


class HpaBehavior:
    """The Kubernetes HPA (autoscaling/v2) from a raw recommendation to the replicas it sets, with its default
    behaviour: every `period_s` (15 s) sync, scale-up stabilisation 0 s and at most max(100% of current, 4 pods) more
    per 15 s; scale-down to the highest recommendation of the last 300 s (100% per 15 s may go); within
    [low, high]. Raw recommendations are remembered before stabilisation, as the HPA does."""

    def __init__(self, low: int, high: int, down_window_s: float = 300.0, up_percent: float = 100.0,
                 up_pods: int = 4):
        self.low, self.high = low, high
        self.down_window_s, self.up_percent, self.up_pods = down_window_s, up_percent, up_pods
        self.recommendations: list[tuple[float, int]] = []

    def apply(self, now: float, current: int, recommendation: int) -> int:
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - self.down_window_s]
        self.recommendations.append((now, recommendation))
        up = recommendation  # the up window is 0 s: the lowest of the current one alone
        down = max(r for _, r in self.recommendations)
        result = current
        if result < up:
            result = up
        if result > down:
            result = down
        up_limit = max(math.ceil(current * (1 + self.up_percent / 100)), current + self.up_pods)
        return max(self.low, min(self.high, up_limit, result))


def _hpa_ratio_recommendation(current: int, ratio: float, replicas_for_ratio: float, tolerance: float) -> int:
    """The HPA's rule: no change while metric / target is within 1 +- tolerance, else ceil(ratio x replicas)."""
    if abs(ratio - 1) <= tolerance:
        return current
    return math.ceil(ratio * replicas_for_ratio)


class HpaGpuUtilPolicy:
    """HPA v2 on GPU utilisation alone (a Resource-style metric averaged over ready pods): every 15 s,
    desired = ceil(ready x utilisation / target), target 70%, 10% tolerance, then the default behaviour."""

    period_s = 15.0

    def __init__(self, low: int, high: int, target_percent: float = 70.0, tolerance: float = 0.1):
        self.target, self.tolerance = target_percent, tolerance
        self.behavior = HpaBehavior(low, high)

    def decide(self, obs: Observation) -> int:
        if obs.ready <= 0:  # no pod reports: the HPA skips the metric
            return obs.requested
        rec = _hpa_ratio_recommendation(obs.requested, obs.utilization_percent / self.target, obs.ready,
                                        self.tolerance)
        return self.behavior.apply(obs.time_s, obs.requested, rec)


class KedaQueuePolicy:
    """KEDA on queue length: the scaler polls requests queued + in flight every `poll_s` (30 s) and serves it to the
    HPA as an external AverageValue metric with `target_per_replica` (a full batch) per replica; the HPA syncs every
    15 s on the last polled value: desired = ceil(metric / target) unless metric / (target x current) is within the
    10% tolerance, then its default behaviour."""

    period_s = 15.0

    def __init__(self, low: int, high: int, target_per_replica: float, poll_s: float = 30.0,
                 tolerance: float = 0.1):
        self.target, self.poll_s, self.tolerance = target_per_replica, poll_s, tolerance
        self.behavior = HpaBehavior(low, high)
        self.metric: float | None = None
        self.polled_at = -math.inf

    def decide(self, obs: Observation) -> int:
        if obs.time_s - self.polled_at >= self.poll_s:
            self.metric, self.polled_at = obs.concurrency, obs.time_s
        ratio = self.metric / (self.target * max(obs.requested, 1))
        rec = _hpa_ratio_recommendation(obs.requested, ratio, max(obs.requested, 1), self.tolerance)
        return self.behavior.apply(obs.time_s, obs.requested, rec)


class KnativeKpaPolicy:
    """Knative's KPA on concurrency (requests in flight + queued per pod), sampled every second and decided every
    `tick_s` (2 s): target per pod `target_per_replica` (70% of a full batch); the stable desired count is
    ceil(mean concurrency over 60 s / target), the panic one the same over 6 s; both within
    [floor(ready / 2), ceil(1000 x ready)] (the default max scale-down and scale-up rates). Panic starts (and is
    extended) while the panic desired >= 2 x ready pods, and ends 60 s after that last held; panicking, the count is
    the larger of the two and never goes down. Within [low, high] (min / max scale)."""

    period_s = 1.0

    def __init__(self, low: int, high: int, target_per_replica: float, tick_s: float = 2.0,
                 stable_s: float = 60.0, panic_s: float = 6.0, panic_threshold: float = 2.0,
                 max_scale_up_rate: float = 1000.0, max_scale_down_rate: float = 2.0):
        self.low, self.high, self.target, self.tick_s = low, high, target_per_replica, tick_s
        self.stable_s, self.panic_s, self.panic_threshold = stable_s, panic_s, panic_threshold
        self.up_rate, self.down_rate = max_scale_up_rate, max_scale_down_rate
        self.samples: list[tuple[float, float]] = []  # (time, concurrency)
        self.panic_since: float | None = None  # the last time the panic condition held, while panicking
        self.max_panic_pods = 0

    def _mean(self, now: float, window_s: float) -> float:
        values = [c for t, c in self.samples if t > now - window_s]
        return sum(values) / len(values)

    @property
    def panicking(self) -> bool:
        return self.panic_since is not None

    def decide(self, obs: Observation) -> int:
        now = obs.time_s
        self.samples = [(t, c) for t, c in self.samples if t > now - self.stable_s]
        self.samples.append((now, obs.concurrency))
        if now % self.tick_s:
            return obs.requested
        ready = max(1, obs.ready)
        up_limit, down_limit = math.ceil(self.up_rate * ready), math.floor(ready / self.down_rate)
        stable = math.ceil(self._mean(now, self.stable_s) / self.target)
        panic = math.ceil(self._mean(now, self.panic_s) / self.target)
        desired_stable = min(max(stable, down_limit), up_limit)
        desired_panic = min(max(panic, down_limit), up_limit)
        over = panic / ready >= self.panic_threshold
        if over:
            self.panic_since = now
        elif self.panicking and now > self.panic_since + self.stable_s:
            self.panic_since, self.max_panic_pods = None, 0
        desired = desired_stable
        if self.panicking:
            desired = max(desired, desired_panic, self.max_panic_pods)
            self.max_panic_pods = desired
        return max(self.low, min(self.high, desired))


class IdealReactivePolicy:
    """A reference, not a deployable policy: the best a policy that waits for load to arrive can do without
    foresight. Every second it knows the output tokens arriving exactly (no sampling, no smoothing, no noise to
    filter) and asks at once for the replicas that carry the last `window_s` of them at full capacity, plus the
    backlog worked off within `drain_s`; it never goes below the largest load it has seen (as much headroom as any
    policy without foresight could justify), so every burst after the largest one so far finds its pods. It still
    waits a provisioning time for each pod: a burst larger than any before it, or a ramp that outgrows the pods
    within a provisioning time, queues until they serve. Static sizing (which reads the trace's peak in advance) or
    a shorter provisioning time does better."""

    period_s = 1.0

    def __init__(self, low: int, high: int, capacity_tokens_per_s: float, window_s: int = 5, drain_s: float = 10.0):
        self.low, self.high, self.capacity = low, high, capacity_tokens_per_s
        self.window_s, self.drain_s = window_s, drain_s
        self.arrived: list[float] = []
        self.largest = 0

    def decide(self, obs: Observation) -> int:
        self.arrived = [*self.arrived, obs.offered_tokens_per_s][-self.window_s:]
        load = sum(self.arrived) / len(self.arrived) / self.capacity
        self.largest = max(self.largest, math.ceil(load - 1e-9))
        backlog_pod_s = obs.queue_wait_ms / 1e3 * obs.ready
        need = max(self.largest, math.ceil(load + backlog_pod_s / self.drain_s - 1e-9))
        return max(self.low, min(self.high, need))


class ThresholdPolicy:
    """Add `step` replicas while queue wait is over target, remove `step` while utilisation is under 50% and the
    queue is short; one cooldown after any change. No windows, no hysteresis beyond that gap."""

    def __init__(self, low: int, high: int, queue_wait_ms: float, step: int, cooldown_s: float = 60.0):
        self.low, self.high, self.target, self.step, self.cooldown_s = low, high, queue_wait_ms, step, cooldown_s
        self.last_change = -math.inf

    def decide(self, obs: Observation) -> int:
        want = obs.requested
        if obs.time_s - self.last_change < self.cooldown_s:
            return want
        if obs.queue_wait_ms > self.target:
            want = obs.requested + self.step
        elif obs.utilization_percent < 50 and obs.queue_wait_ms < self.target / 2:
            want = obs.requested - self.step
        want = max(self.low, min(self.high, want))
        if want != obs.requested:
            self.last_change = obs.time_s
        return want


class OperatorPolicy:
    """Adapter: feeds `specfleet_operator.policy.decide` the MetricsSample the fleet's heartbeats would produce
    (one verifier role, one drafter pool sized with it) and returns its verifier count, every `period_s` (the
    operator's default `--interval`, 10 s)."""

    period_s = 10.0

    def __init__(self, low: int, high: int, fleet: FleetModel, costs: CostModel, max_step: int,
                 queue_wait_ms: float):
        from specfleet_operator.spec import FleetSpec

        self.fleet, self.costs = fleet, costs
        self.spec = FleetSpec.from_dict("sim", {
            "verifier": {"replicas": low, "minReplicas": low, "maxReplicas": high},
            "drafters": [{"name": "general", "model": "drafter-general", "replicas": low, "minReplicas": 1,
                          "maxReplicas": high}],
            "autoscaling": {"maxStep": max_step, "targets": {"queueWaitMs": queue_wait_ms}}})
        self.memory = None
        self.history: list = []
        self.drafters = low

    def decide(self, obs: Observation) -> int:
        from specfleet_operator.metrics import MetricsSample, PodLoad, RoleLoad
        from specfleet_operator.policy import decide

        busy = obs.utilization_percent / 100
        verifier = RoleLoad(tuple(PodLoad(
            pod=f"v{i}", inflight=1 if obs.live_requests else 0, busy_frac=busy,
            tokens_per_s=obs.tokens_per_s / max(obs.ready, 1), step_ms=self.fleet.step_ms,
            gpu_util=obs.utilization_percent, queue_wait_ms=obs.queue_wait_ms) for i in range(max(obs.ready, 1))))
        drafter_capacity = self.drafters * self.fleet.capacity_tokens_per_s / self.costs.cosine_drafter_ratio
        drafter_busy = min(1.0, obs.tokens_per_s / max(drafter_capacity, 1e-9))
        drafters = RoleLoad(tuple(PodLoad(
            pod=f"d{i}", busy_frac=drafter_busy, tokens_per_s=obs.tokens_per_s / max(self.drafters, 1),
            step_ms=self.fleet.draft_step_ms, gpu_util=100 * drafter_busy) for i in range(self.drafters)))
        sample = MetricsSample(time_s=obs.time_s, roles={"verifier": verifier, "drafter-general": drafters},
                               live_requests=obs.live_requests)
        self.history = [*self.history[-8:], sample]
        current = {"router": 1, "fusion": 1, "drafter-general": self.drafters, "verifier": obs.requested}
        result = decide(self.history, self.spec, current, self.memory, now=obs.time_s)
        self.memory = result.memory
        self.drafters = result.desired["drafter-general"]
        return result.desired["verifier"]


@dataclass
class ScoreResult:
    policy: str
    slo_attainment: float
    gpu_hours: float
    scaling_actions: int
    p99_latency_per_token_ms: float
    timeline: dict = field(default_factory=dict)  # time_s, requested, ready, load_tokens_per_s, queue_wait_ms
    reversals: int = 0  # changes of direction of the requested count
    surge_to_scale_up_s: float | None = None  # mean over the surges a scale-up followed (None: none did)
    surges_without_scale_up: int = 0  # no scale-up before the next surge (or the end): late, or not needed

    def summary(self) -> dict:
        return {"policy": self.policy, "slo_attainment": round(self.slo_attainment, 4),
                "gpu_hours": round(self.gpu_hours, 2), "scaling_actions": self.scaling_actions,
                "reversals": self.reversals,
                "surge_to_scale_up_s": None if self.surge_to_scale_up_s is None else round(self.surge_to_scale_up_s, 1),
                "surges_without_scale_up": self.surges_without_scale_up,
                "p99_latency_per_token_ms": round(self.p99_latency_per_token_ms, 2)}


def count_reversals(counts: Sequence[int]) -> int:
    """How often a sequence of requested replica counts turns from going up to going down or back (repeats and
    flat stretches do not count as a turn)."""
    signs = [1 if b > a else -1 for a, b in zip(counts[:-1], counts[1:], strict=True) if b != a]
    return sum(1 for a, b in zip(signs[:-1], signs[1:], strict=True) if a != b)


def surge_delays(scale_up_times: Sequence[float], surges: Sequence[tuple[float, float]],
                 end_s: float) -> list[float | None]:
    """Per surge, seconds from its start to the first scale-up decision at or after it and before the next surge's
    start (or `end_s`); None where there was none."""
    starts = [start for start, _ in surges]
    delays: list[float | None] = []
    for i, start in enumerate(starts):
        until = starts[i + 1] if i + 1 < len(starts) else end_s
        first = next((t for t in sorted(scale_up_times) if start <= t < until), None)
        delays.append(None if first is None else first - start)
    return delays


def run_policy(name: str, policy, trace: Trace, fleet: FleetModel, start: int, slo_ms_per_token: float,
               provision_s: float = 60.0, control_s: float = 15.0) -> ScoreResult:
    ticks = int(math.ceil(trace.duration_s))
    tick_of = np.minimum(trace.arrival_s.astype(np.int64), ticks - 1)
    arriving_tokens = np.bincount(tick_of, weights=trace.output_tokens, minlength=ticks)
    arriving_requests = np.bincount(tick_of, minlength=ticks)
    cap = fleet.capacity_tokens_per_s
    mean_output = max(float(np.mean(trace.output_tokens)), 1.0) if len(trace) else 1.0
    ready, requested, backlog, actions, gpu_s = start, start, 0.0, 0, 0.0
    pending: list[tuple[float, int]] = []  # (ready at, replicas)
    draining: list[tuple[float, int]] = []  # (released at, replicas)
    per_token_s = np.zeros(ticks)
    series = {"time_s": [], "requested": [], "ready": [], "load_tokens_per_s": [], "queue_wait_ms": []}
    util, served = 0.0, 0.0
    busy_tokens = None  # tokens served per s, averaged over a request's decode time
    period = max(1, int(getattr(policy, "period_s", control_s)))
    counts, scale_ups = [start], []
    for t in range(ticks):
        ready += sum(n for at, n in pending if at <= t)
        pending = [(at, n) for at, n in pending if at > t]
        draining = [(at, n) for at, n in draining if at > t]
        capacity = cap * ready
        backlog += arriving_tokens[t]
        served = min(backlog, capacity)
        backlog -= served
        util = served / capacity if capacity > 0 else 1.0
        wait_s = backlog / capacity if capacity > 0 else float(trace.duration_s)
        # a request arriving now waits for the backlog, then decodes at the per-token time of this batch size
        decode_s = fleet.idle_s_per_token + (fleet.full_s_per_token - fleet.idle_s_per_token) * util
        per_token_s[t] = decode_s + wait_s / mean_output
        # requests decoding now, by Little's law: the throughput over the last decode time (an exponential average
        # with that time constant) x the time each token takes
        service_s = max(1.0, mean_output * decode_s)
        busy_tokens = served if busy_tokens is None else busy_tokens + (served - busy_tokens) / service_s
        gpu_s += (requested + sum(n for _, n in draining)) * fleet.gpus_per_replica
        if t % period == 0:
            obs = Observation(float(t), ready, requested, 100 * util, wait_s * 1e3, served,
                              int(arriving_requests[max(0, t - 60):t + 1].sum() + (backlog > 0)),
                              queued_requests=backlog / mean_output, inflight_requests=busy_tokens * decode_s,
                              offered_tokens_per_s=float(arriving_tokens[t]))
            want = int(policy.decide(obs))
            if want != requested:
                actions += 1
                counts.append(want)
                if want > requested:
                    scale_ups.append(float(t))
                    pending.append((t + provision_s, want - requested))
                else:
                    drop = requested - want
                    # cancel replicas still provisioning first, then drain ready ones
                    while drop and pending:
                        at, n = pending.pop()
                        cut = min(n, drop)
                        drop -= cut
                        if n > cut:
                            pending.append((at, n - cut))
                    ready -= drop
                    draining.append((t + fleet.full_s_per_token * mean_output, drop))
                requested = want
        series["time_s"].append(t)
        series["requested"].append(requested)
        series["ready"].append(ready)
        series["load_tokens_per_s"].append(float(arriving_tokens[t]))
        series["queue_wait_ms"].append(wait_s * 1e3)
    per_request = per_token_s[tick_of]
    attained = float(np.mean(per_request <= slo_ms_per_token / 1e3)) if len(trace) else 1.0
    p99 = float(np.percentile(per_request, 99) * 1e3) if len(trace) else 0.0
    every = max(1, ticks // 400)  # keep the timeline small in the JSON
    timeline = {key: values[::every] for key, values in series.items()}
    delays = surge_delays(scale_ups, trace.surges, float(ticks))
    reacted = [d for d in delays if d is not None]
    return ScoreResult(name, attained, gpu_s / 3600, actions, p99, timeline, count_reversals(counts),
                       float(np.mean(reacted)) if reacted else None, len(delays) - len(reacted))


def make_policy(name: str, low: int, high: int, fleet: FleetModel, costs: CostModel, trace: Trace,
                queue_wait_ms: float = 50.0, max_step: int | None = None, start: int | None = None):
    """A fresh policy by name and the replicas it starts with: a static policy its count, the others `start`
    (default `low`)."""
    step = max_step or max(2, high // 20)
    start = low if start is None else start
    if name in ("static-peak", "static-mean"):
        replicas = static_replicas(trace, fleet.capacity_tokens_per_s, low, high, name.removeprefix("static-"))
        return StaticPolicy(replicas), replicas
    if name == "threshold":
        return ThresholdPolicy(low, high, queue_wait_ms, step), start
    if name == "hpa-gpu-util":
        return HpaGpuUtilPolicy(low, high), start
    if name == "keda-queue":
        return KedaQueuePolicy(low, high, costs.max_batch), start
    if name == "knative-kpa":
        return KnativeKpaPolicy(low, high, 0.7 * costs.max_batch), start
    if name == "operator":
        return OperatorPolicy(low, high, fleet, costs, step, queue_wait_ms), start
    if name == "ideal-reactive":
        return IdealReactivePolicy(low, high, fleet.capacity_tokens_per_s), start
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


def peak_rate(costs: CostModel, fleet: FleetModel, high: int) -> float:
    """Requests per second whose output needs `PEAK_SHARE` of `high` replicas."""
    return PEAK_SHARE * high * fleet.capacity_tokens_per_s / costs.request.output_tokens_mean


def score_policies(costs: CostModel, low: int, high: int, duration_s: float, seed: int,
                   provision_s: float = 60.0, queue_wait_ms: float = 50.0, max_step: int | None = None,
                   policies: tuple[str, ...] = POLICIES) -> tuple[FleetModel, float, list[ScoreResult]]:
    """Every policy on the same ramp, whose peak needs ~80% of `high` replicas. Returns the fleet model, the SLO in
    ms per output token (1.5 x the per-token time of a full batch) and one result per policy."""
    fleet = measure_fleet(costs, seed)
    trace = make("ramp", costs, peak_rate(costs, fleet, high), duration_s, seed)
    slo_ms = 1.5 * fleet.full_s_per_token * 1e3
    results = []
    for name in policies:
        policy, start = make_policy(name, low, high, fleet, costs, trace, queue_wait_ms, max_step)
        results.append(run_policy(name, policy, trace, fleet, start, slo_ms, provision_s))
    return fleet, slo_ms, results


def scale_bounds(high: int) -> tuple[int, int]:
    """A fleet scale (its most replicas) as (low, high): the least is a tenth of the most, at least 1."""
    return max(1, high // 10), high


SCORE_KEYS = ("slo_attainment", "gpu_hours", "scaling_actions", "reversals", "surge_to_scale_up_s",
              "surges_without_scale_up", "p99_latency_per_token_ms")


def score_grid(costs: CostModel, traces: Sequence[str] = AUTOSCALE_TRACES, scales: Sequence[int] = (10, 100, 1000),
               seeds: Sequence[int] = (0, 1, 2), duration_s: float = 3600.0, provision_s: float = 60.0,
               queue_wait_ms: float = 50.0, policies: Sequence[str] = POLICIES, progress: bool = False) -> list[dict]:
    """Every policy on every trace at every scale (`scale_bounds`), each seed its own fleet measurement and trace;
    one row per (trace, scale, policy) with the scores averaged over the seeds (the surge time over the seeds where
    some scale-up followed a surge; None if none did). Each trace's peak needs `PEAK_SHARE` of the most replicas.
    The autoscalers start at the replicas that carry the first minute's load at capacity (within the bounds), as a
    fleet already serving that load would, so a steady trace measures holding a load, not climbing to it."""
    from tqdm import tqdm

    per_cell: dict[tuple[str, int, str], list[dict]] = {}
    plan = [(seed, kind, high) for seed in seeds for kind in traces for high in scales]
    fleets: dict[int, FleetModel] = {}
    bar = tqdm(plan, desc="autoscale", unit="trace", disable=not progress)
    for seed, kind, high in bar:
        bar.set_postfix_str(f"{kind} x{high} seed {seed}")
        if seed not in fleets:
            fleets[seed] = measure_fleet(costs, seed)
        fleet = fleets[seed]
        low, high = scale_bounds(high)
        trace = make(kind, costs, peak_rate(costs, fleet, high), duration_s, seed)
        slo_ms = 1.5 * fleet.full_s_per_token * 1e3
        initial = static_replicas(trace, fleet.capacity_tokens_per_s, low, high, "initial")
        for name in policies:
            policy, start = make_policy(name, low, high, fleet, costs, trace, queue_wait_ms, start=initial)
            tick = time.perf_counter()
            result = run_policy(name, policy, trace, fleet, start, slo_ms, provision_s)
            per_cell.setdefault((kind, high, name), []).append(
                {**result.summary(), "duration_s": trace.duration_s, "wall_s": time.perf_counter() - tick})
    bar.close()
    rows = []
    for (kind, high, name), runs in per_cell.items():
        row = {"trace": kind, "min_replicas": scale_bounds(high)[0], "max_replicas": high, "policy": name,
               "seeds": len(runs), "duration_s": runs[0]["duration_s"]}
        for key in SCORE_KEYS:
            values = [r[key] for r in runs if r[key] is not None]
            row[key] = round(float(np.mean(values)), 4) if values else None
        row["wall_s"] = round(sum(r["wall_s"] for r in runs), 3)
        rows.append(row)
    return rows
