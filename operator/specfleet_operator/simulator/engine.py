"""The simulator's event core: a fleet of R replicas, each a continuous-batching server with S slots, run under one
arrival trace.

Each replica's only event is "its current round ends"; requests are placed on replicas at arrival (uniformly at
random, as a Kubernetes Service spreads connections, or by `assign_power_of_two`, a load-aware router's choice
from what it has sent), so replicas never wait on one another and every replica's
next event can be processed in the same vectorised step: one loop iteration ends one round on every replica at
that replica's own clock. Work is per round and aggregated over tokens (a round adds `gain` tokens to each request),
so 1,000 replicas cost a few thousand numpy steps over [R, S] arrays rather than millions of Python events.
A round admits waiting requests into free slots (their prefill shares the forward, as chunked prefill does, and
yields their first token), decodes the others, and frees the slots of finished requests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specfleet_operator.simulator.systems import System
from specfleet_operator.simulator.traces import Trace


@dataclass
class SimResult:
    system: str
    replicas: int
    gpus_per_replica: float
    trace: Trace
    first_token_s: np.ndarray  # [N] absolute time of each request's first token (inf: never)
    finish_s: np.ndarray  # [N] absolute time it finished (inf: not within the horizon)
    tokens_in_window: float  # tokens generated during [warm-up, duration]
    rounds: int
    mean_k: float  # draft length the replicas used, averaged over busy rounds

    def summary(self) -> dict:
        t = self.trace
        measured = t.measured
        finished = np.isfinite(self.finish_s)
        latency = np.where(finished, self.finish_s - t.arrival_s, np.inf)[measured]
        ttft = (self.first_token_s - t.arrival_s)[measured]
        with np.errstate(invalid="ignore"):  # inf - inf for requests that never started
            decode = ((self.finish_s - self.first_token_s) / np.maximum(t.output_tokens - 1, 1))[measured]

        def pct(values, q):
            # nearest rank, no interpolation: requests that never finished are inf and must stay inf
            return float(np.percentile(values, q, method="inverted_cdf")) if len(values) else float("nan")

        gpu_hours = self.replicas * self.gpus_per_replica * t.duration_s / 3600
        tokens_per_s = self.tokens_in_window / (t.duration_s - t.warmup_s)
        makespan = float(self.finish_s[finished].max() - t.arrival_s.min()) if finished.any() else float("nan")
        return {"system": self.system, "replicas": self.replicas, "trace": t.kind, "requests": int(measured.sum()),
                "finished": int(finished[measured].sum()), "tokens_per_s": round(tokens_per_s, 2),
                "offered_tokens_per_s": round(t.offered_tokens_per_s, 2),
                "p50_latency_s": round(pct(latency, 50), 4), "p99_latency_s": round(pct(latency, 99), 4),
                "p50_ttft_s": round(pct(ttft, 50), 4), "p99_ttft_s": round(pct(ttft, 99), 4),
                "p50_tpot_ms": round(pct(decode[finished[measured]] * 1e3, 50), 3),
                "gpus": round(self.replicas * self.gpus_per_replica, 2), "gpu_hours": round(gpu_hours, 4),
                "tokens_per_gpu_s": round(tokens_per_s / max(self.replicas * self.gpus_per_replica, 1e-9), 3),
                "mean_k": round(self.mean_k, 3), "rounds": self.rounds, "makespan_s": round(makespan, 4),
                "batch_tokens_per_s": round(float(t.output_tokens[finished].sum()) / makespan, 2) if finished.any()
                else 0.0}


ROUTINGS = ("random", "p2c")


def assign_power_of_two(trace: Trace, replicas: int, drain_tokens_per_s: float,
                        rng: np.random.Generator) -> np.ndarray:
    """A load-aware router's placement: for each arrival, in time order, sample two replicas and send the request to
    the one with less estimated outstanding work (tokens sent there, drained at `drain_tokens_per_s`). It sees only
    what a router knows (what it sent and when), not the replicas' true state; one Python pass over the arrivals."""
    pairs = rng.integers(0, replicas, (len(trace), 2)).tolist()
    backlog = [0.0] * replicas
    last = [0.0] * replicas
    chosen = [0] * len(trace)
    for i, (t, tokens, (a, b)) in enumerate(zip(trace.arrival_s.tolist(), trace.output_tokens.tolist(), pairs,
                                                strict=True)):
        load_a = max(0.0, backlog[a] - drain_tokens_per_s * (t - last[a]))
        load_b = max(0.0, backlog[b] - drain_tokens_per_s * (t - last[b]))
        pick, load = (a, load_a) if load_a <= load_b else (b, load_b)
        backlog[pick], last[pick], chosen[i] = load + tokens, t, pick
    return np.asarray(chosen, dtype=np.int64)


def simulate(system: System, trace: Trace, replicas: int, seed: int = 0, max_batch: int | None = None,
             horizon_factor: float = 4.0, assign: np.ndarray | None = None) -> SimResult:
    """Runs `trace` through `replicas` replicas of `system`; requests not finished by horizon_factor x duration
    count as never finished. `assign` (replica per request) overrides the random spread."""
    rng = np.random.default_rng(seed)
    R, S = replicas, max_batch or system.costs.max_batch
    n = len(trace)
    horizon = trace.duration_s * horizon_factor
    if assign is None:
        assign = rng.integers(0, R, n)
    # per-replica FIFO queues as a padded [R, W] table, flattened (padding lets one window gather never run off)
    order = np.lexsort((trace.arrival_s, assign))
    counts = np.bincount(assign, minlength=R)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    width = int(counts.max(initial=0)) + S + 1
    queue = np.full(R * width, -1, dtype=np.int64)
    queue_arrival = np.full(R * width, np.inf)
    flat = assign[order] * width + np.arange(n) - starts[assign[order]]
    queue[flat] = order
    queue_arrival[flat] = trace.arrival_s[order]
    row_base = np.arange(R) * width
    request_alpha = system.request_alpha(trace.domain)

    slot_req = np.full((R, S), -1, dtype=np.int64)
    slot_left = np.zeros((R, S))  # tokens still to generate; 0 in free slots
    slot_alpha = np.zeros((R, S))
    occupied = np.zeros(R, dtype=np.int64)
    next_in_queue = np.zeros(R, dtype=np.int64)
    clock = queue_arrival[row_base].copy()  # each replica wakes at its first arrival (inf: never)
    first_token = np.full(n, np.inf)
    finish = np.full(n, np.inf)
    offsets = np.arange(S)[None]
    tokens_in_window, rounds, k_sum, k_rounds = 0.0, 0, 0.0, 0

    while True:
        live = clock <= horizon
        if not live.any():
            break
        # admit arrived requests into free slots, FIFO; only replicas with a free slot and a waiting arrival
        head = queue_arrival[row_base + next_in_queue]
        ready = np.flatnonzero((head <= clock) & (occupied < S) & live)
        admit = np.zeros(R, dtype=np.int64)
        new = np.zeros((R, S), dtype=bool)
        prefill = np.zeros(R)
        if ready.size:
            window = (row_base[ready] + next_in_queue[ready])[:, None] + offsets  # [m, S]
            free = slot_req[ready] < 0
            admit_ready = np.minimum((queue_arrival[window] <= clock[ready, None]).sum(1), free.sum(1))
            rank = np.cumsum(free, 1) - 1
            take = free & (rank < admit_ready[:, None])
            picked = queue[window[:, :1] + rank][take]  # request ids in slot order
            rows, cols = np.nonzero(take)
            rows = ready[rows]
            slot_req[rows, cols] = picked
            slot_left[rows, cols] = trace.output_tokens[picked]
            slot_alpha[rows, cols] = request_alpha[picked]
            new[rows, cols] = True
            admit[ready] = admit_ready
            prefill = np.bincount(rows, weights=trace.prompt_tokens[picked], minlength=R)
            next_in_queue[ready] += admit_ready
            occupied[ready] += admit_ready

        decoding = (slot_left > 0) & ~new
        batch = occupied - admit
        step = system.round(decoding, slot_alpha, batch, prefill, admit, rng)
        busy = occupied > 0
        end = clock + step.ms / 1e3

        gain = np.where(decoding, step.gain, 0.0)
        if ready.size:
            gain[rows, cols] = 1.0  # prefill yields the first token
            first_token[picked] = end[rows]
        gain = np.minimum(gain, slot_left)
        in_window = busy & (end <= trace.duration_s) & (end > trace.warmup_s)
        tokens_in_window += float(gain.sum(1) @ in_window)
        slot_left -= gain
        done = (slot_req >= 0) & (slot_left <= 1e-9)
        done_rows, done_cols = np.nonzero(done)
        if done_rows.size:
            finish[slot_req[done_rows, done_cols]] = end[done_rows]
            slot_req[done_rows, done_cols] = -1
            slot_left[done_rows, done_cols] = 0.0
            occupied -= np.bincount(done_rows, minlength=R)

        rounds += 1
        spec = busy & (batch > 0)
        k_sum += float(step.k[spec].sum())
        k_rounds += int(spec.sum())
        # busy replicas move to the end of their round; idle ones sleep until their next arrival
        clock = np.where(busy, end, np.where(live, np.maximum(queue_arrival[row_base + next_in_queue], clock),
                                             np.inf))
        late = np.flatnonzero((clock > horizon) & (occupied > 0))
        if late.size:  # past the horizon: what is still running never finishes
            slot_req[late] = -1
            slot_left[late] = 0.0
            occupied[late] = 0
        clock = np.where(clock > horizon, np.inf, clock)
    return SimResult(system.name, R, system.gpus_per_replica(), trace, first_token, finish, tokens_in_window,
                     rounds, k_sum / max(k_rounds, 1))


def saturated_tokens_per_s(system: System, seed: int = 0, duration_s: float = 20.0) -> float:
    """Tokens per second one replica of `system` delivers with a queue that never empties (its capacity; with
    requests spread at random, R replicas deliver R times this)."""
    from specfleet_operator.simulator.traces import make

    costs = system.costs
    one_request_s = costs.request.output_tokens_mean * float(costs.target.ms(1, 1)) / 1e3
    flood = make("steady", costs, 8.0 * costs.max_batch / one_request_s, duration_s, seed)
    return simulate(system, flood, 1, seed=seed, horizon_factor=1.0).tokens_in_window / (duration_s - flood.warmup_s)
