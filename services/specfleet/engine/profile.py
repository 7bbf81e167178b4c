"""`specfleet profile`: times the target's forward over a grid of batch sizes and tokens per sequence, and each
drafter's step over batch sizes, on this machine, and fits the verifier's cost model (fixed + per-token cost). The
verifier's batch scheduler reads the profile (`serve verifier --profile`) to cap each forward's tokens so one batch
stays within a latency bound; the simulator reads the same numbers."""

from __future__ import annotations

import json
import os
from pathlib import Path

from specfleet.engine.models import ModelSet

TARGET_BATCHES = (1, 4, 16, 32)
TARGET_TOKENS = (1, 5, 9)
DRAFTER_BATCHES = (1, 4, 16)


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x, the slope kept >= 0 and the intercept >= 0."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in points) / var) if var else 0.0
    return max(0.0, my - slope * mx), slope


def run(models: Path | ModelSet, drafters: tuple[str, ...] = ("drafter-python", "drafter-prose", "drafter-c",
                                                        "drafter-general"), repeats: int = 3,
        progress: bool = True) -> dict:
    import torch
    from tqdm import tqdm

    from specfleet.engine.factory import load_model
    from specfleet.engine.llama import LlamaRunner

    target = LlamaRunner(load_model(models, "target"), slots=max(TARGET_BATCHES))
    device = target.device
    grid = [(b, t) for b in TARGET_BATCHES for t in TARGET_TOKENS]
    bar = tqdm(total=len(grid) + len(drafters) * len(DRAFTER_BATCHES), desc="profile", unit="shape",
               disable=not progress)
    rows = []
    for batch, tokens in grid:
        rows.append({"batch": batch, "tokens": tokens, "ms": round(1e3 * target.time_forward(batch, tokens, repeats),
                                                                   3)})
        bar.update()
    del target
    steps: dict[str, list[dict]] = {}
    loaded = {name: load_model(models, name) for name in drafters}
    for name, model in loaded.items():
        runner = LlamaRunner(model, slots=max(DRAFTER_BATCHES))
        steps[name] = []
        for batch in DRAFTER_BATCHES:
            steps[name].append({"batch": batch, "ms": round(1e3 * runner.time_forward(batch, 1, repeats), 3)})
            bar.update()
    groups = _group_steps(loaded, steps, repeats)
    head = _head_steps(models, repeats)
    bar.close()
    fixed, per_token = fit_line([(r["batch"] * r["tokens"], r["ms"]) for r in rows])
    from specfleet_kernels import cpu_gemm

    if device.type != "cpu":
        matmul = f"torch on {device} (the CPU kernel is for the CPU only)"
    else:
        matmul = "packed (specfleet_kernels.cpu_gemm)" if cpu_gemm.available() else (
            f"torch ({cpu_gemm.unavailable_reason()})")
    return {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
                        "matmul": matmul},
            "target_forward_ms": rows, "drafter_step_ms": steps, "drafter_group_step_ms": groups,
            **({"head_step_ms": head} if head else {}),
            "verify_cost": {"fixed_ms": round(fixed, 3), "per_token_ms": round(per_token, 4),
                            "model": "ms = fixed_ms + per_token_ms * (tokens in the forward over all sequences)"}}


def _head_steps(models, repeats: int) -> list[dict]:
    """One draft level of the model set's draft head (none: []), with its share of a target step of one token."""
    from specfleet.engine.factory import build_head, load_model
    from specfleet.engine.llama import LlamaRunner
    from specfleet.engine.models import ModelSet

    models = ModelSet.of(models)
    if models.head is None:
        return []
    target = load_model(models, "target")
    head = build_head(models, max(DRAFTER_BATCHES), target=target).runner
    runner = LlamaRunner(target, slots=max(DRAFTER_BATCHES))
    out = []
    for batch in DRAFTER_BATCHES:
        ms, step = 1e3 * head.time_forward(batch, 1, repeats), 1e3 * runner.time_forward(batch, 1, repeats)
        out.append({"batch": batch, "ms": round(ms, 3), "target_ms": round(step, 3), "vs_target": round(ms / step, 3)})
    return out


def _group_steps(loaded: dict, steps: dict[str, list[dict]], repeats: int) -> dict[str, list[dict]]:
    """One draft level of the first 2, 3, ... drafters of one shape run as one group (the engine's grouped
    forward), per batch size, beside the mean step of one of them alone (`vs_one`)."""
    from specfleet.engine.llama import LlamaRunner, same_shape

    out: dict[str, list[dict]] = {}
    names = list(loaded)
    while names:
        first = names[0]
        members = [n for n in names if same_shape(loaded[first].config, loaded[n].config)]
        names = [n for n in names if n not in members]
        for size in range(2, len(members) + 1):
            group = members[:size]
            runner = LlamaRunner([loaded[n] for n in group], slots=max(DRAFTER_BATCHES))
            points = []
            for i, batch in enumerate(DRAFTER_BATCHES):
                ms = 1e3 * runner.time_forward(batch, 1, repeats)
                one = sum(steps[n][i]["ms"] for n in group) / size
                points.append({"batch": batch, "ms": round(ms, 3), "vs_one": round(ms / one, 2)})
            out["+".join(n.removeprefix("drafter-") for n in group)] = points
    return out


def load(path: Path) -> dict:
    """A profile written by `specfleet profile` (ValueError saying what is wrong otherwise)."""
    try:
        profile = json.loads(Path(path).read_text())
        cost = profile["verify_cost"]
        float(cost["fixed_ms"]), float(cost["per_token_ms"])
    except FileNotFoundError:
        raise ValueError(f"no profile at {path}: write one with `specfleet profile --output {path}`") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a specfleet profile ({exc}); rewrite it with `specfleet profile`") from None
    return profile


def max_batch_tokens(profile: dict, latency_ms: float) -> int:
    """The most tokens one verifier forward may carry to finish within latency_ms, by the profiled cost model
    (at least one sequence's worth: a request is never starved by the cap)."""
    cost = profile["verify_cost"]
    per_token = float(cost["per_token_ms"])
    if per_token <= 0:
        return 1 << 30
    return max(TARGET_TOKENS[-1], int((latency_ms - float(cost["fixed_ms"])) / per_token))


def format_table(profile: dict) -> str:
    rows = profile["target_forward_ms"]
    tokens = sorted({r["tokens"] for r in rows})
    machine = profile.get("machine", {})
    lines = [f"matmul: {machine['matmul']}"] if "matmul" in machine else []
    lines += ["target forward, ms (rows: batch; columns: tokens per sequence)",
              f"{'batch':>6}" + "".join(f"{t:>9}" for t in tokens)]
    for batch in sorted({r["batch"] for r in rows}):
        by = {r["tokens"]: r["ms"] for r in rows if r["batch"] == batch}
        lines.append(f"{batch:>6}" + "".join(f"{by[t]:>9.2f}" for t in tokens))
    lines.append("")
    for name, points in profile["drafter_step_ms"].items():
        lines.append(f"{name} step, ms: " + ", ".join(f"batch {p['batch']}: {p['ms']:.2f}" for p in points))
    for name, points in profile.get("drafter_group_step_ms", {}).items():
        lines.append(f"{name} as one forward, ms: " + ", ".join(
            f"batch {p['batch']}: {p['ms']:.2f} ({p['vs_one']:.2f}x one)" for p in points))
    if profile.get("head_step_ms"):
        steps = profile["head_step_ms"]
        lines.append("draft head step, ms: " + ", ".join(
            f"batch {p['batch']}: {p['ms']:.2f} ({p['vs_target']:.2f}x a target step)" for p in steps))
    c = profile["verify_cost"]
    lines.append(f"\nverifier cost model: {c['fixed_ms']:.2f} ms + {c['per_token_ms']:.3f} ms per token")
    return "\n".join(lines)
