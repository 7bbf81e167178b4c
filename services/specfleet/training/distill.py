"""Distils the drafters from the target: a teacher cache of the target's top-k next-token distribution per
domain, then training of each drafter on its own domains' cache to match it (forward KL or total variation).

The cache is mostly on-policy (DistillSpec, Zhou et al. 2024): most windows are a corpus prompt continued by the
target itself -- sampled at the serving temperature, at T = 1 and greedily -- so that a drafter learns the text it
will be asked to predict when serving, not only the training corpus the target learnt from."""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specfleet.training.acceptance import continuation
from specfleet.training.corpus import DOMAINS
from specfleet.training.tokenizer import load_tokenizer
from specfleet.training.train import (
    DRAFTER_ARCH,
    DRAFTERS,
    Arch,
    autocast,
    count_parameters,
    device_for,
    export_model,
    load_model,
    make_model,
    resolve_precision,
    set_threads,
    token_files,
    validation_loss,
)


@dataclass
class DistillConfig:
    windows_per_domain: int = 1200
    seq: int = 256
    top_k: int = 32
    steps: int = 400
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0
    on_policy: float = 0.75  # share of teacher windows whose tail the target generated itself
    prompt_tokens: int = 64  # corpus tokens before the target's own continuation in an on-policy window
    loss: str = "kl"  # "kl" (forward KL to the teacher's top-k) or "tv" (total variation, what acceptance pays)

    def __post_init__(self):
        if not 0.0 <= self.on_policy <= 1.0:
            raise ValueError(f"on_policy must be in [0, 1], got {self.on_policy}")
        if not 0 < self.prompt_tokens < self.seq:
            raise ValueError(f"prompt_tokens must be in (0, seq = {self.seq}), got {self.prompt_tokens}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")


# How the target continues on-policy windows, in turn: (temperature, top_p); temperature 0 is greedy. Half at the
# serving temperature the benchmarks use, a quarter at T = 1, a quarter greedy.
ON_POLICY_MODES: tuple[tuple[float, float], ...] = ((0.8, 0.95), (0.8, 0.95), (1.0, 1.0), (0.0, 1.0))


# (prompts [n, P], new_tokens, temperature, top_p, seed) -> [n, new_tokens]: the target's own continuations. The
# CLI passes the engine's batched decoding (several times faster than Hugging Face's loop on the CPU); without one,
# `continuation` below does it with the Hugging Face model.
Continue = Callable[[torch.Tensor, int, float, float, int], torch.Tensor]


def on_policy_rows(n: int, share: float) -> list[int]:
    """Indices of the windows (of n) that the target continues itself: share of every 20 consecutive windows."""
    per_20 = round(share * 20)
    return [i for i in range(n) if i % 20 < per_20]


def nucleus_sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """[B, V] logits -> [B, 1] tokens: argmax for temperature 0, else a draw from the tempered nucleus."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # the likeliest token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


@dataclass(frozen=True)
class Recipe:
    """How long each drafter is distilled: optimiser steps and teacher-cache windows per domain."""

    steps: int = 400
    teacher_windows: int = 1200


# python and prose overlap (long docstrings are in both corpora, code blocks in the docs), so their
# specialists need longer distillation to pull apart; prose, the harder domain, also gets more teacher data.
RECIPES: dict[str, Recipe] = {
    "drafter-python": Recipe(steps=1000),
    "drafter-prose": Recipe(steps=1000, teacher_windows=3000),
    "drafter-c": Recipe(),
    "drafter-general": Recipe(),
}


def config_for(name: str, base: DistillConfig, steps: int | None = None, windows: int | None = None) -> DistillConfig:
    """The drafter's recipe applied to the shared settings; explicit steps/windows override the recipe."""
    recipe = RECIPES[name]
    return replace(base, steps=steps or recipe.steps, windows_per_domain=windows or recipe.teacher_windows)


def target_fingerprint(target_dir: Path) -> str:
    """Content hash of the target's weights: a retrained target invalidates caches and drafters built from it."""
    digest = hashlib.sha256()
    with open(target_dir / "model.safetensors", "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


@torch.no_grad()
def build_teacher_cache(target_dir: Path, tokens_dir: Path, cache_dir: Path, cfg: DistillConfig,
                        device_name: str = "auto", windows: dict[str, int] | None = None,
                        generate: Continue | None = None, precision: str = "auto") -> None:
    """Writes cache_dir/{domain}.pt with inputs [N, seq], top-k ids and log-probs [N, seq, k] from the target,
    for the domains in `windows` (N each; default: every domain, cfg.windows_per_domain).

    Windows are corpus text; a cfg.on_policy share of them keep only their first cfg.prompt_tokens and are
    continued by the target itself (ON_POLICY_MODES in turn). The cache is keyed by the target's weights and this
    recipe: a retrained target or another recipe invalidates it; a larger cache serves a smaller one (a prefix).
    """
    windows = windows or {d: cfg.windows_per_domain for d in DOMAINS}
    set_threads()
    device = device_for(device_name)
    precision = resolve_precision(precision, device)
    target = load_model(target_dir, device)
    stamp = target_fingerprint(target_dir)
    recipe = {"on_policy": cfg.on_policy, "prompt_tokens": cfg.prompt_tokens, "modes": ON_POLICY_MODES,
              "seq": cfg.seq, "top_k": cfg.top_k, "seed": cfg.seed}
    recipe = json.loads(json.dumps(recipe))  # tuples as lists, as they come back from the file
    cache_dir.mkdir(parents=True, exist_ok=True)
    train = token_files(tokens_dir, "train")
    for i, (domain, tf) in enumerate(train.items()):
        if domain not in windows:
            continue
        path = cache_dir / f"{domain}.pt"
        if path.exists():
            cached = torch.load(path, weights_only=False)
            if (cached.get("target_stamp") == stamp and cached.get("recipe") == recipe
                    and len(cached["inputs"]) >= windows[domain]):
                continue
        x = tf.windows(np.random.default_rng([cfg.seed, 7, i]), windows[domain], cfg.seq)
        _continue_on_policy(target, x, cfg, domain, generator_seed=cfg.seed * 1000 + i, device=device,
                            generate=generate)
        ids, logps = [], []
        for chunk in tqdm(x.split(16), desc=f"teacher cache {domain}", unit="batch"):
            with autocast(device, precision):
                logits = target(input_ids=chunk.to(device)).logits.float()  # [b, seq, vocab]
            top = torch.log_softmax(logits, dim=-1).topk(cfg.top_k, dim=-1)
            ids.append(top.indices.to(torch.int16).cpu())
            logps.append(top.values.to(torch.float16).cpu())
        torch.save({"inputs": x.to(torch.int16), "top_ids": torch.cat(ids), "top_logps": torch.cat(logps),
                    "target_stamp": stamp, "recipe": recipe}, path)


def _continue_on_policy(target, x: torch.Tensor, cfg: DistillConfig, domain: str, generator_seed: int,
                        device: torch.device, batch: int = 32, generate: Continue | None = None) -> None:
    """Replaces, in place, the tail after cfg.prompt_tokens of the on-policy rows of x [N, seq] with the
    target's own continuation of their prompt, each mode of ON_POLICY_MODES in turn."""
    rows = on_policy_rows(len(x), cfg.on_policy)
    generator = torch.Generator().manual_seed(generator_seed)
    by_mode = [(mode, rows[j::len(ON_POLICY_MODES)]) for j, mode in enumerate(ON_POLICY_MODES)]
    new_tokens = cfg.seq - cfg.prompt_tokens
    with tqdm(total=len(rows), desc=f"on-policy {domain}", unit="window") as bar:
        for m, ((temperature, top_p), mode_rows) in enumerate(by_mode):
            for start in range(0, len(mode_rows), batch):
                chunk = torch.tensor(mode_rows[start:start + batch])
                prompts = x[chunk, :cfg.prompt_tokens]
                if generate is not None:
                    seed = (generator_seed * 100 + m) * 100_000 + start
                    tail = generate(prompts, new_tokens, temperature, top_p, seed)
                else:
                    def pick(logits, _, t=temperature, p=top_p):
                        return nucleus_sample(logits, t, p, generator)
                    tail = continuation(target, prompts.to(device), new_tokens, pick)
                x[chunk, cfg.prompt_tokens:] = tail.cpu()
                bar.update(len(chunk))


def _soft_cross_entropy(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logps: torch.Tensor) -> torch.Tensor:
    # Teacher distribution renormalised over its top-k; equals KL(teacher_k || student) up to a constant.
    teacher = torch.softmax(top_logps.float(), dim=-1)  # [b, seq, k]
    student = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, top_ids.long())  # [b, seq, k]
    return -(teacher * student).sum(-1).mean()


def _total_variation(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logps: torch.Tensor) -> torch.Tensor:
    # TV(p, q) = 1 - sum min(p, q): one minus the chance a sampled draft is accepted (the teacher renormalised over
    # its top-k, so the student's mass outside those k counts fully against it).
    teacher = torch.softmax(top_logps.float(), dim=-1)  # [b, seq, k]
    student = torch.softmax(student_logits.float(), dim=-1).gather(-1, top_ids.long())  # [b, seq, k]
    return (1.0 - torch.minimum(teacher, student).sum(-1)).mean()


LOSSES = {"kl": _soft_cross_entropy, "tv": _total_variation}


def train_drafter(name: str, target_dir: Path, tokens_dir: Path, cache_dir: Path, out_dir: Path,
                  cfg: DistillConfig, device_name: str = "auto", arch: Arch = DRAFTER_ARCH,
                  precision: str = "auto") -> dict:
    """Distils one drafter (name in DRAFTERS) from the cached teacher outputs of its domains.

    Skips a drafter already distilled from this very target with this configuration (so an interrupted
    `specfleet train drafters` resumes at the first drafter not yet done).
    """
    stamp = target_fingerprint(target_dir)
    info_path = out_dir / name / "training.json"
    if info_path.exists():
        done = json.loads(info_path.read_text())
        if done.get("target_fingerprint") == stamp and done.get("run") == asdict(cfg):
            tqdm.write(f"{name}: already distilled from this target with this configuration, skipping")
            return done
    set_threads()
    device = device_for(device_name)
    precision = resolve_precision(precision, device)
    domains = DRAFTERS[name]
    tok = load_tokenizer(target_dir)
    model = make_model(arch, tok, cfg.seed + zlib.crc32(name.encode()) % 1000).to(device)
    caches = [torch.load(cache_dir / f"{d}.pt", weights_only=False) for d in domains]
    n = cfg.windows_per_domain
    inputs = torch.cat([c["inputs"][:n] for c in caches])
    top_ids = torch.cat([c["top_ids"][:n] for c in caches])
    top_logps = torch.cat([c["top_logps"][:n] for c in caches])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    start = time.time()
    model.train()
    bar = tqdm(range(cfg.steps), desc=name, unit="step")
    for step in bar:
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = torch.from_numpy(rng.integers(0, len(inputs), size=cfg.batch))
        x = inputs[rows].long().to(device)
        with autocast(device, precision):
            logits = model(input_ids=x).logits
        loss = LOSSES[cfg.loss](logits, top_ids[rows].to(device), top_logps[rows].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix({cfg.loss: f"{loss.item():.3f}"})
    val = validation_loss(model, token_files(tokens_dir, "val"), device)
    info = {"role": "drafter", "name": name, "domains": list(domains), "arch": asdict(arch),
            "parameters": count_parameters(model), "distilled_from": "target", "target_fingerprint": stamp,
            "teacher_top_k": cfg.top_k,
            "tokens_seen": cfg.steps * cfg.batch * cfg.seq, "train_seconds": round(time.time() - start),
            "validation_loss": val, "run": asdict(cfg), "device": str(device), "precision": precision}
    export_model(model, tok, out_dir / name, info)
    tqdm.write(f"{name}: validation loss {val}")
    return info


def distill_all(target_dir: Path, tokens_dir: Path, cache_dir: Path, models_dir: Path, base: DistillConfig,
                names: list[str] | None = None, device_name: str = "auto", steps: int | None = None,
                windows: int | None = None, generate: Continue | None = None, precision: str = "auto") -> list[dict]:
    """Distils the named drafters (default all) by their recipes, building the teacher cache they need once."""
    configs = {n: config_for(n, base, steps, windows) for n in (names or list(DRAFTERS))}
    needed: dict[str, int] = {}
    for name, cfg in configs.items():
        for domain in DRAFTERS[name]:
            needed[domain] = max(needed.get(domain, 0), cfg.windows_per_domain)
    build_teacher_cache(target_dir, tokens_dir, cache_dir, base, device_name, windows=needed, generate=generate,
                        precision=precision)
    return [train_drafter(n, target_dir, tokens_dir, cache_dir, models_dir, cfg, device_name, precision=precision)
            for n, cfg in configs.items()]
