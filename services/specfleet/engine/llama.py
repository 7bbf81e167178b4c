"""A lean decoder forward over a preallocated, slot-addressed KV cache: the engine's model runner for the target
and the drafters. Same weights and math as Hugging Face's causal LMs of the Llama family (Llama, Mistral, Qwen2,
Qwen3), a fraction of their per-call overhead, and batches of ragged requests with arbitrary (tree) attention in
one call.

Nothing of a checkpoint is silently ignored: `check_config` refuses every model type, config field or value the
runner does not implement, and the runner refuses every weight it does not consume, each with a message naming it.

Cache layout: keys/values [layers, slots, kv_heads, columns, head_dim], columns growing up to max_len as contexts
reach them. Each live request owns one slot; the
engine keeps live requests in slots 0..B-1 so a batch reads a view, never a copy. A token's cache column equals its
position for everything committed (trees sit past the end), which is what the sliding-window mask relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specfleet_kernels import backend_for, cpu_gemm

NEG = torch.finfo(torch.float32).min

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Rotary variants computed by the model's own rotary module from the positions alone. "dynamic" rescales with the
# longest sequence of each call, so cached keys would be rotated by a different rule than new ones: refused.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# Those whose cos/sin at a position depend on that position alone (Hugging Face: position x inverse frequency, then
# cos/sin, elementwise), so a table built once over positions 0..n-1 holds what the module returns for any call.
# longrope picks its frequencies by the call's longest position: computed by the module per forward.
POSITION_ONLY_ROPE = ("default", "linear", "llama3", "yarn")
# Config fields that describe no arithmetic of the forward (bookkeeping, training, generation, labels).
_METADATA = {"_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache",
             "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "id2label", "label2id",
             "problem_type", "return_dict", "output_attentions", "output_hidden_states", "chunk_size_feed_forward",
             "is_encoder_decoder", "attention_dropout", "tokenizer_class", "model_type", "max_window_layers"}


class UnsupportedModel(ValueError):
    """A model type, config field or weight the runner does not implement (refused at load, never ignored)."""


def check_config(cfg) -> None:
    """Raises UnsupportedModel naming the first model type, config field or value the runner does not implement."""
    if cfg.model_type not in FAMILIES:
        raise UnsupportedModel(f"model_type {cfg.model_type!r} is not supported; the runner implements "
                               f"{', '.join(FAMILIES)}")
    known = set(type(cfg)().to_dict())
    extra = sorted(set(cfg.to_dict()) - known - _METADATA)
    if extra:
        raise UnsupportedModel(f"config field(s) {', '.join(extra)} of this {cfg.model_type} checkpoint are not "
                               "implemented by the runner (they would be ignored)")
    for field_name in ("quantization_config",):
        if getattr(cfg, field_name, None):
            raise UnsupportedModel(f"config field {field_name} = {getattr(cfg, field_name)!r} is not implemented")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {cfg.hidden_act!r} is not implemented (only 'silu')")
    rope_type = _rope_type(cfg)
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(f"rope_parameters rope_type {rope_type!r} is not implemented; supported: "
                               f"{', '.join(ROPE_TYPES)}")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModel(f"pretraining_tp = {cfg.pretraining_tp} is not implemented (only 1)")
    windows = layer_windows(cfg)
    if any(w is not None and w < 1 for w in windows):
        raise UnsupportedModel(f"sliding_window = {cfg.sliding_window} is not a window")


def _rope_type(cfg) -> str:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    return rope.get("rope_type", rope.get("type", "default"))


def layer_windows(cfg) -> list[int | None]:
    """Per layer, the sliding attention window (None: full attention), as Hugging Face applies it per family."""
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "mistral":
        return [window] * n
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [None] * n
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModel(f"layer_types {unknown} are not implemented")
    return [window if t == "sliding_attention" else None for t in types]


DEFAULT_KV_CACHE_MEMORY = 4 << 30  # bytes of KV cache per runner unless told otherwise (vLLM's CPU default too)
TREE_ROOM = 64  # cache columns past the last position, for a draft tree
INITIAL_COLUMNS = 256  # KV cache columns per slot allocated at start; more as contexts grow


@dataclass(frozen=True)
class KvLimits:
    """How much KV cache a runner may hold: max_model_len caps positions (prompt + output) below the model's own
    max_position_embeddings; kv_cache_memory (bytes) caps the cache, which then holds fewer slots than asked for
    (requests wait for a slot) -- never slots x max_position_embeddings columns beyond the budget."""

    max_model_len: int | None = None
    kv_cache_memory: int = DEFAULT_KV_CACHE_MEMORY

    def __post_init__(self):
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")


def kv_bytes_per_column(cfg, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of keys and values one token position takes in every layer."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = dtype.itemsize
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * element


@dataclass
class _Layer:
    w_in: torch.Tensor
    w_qkv: torch.Tensor  # q, k and v stacked: one matmul
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm of each head's q and k before the rotation
    k_norm: torch.Tensor | None
    w_post: torch.Tensor
    w_gate_up: torch.Tensor  # gate and up stacked: one matmul
    b_gate_up: torch.Tensor | None
    w_down: torch.Tensor
    b_down: torch.Tensor | None
    window: int | None  # sliding attention window, None for full attention


class _Weights:
    """The model's named parameters, taken one by one; whatever is left at the end was not implemented."""

    def __init__(self, model):
        self.params = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=True)}
        self.taken: set[str] = set()

    def take(self, name: str, required: bool = True) -> torch.Tensor | None:
        if name not in self.params:
            if required:
                raise UnsupportedModel(f"weight {name} is missing")
            return None
        self.taken.add(name)
        return self.params[name]

    def cat(self, names: list[str], required: bool = True) -> torch.Tensor | None:
        parts = [self.take(n, required) for n in names]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise UnsupportedModel(f"weights {', '.join(names)} must all be present or all absent")
        return torch.cat(parts)

    def check_all_taken(self) -> None:
        left = sorted(set(self.params) - self.taken)
        if left:
            shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
            raise UnsupportedModel(f"weight(s) {shown} are not implemented by the runner (they would be ignored)")


def same_shape(a, b) -> bool:
    """Whether two model configs describe the same arithmetic (names and bookkeeping aside)."""
    strip = {"_name_or_path", "transformers_version", "architectures"}
    return ({k: v for k, v in a.to_dict().items() if k not in strip}
            == {k: v for k, v in b.to_dict().items() if k not in strip})


@dataclass
class _Model:
    embed: torch.Tensor
    lm_head: torch.Tensor
    final_norm: torch.Tensor
    layers: list[_Layer]


def _take_weights(model) -> _Model:
    w = _Weights(model)
    embed = w.take("model.embed_tokens.weight")  # [V, hidden]
    tied = "lm_head.weight" not in w.params  # tied to the embedding (named_parameters lists it once)
    lm_head = embed if tied else w.take("lm_head.weight")  # [V, hidden]
    final_norm = w.take("model.norm.weight")
    layers = []
    for i, window in enumerate(layer_windows(model.config)):
        att, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        layers.append(_Layer(
            w_in=w.take(f"model.layers.{i}.input_layernorm.weight"),
            w_qkv=w.cat([att + "q_proj.weight", att + "k_proj.weight", att + "v_proj.weight"]),
            b_qkv=w.cat([att + "q_proj.bias", att + "k_proj.bias", att + "v_proj.bias"], required=False),
            w_o=w.take(att + "o_proj.weight"), b_o=w.take(att + "o_proj.bias", required=False),
            q_norm=w.take(att + "q_norm.weight", required=False),
            k_norm=w.take(att + "k_norm.weight", required=False),
            w_post=w.take(f"model.layers.{i}.post_attention_layernorm.weight"),
            w_gate_up=w.cat([mlp + "gate_proj.weight", mlp + "up_proj.weight"]),
            b_gate_up=w.cat([mlp + "gate_proj.bias", mlp + "up_proj.bias"], required=False),
            w_down=w.take(mlp + "down_proj.weight"), b_down=w.take(mlp + "down_proj.bias", required=False),
            window=window))
    w.check_all_taken()
    return _Model(embed, lm_head, final_norm, layers)


def _stack(parts: list[_Model]) -> _Model:
    """G models of one shape as one: linear weights [G, in, out] (pre-transposed for bmm), biases [G, 1, out],
    norm weights [G, 1, dim], embeddings [G*V, hidden] (member g's ids offset by g*V), LM heads [G, hidden, V]."""
    def linear(ws):
        return None if ws[0] is None else torch.stack([x.t() for x in ws]).contiguous()

    def row(ws):
        return None if ws[0] is None else torch.stack(ws)[:, None].contiguous()

    layers = []
    for i, first in enumerate(parts[0].layers):
        of = [m.layers[i] for m in parts]
        layers.append(_Layer(
            w_in=row([x.w_in for x in of]), w_qkv=linear([x.w_qkv for x in of]), b_qkv=row([x.b_qkv for x in of]),
            w_o=linear([x.w_o for x in of]), b_o=row([x.b_o for x in of]), q_norm=row([x.q_norm for x in of]),
            k_norm=row([x.k_norm for x in of]), w_post=row([x.w_post for x in of]),
            w_gate_up=linear([x.w_gate_up for x in of]), b_gate_up=row([x.b_gate_up for x in of]),
            w_down=linear([x.w_down for x in of]), b_down=row([x.b_down for x in of]), window=first.window))
    return _Model(embed=torch.cat([m.embed for m in parts]), lm_head=linear([m.lm_head for m in parts]),
                  final_norm=row([m.final_norm for m in parts]), layers=layers)


class LlamaRunner:
    def __init__(self, model, slots: int, max_len: int | None = None, limits: KvLimits | None = None):
        """model: one causal LM, or a list of G models of one shape run as a group (drafters: every call feeds
        the same tokens to all G, one batched matmul per weight instead of G forwards; logits come back
        member-major, [G*B, ...]). slots: concurrent requests asked for (fewer when limits.kv_cache_memory cannot
        hold that many); max_len: cache columns per slot (default: the context plus TREE_ROOM)."""
        models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not models:
            raise ValueError("LlamaRunner needs at least one model")
        cfg = models[0].config
        for other in models[1:]:
            if not same_shape(cfg, other.config):
                raise ValueError("models run as one group must share one shape (config); "
                                 f"{getattr(other.config, '_name_or_path', '?')} differs from "
                                 f"{getattr(cfg, '_name_or_path', '?')}")
        check_config(cfg)
        limits = limits or KvLimits()
        self.config = cfg
        self.group = len(models)
        self.vocab_size = cfg.vocab_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.max_positions = min(cfg.max_position_embeddings, limits.max_model_len or cfg.max_position_embeddings)
        self.max_len = max_len or self.max_positions + TREE_ROOM  # room for a tree past the last position
        per_slot = self.max_len * kv_bytes_per_column(cfg, models[0].model.embed_tokens.weight.dtype) * self.group
        fit = limits.kv_cache_memory // per_slot
        if fit < 1:
            raise ValueError(f"a KV cache of {limits.kv_cache_memory / 2**20:.0f} MiB holds no request of "
                             f"{self.max_positions} positions (one needs {per_slot / 2**20:.0f} MiB): lower "
                             "--max-model-len or raise --kv-cache-memory")
        self.slots = min(slots, fit)
        self.rotary = models[0].model.rotary_emb
        # cos/sin rows by position, built with that module (`_cos_sin`): on the CPU, for the position-only types
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_by_table = _rope_type(cfg) in POSITION_ONLY_ROPE
        self._layer_table: cpu_gemm.LayerTable | None = None  # the packed layers for sf_layers, per cache buffers
        self._aranges: dict[int, torch.Tensor] = {}  # arange(n) on the CPU, read only
        parts = [_take_weights(m) for m in models]
        weights = parts[0] if self.group == 1 else _stack(parts)
        self.embed, self.lm_head, self.final_norm = weights.embed, weights.lm_head, weights.final_norm
        self.layers: list[_Layer] = weights.layers
        # fp32 on the CPU: every linear weight packed for specfleet_kernels.cpu_gemm (one sequential pass over the
        # weights per forward, batch-invariant), unless the kernel cannot be built here (then torch's matmul)
        self.matmul = "torch"
        if self.embed.dtype == torch.float32 and self.embed.device.type == "cpu" and cpu_gemm.available():
            self.matmul = "packed"
            self._pack(parts)
        # the device the checkpoint was loaded on (models/ModelSet.device): every tensor the runner makes goes there
        self.device = self.embed.device
        self._rope_by_table = self._rope_by_table and self.device.type == "cpu"
        # the tree kernels for tensors on that device (KV compaction): Triton on CUDA where it runs, else the reference
        self.kernels = backend_for(self.device)
        self.vocab_offsets = torch.arange(self.group, device=self.device)[:, None, None] * self.vocab_size  # [G,1,1]
        self.dtype = self.embed.dtype  # weights, activations and KV cache (the checkpoint as loaded)
        # Columns are allocated as contexts reach them (doubling, up to max_len): memory follows the longest context
        # served, not the model's maximum; the budget above is checked against max_len, the most it can grow to.
        # Member g of a group keeps request slot s in cache row g * slots + s.
        self.columns = min(self.max_len, INITIAL_COLUMNS)
        shape = (len(self.layers), self.group * self.slots, self.kv_heads, self.columns, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def reserve(self, columns: int) -> None:
        """Grows every slot's cache to hold `columns` columns (at most max_len), keeping what it holds."""
        if columns <= self.columns:
            return
        if columns > self.max_len:
            raise ValueError(f"{columns} KV cache columns asked for, the cache holds at most {self.max_len}")
        grown_to = min(self.max_len, max(columns, 2 * self.columns))
        for name in ("k_cache", "v_cache"):
            old = getattr(self, name)
            grown = torch.zeros(*old.shape[:3], grown_to, old.shape[4], dtype=old.dtype, device=old.device)
            grown[:, :, :, :self.columns] = old
            setattr(self, name, grown)
        self.columns = grown_to

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # as Hugging Face's RMSNorm: in float32, back to the activations' dtype, then the weight. The same ops in
        # the same order; the temporaries this function made itself are reused in place (same values, fewer
        # allocations), and weight * normed is normed * weight (one rounded product either way)
        h = x.float()
        normed = (h * h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()).to(x.dtype)
        if self.group == 1:
            return normed.mul_(weight) if weight.dtype == normed.dtype and weight.dim() == 1 else weight * normed
        return (normed.view(self.group, -1, normed.shape[-1]) * weight).view(normed.shape)  # rows member-major

    def _pack(self, parts: list[_Model]) -> None:
        """Every linear weight (and its bias) of the G members as one cpu_gemm.PackedWeight."""
        def packed(name: str, bias: str | None, i: int | None = None):
            def of(part, attr):
                return getattr(part if i is None else part.layers[i], attr)

            weights = [of(p, name) for p in parts]
            biases = None if bias is None or of(parts[0], bias) is None else [of(p, bias) for p in parts]
            if self.group == 1:
                return cpu_gemm.PackedWeight(weights[0], None if biases is None else biases[0])
            return cpu_gemm.PackedWeight(torch.stack(weights), None if biases is None else torch.stack(biases))

        self.lm_head = packed("lm_head", None)
        for i, layer in enumerate(self.layers):
            for weight, bias in (("w_qkv", "b_qkv"), ("w_o", "b_o"), ("w_gate_up", "b_gate_up"),
                                 ("w_down", "b_down")):
                setattr(layer, weight, packed(weight, bias, i))
                setattr(layer, bias, None)  # packed with its weight
        self._layer_table = None  # the weights moved: any table of their addresses is stale
        # one buffer on huge pages: a step streams all of them, and a group's G times as many overflow the TLB
        cpu_gemm.gather([self.lm_head] + [getattr(layer, weight) for layer in self.layers
                                          for weight in ("w_qkv", "w_o", "w_gate_up", "w_down")])

    def keep_logit_rows(self, rows: torch.Tensor) -> None:
        """Logits for these vocabulary ids only, in this order (a draft head's reduced vocabulary)."""
        if self.group != 1:
            raise ValueError("a reduced vocabulary is for a single model, not a group")
        full = self.lm_head_weight()
        kept = full[rows.to(full.device)].contiguous()
        self.lm_head = cpu_gemm.PackedWeight(kept) if self.matmul == "packed" else kept

    def lm_head_weight(self) -> torch.Tensor:
        """The LM head as a [V, hidden] tensor (unpacked)."""
        if isinstance(self.lm_head, cpu_gemm.PackedWeight):
            return self.lm_head.unpack()
        return self.lm_head

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.lm_head, None)

    def _linear(self, x: torch.Tensor, w, b: torch.Tensor | None) -> torch.Tensor:
        if type(w) is cpu_gemm.PackedWeight:
            return w(x)  # its bias packed with it
        if self.group == 1:
            return F.linear(x, w, b)
        flat = x.reshape(self.group, -1, x.shape[-1])  # [G, rows of one member, in]
        y = torch.bmm(flat, w) if b is None else torch.baddbmm(b, flat, w)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, write_cols: torch.Tensor, bias: torch.Tensor,
                logits_at: torch.Tensor | None = None, slots: torch.Tensor | None = None,
                inputs: torch.Tensor | None = None, return_hidden: bool = False, lengths: list[int] | None = None):
        """One forward for the requests in `slots` [B] (None: slots 0..B-1, read as a view with no copy).

        tokens, positions, write_cols: [B, T] (token ids, rotary positions, cache column each token's KV goes to);
        bias: [B, 1, T, S] additive attention bias over cache columns 0..S-1 (0 visible, NEG hidden).
        logits_at: optional [B, m] indices into T; only those positions get logits (saves the vocab matmul).
        inputs: optional [B, T, hidden] input vectors in place of the tokens' embeddings (a draft head's).
        lengths: optional [B]: row b's first lengths[b] tokens are real, the rest padding. The per-token work
        (norms, projections, MLP, logits) then runs on the real tokens only, so one long row (a draft tree, a
        drafter catching up) costs its own tokens, not T for every row; nothing is written for padding.
        Returns logits [B, T or m, V]; with return_hidden, (logits, hidden [B, T, hidden]): every position's last
        hidden state after the final norm, the features a draft head reads. With lengths and no logits_at, logits
        and hidden come back packed: the real tokens in row order, [sum(lengths), ...] (a group's member-major).
        """
        b, t = tokens.shape
        if lengths is not None and len(lengths) != b:
            raise ValueError(f"lengths names {len(lengths)} rows for a batch of {b}")
        # inputs built on the host come to the model's device here, once per forward (a no-op when already there)
        dev = self.device
        tokens, positions, write_cols, bias = tokens.to(dev), positions.to(dev), write_cols.to(dev), bias.to(dev)
        logits_at = None if logits_at is None else logits_at.to(dev)
        slots = None if slots is None else slots.to(dev)
        inputs = None if inputs is None else inputs.to(dev)
        if self.matmul == "packed":  # the C layer runs on packed tokens: padded rows in, padded rows out
            out = self._forward_packed(tokens, positions, write_cols, bias, logits_at, slots, inputs, return_hidden,
                                       [t] * b if lengths is None else lengths)
            if lengths is not None:
                return out
            if return_hidden:
                logits, hidden = out
                return (logits if logits_at is not None else logits.view(self.group * b, t, -1),
                        hidden.view(b, t, -1))
            return out if logits_at is not None else out.view(self.group * b, t, -1)
        if lengths is not None and min(lengths) < t:
            return self._forward_packed(tokens, positions, write_cols, bias, logits_at, slots, inputs,
                                        return_hidden, lengths)
        out = self._forward_padded(tokens, positions, write_cols, bias, logits_at, slots, inputs, return_hidden)
        if lengths is None or logits_at is not None:
            return out
        if return_hidden:  # no padding: the packed layout is the padded one, flattened
            return out[0].flatten(0, 1), out[1].flatten(0, 1)
        return out.flatten(0, 1)

    def _forward_padded(self, tokens, positions, write_cols, bias, logits_at, slots, inputs, return_hidden):
        b, t = tokens.shape
        g = self.group
        n = g * b  # rows: member-major, member j's request i at row j * b + i
        s = bias.shape[-1]
        bias = bias.to(self.dtype)  # SDPA takes a mask of the queries' dtype (NEG stays hidden: -inf in fp16)
        self.reserve(max(s, int(write_cols.max()) + 1))
        if (inputs is not None or return_hidden) and g != 1:
            raise ValueError("input vectors and hidden states are for a single model, not a group")
        if inputs is not None:
            x = inputs.to(self.dtype)
            rows = (torch.arange(b, device=self.device) if slots is None else slots)[:, None].expand(b, t)
        elif g == 1:
            x = F.embedding(tokens, self.embed)  # [B, T, hidden]
            rows = (torch.arange(b, device=self.device) if slots is None else slots)[:, None].expand(b, t)
        else:
            x = F.embedding(tokens[None] + self.vocab_offsets, self.embed).view(n, t, -1)  # [G*B, T, hidden]
            base = torch.arange(b, device=self.device) if slots is None else slots
            rows = (torch.arange(g, device=self.device)[:, None] * self.slots + base[None]).view(n)[:, None].expand(
                n, t)
            positions, write_cols, bias = positions.repeat(g, 1), write_cols.repeat(g, 1), bias.repeat(g, 1, 1, 1)
            slots = rows[:, 0]
        cos, sin = self._cos_sin(x, positions)  # [B, T, head_dim]
        cos, sin = cos[:, None], sin[:, None]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        windowed: dict[int, torch.Tensor] = {}  # window -> the bias with columns beyond it hidden
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.w_in)
            q, k, v = self._linear(h, layer.w_qkv, layer.b_qkv).split([q_size, kv_size, kv_size], dim=-1)
            q, k = q.view(n, t, self.heads, self.head_dim), k.view(n, t, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            q = self._rope(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
            k = self._rope(k.transpose(1, 2), cos, sin)
            v = v.view(n, t, self.kv_heads, self.head_dim)
            kc, vc = self.k_cache[i], self.v_cache[i]  # [slots, kv_heads, max_len, D]
            kc[rows, :, write_cols] = k.transpose(1, 2)  # [B, T, kv_heads, D] into the slots' columns
            vc[rows, :, write_cols] = v
            if slots is None:
                keys, values = kc[:b, :, :s], vc[:b, :, :s]
            else:
                keys, values = kc[:, :, :s].index_select(0, slots), vc[:, :, :s].index_select(0, slots)
            mask = bias
            if layer.window is not None:
                if layer.window not in windowed:  # a key at column c (= its position) is out of a query's window
                    out_of_window = (torch.arange(s, device=self.device)[None, None, None, :]
                                     <= positions[:, None, :, None] - layer.window)
                    windowed[layer.window] = bias.masked_fill(out_of_window, torch.finfo(self.dtype).min)
                mask = windowed[layer.window]
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 enable_gqa=self.kv_heads != self.heads)
            x = x + self._linear(att.transpose(1, 2).reshape(n, t, q_size), layer.w_o, layer.b_o)
            gate, up = self._linear(self._norm(x, layer.w_post), layer.w_gate_up, layer.b_gate_up).chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, layer.w_down, layer.b_down)
        if return_hidden:
            hidden = self._norm(x, self.final_norm)
            picked = hidden if logits_at is None else hidden.gather(
                1, logits_at[..., None].expand(b, logits_at.shape[1], hidden.shape[-1]))
            return self._logits(picked), hidden
        if logits_at is not None:
            at = logits_at if g == 1 else logits_at.repeat(g, 1)
            x = x.gather(1, at[..., None].expand(n, at.shape[1], x.shape[-1]))
        x = self._norm(x, self.final_norm)
        return self._logits(x)

    def _arange(self, n: int) -> torch.Tensor:
        """torch.arange(n) on the runner's device, made once (callers never write into it)."""
        got = self._aranges.get(n)
        if got is None:
            got = self._aranges[n] = torch.arange(n, device=self.device)
        return got

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What self.rotary(x, positions) returns, [*positions.shape, head_dim]: for the position-only rope types
        on the CPU, rows of a table the module computed once over positions 0..n-1 (grown as positions reach
        it; tests/unit/test_rope_table.py holds it bit for bit to the module), else the module itself."""
        if not self._rope_by_table:
            return self._cos_sin_of_module(x, positions)
        table = self._rope_table
        flat = positions.reshape(-1)
        if table is not None:
            try:
                return (table[0].index_select(0, flat).view(*positions.shape, -1),
                        table[1].index_select(0, flat).view(*positions.shape, -1))
            except IndexError:  # a position past the table (or a negative one)
                pass
        need = max(int(flat.max()) + 1 if len(flat) else 1, self.columns)
        if (len(flat) and int(flat.min()) < 0) or need > self.max_len:  # no table past the cache's positions
            return self._cos_sin_of_module(x, positions)
        size = min(max(need, 2 * len(table[0])), self.max_len) if table is not None else need
        cos, sin = self.rotary(torch.empty(0, dtype=self.dtype, device=self.device),
                               torch.arange(size, device=self.device)[None])
        self._rope_table = (cos[0].contiguous(), sin[0].contiguous())
        return self._cos_sin(x, positions)

    def _cos_sin_of_module(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:  # the module's positions are [batch, tokens]
            cos, sin = self.rotary(x, positions[None])
            return cos[0], sin[0]
        return self.rotary(x, positions)

    def _layers_table(self) -> cpu_gemm.LayerTable:
        """The packed layers' table for one sf_layers call (rebuilt when `reserve` reallocated the caches)."""
        table = self._layer_table
        if table is None or table.key != (self.k_cache.data_ptr(), self.v_cache.data_ptr()):
            table = self._layer_table = cpu_gemm.LayerTable(
                [dict(w_in=layer.w_in, w_post=layer.w_post, qkv=layer.w_qkv, o=layer.w_o, gate_up=layer.w_gate_up,
                      down=layer.w_down, q_norm=layer.q_norm, k_norm=layer.k_norm, window=layer.window)
                 for layer in self.layers], groups=self.group, heads=self.heads,
                hidden=self.embed.shape[-1], eps=self.eps, k_cache=self.k_cache, v_cache=self.v_cache)
        return table

    def _forward_packed(self, tokens, positions, write_cols, bias, logits_at, slots, inputs, return_hidden,
                        lengths):
        """`forward` with padding: the real tokens (P of them over the G members, member-major) go through every
        per-token layer packed [P, ...]; only attention sees rows of T (queries scattered into them and back)."""
        b, t = tokens.shape
        g = self.group
        n = g * b
        s = bias.shape[-1]
        bias = bias.to(self.dtype)
        if (inputs is not None or return_hidden) and g != 1:
            raise ValueError("input vectors and hidden states are for a single model, not a group")
        dev = self.device
        fused = self.matmul == "packed"  # every layer in one call of cpu_gemm's sf_layers
        # no padding (every row's length is t): every token is real, in order, and nothing is gathered
        full = fused and b * t > 0 and all(length == t for length in lengths)
        if full:
            real, count = None, b * t
            flat_cols = write_cols.reshape(-1)
            if flat_cols.dtype != torch.long:
                raise ValueError("write columns must be int64")
            # the C layers write where they are told: slots and columns are checked here, on the host
            low, high = (flat_cols.aminmax() if count > 8 else (None, None))
            listed = None if count > 8 else flat_cols.tolist()
            low, high = (min(listed), max(listed)) if listed is not None else (int(low), int(high))
            if low < 0:
                raise ValueError(f"slots must be in [0, {self.slots}) and write columns >= 0")
            self.reserve(max(s, high + 1))
            if slots is None:
                if b > self.slots:
                    raise ValueError(f"slots must be in [0, {self.slots}) and write columns >= 0")
                base = self._arange(b) if dev.type == "cpu" else torch.arange(b, device=dev)
            else:
                listed = slots.tolist()
                if min(listed) < 0 or max(listed) >= self.slots:
                    raise ValueError(f"slots must be in [0, {self.slots}) and write columns >= 0")
                base = slots.long()
            at = base[None] if g == 1 else torch.arange(g, device=dev)[:, None] * self.slots + base[None]  # [G, B]
            rows = at[:, :, None].expand(g, b, t).reshape(-1).contiguous()  # [P]
            cols = flat_cols.contiguous() if g == 1 else flat_cols.repeat(g)
            if inputs is not None:
                x = inputs.to(self.dtype).reshape(count, -1)
                # the layers write into x: never into the caller's tensor
                x = (x.clone(memory_format=torch.contiguous_format) if x.data_ptr() == inputs.data_ptr()
                     else x.contiguous())
            elif g == 1:
                x = F.embedding(tokens.reshape(-1), self.embed)  # [P, hidden]
            else:
                x = F.embedding(tokens.reshape(1, -1) + self.vocab_offsets.view(g, 1), self.embed).view(g * count, -1)
            bias_rows = self._arange(count) if g == 1 else self._arange(count).repeat(g)
            token_positions = positions.reshape(-1)
            if g != 1:
                token_positions = token_positions.repeat(g)
            cos, sin = self._cos_sin(x, token_positions)  # [P, head_dim]
            self._layers_table()(x, cos.contiguous(), sin.contiguous(), rows, cols, bias.contiguous(), bias_rows,
                                 token_positions.contiguous())
            picked = None
            if logits_at is not None:  # each row's indices into T, as packed rows
                picked = (self._arange(b) * t)[:, None] + logits_at  # [B, m]
                if g != 1:
                    picked = (torch.arange(g, device=dev)[:, None, None] * count + picked[None]).view(n, -1)
            return self._packed_logits(x, picked, return_hidden, n)
        self.reserve(max(s, int(write_cols.max()) + 1))
        real = (torch.arange(t, device=dev)[None] < torch.tensor(lengths, device=dev)[:, None]).flatten().nonzero()[
            :, 0]  # [N] in B*T
        count = len(real)
        base = torch.arange(b, device=dev) if slots is None else slots
        at = torch.arange(g, device=dev)[:, None] * self.slots + base[None]  # [G, B]: each member's cache row
        rows = at[:, :, None].expand(g, b, t).reshape(g, b * t)[:, real].reshape(-1)  # [P]
        cols = write_cols.flatten()[real].repeat(g)  # [P]
        where = (torch.arange(g, device=dev)[:, None] * (b * t) + real[None]).reshape(-1)  # [P]: rows in n*T
        if inputs is not None:
            x = inputs.to(self.dtype).flatten(0, 1)[real]  # [P, hidden]
        else:
            x = F.embedding(tokens.flatten()[real][None] + self.vocab_offsets.view(g, 1), self.embed).view(
                g * count, -1)
        read = None if slots is None and g == 1 else at.reshape(n)
        if fused:
            x = x.contiguous()
            bias_rows = real.repeat(g)  # each token's row of the bias [B*T, S] (every member's alike)
            token_positions = positions.flatten()[real].repeat(g).contiguous()
            flat_bias = bias.contiguous()
        if g != 1:
            positions, bias = positions.repeat(g, 1), bias.repeat(g, 1, 1, 1)
        cos, sin = self._cos_sin(x[None], positions.flatten()[real].repeat(g)[None])  # [1, P, head_dim]
        if fused:  # the C layer writes where it is told: out-of-range slots or columns are refused here
            live = [r for r, length in zip(range(b) if slots is None else slots.tolist(), lengths, strict=True)
                    if length]  # the slots of rows with a real token (the host's lists: one reduction, not three)
            if live and (min(live) < 0 or max(live) >= self.slots or int(cols.min()) < 0):
                raise ValueError(f"slots must be in [0, {self.slots}) and write columns >= 0")
            self._layers_table()(x, cos[0].contiguous(), sin[0].contiguous(), rows, cols.contiguous(), flat_bias,
                                 bias_rows, token_positions)
        cos, sin = cos[0, :, None], sin[0, :, None]  # [P, 1, head_dim]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        windowed: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers if not fused else ()):
            h = self._norm(x, layer.w_in)
            q, k, v = self._linear(h, layer.w_qkv, layer.b_qkv).split([q_size, kv_size, kv_size], dim=-1)
            q, k = q.view(-1, self.heads, self.head_dim), k.view(-1, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)  # [P, heads, D]
            v = v.view(-1, self.kv_heads, self.head_dim)
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, cols] = k
            vc[rows, :, cols] = v
            if read is None:
                keys, values = kc[:b, :, :s], vc[:b, :, :s]
            else:
                keys, values = kc[:, :, :s].index_select(0, read), vc[:, :, :s].index_select(0, read)
            mask = bias
            if layer.window is not None:
                if layer.window not in windowed:
                    out_of_window = (torch.arange(s, device=self.device)[None, None, None, :]
                                     <= positions[:, None, :, None] - layer.window)
                    windowed[layer.window] = bias.masked_fill(out_of_window, torch.finfo(self.dtype).min)
                mask = windowed[layer.window]
            padded = q.new_zeros(n * t, self.heads, self.head_dim)
            padded[where] = q
            att = F.scaled_dot_product_attention(padded.view(n, t, self.heads, self.head_dim).transpose(1, 2),
                                                 keys, values, attn_mask=mask,
                                                 enable_gqa=self.kv_heads != self.heads)  # [n, heads, T, D]
            x = x + self._linear(att.transpose(1, 2).reshape(n * t, q_size)[where], layer.w_o, layer.b_o)
            gate, up = self._linear(self._norm(x, layer.w_post), layer.w_gate_up, layer.b_gate_up).chunk(2, dim=-1)
            x = x + self._linear(F.silu(gate) * up, layer.w_down, layer.b_down)
        picked = None
        if logits_at is not None:  # each row's indices into T, as packed rows
            packed_at = torch.full((b * t,), -1, dtype=torch.long, device=dev)
            packed_at[real] = torch.arange(count, device=dev)
            picked = packed_at[(torch.arange(b, device=dev) * t)[:, None] + logits_at]  # [B, m]
            if bool((picked < 0).any()):
                raise ValueError("logits_at names a padding position")
            picked = (torch.arange(g, device=dev)[:, None, None] * count + picked[None]).view(n, -1)  # [n, m]
        return self._packed_logits(x, picked, return_hidden, n)

    def _packed_logits(self, x: torch.Tensor, picked: torch.Tensor | None, return_hidden: bool, n: int):
        """The packed forward's end: the final norm, logits at `picked` ([n, m] packed rows; None: every row)."""
        if return_hidden:
            hidden = self._norm(x, self.final_norm)
            return self._logits(hidden if picked is None else hidden[picked]), hidden
        x = self._norm(x if picked is None else x[picked.flatten()], self.final_norm)
        logits = self._logits(x)
        return logits if picked is None else logits.view(n, picked.shape[1], -1)

    @torch.no_grad()
    def keep(self, slot: int, start: int, columns: torch.Tensor | list[int]) -> None:
        """KV compaction for one slot: columns [m] (all >= start) move to start..start+m-1, in that order. A list
        is checked on the host (no device sync when nothing moves)."""
        if isinstance(columns, list):
            if columns == list(range(start, start + len(columns))):
                return
            columns = torch.tensor(columns, dtype=torch.long, device=self.device)
        columns = columns.to(self.device)
        if len(columns) == 0 or bool((columns == torch.arange(start, start + len(columns), device=self.device)).all()):
            return
        for row in range(slot, self.group * self.slots, self.slots):  # the slot's row of every member
            for cache in (self.k_cache, self.v_cache):
                # [layers, kv_heads, max_len, D] viewed as a batch of layers: gather then write back
                moved = self.kernels.gather_kv(cache[:, row], columns[None].expand(cache.shape[0], -1))
                cache[:, row, :, start:start + len(columns)] = moved

    def time_forward(self, batch: int, tokens: int, repeats: int = 3) -> float:
        """Fastest seconds of a forward of `tokens` tokens in each of `batch` slots (profiling; call it before any
        request is live: it overwrites the first columns of those slots). The minimum, not the median: other work
        on the machine only ever adds time, and one slow sample must not price speculation out for good."""
        import time

        batch = min(batch, self.slots)
        ids = torch.zeros(batch, tokens, dtype=torch.long, device=self.device)
        cols = torch.arange(tokens, device=self.device)[None].expand(batch, tokens)
        bias = causal_bias([0] * batch, [tokens] * batch, tokens, device=self.device)
        times = []
        for _ in range(repeats + 1):
            self._synchronize()
            start = time.perf_counter()
            self.forward(ids, cols, cols, bias)
            self._synchronize()  # a CUDA forward returns before it is done
            times.append(time.perf_counter() - start)
        return min(times[1:])  # the first call warms caches

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copies a request's first `length` KV columns to another slot (keeps live slots packed at 0..B-1)."""
        for member in range(0, self.group * self.slots, self.slots):
            for cache in (self.k_cache, self.v_cache):
                cache[:, member + dst, :, :length] = cache[:, member + src, :, :length]


def common_prefix(cached: list[int], tokens: list[int]) -> int:
    """Length of the longest common prefix: how many cached KV columns a slot can keep for `tokens`."""
    n = min(len(cached), len(tokens))
    if cached[:n] == tokens[:n]:  # the usual case (the request only grew): one C-level compare
        return n
    return next(i for i in range(n) if cached[i] != tokens[i])


def causal_bias(starts: list[int], lengths: list[int], width: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """[B, 1, T, width] bias for feeding chains: row b feeds lengths[b] tokens written at starts[b]..; each sees
    columns < starts[b] + its index. Padding queries (past lengths[b]) see column 0 only (no all-hidden row).
    Built on the host, then moved to `device` in one copy (default: stays on the CPU; the runner moves it)."""
    b, t = len(starts), max(lengths)
    cols = torch.arange(width, device="cpu")
    bias = torch.full((b, 1, t, width), NEG, device="cpu")
    for r, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        visible = cols[None, :] <= (start + torch.arange(n, device="cpu"))[:, None]  # [n, width]
        bias[r, 0, :n] = torch.where(visible, 0.0, NEG)
        bias[r, 0, n:, 0] = 0.0
    return bias if device is None else bias.to(device)
