"""Trains the target LM and distils the drafters from it; resumable, seeded, time-boxed.

Target: next-token cross-entropy on an equal mix of the three domains. Drafters: soft cross-entropy to the
target's top-k next-token distribution (KL to the target up to a constant) on their own domain, from a
teacher cache computed once per domain so the four drafters share the target's forward passes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specfleet.training.corpus import DOMAINS
from specfleet.training.family import DRAFTERS  # noqa: F401  (re-exported for distill)
from specfleet.training.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Arch:
    """Llama shape of one model of the family."""

    hidden: int
    layers: int
    intermediate: int
    heads: int


TARGET_ARCH = Arch(hidden=384, layers=10, intermediate=1024, heads=6)
DRAFTER_ARCH = Arch(hidden=128, layers=3, intermediate=384, heads=4)
MAX_POSITIONS = 1024


def set_threads() -> None:
    torch.set_num_threads(int(os.environ.get("SPECFLEET_TORCH_THREADS", os.cpu_count() or 1)))


def device_for(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively: CUDA with bf16, or a CPU with AVX512-BF16/AMX (oneDNN)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 mixed precision where the hardware runs it natively (2.6x a step on an AVX512-BF16 core
    here), else fp32. Weights, optimiser state and gradients stay fp32 either way; only autocast matmuls change."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        print(f"warning: bf16 is emulated on this {device.type} (slow); --precision fp32 may be faster")
    return precision


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def make_model(arch: Arch, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def load_model(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A model folder as a causal LM in eval mode, float32 unless told (offline: the path must exist)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


class TokenFile:
    """A uint16 token file (documents joined by EOS) sampled as fixed-length windows."""

    def __init__(self, path: Path):
        self.path = path
        self.ids = np.memmap(path, dtype=np.uint16, mode="r")

    def windows(self, rng: np.random.Generator, n: int, length: int) -> torch.Tensor:
        starts = rng.integers(0, len(self.ids) - length - 1, size=n)
        return torch.from_numpy(np.stack([self.ids[s:s + length].astype(np.int64) for s in starts]))


def token_files(tokens_dir: Path, split: str) -> dict[str, TokenFile]:
    return {d: TokenFile(tokens_dir / f"{d}.{split}.bin") for d in DOMAINS}


def lr_at(step: int, total: int, peak: float, warmup: int, start: int = 0) -> float:
    """Linear warm-up from `start`, then cosine to 10% of peak at `total`; flat at 10% beyond it.

    `start` is the step a run began from fresh optimiser state (0, or the exported weights' step when a
    clone continues them): Adam's moments start at zero again, so the learning rate warms up again too."""
    if step < start + warmup:
        return peak * (step - start + 1) / warmup
    progress = min(1.0, (step - start - warmup) / max(1, total - start - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validation_loss(model, val: dict[str, TokenFile], device, windows: int = 24, length: int = 256,
                    seed: int = 1234) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) per domain on fixed validation windows."""
    model.eval()
    out = {}
    for domain, tf in val.items():
        x = tf.windows(np.random.default_rng(seed), windows, length).to(device)
        losses = []
        for chunk in x.split(8):
            losses.append(model(input_ids=chunk, labels=chunk).loss.item())
        out[domain] = round(float(np.mean(losses)), 4)
    model.train()
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_model(model, tokenizer, out_dir: Path, info: dict) -> None:
    """Saves a HF folder: fp16 safetensors (half the disk) that load as float32, the tokenizer, training info."""
    import copy

    out_dir.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to("cpu", torch.float16)
    half.save_pretrained(out_dir, safe_serialization=True)
    # Stored in fp16, computed in fp32: with the config saying float32, from_pretrained upcasts on load.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # chat template inside tokenizer_config.json
    (out_dir / "training.json").write_text(json.dumps(info, indent=2) + "\n")


@dataclass
class RunConfig:
    steps: int
    batch: int
    seq: int
    lr: float
    warmup: int
    seed: int
    eval_every: int
    checkpoint_minutes: float


def train_target(tokens_dir: Path, tokenizer_dir: Path, out_dir: Path, run_dir: Path, cfg: RunConfig,
                 minutes: float | None, device_name: str = "auto", arch: Arch = TARGET_ARCH,
                 precision: str = "auto") -> dict:
    """Trains (or resumes) the target; exports to out_dir whenever mean validation loss improves."""
    set_threads()
    device = device_for(device_name)
    precision = resolve_precision(precision, device)
    tok = load_tokenizer(tokenizer_dir)
    model = make_model(arch, tok, cfg.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    train, val = token_files(tokens_dir, "train"), token_files(tokens_dir, "val")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    state = {"step": 0, "tokens_seen": 0, "best_val": float("inf"), "history": [], "seconds": 0.0,
             "schedule_start": 0}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = {"schedule_start": 0, **ckpt["state"]}
        print(f"resuming target from step {state['step']} ({state['tokens_seen']:,} tokens seen)")
    elif (out_dir / "training.json").exists():
        # No checkpoint on this machine (a fresh clone): continue from the exported weights, fresh optimiser.
        info = json.loads((out_dir / "training.json").read_text())
        if info.get("role") == "target" and info.get("arch") == asdict(arch):
            model.load_state_dict(load_model(out_dir, device).state_dict())
            history = info.get("history") or [{"step": info["step"], "tokens_seen": info["tokens_seen"],
                                               "val": info["validation_loss"]}]
            # The validation split is this machine's corpus, which need not be the one the exported loss was
            # measured on: re-measure, so that an export means "better than the weights we started from here".
            losses = validation_loss(model, val, device)
            if losses != info["validation_loss"]:
                history.append({"step": info["step"], "tokens_seen": info["tokens_seen"], "val": losses,
                                "note": "re-measured on a rebuilt corpus"})
            state.update(step=info["step"], tokens_seen=info["tokens_seen"], seconds=float(info["train_seconds"]),
                         best_val=float(np.mean(list(losses.values()))), history=history,
                         schedule_start=info["step"])
            print(f"no checkpoint in {run_dir}: continuing from the weights in {out_dir} at step {state['step']} "
                  f"with a fresh optimiser state (validation here: {losses})")

    def save_checkpoint():
        _atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                      "config": asdict(cfg)}, ckpt_path)

    def evaluate_and_export():
        losses = validation_loss(model, val, device)
        mean = float(np.mean(list(losses.values())))
        state["history"].append({"step": state["step"], "tokens_seen": state["tokens_seen"], "val": losses})
        improved = mean < state["best_val"]
        if improved:
            state["best_val"] = mean
            export_model(model, tok, out_dir, {
                "role": "target", "arch": asdict(arch), "parameters": count_parameters(model),
                "step": state["step"], "tokens_seen": state["tokens_seen"], "train_seconds": round(state["seconds"]),
                "validation_loss": losses, "run": asdict(cfg), "device": str(device), "precision": precision,
                "history": state["history"]})  # the loss curve: tokens seen against validation loss
        tqdm.write(f"step {state['step']}: val {losses} mean {mean:.4f}{' (exported)' if improved else ''}")

    model.train()
    domains = list(DOMAINS)

    def batch(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, step])
        return torch.cat([train[domains[i % len(domains)]].windows(rng, 1, cfg.seq + 1)
                          for i in range(cfg.batch)]).to(device)

    def loss_of(x: torch.Tensor):
        with autocast(device, precision):
            return model(input_ids=x, labels=x).loss, {}

    return train_loop("target", cfg, state, opt, model.parameters(), minutes, batch, loss_of, evaluate_and_export,
                      save_checkpoint)


def train_loop(desc: str, cfg, state: dict, opt, params, minutes: float | None, batch, loss_of, evaluate_and_export,
               save_checkpoint) -> dict:
    """The optimiser loop the target and the draft head share: up to cfg.steps (or `minutes`), each step
    batch(step) -> loss_of(batch) -> (loss, progress-bar extras), clipped, with the learning rate of `lr_at` from the
    run's `schedule_start`; evaluates (and exports) every cfg.eval_every steps and at the end, checkpoints every
    cfg.checkpoint_minutes and at the end. Returns the state."""
    params = list(params)
    start, last_ckpt = time.time(), time.time()
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=desc, unit="step")
    while state["step"] < cfg.steps:
        if minutes is not None and time.time() - start > minutes * 60:
            tqdm.write(f"time budget of {minutes} min reached at step {state['step']}")
            break
        t0 = time.time()
        step = state["step"]
        x = batch(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, state.get("schedule_start", 0))
        loss, extras = loss_of(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens_seen"] += x.numel()
        state["seconds"] += time.time() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{group['lr']:.2e}", **extras)
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps:
            evaluate_and_export()
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            save_checkpoint()
            last_ckpt = time.time()
    bar.close()
    if not state["history"] or state["history"][-1]["step"] != state["step"]:
        evaluate_and_export()
    save_checkpoint()
    return state
