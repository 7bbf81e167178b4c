"""Arrival traces for the simulator: steady (Poisson) and bursty (a two-state Markov-modulated Poisson process with
the same mean rate), plus the load shapes autoscaling is scored on (`AUTOSCALE_TRACES`): steady, a ramp over the
whole duration, a 5-minute ramp, on-off bursts and a diurnal sinusoid. A trace is flat numpy arrays, one entry per
request."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from specfleet_operator.simulator.costs import CostModel

TRACES = ("steady", "bursty")
AUTOSCALE_TRACES = ("steady", "ramp", "ramp-5m", "on-off", "diurnal")
SHORT_RAMP_S = 300.0  # "ramp-5m": the ramp's shape over five minutes
WARMUP_SHARE = 0.25  # steady and bursty runs measure the last 75% of the arrivals window


@dataclass(frozen=True)
class Trace:
    kind: str
    duration_s: float
    arrival_s: np.ndarray  # [N] sorted
    prompt_tokens: np.ndarray  # [N] int
    output_tokens: np.ndarray  # [N] int
    domain: np.ndarray  # [N] index into the cost model's domains
    warmup_s: float = 0.0  # figures count from here on (the fleet starts empty; steady state comes later)
    # windows (start, end) of rising load: a ramp's rise, each on-off burst; autoscaling scores time the first
    # scale-up after each start
    surges: tuple[tuple[float, float], ...] = ()

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def measured(self) -> np.ndarray:
        """[N] bool: the requests the figures describe (arrived after the warm-up)."""
        return self.arrival_s >= self.warmup_s

    @property
    def offered_tokens_per_s(self) -> float:
        return float(self.output_tokens[self.measured].sum()) / (self.duration_s - self.warmup_s)


def _requests(costs: CostModel, arrivals: np.ndarray, kind: str, duration_s: float,
              rng: np.random.Generator) -> Trace:
    shape = costs.request
    n = len(arrivals)
    if shape.output_sigma > 0:
        # lognormal with the requested mean: mu = ln(mean) - sigma^2 / 2
        mu = np.log(shape.output_tokens_mean) - shape.output_sigma ** 2 / 2
        out = rng.lognormal(mu, shape.output_sigma, n)
    else:
        out = np.full(n, shape.output_tokens_mean)
    out = np.clip(np.rint(out), 1, shape.output_tokens_max).astype(np.int64)
    weights = np.asarray(costs.domain_weights) / np.sum(costs.domain_weights)
    domain = rng.choice(len(costs.domains), size=n, p=weights)
    warmup = duration_s * WARMUP_SHARE if kind in TRACES else 0.0
    return Trace(kind, duration_s, arrivals, np.full(n, shape.prompt_tokens, dtype=np.int64), out, domain, warmup)


def steady(costs: CostModel, rate_per_s: float, duration_s: float, rng: np.random.Generator) -> Trace:
    """Poisson arrivals at `rate_per_s` requests per second."""
    n = rng.poisson(rate_per_s * duration_s)
    arrivals = np.sort(rng.uniform(0.0, duration_s, n))
    return _requests(costs, arrivals, "steady", duration_s, rng)


def bursty(costs: CostModel, rate_per_s: float, duration_s: float, rng: np.random.Generator,
           burst_factor: float = 3.0, mean_burst_s: float = 10.0, mean_calm_s: float = 30.0) -> Trace:
    """MMPP-2: calm and burst periods with exponential lengths; bursts arrive `burst_factor` times faster than calm
    periods, and the two rates are set so the long-run mean stays `rate_per_s` (comparable with `steady`)."""
    share_burst = mean_burst_s / (mean_burst_s + mean_calm_s)
    calm_rate = rate_per_s / (1 - share_burst + share_burst * burst_factor)
    edges, rates, t, burst = [0.0], [], 0.0, False
    while t < duration_s:
        t = min(duration_s, t + rng.exponential(mean_burst_s if burst else mean_calm_s))
        rates.append(calm_rate * (burst_factor if burst else 1.0))
        edges.append(t)
        burst = not burst
    # a short trace sees few periods: rescale so the expected count is exactly rate x duration, as in `steady`
    expected = sum(r * (b - a) for a, b, r in zip(edges[:-1], edges[1:], rates, strict=True))
    rates = [r * rate_per_s * duration_s / max(expected, 1e-12) for r in rates]
    pieces = []
    for start, end, rate in zip(edges[:-1], edges[1:], rates, strict=True):
        pieces.append(rng.uniform(start, end, rng.poisson(rate * (end - start))))
    arrivals = np.sort(np.concatenate(pieces)) if pieces else np.zeros(0)
    return _requests(costs, arrivals, "bursty", duration_s, rng)


def _thinned(costs: CostModel, peak_rate_per_s: float, duration_s: float, rng: np.random.Generator, shape,
             kind: str) -> Trace:
    """A Poisson process at the peak rate, thinned to `shape(t)` x peak (shape in [0, 1])."""
    n = rng.poisson(peak_rate_per_s * duration_s)
    candidates = np.sort(rng.uniform(0.0, duration_s, n))
    arrivals = candidates[rng.uniform(size=n) < shape(candidates)]
    return _requests(costs, arrivals, kind, duration_s, rng)


def ramp(costs: CostModel, peak_rate_per_s: float, duration_s: float, rng: np.random.Generator,
         floor: float = 0.05) -> Trace:
    """Load up and down: the rate rises linearly from `floor` x peak to the peak at mid-time and falls back
    (thinning a Poisson process at the peak rate). Its surge is the rise."""
    trace = _thinned(costs, peak_rate_per_s, duration_s, rng,
                     lambda t: floor + (1 - floor) * (1 - np.abs(2 * t / duration_s - 1)), "ramp")
    return replace(trace, surges=((0.0, duration_s / 2),))


def diurnal(costs: CostModel, peak_rate_per_s: float, duration_s: float, rng: np.random.Generator,
            floor: float = 0.1) -> Trace:
    """One day compressed into the duration: a sinusoid from `floor` x peak at the start and end to the peak at
    mid-time."""
    return _thinned(costs, peak_rate_per_s, duration_s, rng,
                    lambda t: floor + (1 - floor) * (1 - np.cos(2 * np.pi * t / duration_s)) / 2, "diurnal")


def on_off(costs: CostModel, peak_rate_per_s: float, duration_s: float, rng: np.random.Generator,
           burst_factor: tuple[float, float] = (5.0, 20.0), burst_s: tuple[float, float] = (60.0, 120.0),
           calm_s: tuple[float, float] = (180.0, 600.0)) -> Trace:
    """A base rate with bursts: calm periods of `calm_s` (uniform) alternate with bursts of `burst_s` at
    `burst_factor` (uniform, drawn per burst) x the base rate; the base is set so the largest burst is the peak. A
    trace too short for a calm period and a burst gets one burst (the largest factor) a third of the way in."""
    windows, factors = [], []
    t = rng.uniform(*calm_s)
    while True:
        length = rng.uniform(*burst_s)
        if t + length > duration_s:
            break
        windows.append((t, t + length))
        factors.append(rng.uniform(*burst_factor))
        t += length + rng.uniform(*calm_s)
    if not windows:
        start = duration_s / 3
        windows, factors = [(start, start + min(burst_s[0], duration_s / 3))], [burst_factor[1]]
    base = peak_rate_per_s / max(factors)
    edges, rates = [0.0], []
    for (start, end), factor in zip(windows, factors, strict=True):
        edges += [start, end]
        rates += [base, base * factor]
    edges.append(duration_s)
    rates.append(base)
    pieces = [rng.uniform(a, b, rng.poisson(rate * (b - a)))
              for a, b, rate in zip(edges[:-1], edges[1:], rates, strict=True)]
    arrivals = np.sort(np.concatenate(pieces))
    return replace(_requests(costs, arrivals, "on-off", duration_s, rng), surges=tuple(windows))


def batch(costs: CostModel, requests: int, output_tokens: np.ndarray | None = None) -> Trace:
    """`requests` requests all waiting at t = 0 (an offline batch, as `specfleet bench engine` runs them). The
    duration only bounds the run (an hour); read the result's `batch_tokens_per_s`, computed from finish times."""
    rng = np.random.default_rng(0)
    trace = _requests(costs, np.zeros(requests), "batch", 3600.0, rng)
    if output_tokens is not None:
        trace = replace(trace, output_tokens=np.asarray(output_tokens, dtype=np.int64))
    return trace


def make(kind: str, costs: CostModel, rate_per_s: float, duration_s: float, seed: int) -> Trace:
    """A trace by name. `rate_per_s` is the mean rate for steady and bursty, the peak rate for the others;
    "ramp-5m" lasts `SHORT_RAMP_S` (or `duration_s` if that is shorter)."""
    rng = np.random.default_rng(seed)
    if kind == "steady":
        return steady(costs, rate_per_s, duration_s, rng)
    if kind == "bursty":
        return bursty(costs, rate_per_s, duration_s, rng)
    if kind == "ramp":
        return ramp(costs, rate_per_s, duration_s, rng)
    if kind == "ramp-5m":
        return replace(ramp(costs, rate_per_s, min(SHORT_RAMP_S, duration_s), rng), kind="ramp-5m")
    if kind == "on-off":
        return on_off(costs, rate_per_s, duration_s, rng)
    if kind == "diurnal":
        return diurnal(costs, rate_per_s, duration_s, rng)
    raise ValueError(f"unknown trace {kind!r}; choose from steady, bursty, {', '.join(AUTOSCALE_TRACES[1:])}")
