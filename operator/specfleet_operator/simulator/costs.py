"""Cost models for the simulator: how long a target or drafter forward takes, what a fleet round costs on the wire,
and how often drafts are accepted (per position, per drafter and domain).

Two kinds of source:
- `local`: measured on this machine, read from the committed `bench/engine.json`, `bench/fleet.json` and
  `bench/acceptance.json` (`specfleet bench engine|fleet`, `specfleet models acceptance`);
- `a100-70b`, `h100-70b`: paper-scale deployments built from public figures (a Llama-2-70B-class target, 1B
  drafters). Those numbers are estimates, derived from a roofline and checked against the ranges the SpecInfer,
  PipeInfer, DSI and CoSine papers report; each constant says where it comes from. docs/simulator.md has the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

DEFAULT_BENCH = Path(__file__).resolve().parents[3] / "bench"


@dataclass(frozen=True)
class StepCost:
    """Milliseconds of one forward of one model instance over `tokens` tokens in `seqs` sequences (a roofline):
    fixed + max(memory, compute_per_token * tokens) + kv_per_seq * seqs. `memory_ms` is reading the weights once
    (decode is memory-bound until a batch holds enough tokens), `kv_ms_per_seq` reading one sequence's KV cache."""

    fixed_ms: float
    memory_ms: float
    compute_ms_per_token: float
    kv_ms_per_seq: float = 0.0

    def ms(self, tokens, seqs):
        """Vectorised over numpy arrays; zero tokens cost nothing (the instance is idle)."""
        tokens = np.asarray(tokens, dtype=np.float64)
        cost = (self.fixed_ms + np.maximum(self.memory_ms, self.compute_ms_per_token * tokens)
                + self.kv_ms_per_seq * np.asarray(seqs, dtype=np.float64))
        return np.where(tokens > 0, cost, 0.0)


@dataclass(frozen=True)
class GridCost:
    """Milliseconds of one forward interpolated from a profiled grid (`specfleet profile`: `bench/profile.json`):
    `ms_grid[i][j]` is a forward of `batches[i]` sequences with `tokens[j]` tokens each. Between grid points the
    cost is linear in the batch and in the tokens per sequence; past the last tokens column it grows with the last
    column's slope per token (a long prefill), past the last batch row with the last rows' slope per sequence.
    `overhead_ms` per sequence is added to every non-empty forward (the engine's per-round Python work around it,
    done request by request: sampling, acceptance, tree building, commit). Same `ms(tokens, seqs)` interface as
    StepCost, vectorised."""

    batches: tuple[float, ...]
    tokens: tuple[float, ...]
    ms_grid: tuple[tuple[float, ...], ...]  # [len(batches)][len(tokens)]
    overhead_ms: float = 0.0  # per sequence in the forward
    compute_ms_per_token: float = 0.0  # the fitted line's slope (verify_cost.per_token_ms): the prefill unit

    @classmethod
    def from_points(cls, points: list[dict], overhead_ms: float = 0.0, per_token_ms: float = 0.0) -> GridCost:
        """`points`: [{"batch": B, "tokens": T, "ms": x}, ...] covering a full batch x tokens grid."""
        batches = sorted({float(p["batch"]) for p in points})
        tokens = sorted({float(p.get("tokens", 1)) for p in points})
        by = {(float(p["batch"]), float(p.get("tokens", 1))): float(p["ms"]) for p in points}
        missing = [(b, t) for b in batches for t in tokens if (b, t) not in by]
        if missing:
            raise ValueError(f"the profile's grid lacks (batch, tokens) {missing}; rerun `specfleet profile`")
        return cls(tuple(batches), tuple(tokens), tuple(tuple(by[b, t] for t in tokens) for b in batches),
                   overhead_ms, per_token_ms)

    @staticmethod
    def _interp(x: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Piecewise linear through (xs, ys) at x, vectorised: ys is [n] or [len(x), n] (one curve per x). Below
        xs[0] the first value; past xs[-1] the last segment's slope (never negative) carries on."""
        if len(xs) == 1:
            return np.broadcast_to(ys[..., 0], x.shape).astype(np.float64)
        x = np.maximum(x, xs[0])
        i = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, len(xs) - 2)
        if ys.ndim == 1:
            low, high = ys[i], ys[i + 1]
        else:
            low = np.take_along_axis(ys, i[:, None], 1)[:, 0]
            high = np.take_along_axis(ys, i[:, None] + 1, 1)[:, 0]
        slope = (high - low) / (xs[i + 1] - xs[i])
        slope = np.where(x > xs[-1], np.maximum(slope, 0.0), slope)
        return low + slope * (x - xs[i])

    def ms(self, tokens, seqs):
        tokens = np.asarray(tokens, dtype=np.float64)
        tokens, seqs = np.broadcast_arrays(tokens, np.maximum(np.asarray(seqs, dtype=np.float64), 1.0))
        per_seq = np.maximum(tokens / seqs, 1.0).reshape(-1)  # [N]
        grid = np.asarray(self.ms_grid)  # [batches, tokens]
        xs_t = np.asarray(self.tokens)
        rows = np.stack([self._interp(per_seq, xs_t, grid[b]) for b in range(len(self.batches))], 1)  # [N, batches]
        cost = self._interp(seqs.reshape(-1), np.asarray(self.batches), rows).reshape(tokens.shape)
        return np.where(tokens > 0, cost + self.overhead_ms * seqs, 0.0)


@dataclass(frozen=True)
class RequestShape:
    """Prompt and output lengths of the simulated requests (output ~ lognormal around the mean, clipped)."""

    prompt_tokens: int
    output_tokens_mean: float
    output_tokens_max: int
    output_sigma: float = 0.5  # lognormal sigma; 0 gives every request the mean


@dataclass(frozen=True)
class CostModel:
    """Everything the systems need to know about one deployment."""

    name: str
    source: str
    target: StepCost | GridCost
    drafter: StepCost | GridCost
    target_gpus: float  # GPUs per target instance (tensor parallel degree)
    drafter_gpus: float  # GPUs per drafter instance
    network_ms: float  # per speculative fleet round: gRPC hops + Redis commit between router, drafters, verifier
    max_batch: int  # sequences per target forward (KV-cache and latency bound)
    k: int  # draft tokens per round (the most, for adaptive systems)
    domains: tuple[str, ...]
    domain_weights: tuple[float, ...]
    # alpha[drafter][domain]: probability that a drafted token is accepted given its predecessors were
    alpha: dict[str, dict[str, float]] = field(default_factory=dict)
    general_drafter: str = ""  # the drafter single-drafter systems (SpecInfer, PipeInfer, DSI) use
    tree_width: int = 2  # SpecInfer's token-tree branches per level
    cosine_drafters_per_request: int = 2  # CoSine's router picks this many drafters per request
    cosine_drafter_ratio: float = 1.0  # CoSine drafter instances per verifier (the pools are sized independently)
    fusion_independence: float = 0.35  # 0: drafters always err together, 1: independent errors
    request: RequestShape = RequestShape(512, 256, 1024)
    # True where every service is a process on one machine's few cores (the local preset): the fleet's drafting,
    # verification and per-request RPC handling (CPU-bound Python) queue on the same CPUs instead of overlapping,
    # so a fleet round costs the sum of its parts and `network_ms` is paid once per request in the round
    shared_cores: bool = False
    # per fleet round that does not speculate (k = 0: router -> verifier only); None: the same as network_ms
    plain_network_ms: float | None = None
    # one draft level of the in-process engine's drafters run as one grouped forward (`specfleet profile`'s
    # drafter_group_step_ms); None: cosine_drafters_per_request drafter steps one after another
    engine_draft_level: StepCost | GridCost | None = None
    # shared cores: the fleet's forwards (drafting and verification) take this many times what the profile timed
    # each model alone (measured: `round_hops`' compute in the fleet against the profile at the same shape)
    fleet_compute_factor: float = 1.0

    @property
    def plain_round_network_ms(self) -> float:
        return self.network_ms if self.plain_network_ms is None else self.plain_network_ms

    def with_alpha(self, value: float) -> CostModel:
        """The same deployment with every drafter accepted at `value` per position (tests, what-ifs)."""
        return replace(self, alpha={d: dict.fromkeys(self.domains, value) for d in self.alpha})

    def best_drafters(self, domain: str, count: int) -> list[str]:
        ranked = sorted(self.alpha, key=lambda d: -self.alpha[d][domain])
        return ranked[:count]


def alpha_from_accepted(accepted_per_round: float, k: int) -> float:
    """Per-position acceptance alpha such that alpha + alpha^2 + ... + alpha^k = the measured mean accepted draft
    tokens per round (each position is accepted only if all earlier ones were). Bisection: the sum is monotone."""
    if accepted_per_round <= 0:
        return 0.0
    if accepted_per_round >= k:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if sum(mid ** i for i in range(1, k + 1)) < accepted_per_round:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def fuse_alpha(alphas: list[float], independence: float) -> float:
    """Acceptance of a token tree whose branches come from several drafts (CoSine fusion, SpecInfer trees): a
    position fails only if every branch misses. Drafts of similar models err together, so each extra branch removes
    only part of the remaining miss: miss = (1 - best) * prod((1 - other) ** independence)."""
    if not alphas:
        return 0.0
    ordered = sorted(alphas, reverse=True)
    miss = 1.0 - ordered[0]
    for other in ordered[1:]:
        miss *= (1.0 - other) ** independence
    return 1.0 - miss


def expected_gain(alpha, k):
    """Mean tokens a request gains per verified round with k drafted tokens: 1 + alpha + ... + alpha^k (the bonus
    token from the target plus the accepted prefix). Vectorised over alpha and k."""
    alpha = np.asarray(alpha, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    return np.where(np.isclose(alpha, 1.0), k + 1, (1 - alpha ** (k + 1)) / np.maximum(1 - alpha, 1e-12))


# --- paper-scale presets ---------------------------------------------------------------------------------------
# Llama-2-70B in fp16: 140 GB of weights, GQA with 8 KV heads x 128 dims x 80 layers -> 320 KB of KV per token.
# A decode step reads every weight once: 140 GB / (4 GPUs x HBM bandwidth x ~60% achieved) plus a few ms of
# kernel launches and tensor-parallel all-reduce. A100-80G (2.0 TB/s): ~29 + 5 = 34 ms; H100-SXM (3.35 TB/s):
# ~17 + 4 = 21 ms. Those agree with the 30-40 ms (A100) and 20-25 ms (H100) per-token latencies that vLLM and
# TensorRT-LLM report for 70B at batch 1 with TP4, and with the 70B step times in the PipeInfer and DSI papers.
# Compute: 2 x 70e9 FLOP per token over 4 GPUs at ~50% of peak (312 / 989 TFLOP/s) -> 0.22 / 0.07 ms per token, so
# a batch turns compute-bound past ~130 / ~250 tokens. KV reads: 320 KB x ~768 tokens of context per sequence.
# Drafters (1.1B, TinyLlama / Llama-3.2-1B class, one GPU each): launch-bound, ~5 ms (A100) / ~3.5 ms (H100) per
# step, the figure SpecInfer and DSI use for ~1B drafters. Acceptance per position 0.6-0.8: the range SpecInfer
# (LLaMA-68M/160M drafters, 2-3.5 tokens per step), PipeInfer (TinyLlama drafting for 70B targets), DSI and CoSine
# (specialised drafters accepted more in their own domain) report. All of these are estimates, not measurements.
PAPER_DOMAINS = ("code", "chat", "math")
PAPER_ALPHA = {  # general drafter ~0.68; a specialist ~0.80 in its domain and ~0.55 elsewhere
    "general-1b": {"code": 0.68, "chat": 0.70, "math": 0.62},
    "code-1b": {"code": 0.80, "chat": 0.55, "math": 0.55},
    "chat-1b": {"code": 0.55, "chat": 0.80, "math": 0.58},
    "math-1b": {"code": 0.55, "chat": 0.58, "math": 0.78},
}
KV_BYTES_PER_TOKEN_70B = 320e3
CONTEXT_TOKENS = 768


def _paper_preset(name: str, hbm_tb_s: float, peak_tflops: float, launch_ms: float, drafter_ms: float) -> CostModel:
    gpus = 4
    bandwidth = gpus * hbm_tb_s * 1e12 * 0.6  # bytes/s achieved over the tensor-parallel group
    memory_ms = 140e9 / bandwidth * 1e3
    compute_ms_per_token = 2 * 70e9 / (gpus * peak_tflops * 1e12 * 0.5) * 1e3
    kv_ms_per_seq = KV_BYTES_PER_TOKEN_70B * CONTEXT_TOKENS / bandwidth * 1e3
    target = StepCost(launch_ms, memory_ms, compute_ms_per_token, kv_ms_per_seq)
    # a 1B drafter: 2.2 GB of weights on one GPU, ~2 GFLOP per token
    drafter = StepCost(drafter_ms - 2.2e9 / (hbm_tb_s * 1e12 * 0.5) * 1e3, 2.2e9 / (hbm_tb_s * 1e12 * 0.5) * 1e3,
                       2 * 1.1e9 / (peak_tflops * 1e12 * 0.4) * 1e3, 0.0)
    return CostModel(
        name=name, source="estimates from public figures (see costs.py comments and docs/simulator.md)",
        target=target, drafter=drafter, target_gpus=gpus, drafter_gpus=1, network_ms=1.0, max_batch=64, k=4,
        domains=PAPER_DOMAINS, domain_weights=(0.4, 0.4, 0.2), alpha=PAPER_ALPHA, general_drafter="general-1b",
        request=RequestShape(prompt_tokens=512, output_tokens_mean=256, output_tokens_max=1024))


def a100_70b() -> CostModel:
    return _paper_preset("a100-70b", hbm_tb_s=2.0, peak_tflops=312, launch_ms=5.0, drafter_ms=5.0)


def h100_70b() -> CostModel:
    return _paper_preset("h100-70b", hbm_tb_s=3.35, peak_tflops=989, launch_ms=4.0, drafter_ms=3.5)


# --- the local preset: this machine's committed measurements ----------------------------------------------------
# bench/profile.json (`specfleet profile`) holds the target forward over a grid of batch x tokens per sequence and
# each drafter's step over batch sizes; bench/fleet.json (`specfleet bench fleet`, the same machine and session)
# the engine's plain round (engine_round_p50: the profiled forward plus the engine's per-round work around it) and
# the fleet's per-round overhead (round_overhead_ms.p50: one gRPC hop + the Redis commit, measured on plain rounds).
# Without a profile, the two constants below stand in (estimates).
LOCAL_COMPUTE_MS_PER_TOKEN = 0.6  # estimate used only without bench/profile.json
LOCAL_DRAFTER_STEP_MS = 1.2  # estimate used only without bench/profile.json
# A speculative fleet round makes three RPCs one after another (router -> drafter pools, in parallel; -> fusion;
# -> verifier, which commits to Redis: `router.service`), a plain one only the last; the measured overhead is a
# plain round's, so a speculative round pays it this many times where the benchmark did not time one. Where it did
# (`round_hops`: the fleet with k = 4 every round, bundled models, one stream), the speculative round's measured
# orchestration is used instead: with routed pools the router skips the fusion RPC (one non-empty draft), so it
# came out 2.7x the plain round's, not 3x (bench/fleet.json, session 12).
SPECULATIVE_ROUND_HOPS = 3
# The in-process engine of `specfleet bench fleet`'s throughput stage drafts with three model drafters (python,
# prose, c), grouped as one forward per draft level (`engine.drafters`: a level costs one grouped forward however
# many of the group a request uses)
ENGINE_GROUP_DRAFTERS = 3


def _read(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; the local preset reads the committed benchmarks. Run "
                                f"`specfleet bench engine`, `specfleet bench fleet`, `specfleet profile` and "
                                f"`specfleet models acceptance`, or pick --preset a100-70b")
    return json.loads(path.read_text(encoding="utf-8"))


def profiled_costs(profile: dict, engine_round_ms: float | None = None) -> tuple[GridCost, GridCost]:
    """Target and drafter step costs from a `specfleet profile` report: the target's (batch, tokens) grid, and the
    drafters' steps averaged per batch size (one drafter cost for all). `engine_round_ms`, the engine's measured
    plain round at batch 1 on the same machine, sets the per-round overhead around the forward (never negative)."""
    target = GridCost.from_points(profile["target_forward_ms"],
                                  per_token_ms=float(profile.get("verify_cost", {}).get("per_token_ms", 0.0)))
    if engine_round_ms is not None:
        target = replace(target, overhead_ms=max(0.0, engine_round_ms - float(target.ms(1, 1))))
    steps = profile["drafter_step_ms"]
    if isinstance(steps, dict):  # {drafter: [{"batch": B, "ms": x}, ...]}
        by_batch: dict[float, list[float]] = {}
        for points in steps.values():
            for p in points:
                by_batch.setdefault(float(p["batch"]), []).append(float(p["ms"]))
        steps = [{"batch": b, "ms": float(np.mean(v))} for b, v in sorted(by_batch.items())]
    drafter = GridCost.from_points([{"batch": p["batch"], "tokens": 1, "ms": p["ms"]} for p in steps])
    return target, drafter


def engine_group_cost(profile: dict, members: int = ENGINE_GROUP_DRAFTERS) -> GridCost | None:
    """One draft level of `members` drafters run as one grouped forward, per batch size, from the profile's
    drafter_group_step_ms (the group of that many drafters); None where the profile has no such group."""
    for name, points in profile.get("drafter_group_step_ms", {}).items():
        if len(name.split("+")) == members:
            return GridCost.from_points([{"batch": p["batch"], "tokens": 1, "ms": p["ms"]} for p in points])
    return None


def _hop_run(fleet: dict, concurrency: int = 1) -> dict | None:
    runs = fleet.get("round_hops", {}).get("bundled", {}).get("runs", [])
    return next((r for r in runs if r["concurrency"] == concurrency), None)


def fleet_compute_factor(fleet: dict, target, drafter, k: int) -> float:
    """How much slower the fleet's forwards ran than the profile timed each model alone, on the same machine: the
    hop run's compute (the verifier's forward + the slowest drafter's drafting, p50, one stream, k drafts a round)
    against the profiled target forward of one sequence with the k-fixed ablation's tree and k drafter steps. 1 where
    the benchmark did not time the hops. On two cores the fleet's seven processes (the router's and the drafters'
    Python, gRPC and Redis threads) run beside each forward, which the profile's lone model never shares."""
    run = _hop_run(fleet)
    if run is None:
        return 1.0
    fixed = next(r["greedy"] for r in fleet["ablation"]["systems"] if r["system"] == "cosine, k fixed")
    tree = 1 + fixed["draft_tokens_per_round"]
    overhead = getattr(target, "overhead_ms", 0.0)
    alone = float(target.ms(tree, 1)) - overhead + k * float(drafter.ms(1, 1))
    return max(1.0, float(run["hops_ms"]["compute"]["p50"]) / alone)


def speculative_round_network_ms(fleet: dict) -> float:
    """A speculative fleet round's orchestration, per request: measured where the benchmark timed the hops of a
    round with k = 4 (`round_hops`, bundled models, one stream: round - compute), else SPECULATIVE_ROUND_HOPS plain
    rounds' overhead."""
    one = _hop_run(fleet)
    if one is not None:
        return float(one["hops_ms"]["orchestration"]["p50"])
    return SPECULATIVE_ROUND_HOPS * float(fleet["round_overhead_ms"]["p50"])


def local(bench_dir: Path = DEFAULT_BENCH) -> CostModel:
    fleet = _read(bench_dir / "fleet.json")
    acceptance = _read(bench_dir / "acceptance.json")
    engine = _read(bench_dir / "engine.json")
    step_ms = float(fleet["round_overhead_ms"]["engine_round_p50"])
    k = int(acceptance["config"]["k"])
    matrix = {name: {domain: alpha_from_accepted(cell["accepted_per_round"], k) for domain, cell in row.items()}
              for name, row in acceptance["matrix"].items() if name != "target"}
    domains = tuple(sorted(next(iter(matrix.values()))))
    prompts = engine["config"]
    plain = next(r for r in engine["results"] if r["system"] == "specfleet-none" and r["batch"] == 1
                 and r["mode"] == "greedy")
    sources = ["fleet.json", "engine.json", "acceptance.json"]
    group = None
    if (bench_dir / "profile.json").exists():
        profile = _read(bench_dir / "profile.json")
        target, drafter = profiled_costs(profile, step_ms)
        group = engine_group_cost(profile)
        sources.insert(0, "profile.json")
    else:
        target = StepCost(fixed_ms=step_ms - LOCAL_COMPUTE_MS_PER_TOKEN, memory_ms=0.0,
                          compute_ms_per_token=LOCAL_COMPUTE_MS_PER_TOKEN)
        drafter = StepCost(fixed_ms=LOCAL_DRAFTER_STEP_MS * 0.8, memory_ms=0.0,
                           compute_ms_per_token=LOCAL_DRAFTER_STEP_MS * 0.2)
    return CostModel(
        name="local", source=f"measured on this machine: {bench_dir}/{', '.join(sources)}",
        target=target, drafter=drafter, target_gpus=1.0, drafter_gpus=1.0,  # devices: one CPU process each
        network_ms=speculative_round_network_ms(fleet), plain_network_ms=float(fleet["round_overhead_ms"]["p50"]),
        engine_draft_level=group, fleet_compute_factor=fleet_compute_factor(fleet, target, drafter, k),
        max_batch=16, k=k,
        domains=domains, domain_weights=tuple(1.0 / len(domains) for _ in domains), alpha=matrix,
        general_drafter="drafter-general", shared_cores=True,
        request=RequestShape(prompt_tokens=int(prompts["prompt_tokens"]),
                             output_tokens_mean=plain["tokens"] / prompts["prompts"],
                             output_tokens_max=int(prompts["max_new_tokens"]), output_sigma=0.0))


PRESETS = {"local": local, "a100-70b": a100_70b, "h100-70b": h100_70b}


def get_preset(name: str, bench_dir: Path = DEFAULT_BENCH) -> CostModel:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return local(bench_dir) if name == "local" else PRESETS[name]()


def dsi_parallelism(costs: CostModel) -> int:
    """DSI's rule: enough target instances that one is always free when the drafter has the next k tokens ready,
    SP >= ceil(t_target / (k * t_draft)), at batch 1."""
    target_ms = float(costs.target.ms(1, 1))
    draft_ms = max(float(costs.drafter.ms(1, 1)), 1e-6)
    return max(1, math.ceil(target_ms / (costs.k * draft_ms)))


def plain_capacity_tokens_per_s(costs: CostModel) -> float:
    """Tokens per second one plain-decoding replica sustains with every slot busy: each request costs its decode
    steps' share of a full batch plus its prefill's extra compute. The unit `--load` is measured in."""
    batch = costs.max_batch
    step_s = float(costs.target.ms(batch, batch)) / 1e3
    out = costs.request.output_tokens_mean
    prefill_s = costs.target.compute_ms_per_token * costs.request.prompt_tokens / 1e3
    return out / (out * step_s / batch + prefill_s)
