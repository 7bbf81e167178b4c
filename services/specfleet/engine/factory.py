"""Builds an engine from a model set (or a models folder) and a proposer name: the one place the CLI, the
benchmark and the services turn `--proposer fused --drafters python,prose` into objects."""

from __future__ import annotations

from pathlib import Path

from specfleet.engine.llama import KvLimits
from specfleet.engine.models import ModelSet, check_all
from specfleet.engine.proposers import NgramProposer, NoProposer, Proposer
from specfleet.training.family import DRAFTER_NAMES

# fused = CoSine fusion of the drafters (and the draft head, when named) + suffix trees
PROPOSERS = ("fused", "model", "head", "suffix", "ngram", "none")
# fused: the specialists and, where the model set has one, the draft head (greedy 2.9x plain against 2.4x without it
# at batch 1, bench/engine.json); the controller routes each request to those that earn their cost
DEFAULT_DRAFTERS = {"fused": ("python", "prose", "c", "head"), "model": ("general",)}


def parse_drafters(text: str | None, proposer: str, known: tuple[str, ...] | list[str] | None = None
                   ) -> tuple[str, ...]:
    """`python,prose` -> ("python", "prose"); None -> the proposer's default, as far as the model set has it (the
    draft head only where it has one; where it has none of the default drafters: all of them for fused, the first
    for model). Raises ValueError on names not in `known` (default: the bundled drafters)."""
    known = tuple(known) if known is not None else tuple(n.removeprefix("drafter-") for n in DRAFTER_NAMES)
    if proposer == "head":
        return ("head",)
    if not text:
        default = DEFAULT_DRAFTERS.get(proposer, ())
        models = tuple(n for n in default if n != "head")
        if models and all(n in known for n in models):
            return default if "head" in known else models
        return known if proposer == "fused" else known[:1]
    names = tuple(n.strip().removeprefix("drafter-") for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown drafter(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(known) or '(none: add one with --drafter NAME=PATH)'}")
    if proposer == "model" and len(names) != 1:
        raise ValueError("--proposer model drafts with exactly one drafter; use --proposer fused for several")
    return names


def load_model(models: Path | ModelSet, name: str):
    """The target (name "target") or a drafter (by name, with or without the `drafter-` prefix) of a model set or
    a bundled models folder."""
    from specfleet.training.train import load_model as load

    models = ModelSet.of(models)
    path = models.target if name == "target" else models.drafters.get(name.removeprefix("drafter-"))
    if path is None:
        path = Path(models.target).parent / f"drafter-{name.removeprefix('drafter-')}"  # absent: named in the error
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model at {path} (expected a Hugging Face folder with config.json); the "
                                "bundled ones are in models/, or rebuild them with `make models`")
    return load(path, device=models.torch_device, dtype=models.dtype_for(path))


def build_head(models: Path | ModelSet, slots: int, limits: KvLimits | None = None, target=None):
    """The model set's draft head as a proposer (ValueError when it has none)."""
    from specfleet.engine.head import HeadModel, HeadProposer

    models = ModelSet.of(models)
    if models.head is None:
        raise ValueError("this model set has no draft head: train one with `specfleet train head` or give --head PATH")
    target = target if target is not None else load_model(models, "target")
    return HeadProposer(HeadModel(models.head, target, slots, limits, target_dir=models.target))


def build_proposer(kind: str, models: Path | ModelSet, drafters: tuple[str, ...], slots: int,
                   limits: KvLimits | None = None, stack: bool = True, target=None) -> Proposer:
    """`target`: the loaded target, shared with a draft head (loaded again when not given)."""
    if kind == "none":
        return NoProposer()
    if kind == "ngram":
        return NgramProposer()
    if kind == "suffix":
        from specfleet.engine.suffix import SuffixProposer

        return SuffixProposer()
    if kind == "head":
        return build_head(models, slots, limits, target)
    if kind in ("model", "fused"):
        from specfleet.engine.drafters import ModelProposer, stack_drafters

        head = build_head(models, slots, limits, target) if "head" in drafters else None
        drafters = tuple(n for n in drafters if n != "head")

        # drafters of one shape draft each level in one batched forward (`stack=False`: one forward each)
        loaded = (ModelProposer(stack_drafters([(n, load_model(models, n)) for n in drafters], slots, limits, stack))
                  if drafters or kind == "model" else None)
        if kind == "model":
            return loaded
        from specfleet.engine.proposers import MergedProposer
        from specfleet.engine.suffix import SuffixProposer

        # the suffix tree costs microseconds and catches what the text repeats; the drafters handle the rest
        members = [p for p in (loaded, head) if p is not None]
        return MergedProposer(members + [SuffixProposer(max_tree_nodes=8)], name="fused")
    raise ValueError(f"unknown proposer {kind!r}; choose from {', '.join(PROPOSERS)}")


def build_engine(models: Path | ModelSet, proposer: str = "fused", drafters: str | tuple[str, ...] | None = None,
                 batch_size: int = 8, k: int = 4, adaptive: bool = True, target=None, limits: KvLimits | None = None,
                 stack: bool = True):
    """Returns a SpecEngine; `target` may be passed to share one loaded target between engines. Drafters whose
    vocabulary differs from the target's are refused (ValueError) before anything loads."""
    from specfleet.engine.control import SpeculationController
    from specfleet.engine.engine import SpecEngine

    models = ModelSet.of(models)
    known = tuple(models.drafters) + (("head",) if models.head is not None else ())
    names = drafters if isinstance(drafters, tuple) else parse_drafters(drafters, proposer, known)
    if proposer in ("model", "fused"):
        check_all(models, names)
    target = target if target is not None else load_model(models, "target")
    policy = None
    if adaptive and proposer != "none":
        # the draft head is routed and credited like any drafter: a request drafts with the models that earn it
        policy = SpeculationController(k_max=k, drafters=list(names) or [proposer])
    engine = SpecEngine(target, NoProposer(), max_batch=batch_size, k=k, policy=policy, limits=limits)
    # the drafters hold as many requests as the target's KV budget lets the engine run, over the same context
    engine.use_proposer(build_proposer(proposer, models, names, engine.max_batch,
                                       KvLimits(engine.max_positions, (limits or KvLimits()).kv_cache_memory), stack,
                                       target))
    engine.calibrate()
    return engine
