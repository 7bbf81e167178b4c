"""`specfleet simulate --profile`: times a few forwards of the real bundled models on this machine and turns them
into the local preset's step costs (interpolated per shape, as from bench/profile.json).

Timings on a shared machine are noisy; the committed benchmarks (`bench/*.json`) stay the default source."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from specfleet_operator.simulator.costs import CostModel, profiled_costs

SHAPES = ((1, 1), (1, 5), (4, 1), (4, 5), (16, 1), (16, 5))  # (batch, tokens per sequence)


def profile_models(models_dir: Path, drafter: str = "drafter-general", repeats: int = 5) -> dict:
    """Median ms of target forwards at SHAPES and drafter steps at batch 1, 4, 16 (one token each)."""
    import torch

    from specfleet.engine.factory import load_model
    from specfleet.engine.llama import LlamaRunner

    with torch.no_grad():
        target = LlamaRunner(load_model(models_dir, "target"), slots=16)
        target_ms = [{"batch": b, "tokens": t, "ms": round(target.time_forward(b, t, repeats) * 1e3, 3)}
                     for b, t in SHAPES]
        small = LlamaRunner(load_model(models_dir, drafter), slots=16)
        drafter_ms = [{"batch": b, "tokens": 1, "ms": round(small.time_forward(b, 1, repeats) * 1e3, 3)}
                      for b in (1, 4, 16)]
    return {"target_forward_ms": target_ms, "drafter_step_ms": drafter_ms, "drafter": drafter,
            "torch_threads": torch.get_num_threads()}


def apply_profile(costs: CostModel, profile: dict) -> CostModel:
    """The cost model with its target and drafter steps taken from the profile (the same per-shape interpolation as
    bench/profile.json); the engine's per-round overhead around the forward, if the model has one, is kept."""
    target, drafter = profiled_costs(profile)
    target = replace(target, overhead_ms=getattr(costs.target, "overhead_ms", 0.0))
    return replace(costs, target=target, drafter=drafter, source=costs.source + "; steps profiled by --profile")
