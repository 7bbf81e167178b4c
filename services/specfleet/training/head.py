"""The draft head: an EAGLE-style drafter that reads the target's own features, and its training on the CPU.

Recipe (EAGLE-1/2 architecture, EAGLE-3/HASS training-time test):
- Input at position i: the target's feature f_i (its last hidden state after the final norm, the vector its LM head
  reads) and the embedding of the next token x_{i+1}, joined by one linear layer `fc` [2H -> H]; one Llama decoder
  layer over those inputs (causal attention, its own KV cache); the head's final norm gives the predicted feature
  f^_{i+1}, and the target's own LM head turns it into the draft distribution for x_{i+2}. The next draft level
  feeds (f^_{i+1}, embedding of the drafted token) at position i+1: the head is sequentially dependent, so a chain
  of drafts stays coherent (unlike Medusa's independent heads).
- Loss: SmoothL1 between f^ and the target's next feature, plus 0.1 x cross-entropy to the target's next-token
  distribution (EAGLE's weights; soft labels, so sampled drafting follows the target's distribution).
- Training-time test: pass 1 (and further passes, `passes`) feeds the head its *own* predicted features, with the
  attention each position would see while drafting (the context's true features, then its own chain), so errors
  do not compound at depth 2+ (HASS, EAGLE-3). Uniform noise on the true features (EAGLE) does the same for pass 0.
Why this recipe: EAGLE's feature-level drafting is what gives its 2x acceptance over an independent 68 M drafter and
Hydra++'s over Medusa; EAGLE-3's multi-layer feature fusion and reduced vocabulary buy little for a 10-layer, 8 k
vocabulary target and would cost a second feature path through the fleet. The head reuses the target's embedding
and LM head (frozen, not stored): it ships as ~2 M parameters.

Files of a head folder: `config.json` (a one-layer Llama config, the shape of the head's decoder), `head.safetensors`
(fc, the layer and the final norm, stored in bfloat16), `head.json` (the fingerprint of the target it was trained
for, and its training record). A head is refused for any other target.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEAD_FILE = "head.safetensors"
HEAD_INFO = "head.json"
FORMAT = 1
PASSES = 2  # training-time test: the true features, then the head's own (a third pass costs a third more per step)
REGRESSION_WEIGHT, CE_WEIGHT, NOISE = 1.0, 0.1, 0.2  # EAGLE's: SmoothL1 + 0.1 CE, uniform noise of width 0.2


def target_fingerprint(target_dir: Path) -> str:
    """A short hash of the target's weight files: a head reads one target's features and no other's."""
    digest = hashlib.sha256()
    files = sorted(Path(target_dir).glob("*.safetensors")) or sorted(Path(target_dir).glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files in {target_dir}")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def head_config(target_config):
    """The head's decoder: one layer of the target's width, heads and rotary settings."""
    from transformers import LlamaConfig

    cfg = target_config.to_dict()
    for key in ("_name_or_path", "architectures", "transformers_version"):
        cfg.pop(key, None)
    cfg.pop("layer_types", None)
    cfg.update(num_hidden_layers=1, tie_word_embeddings=True)
    return LlamaConfig(**cfg)


# The head's weights by their names in the head file (Hugging Face Llama names for the layer and norm).
def _names() -> list[str]:
    att, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    return (["fc.weight", "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
             "model.norm.weight"] + [att + p + ".weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            + [mlp + p + ".weight" for p in ("gate_proj", "up_proj", "down_proj")])


HEAD_WEIGHTS = tuple(_names())
# Optional: the draft vocabulary (EAGLE-3's reduced vocabulary), the token ids the head may draft, ascending. The
# head's LM head is then the target's rows for those ids only: a draft level reads a fraction of the LM head, the
# largest part of a one-layer head's step. Acceptance compares tokens, so drafts from a subset stay lossless.
DRAFT_VOCAB = "draft_vocab"


def draft_vocabulary(tokens_dir: Path, size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The `size` most frequent token ids of the training split over every domain (and `always`, e.g. EOS),
    ascending."""
    files = _split_files(tokens_dir, "train")
    if not files:
        raise FileNotFoundError(f"no training tokens in {tokens_dir}: run `specfleet train corpus` and "
                                "`specfleet train tokenizer` first")
    counts = sum(np.bincount(np.asarray(tf.ids), minlength=1 << 16) for tf in files.values())
    for token in always:
        counts[token] = np.iinfo(np.int64).max
    top = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(np.sort(top).astype(np.int64))


def vocabulary_coverage(tokens_dir: Path, vocab: torch.Tensor) -> dict[str, float]:
    """Per domain, the share of the validation split's tokens inside a draft vocabulary."""
    inside = np.zeros(1 << 16, dtype=bool)
    inside[vocab.numpy()] = True
    return {domain: round(float(inside[np.asarray(tf.ids)].mean()), 4)
            for domain, tf in _split_files(tokens_dir, "val").items()}


def _split_files(tokens_dir: Path, split: str) -> dict:
    """The domains' token files of one split that exist in tokens_dir."""
    from specfleet.training.train import TokenFile

    return {path.name.split(".")[0]: TokenFile(path) for path in sorted(Path(tokens_dir).glob(f"*.{split}.bin"))}


def copy_with_draft_vocab(head_dir: Path, out_dir: Path, vocab: torch.Tensor | None) -> Path:
    """A copy of a head folder drafting from `vocab` (None: the full vocabulary); the weights are untouched."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(head_dir, out_dir)
    tensors = load_file(Path(head_dir) / HEAD_FILE)
    tensors.pop(DRAFT_VOCAB, None)
    if vocab is not None:
        tensors[DRAFT_VOCAB] = vocab.to(torch.int64).contiguous()
    save_file(tensors, out_dir / HEAD_FILE, metadata={"format": str(FORMAT)})
    return out_dir


def check_draft_vocab(vocab: torch.Tensor, vocab_size: int, where: str) -> torch.Tensor:
    """A stored draft vocabulary as int64 ids, or ValueError naming what is wrong with it."""
    ids = vocab.to(torch.int64)
    if ids.dim() != 1 or len(ids) < 2 or bool((ids[1:] <= ids[:-1]).any()) or int(ids[0]) < 0 \
            or int(ids[-1]) >= vocab_size or vocab.dtype.is_floating_point:
        raise ValueError(f"draft head {where}: {DRAFT_VOCAB} must be >= 2 ascending, distinct integer token ids "
                         f"below the vocabulary size {vocab_size}")
    return ids


class TrainHead(nn.Module):
    """The head for training: the same arithmetic as the runner's one-layer Llama (RMSNorm in float32, rotary,
    SDPA, SiLU MLP), written out so that a pass can attend to keys of earlier passes (training-time test)."""

    def __init__(self, config, embed: torch.Tensor):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        h, i = config.hidden_size, config.intermediate_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or h // self.heads
        self.eps = config.rms_norm_eps
        self.register_buffer("embed", embed.detach().clone(), persistent=False)  # frozen: the target's
        self.w = nn.ParameterDict()
        std = config.initializer_range
        shapes = {"fc.weight": (h, 2 * h), "q_proj": (self.heads * self.head_dim, h),
                  "k_proj": (self.kv_heads * self.head_dim, h), "v_proj": (self.kv_heads * self.head_dim, h),
                  "o_proj": (h, self.heads * self.head_dim), "gate_proj": (i, h), "up_proj": (i, h),
                  "down_proj": (h, i)}
        for name in HEAD_WEIGHTS:
            short = name if name == "fc.weight" else name.split(".")[-2]
            if short in shapes:
                self.w[self._key(name)] = nn.Parameter(torch.randn(shapes[short]) * std)
            else:  # norms
                self.w[self._key(name)] = nn.Parameter(torch.ones(h))
        self.rotary = LlamaRotaryEmbedding(config)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def p(self, name: str) -> torch.Tensor:
        return self.w[self._key(name)]

    def head_state(self) -> dict[str, torch.Tensor]:
        return {name: self.p(name).detach() for name in HEAD_WEIGHTS}

    def load_head_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in HEAD_WEIGHTS:
                self.p(name).copy_(state[name])

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rope(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def inputs(self, features: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """fc(cat(f_i, embedding of x_{i+1})): [B, T, H]."""
        return F.linear(torch.cat([features, F.embedding(next_tokens, self.embed)], dim=-1), self.p("fc.weight"))

    def layer(self, x, positions, past: list[tuple[torch.Tensor, torch.Tensor]], mask):
        """The decoder layer over x [B, T, H] at `positions` [B, T], attending to the keys of `past` passes and its
        own under the boolean `mask` [T, S] (True: visible). Returns (predicted features [B, T, H], its (k, v))."""
        b, t, _ = x.shape
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, None], sin[:, None]
        a = "model.layers.0.self_attn."
        h = self._norm(x, self.p("model.layers.0.input_layernorm.weight"))
        q = F.linear(h, self.p(a + "q_proj.weight")).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = F.linear(h, self.p(a + "k_proj.weight")).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = F.linear(h, self.p(a + "v_proj.weight")).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        keys = torch.cat([pk for pk, _ in past] + [k], dim=2)
        values = torch.cat([pv for _, pv in past] + [v], dim=2)
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             enable_gqa=self.kv_heads != self.heads)
        x = x + F.linear(att.transpose(1, 2).reshape(b, t, -1), self.p(a + "o_proj.weight"))
        m = "model.layers.0.mlp."
        h = self._norm(x, self.p("model.layers.0.post_attention_layernorm.weight"))
        gate, up = F.linear(h, self.p(m + "gate_proj.weight")), F.linear(h, self.p(m + "up_proj.weight"))
        x = x + F.linear(F.silu(gate) * up, self.p(m + "down_proj.weight"))
        return self._norm(x, self.p("model.norm.weight")), (k, v)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.embed)  # the target's LM head (tied to its embedding)

    def unroll(self, features: torch.Tensor, tokens: torch.Tensor, passes: int = PASSES, noise: float = 0.0
               ) -> list[torch.Tensor]:
        """Training-time test over windows: features [B, T, H] (the target's f_0..f_{T-1}), tokens [B, T] (x_1..x_T,
        each position's next token). Pass j's position i feeds the head's pass-(j-1) prediction made at i-1 and
        sees the true context up to i-j, then its own chain (positions i-j+1..i of passes 1..j), as while drafting.
        Returns each pass's predicted features [B, T, H] (pass j is meaningful from position j on)."""
        b, t, _ = features.shape
        positions = torch.arange(t, device=features.device)[None].expand(b, t)
        rows = torch.arange(t, device=features.device)[:, None]
        cols = torch.arange(t, device=features.device)[None]
        if noise:
            features = features + (torch.rand_like(features) - 0.5) * noise
        past: list[tuple[torch.Tensor, torch.Tensor]] = []
        outs = []
        given = features
        for j in range(passes):
            # keys: pass 0 at columns <= i - j, pass j' (1..j) at column i - (j - j') only
            blocks = [cols <= rows - j] + [cols == rows - (j - jj) for jj in range(1, j + 1)]
            mask = torch.cat(blocks, dim=1)
            pred, kv = self.layer(self.inputs(given, tokens), positions, past, mask)
            outs.append(pred)
            past.append(kv)
            given = torch.cat([features[:, :1], pred[:, :-1]], dim=1)  # position i gets the prediction from i-1
        return outs


def save_head(head: TrainHead, config, out_dir: Path, info: dict, draft_vocab: torch.Tensor | None = None) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in head.head_state().items()}
    if draft_vocab is not None:
        tensors[DRAFT_VOCAB] = draft_vocab.to(torch.int64).contiguous()
    save_file(tensors, out_dir / HEAD_FILE, metadata={"format": str(FORMAT)})
    (out_dir / HEAD_INFO).write_text(json.dumps({"format": FORMAT, **info}, indent=2) + "\n")


def read_head(head_dir: Path, target_dir: Path | None) -> tuple[object, dict[str, torch.Tensor], dict]:
    """(config, weights in float32, info) of a head folder; refuses a head of another target or a file whose
    weights are missing or unknown (never ignored)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    head_dir = Path(head_dir)
    for name in ("config.json", HEAD_FILE, HEAD_INFO):
        if not (head_dir / name).exists():
            raise FileNotFoundError(f"no draft head at {head_dir}: {name} is missing (train one with "
                                    "`specfleet train head`)")
    info = json.loads((head_dir / HEAD_INFO).read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"draft head {head_dir}: format {info.get('format')!r} is not {FORMAT}")
    if target_dir is not None:
        want = target_fingerprint(target_dir)
        if info.get("target_fingerprint") != want:
            raise ValueError(f"draft head {head_dir} was trained for target {info.get('target_fingerprint')} but "
                             f"the target at {target_dir} is {want}: a head reads one target's features only; "
                             "retrain it with `specfleet train head`")
    stored = load_file(head_dir / HEAD_FILE)
    vocab = stored.pop(DRAFT_VOCAB, None)
    weights = {k: v.float() for k, v in stored.items()}
    missing, unknown = set(HEAD_WEIGHTS) - set(weights), set(weights) - set(HEAD_WEIGHTS)
    if missing or unknown:
        raise ValueError(f"draft head {head_dir}: weights missing {sorted(missing)}, not implemented "
                         f"{sorted(unknown)}")
    config = LlamaConfig.from_pretrained(head_dir)
    if vocab is not None:
        weights[DRAFT_VOCAB] = check_draft_vocab(vocab, config.vocab_size, str(head_dir))
    return config, weights, info


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class HeadRunConfig:
    steps: int = 3000
    batch: int = 8
    seq: int = 256
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    eval_every: int = 100
    checkpoint_minutes: float = 4.0
    passes: int = PASSES
    draft_vocab: int | None = None  # draft vocabulary size (0: the full vocabulary; None: keep the exported head's)


def _features(target, x: torch.Tensor, device, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target over windows x [B, T+1]: features [B, T+1, H] (after the final norm) and logits."""
    from specfleet.training.train import autocast

    with torch.no_grad(), autocast(device, precision):
        hidden = target.model(input_ids=x).last_hidden_state
        logits = target.lm_head(hidden)
    return hidden.float(), logits.float()


def head_losses(head: TrainHead, target, x: torch.Tensor, device, precision: str, passes: int, noise: float
                ) -> tuple[torch.Tensor, list[dict]]:
    """Loss over windows x [B, T+1] and, per pass, its parts and top-1 agreement with the target's next token."""
    from specfleet.training.train import autocast

    feats, logits = _features(target, x, device, precision)
    f_in, f_next = feats[:, :-1], feats[:, 1:]  # f_0..f_{T-1}; targets f_1..f_T
    p_next = torch.softmax(logits[:, 1:], dim=-1)  # the target's distribution of x_{i+2}
    with autocast(device, precision):
        preds = head.unroll(f_in, x[:, 1:], passes, noise)
    total = torch.zeros((), device=device)
    parts = []
    for j, pred in enumerate(preds):
        pred = pred[:, j:].float()
        reg = F.smooth_l1_loss(pred, f_next[:, j:])
        logp = torch.log_softmax(head.logits(pred), dim=-1)
        ce = -(p_next[:, j:] * logp).sum(-1).mean()
        agree = (logp.argmax(-1) == p_next[:, j:].argmax(-1)).float().mean()
        total = total + (0.8 ** j) * (REGRESSION_WEIGHT * reg + CE_WEIGHT * ce)
        parts.append({"reg": reg.item(), "ce": ce.item(), "top1": agree.item()})
    return total, parts


def train_head(tokens_dir: Path, target_dir: Path, out_dir: Path, run_dir: Path, cfg: HeadRunConfig,
               minutes: float | None, device_name: str = "auto", precision: str = "auto") -> dict:
    """Trains (or resumes) the draft head on the frozen target's features over the three domains' training
    split; evaluates on the validation split every `eval_every` steps (top-1 agreement with the target per pass:
    what acceptance follows) and exports when the validation loss improves."""
    from tqdm import tqdm

    from specfleet.training.corpus import DOMAINS
    from specfleet.training.train import (
        _atomic_save,
        device_for,
        load_model,
        resolve_precision,
        set_threads,
        token_files,
        train_loop,
    )

    set_threads()
    device = device_for(device_name)
    precision = resolve_precision(precision, device)
    target = load_model(target_dir, device)
    for p in target.parameters():
        p.requires_grad_(False)
    config = head_config(target.config)
    fingerprint = target_fingerprint(target_dir)
    torch.manual_seed(cfg.seed)
    head = TrainHead(config, target.model.embed_tokens.weight).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    train, val = token_files(tokens_dir, "train"), token_files(tokens_dir, "val")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    state = {"step": 0, "tokens_seen": 0, "best_val": float("inf"), "history": [], "seconds": 0.0,
             "fingerprint": fingerprint, "schedule_start": 0}
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["state"].get("fingerprint") != fingerprint:
            raise ValueError(f"the head checkpoint in {run_dir} is for another target; delete it to start over")
        head.load_state_dict(ckpt["head"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        print(f"resuming the head from step {state['step']} ({state['tokens_seen']:,} tokens seen)")
    elif (out_dir / HEAD_INFO).exists():
        # No checkpoint on this machine (a fresh clone): continue from the exported head, fresh optimiser state.
        try:
            _, weights, info = read_head(out_dir, target_dir)
        except ValueError as exc:
            print(f"not continuing the head in {out_dir}: {exc}")
        else:
            if cfg.draft_vocab is None and DRAFT_VOCAB in weights:
                cfg.draft_vocab = len(weights[DRAFT_VOCAB])
            head.load_head_state({k: v for k, v in weights.items() if k != DRAFT_VOCAB})
            state.update(step=info["step"], tokens_seen=info["tokens_seen"], seconds=float(info["train_seconds"]),
                         history=info.get("history", []), schedule_start=info["step"], remeasure=True)
            print(f"no checkpoint in {run_dir}: continuing the head exported in {out_dir} at step {state['step']} "
                  "with a fresh optimiser state")

    def evaluate() -> dict:
        head.eval()
        out = {}
        with torch.no_grad():
            for domain, tf in val.items():
                xs = tf.windows(np.random.default_rng(4321), 16, cfg.seq + 1).to(device)
                runs = [head_losses(head, target, chunk, device, precision, cfg.passes, 0.0) for chunk in xs.split(8)]
                out[domain] = {"loss": round(float(np.mean([r[0].item() for r in runs])), 4),
                               "top1": [round(float(np.mean([r[1][j]["top1"] for r in runs])), 4)
                                        for j in range(cfg.passes)]}
        head.train()
        return out

    def save_checkpoint():
        _atomic_save({"head": head.state_dict(), "optimizer": opt.state_dict(), "state": state}, ckpt_path)

    def evaluate_and_export():
        losses = evaluate()
        mean = float(np.mean([v["loss"] for v in losses.values()]))
        state["history"].append({"step": state["step"], "tokens_seen": state["tokens_seen"], "val": losses})
        improved = mean < state["best_val"]
        if improved:
            state["best_val"] = mean
            save_head(head, config, out_dir, {
                "target_fingerprint": fingerprint, "feature": "final-norm hidden state", "passes": cfg.passes,
                "parameters": sum(p.numel() for p in head.parameters()), "step": state["step"],
                "tokens_seen": state["tokens_seen"], "train_seconds": round(state["seconds"]),
                "validation": losses, "run": asdict(cfg), "precision": precision, "history": state["history"],
                **({"draft_vocab": {"size": len(vocab), "validation_coverage": coverage}} if vocab is not None
                   else {})}, vocab)
        tqdm.write(f"step {state['step']}: val {json.dumps(losses)} mean {mean:.4f}"
                   f"{' (exported)' if improved else ''}")

    vocab = None
    if cfg.draft_vocab and cfg.draft_vocab < config.vocab_size:
        eos = getattr(target.config, "eos_token_id", None)
        vocab = draft_vocabulary(tokens_dir, cfg.draft_vocab, () if eos is None else (int(eos),))
        coverage = vocabulary_coverage(tokens_dir, vocab)
        print(f"draft vocabulary: the {len(vocab)} most frequent tokens; validation tokens inside it: {coverage}")
    if state.pop("remeasure", False):  # exports must beat the continued head on this machine's validation split
        state["best_val"] = float(np.mean([v["loss"] for v in evaluate().values()]))
    head.train()
    domains = list(DOMAINS)

    def batch(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, step, 7])
        return torch.cat([train[domains[i % len(domains)]].windows(rng, 1, cfg.seq + 1)
                          for i in range(cfg.batch)]).to(device)

    def loss_of(x: torch.Tensor):
        loss, parts = head_losses(head, target, x, device, precision, cfg.passes, NOISE)
        return loss, {"top1": f"{parts[0]['top1']:.2f}/{parts[-1]['top1']:.2f}"}

    return train_loop("head", cfg, state, opt, head.parameters(), minutes, batch, loss_of, evaluate_and_export,
                      save_checkpoint)

