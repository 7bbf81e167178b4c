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
    for name in drafters:
        runner = LlamaRunner(load_model(models, name), slots=max(DRAFTER_BATCHES))
        steps[name] = []
        for batch in DRAFTER_BATCHES:
            steps[name].append({"batch": batch, "ms": round(1e3 * runner.time_forward(batch, 1, repeats), 3)})
            bar.update()
    bar.close()
    fixed, per_token = fit_line([(r["batch"] * r["tokens"], r["ms"]) for r in rows])
    return {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu"},
            "target_forward_ms": rows, "drafter_step_ms": steps,
            "verify_cost": {"fixed_ms": round(fixed, 3), "per_token_ms": round(per_token, 4),
                            "model": "ms = fixed_ms + per_token_ms * (tokens in the forward over all sequences)"}}


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
    lines = ["target forward, ms (rows: batch; columns: tokens per sequence)",
             f"{'batch':>6}" + "".join(f"{t:>9}" for t in tokens)]
    for batch in sorted({r["batch"] for r in rows}):
        by = {r["tokens"]: r["ms"] for r in rows if r["batch"] == batch}
        lines.append(f"{batch:>6}" + "".join(f"{by[t]:>9.2f}" for t in tokens))
    lines.append("")
    for name, points in profile["drafter_step_ms"].items():
        lines.append(f"{name} step, ms: " + ", ".join(f"batch {p['batch']}: {p['ms']:.2f}" for p in points))
    c = profile["verify_cost"]
    lines.append(f"\nverifier cost model: {c['fixed_ms']:.2f} ms + {c['per_token_ms']:.3f} ms per token")
    return "\n".join(lines)
