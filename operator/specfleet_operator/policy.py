"""The scaling policy, a pure function: (metric history, spec, current replicas, memory, now) -> desired replicas
per role, with the reason and the figures behind each change.

Per role it first recommends a count from the latest smoothed metrics, then damps it the way the Kubernetes HPA
does, and finally enforces the spec's bounds:

- verifier: queue wait against `targets.queueWaitMs` and utilisation against `targets.gpuUtilizationPercent`
  (GPU utilisation where pods report one, else their busy fraction), each as `ceil(current * metric / target)`;
  with `speculationParallelism`, DSI's floor `ceil(t_target / (k * t_draft))`.
- drafter pools: their own utilisation, and CoSine's balance: a pool's drafting capacity must cover its share of
  `drafterVerifierBalance` x the verification throughput, grown as the verifiers grow this round, but no more than
  their utilisation (or predicted load) is over target: a queue wait measures a backlog, not more tokens per second.
- router, fusion: utilisation (busy fraction).
- idle fleet (no live request, nothing in flight or queued): every role goes to its minReplicas.
- ratios are taken over the pods that report (serving, not draining), as the HPA does: pods still starting add
  nothing, so a queue that keeps growing while they start is not counted twice.
- predictive scale-up (verifier): the verifiers' demand in pods (serving x utilisation / target) is fitted with a
  line over the last `TREND_WINDOW_S` (only while no sample there is saturated: then utilisation measures the pods,
  not the demand); the slope less `TREND_T` standard errors, where positive, recommends the demand expected one
  provisioning time ahead, when a pod asked for now would serve. The provisioning time is measured (memory: from a
  scale-up to the serving count reaching it), `DEFAULT_PROVISION_S` until the first one. While the verifiers are
  saturated now (utilisation stops at the pods), the arrival rate's trend (work done plus the backlog's growth) is used
  instead, with a stricter bound (`SATURATED_TREND_T`), at least `TREND_MIN_SAMPLES` + 1 samples at today's serving
  count, and only while the arrivals outrun the pods by more than the tolerance; it adds the backlog that queues
  until the new pods serve (`queued_while_starting`), worked off within `BACKLOG_DRAIN_S`.
- damping: a tolerance band (no change while metric/target is within 1 +- tolerance); stabilisation windows
  (scale up only to the lowest recommendation of the last `up` seconds, down only to the highest of the last `down`
  seconds, and not before the window has been observed); at most `maxStep` replicas per change; after a change of
  one role, `cooldownSeconds` before it scales up again and `scaleDownCooldownSeconds` before it scales down (capacity
  is removed in fewer, larger steps than it is added).
- panic (Knative KPA's rule): while a role's recommendation is >= `PANIC_RATIO` x its serving pods, or the verifier
  queue wait is >= `PANIC_WAIT_RATIO` x its target (the verifier's queue wait read over the smoothing window, or over
  the panic window alone where that holds two samples or more, whichever is higher: its queue-wait ratio then
  recommends as well), the role panics for `PANIC_HOLD_S`: scale-up uses the
  `PANIC_WINDOW_S` window (or the up window where that is shorter: a panic never waits longer than calm scaling
  would) instead of the up window, skips the up cooldown and, sized by the arrival rate below, goes
  to that count in one step (Knative allows 1000x; every extra step waits another provisioning time), or, sized by
  the queue-wait ratio alone (no rate measured yet), adds at most max(maxStep, current) pods (at most doubling, the
  HPA's default scale-up rate); nothing is removed while panicking. The queue-wait ratio also sizes (at most
  doubling) where the panic's rate asks no more than the count while every pod asked for serves and the backlog
  grew since the last read: the queue then overrules a rate estimated from a few reads between which a ramp's first
  requests fell. Panicking, the verifiers
  are sized for their arrival rate one provisioning time ahead (`panic_demand`): the work arriving (work done plus
  the backlog's growth, which saturation does not cap) now, plus its fitted trend's slope less `PANIC_TREND_T`
  standard errors x the provisioning time (only while the load outruns the pods now; in the hold, the rate alone),
  plus the backlog (now, and what queues until the new pods serve) worked off within `BACKLOG_DRAIN_S`, at the
  utilisation target; not by the queue-wait ratio,
  which keeps growing while new pods start. The trend is fitted only over intervals with today's serving count.
- burst headroom: each panic records the burst's size (its arrival rate when the pods asked for now serve, at the
  utilisation target; not the backlog); for `BURST_MEMORY_S` after, no scale-down goes below the largest recorded
  (a burst that came may come again, and its first provisioning time would queue).
- a scale-down of one pod that is under the tolerance of the count waits (noise on the band's edge adds a pod now
  and then; taking it straight back would be a reversal at a constant load).

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
PANIC_RATIO = 2.0  # Knative's panic threshold: the recommendation is twice the pods serving
PANIC_WAIT_RATIO = 4.0  # or the verifier queue wait is this far over its target
PANIC_WINDOW_S = 6.0  # Knative's panic window: scale up on the recommendations of the last 6 s
PANIC_HOLD_S = 60.0  # Knative's stable window: panic ends 60 s after its condition last held
TREND_WINDOW_S = 60.0  # the demand trend is fitted over this much history (the control loop keeps 60 s)
TREND_MIN_SAMPLES = 4
TREND_T = 2.0  # the trend used is the slope less this many standard errors (its lower confidence bound)
SATURATED_TREND_T = 4.0  # the same for the arrival-rate trend that predicts while the pods are saturated
SATURATED_PERCENT = 98.0  # utilisation at which a pod's figure stops telling how much more work there is
PANIC_TREND_T = 1.0  # panicking, the arrival trend's slope less this many standard errors
BACKLOG_DRAIN_S = 60.0  # panicking, the verifiers are sized to work off the queued backlog within this
DEFAULT_PROVISION_S = 60.0  # until a scale-up has been seen through: a GPU pod pulls its image, loads weights
BURST_MEMORY_S = 900.0  # after a panic, the count it reached is held this long (bursts that came may come again)


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
    last_change_s: role -> time of its last change (cooldown); requested: role -> the spec replicas last seen;
    panic_until: role -> when its panic ends; scale_up_pending: role -> (asked at, count) of the oldest scale-up
    not yet serving; provision_s: role -> the measured provisioning time (asked -> serving); hand_set_s: role -> when
    its spec replicas were last adopted (that count holds for its cooldown, panic or not)."""

    recommendations: Mapping[str, tuple[tuple[float, int], ...]] = field(default_factory=dict)
    observed_since: Mapping[str, float] = field(default_factory=dict)
    last_change_s: Mapping[str, float] = field(default_factory=dict)
    requested: Mapping[str, int] = field(default_factory=dict)
    panic_until: Mapping[str, float] = field(default_factory=dict)
    scale_up_pending: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    provision_s: Mapping[str, float] = field(default_factory=dict)
    hand_set_s: Mapping[str, float] = field(default_factory=dict)  # role -> when a spec replicas change was adopted
    burst_peaks: Mapping[str, tuple[tuple[float, int], ...]] = field(default_factory=dict)  # role -> (panic
    # ended or still on at, the count it reached), one per panic of the last BURST_MEMORY_S


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
    # only samples of the fleet as it is now: figures from fewer (or more) serving pods describe another fleet,
    # and averaging them with today's would scale today's pods by yesterday's ratio
    serving = len(samples[-1].role(key).serving)
    samples = [s for s in samples if len(s.role(key).serving) == serving]
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


def demand_trend(key: str, history: Sequence[MetricsSample], target_percent: float, now: float,
                 queue_wait_target_ms: float = math.inf,
                 window_s: float = TREND_WINDOW_S) -> tuple[float, float, float] | None:
    """(demand now, slope per second, its standard error) of one role's demand in pods (serving x utilisation / target)
    fitted by least squares over the samples of the last `window_s`; None with too few samples to fit, or when a
    sample there was saturated (utilisation >= SATURATED_PERCENT or queue wait over target)."""
    points = []
    for s in history:
        if s.time_s < now - window_s:
            continue
        load = s.role(key)
        wait = verifier_queue_wait_ms(s) if key == VERIFIER else None
        if load.utilization_percent >= SATURATED_PERCENT or (wait is not None and wait > queue_wait_target_ms):
            # saturated or queueing: utilisation then measures the pods, not the demand (its rise as pods come
            # up is no trend), and the queue-wait rule is in charge anyway
            return None
        if load.serving:
            points.append((s.time_s, len(load.serving) * load.utilization_percent / target_percent))
    if len(points) < TREND_MIN_SAMPLES or points[-1][0] - points[0][0] < window_s / 2:
        return None
    slope, stderr = _fit(points)
    mean_t = sum(t for t, _ in points) / len(points)
    mean_d = sum(d for _, d in points) / len(points)
    return mean_d + slope * (now - mean_t), slope, stderr


def arrival_trend(history: Sequence[MetricsSample], now: float,
                  window_s: float = TREND_WINDOW_S) -> tuple[float, float, float, float] | None:
    """The verifiers' arrival rate in pods (the work arriving per second, in seconds of one pod's work), from the
    work they do and the growth of their backlog, which saturation does not cap as it caps utilisation: (rate now,
    slope per second, its standard error, the backlog now in pod-seconds). A queue wait is the backlog in seconds of
    the serving pods' work, so the backlog is wait x serving pod-seconds; between two samples the rate is the work of
    the pods serving through the interval, at the later sample's utilisation, plus the backlog's growth. Over the
    intervals of the last `window_s` with today's serving count, a line is fitted and the rate now is its value now
    (with fewer than three such intervals: their mean, slope and error 0; with none, the last interval's rate). None
    with fewer than two samples that report a queue wait."""
    points = []
    for s in history:
        wait = verifier_queue_wait_ms(s)
        load = s.role(VERIFIER)
        serving = len(load.serving)
        if s.time_s >= now - window_s and wait is not None and serving:
            points.append((s.time_s, serving, min(load.utilization_percent, 100.0) / 100, wait / 1e3 * serving))
    # the work done between two samples: the pods serving through the interval (those that joined within it served
    # part of it) at the later sample's utilisation (a backlog there means they were busy)
    rates = [((t0 + t1) / 2, min(serving0, serving1) * busy1 + (backlog1 - backlog0) / (t1 - t0))
             for (t0, serving0, _, backlog0), (t1, serving1, busy1, backlog1) in zip(points, points[1:], strict=False)
             if t1 > t0]
    # the trend only over the fleet as it is now: where pods joined, a rate measured by fewer, saturated pods may
    # undercount what arrived (work dropped or not yet queued), and the step up as pods join is no trend
    if not rates:
        return None
    now_serving = points[-1][1]
    steady = [r for r, (_, serving0, _, _), (_, serving1, _, _) in zip(rates, points, points[1:], strict=False)
              if serving0 == serving1 == now_serving]
    if len(steady) >= 3:  # the fitted line at now: one noisy interval moves it less than it moves the last rate
        slope, stderr = _fit(steady)
        level = sum(r for _, r in steady) / len(steady) + slope * (now - sum(t for t, _ in steady) / len(steady))
    else:
        slope, stderr = 0.0, 0.0
        level = sum(r for _, r in steady) / len(steady) if steady else rates[-1][1]
    return max(0.0, level), slope, stderr, points[-1][3]


def _fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares over (t, y) points: (slope, its standard error)."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((t - mean_t) ** 2 for t, _ in points)
    if sxx <= 0:
        return 0.0, 0.0
    slope = sum((t - mean_t) * (y - mean_y) for t, y in points) / sxx
    residual = sum((y - mean_y - slope * (t - mean_t)) ** 2 for t, y in points) / max(n - 2, 1)
    return slope, math.sqrt(residual / sxx)


def panic_demand(history: Sequence[MetricsSample], now: float, provision_s: float, trend_t: float = PANIC_TREND_T,
                 drain_s: float = BACKLOG_DRAIN_S) -> tuple[float, dict[str, float]] | None:
    """The verifiers' demand in pods one provisioning time ahead, for sizing a panic: the arrival rate now, plus its
    rising trend (the slope less `trend_t` standard errors, where positive) over `provision_s` (a pod asked for now
    serves then), plus the backlog worked off within `drain_s`. A rate, not the queue-wait ratio: a queue keeps
    growing while new pods start, and its ratio would ask for more at every step. None without two samples that
    report a queue wait."""
    trend = arrival_trend(history, now)
    if trend is None:
        return None
    rate, slope, stderr, backlog = trend
    rising = max(0.0, slope - trend_t * stderr)
    serving = len(history[-1].role(VERIFIER).serving)
    # what queues until the pods serve grows with the square of the slope's time: only the slope's surer part
    # (less TREND_T standard errors) counts there, or noise on one pod's rate asks for pods it gives back
    backlog_then = backlog + queued_while_starting(rate, max(0.0, slope - TREND_T * stderr), serving, provision_s)
    demand = rate + rising * provision_s + backlog_then / drain_s
    return demand, {"arrival_pods": round(rate, 3), "arrival_slope_per_min": round(60 * slope, 3),
                    "arrival_slope_low_per_min": round(60 * rising, 3), "backlog_pod_s": round(backlog, 3),
                    "backlog_when_serving_pod_s": round(backlog_then, 3), "panic_demand_pods": round(demand, 3),
                    "provision_s": round(provision_s, 1)}


def queued_while_starting(rate: float, slope: float, serving: int, provision_s: float) -> float:
    """Pod-seconds of work that queue while pods asked for now start: the arrival rate (in pods, rising `slope`
    per second) over the `serving` pods' work, for `provision_s` seconds (never negative: spare pods bank nothing)."""
    if provision_s <= 0:
        return 0.0
    # the excess rate - serving + slope t is integrated from where it turns positive to provision_s
    start = 0.0 if rate >= serving else ((serving - rate) / slope if slope > 0 else provision_s)
    if start >= provision_s:
        return 0.0
    excess = lambda t: (rate - serving) * t + slope * t * t / 2  # noqa: E731
    return excess(provision_s) - excess(start)


def _backlog_growing(history: Sequence[MetricsSample], serving: int) -> bool:
    """Whether the verifiers' backlog (queue wait x serving pods) grew between the last two samples with `serving`
    pods that report a queue wait."""
    backlogs = [wait * serving for s in history if len(s.role(VERIFIER).serving) == serving
                and (wait := verifier_queue_wait_ms(s)) is not None][-2:]
    return len(backlogs) == 2 and backlogs[1] > backlogs[0]


def _ratio_target(base: int, metric: float, target: float, tolerance: float, current: int | None = None) -> int:
    """HPA's rule: ceil(base * metric / target) over the `base` pods that measured it, unless the ratio is within
    the tolerance band (then the `current` count stands). Over target it never recommends fewer than `current` (pods
    still starting are not surplus). Going down, the new count keeps the band's headroom (metric at most
    target / (1 + tolerance) there), so that load as high as what allowed the scale-down, plus the band, does not
    call the pods back: no down-up at a constant load."""
    current = base if current is None else current
    ratio = metric / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    if ratio < 1.0:
        return min(current, math.ceil(base * ratio * (1 + tolerance) - 1e-9))
    return max(current, math.ceil(min(base * ratio, _MOST_REPLICAS) - 1e-9))


def _recommend(role: RoleSpec, current: int, figures: Mapping[str, _Figures], spec: FleetSpec,
               verifier_growth: float, tolerance: float, history: Sequence[MetricsSample] = (), now: float = 0.0,
               provision_s: float = DEFAULT_PROVISION_S) -> tuple[int, str, dict[str, float], dict[str, int]]:
    """The raw recommendation for one role from its smoothed figures (before damping and bounds)."""
    targets = spec.autoscaling.targets
    mine = figures[role.key]
    # ratios over the pods that reported the figures (the HPA's rule); a role with none (all starting, or at 0
    # replicas with load) grows from its current count
    base = max(mine.serving or current, 1)
    metrics = {"utilization_percent": round(mine.utilization, 2), "target_utilization_percent":
               targets.gpu_utilization_percent, "busy_frac": round(mine.busy_frac, 4),
               "tokens_per_s": round(mine.tokens_per_s, 3)}
    wants = {"utilisation": _ratio_target(base, mine.utilization, targets.gpu_utilization_percent, tolerance,
                                          current)}
    # how much more work the role does than at target, unrounded, from utilisation and the predicted trend; not
    # from queue wait, which grows with the backlog, not with the rate of tokens the drafter pools must follow
    load_ratio = mine.utilization / targets.gpu_utilization_percent
    if role.key == VERIFIER:
        if mine.queue_wait_ms is not None:
            metrics.update(queue_wait_ms=round(mine.queue_wait_ms, 3), target_queue_wait_ms=targets.queue_wait_ms)
            wants["queue wait"] = _ratio_target(base, mine.queue_wait_ms, targets.queue_wait_ms, tolerance, current)
        draft_steps = [f.step_ms for key, f in figures.items() if spec.role(key).component == DRAFTER and f.step_ms]
        if spec.autoscaling.speculation_parallelism and mine.step_ms and draft_steps:
            t_draft = sum(draft_steps) / len(draft_steps)
            floor = math.ceil(min(mine.step_ms / (spec.autoscaling.k * t_draft), _MOST_REPLICAS) - 1e-9)
            metrics.update(t_target_ms=round(mine.step_ms, 3), t_draft_ms=round(t_draft, 3), dsi_floor=floor)
            wants["DSI floor ceil(t_target / (k * t_draft))"] = floor
        trend = demand_trend(role.key, history, targets.gpu_utilization_percent, now, targets.queue_wait_ms)
        latest = history[-1] if history else None
        saturated_now = latest is not None and (
            latest.role(VERIFIER).utilization_percent >= SATURATED_PERCENT
            or (verifier_queue_wait_ms(latest) or 0.0) > targets.queue_wait_ms)
        if trend is None and saturated_now:
            # saturated or queueing now: utilisation stops at the pods, but the arrival rate (work done plus the
            # backlog's growth) still measures the demand, and a ramp that outgrows the pods is still a trend
            # (not after the pods caught up: a backlog being worked off makes the rate look as if it rose)
            arrivals = arrival_trend(history, now)
            # as many intervals at today's serving count as demand_trend asks samples (fewer fit noise)
            serving_now = len(latest.role(VERIFIER).serving)
            same = [s.time_s for s in history if s.time_s >= now - TREND_WINDOW_S
                    and len(s.role(VERIFIER).serving) == serving_now and verifier_queue_wait_ms(s) is not None]
            # and only while the work arriving outruns the pods by more than the tolerance (at the band's edge,
            # rates measured while new pods work off a queue look like a rise)
            if arrivals is not None and len(same) > TREND_MIN_SAMPLES and same[-1] - same[0] >= TREND_WINDOW_S / 2 \
                    and arrivals[0] > serving_now * (1 + tolerance):
                rate, slope, stderr, _ = arrivals
                # a stricter bound than unsaturated: these rates include the backlog's growth, noisier than a
                # utilisation, and few intervals fit (a real ramp that outruns the pods clears it by far)
                rising = max(0.0, slope - SATURATED_TREND_T * stderr)
                # the pods are outrun: the backlog that builds until a pod asked for now serves is worked off
                # within BACKLOG_DRAIN_S as well
                queued = queued_while_starting(rate, rising, mine.serving, provision_s)
                share = targets.gpu_utilization_percent / 100
                trend = (rate + queued / BACKLOG_DRAIN_S) / share, slope / share, \
                    stderr * SATURATED_TREND_T / TREND_T / share
        if trend is not None:
            demand, slope, stderr = trend
            # the slope's lower confidence bound: noise at a constant load (a slope of 0 +- its error) predicts
            # nothing, while a real ramp, whose error is small beside its slope, predicts nearly all of it
            rising = slope - TREND_T * stderr
            ahead = demand + max(0.0, rising) * provision_s
            if rising > 0 and ahead > base * (1 + tolerance):
                metrics.update(demand_pods=round(demand, 3), demand_slope_per_min=round(60 * slope, 3),
                               demand_slope_low_per_min=round(60 * rising, 3), provision_s=round(provision_s, 1))
                wants[f"predicted load in {provision_s:.0f} s"] = math.ceil(min(ahead, _MOST_REPLICAS) - 1e-9)
                load_ratio = max(load_ratio, ahead / base)
        metrics["load_ratio"] = round(load_ratio, 4)
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
    return want, reason, metrics, wants


def _stabilize(key: str, raw: int, current: int, memory: PolicyMemory, spec: FleetSpec, now: float,
               panicking: bool = False, tolerance: float = TOLERANCE) -> int:
    """HPA-style stabilisation over the remembered recommendations (raw already recorded in memory). Panicking, the
    scale-up looks at the panic window only and nothing scales down."""
    up_s, down_s = spec.autoscaling.window_up_s, spec.autoscaling.window_down_s
    recs = memory.recommendations.get(key, ((now, raw),))
    since = memory.observed_since.get(key, now)
    if panicking:  # up on the panic window alone, by more than the tolerance (one noisy sample adds no last pod)
        lowest_panic = min([r for t, r in recs if t >= now - panic_window_s(spec)] or [raw])
        return lowest_panic if lowest_panic > current * (1 + tolerance) else current
    up_values = [r for t, r in recs if t >= now - up_s] or [raw]
    down_values = [r for t, r in recs if t >= now - down_s] or [raw]
    lowest_up = min(up_values) if since <= now - up_s else current
    highest_down = max(down_values) if since <= now - down_s else current
    if lowest_up > current:
        return lowest_up
    if highest_down < current and (highest_down <= current * (1 - tolerance) or current - highest_down > 1):
        # a trim of one pod, under the tolerance of the count, waits: noise at a metric on the band's edge
        # adds a pod now and then, and taking it back is a reversal at a constant load
        return highest_down
    return current


def panic_window_s(spec: FleetSpec) -> float:
    """The window a panicking scale-up looks at: Knative's 6 s, or the up window where that is shorter (a fleet tuned
    to react in seconds, such as `specfleet up --autoscale`'s 2-s up window, would otherwise scale up later in a panic
    than without one)."""
    return min(PANIC_WINDOW_S, float(spec.autoscaling.window_up_s))


def _provisioning(key: str, memory: PolicyMemory, serving: int, now: float) -> PolicyMemory:
    """Measures provisioning: a pending scale-up is done when the serving pods reach the count it asked for."""
    pending = memory.scale_up_pending.get(key)
    if pending is None or serving < pending[1]:
        return memory
    asked_at, _ = pending
    return replace(memory, scale_up_pending={k: v for k, v in memory.scale_up_pending.items() if k != key},
                   provision_s={**memory.provision_s, key: now - asked_at})


def _remember(memory: PolicyMemory, key: str, raw: int, now: float, spec: FleetSpec) -> PolicyMemory:
    keep_s = max(spec.autoscaling.window_up_s, spec.autoscaling.window_down_s)
    recs = tuple((t, r) for t, r in memory.recommendations.get(key, ()) if t >= now - keep_s) + ((now, raw),)
    since = memory.observed_since.get(key, now)
    return replace(memory, recommendations={**memory.recommendations, key: recs},
                   observed_since={**memory.observed_since, key: since})


def burst_memory_s(spec) -> float:
    """How long a panic's size is held: BURST_MEMORY_S at the default 210-s down window, scaled with it (a fleet
    tuned to react in seconds, such as `specfleet up --autoscale`, forgets bursts as fast as it removes pods)."""
    return BURST_MEMORY_S * spec.autoscaling.window_down_s / 210.0


def _remember_burst(memory: PolicyMemory, key: str, size: int, now: float,
                    hold_s: float = BURST_MEMORY_S) -> PolicyMemory:
    peaks = tuple((t, n) for t, n in memory.burst_peaks.get(key, ()) if t >= now - hold_s) + ((now, size),)
    return replace(memory, burst_peaks={**memory.burst_peaks, key: peaks})


def burst_floor(memory: PolicyMemory, key: str, now: float, hold_s: float = BURST_MEMORY_S) -> int:
    """The pods a role keeps for bursts: the largest burst size (arrival rate at the utilisation target) measured
    in a panic of the last `BURST_MEMORY_S`; 0 with none."""
    return max((n for t, n in memory.burst_peaks.get(key, ()) if t >= now - hold_s), default=0)


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
            memory = replace(_forget(memory, key), hand_set_s={**memory.hand_set_s, key: now})
        requested[key] = role.replicas
        if not auto.enabled:
            count, reason = role.clamp(role.replicas), "autoscaling off: spec replicas"
        elif figures and not adopted:  # a count set by hand this round stands until its cooldown ends
            serving = figures[key].serving
            memory = _provisioning(key, memory, serving, now)
            panic_until = memory.panic_until.get(key, -math.inf)
            rate_sized = False
            if idle:
                raw, why = role.min_replicas, "idle: no live request, nothing in flight or queued"
                metrics = {"live_requests": 0.0}
            else:
                provision_s = memory.provision_s.get(key, DEFAULT_PROVISION_S)
                raw, why, metrics, wants = _recommend(role, count, figures, spec, verifier_growth, tolerance,
                                                      history, now, provision_s)
                wait = figures[key].queue_wait_ms if key == VERIFIER else None
                # the panic condition also reads the queue wait over the panic window alone (Knative's panic
                # averages over its own, shorter window): the smoothing's older samples would hold a burst's first
                # ones back for most of the smoothing time. Only where the window holds two samples or more (a
                # loop that reads every second, as `specfleet up --autoscale` does): one sample is noise
                newest = [s for s in window if s.time_s >= latest.time_s - panic_window_s(spec)
                          and len(s.role(key).serving) == serving]
                recent = _figures(key, newest).queue_wait_ms if key == VERIFIER and len(newest) >= 2 else None
                panic_wait = max([w for w in (wait, recent) if w is not None], default=None)
                target_wait = auto.targets.queue_wait_ms
                outrun = raw >= PANIC_RATIO * max(serving, 1) or (panic_wait is not None and (
                    panic_wait >= PANIC_WAIT_RATIO * target_wait or _ratio_target(
                        max(serving, 1), panic_wait, target_wait, tolerance, count) >= PANIC_RATIO * max(serving, 1)))
                if outrun:
                    panic_until = now + PANIC_HOLD_S
                    memory = replace(memory, panic_until={**memory.panic_until, key: panic_until})
                # the trend is extrapolated only while the load outruns the pods now; in the panic's hold the
                # rate itself sizes (a few noisy rates after new pods joined can look like a rise)
                ahead = panic_demand(history, now, provision_s if outrun else 0.0, PANIC_TREND_T) \
                    if key == VERIFIER and now < panic_until else None
                if ahead is not None:
                    # panicking, the verifiers are sized for the rate of work expected when a pod asked for now
                    # serves, at the utilisation target (not by the queue-wait ratio, which grows all the while
                    # new pods start); never below what utilisation or the DSI floor ask
                    demand, figures_ahead = ahead
                    need = math.ceil(min(demand / (auto.targets.gpu_utilization_percent / 100), _MOST_REPLICAS)
                                     - 1e-9)
                    floor = max([n for w, n in wants.items() if w != "queue wait"] or [1])
                    why = f"arrival rate in {provision_s:.0f} s" if outrun else "arrival rate"
                    if outrun and serving >= count and max(need, floor) <= count < wants.get("queue wait", 0) \
                            and _backlog_growing(history, serving):
                        # the queue overrules a rate that says the pods keep up: the rate is estimated from a
                        # few busy fractions and queue waits (one per heartbeat read), and the first requests of
                        # a ramp or a burst fall between them; the queue-wait ratio then sizes, at most doubling
                        # the count per decision (the HPA's default scale-up rate), as with no rate measured. Only
                        # while every pod asked for serves (pods starting are what the rate counts on; the queue
                        # grows until they serve) and the queue grew since the last read (one being worked off
                        # after a burst is no sign the rate undercounts)
                        floor = min(wants["queue wait"], count + max(auto.max_step, count))
                        why = f"queue wait {wait:.0f} ms over a rate of {demand:.2f} pods" if wait is not None \
                            else why
                    raw = max(need, floor, 1)
                    metrics.update(figures_ahead)
                    rate_sized = True
                    # the burst's size (its arrival rate when the pods asked for now serve, at the utilisation
                    # target; not the backlog): held for BURST_MEMORY_S after the panic, as headroom for the next
                    rate_then = figures_ahead["arrival_pods"] + figures_ahead["arrival_slope_low_per_min"] / 60 * (
                        provision_s if outrun else 0.0)
                    size = math.ceil(min(rate_then / (auto.targets.gpu_utilization_percent / 100), _MOST_REPLICAS)
                                     - 1e-9)
                    memory = _remember_burst(memory, key, size, now, burst_memory_s(spec))
            panicking = not idle and now < panic_until
            if panicking:
                why = f"panic: {why}"
            memory = _remember(memory, key, raw, now, spec)
            stable = _stabilize(key, raw, count, memory, spec, now, panicking, tolerance)
            held = burst_floor(memory, key, now, burst_memory_s(spec))
            holding = stable < count and held > stable
            if holding:
                # headroom for bursts: a burst seen in the last BURST_MEMORY_S would take a provisioning time
                # to come back to, and its first minute would queue; its size is kept (never more than now)
                stable = min(count, held)
                why = f"{why}; holding the size of a burst of the last {burst_memory_s(spec):.0f} s ({held})"
            # a scale-down waits the longer cooldown: capacity is removed in fewer, larger steps (each change
            # restarts pods' share of work), while a scale-up only waits the short one, or none in a panic
            cooldown_s = auto.cooldown_s if stable > count else auto.scale_down_cooldown_s
            # a panic skips the up cooldown after the policy's own change, never after a count set by hand
            own_change = memory.hand_set_s.get(key) != last_change.get(key)
            cooling = key in last_change and now - last_change[key] < cooldown_s and not (
                panicking and stable > count and own_change)
            if stable != count and not cooling:
                # panicking, sized by the measured arrival rate, the count goes there at once (Knative allows
                # 1000x per decision): each step waits a provisioning time. Sized by the queue-wait ratio alone
                # (no rate measured yet), which grows with the backlog, at most doubling (the HPA's default)
                up_step = (stable - count if rate_sized else max(auto.max_step, count)) if panicking \
                    else auto.max_step
                step = max(-auto.max_step, min(up_step, stable - count))
                count, reason = count + step, f"{why}: recommends {raw}, stabilised {stable}"
            elif stable != count:
                reason = f"cooldown: {why} recommends {raw}, next change after {cooldown_s} s"
            elif holding:
                reason = f"{why}: recommends {raw}, held at {count}"
            if key == VERIFIER:  # growth the pools must follow: the verifiers' change within their bounds (from
                # their stabilised recommendation: one noisy sample must not move the pools either), and no more
                # than the load itself grew (a count rounded up from 1.25 x the target is not twice the tokens)
                verifier_growth = max(role.clamp(count), 1) / max(before or count, 1)
                if verifier_growth > 1 and "load_ratio" in metrics:
                    verifier_growth = min(verifier_growth, max(1.0, metrics["load_ratio"]))
        bounded = role.clamp(count)
        if bounded != count:
            count, reason = bounded, f"{reason}; held to bounds [{role.min_replicas}, {role.max_replicas}]"
        desired[key], reasons[key] = count, reason
        if before is not None and count != before:
            last_change[key] = now
            decisions.append(Decision(now, key, int(before), count, reason, metrics))
            pending = dict(memory.scale_up_pending)
            if count > before and key not in pending:
                pending[key] = (now, count)  # provisioning is timed from the oldest scale-up still starting
            elif count < before and key in pending and pending[key][1] > count:
                del pending[key]  # cancelled before it served: nothing to measure
            memory = replace(memory, scale_up_pending=pending)
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

