"""Builds an engine from a models folder and a proposer name: the one place the CLI, the benchmark and the
services turn `--proposer fused --drafters python,prose` into objects."""

from __future__ import annotations

from pathlib import Path

from specfleet.engine.proposers import NgramProposer, NoProposer, Proposer
from specfleet.training.family import DRAFTER_NAMES

PROPOSERS = ("fused", "model", "suffix", "ngram", "none")  # fused = CoSine fusion of the drafters + suffix trees
DEFAULT_DRAFTERS = {"fused": ("python", "prose", "c"), "model": ("general",)}


def parse_drafters(text: str | None, proposer: str) -> tuple[str, ...]:
    """`python,prose` -> ("python", "prose"); None -> the proposer's default. Raises ValueError on unknown names."""
    if not text:
        return DEFAULT_DRAFTERS.get(proposer, ())
    names = tuple(n.strip().removeprefix("drafter-") for n in text.split(",") if n.strip())
    known = tuple(n.removeprefix("drafter-") for n in DRAFTER_NAMES)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown drafter(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    if proposer == "model" and len(names) != 1:
        raise ValueError("--proposer model drafts with exactly one drafter; use --proposer fused for several")
    return names


def load_model(models_dir: Path, name: str):
    from specfleet.training.train import load_model as load

    path = Path(models_dir) / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path} (expected a Hugging Face folder with config.json); the "
                                "bundled ones are in models/, or rebuild them with `make models`")
    return load(path)


def build_proposer(kind: str, models_dir: Path, drafters: tuple[str, ...], slots: int) -> Proposer:
    if kind == "none":
        return NoProposer()
    if kind == "ngram":
        return NgramProposer()
    if kind == "suffix":
        from specfleet.engine.suffix import SuffixProposer

        return SuffixProposer()
    if kind in ("model", "fused"):
        from specfleet.engine.drafters import DrafterModel, ModelProposer

        models = ModelProposer([DrafterModel(n, load_model(models_dir, f"drafter-{n}"), slots) for n in drafters])
        if kind == "model":
            return models
        from specfleet.engine.proposers import MergedProposer
        from specfleet.engine.suffix import SuffixProposer

        # the suffix tree costs microseconds and catches what the text repeats; the drafters handle the rest
        return MergedProposer([models, SuffixProposer(max_tree_nodes=8)], name="fused")
    raise ValueError(f"unknown proposer {kind!r}; choose from {', '.join(PROPOSERS)}")


def build_engine(models_dir: Path, proposer: str = "fused", drafters: str | tuple[str, ...] | None = None,
                 batch_size: int = 8, k: int = 4, adaptive: bool = True, target=None):
    """Returns a SpecEngine; `target` may be passed to share one loaded target between engines."""
    from specfleet.engine.control import SpeculationController
    from specfleet.engine.engine import SpecEngine

    names = drafters if isinstance(drafters, tuple) else parse_drafters(drafters, proposer)
    target = target if target is not None else load_model(models_dir, "target")
    policy = None
    if adaptive and proposer != "none":
        policy = SpeculationController(k_max=k, drafters=list(names) or [proposer])
    engine = SpecEngine(target, build_proposer(proposer, models_dir, names, batch_size), max_batch=batch_size, k=k,
                        policy=policy)
    engine.calibrate()
    return engine
