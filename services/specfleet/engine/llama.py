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

from specfleet_kernels.reference import gather_kv

NEG = torch.finfo(torch.float32).min

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Rotary variants computed by the model's own rotary module from the positions alone. "dynamic" rescales with the
# longest sequence of each call, so cached keys would be rotated by a different rule than new ones: refused.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
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
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(f"rope_parameters rope_type {rope_type!r} is not implemented; supported: "
                               f"{', '.join(ROPE_TYPES)}")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModel(f"pretraining_tp = {cfg.pretraining_tp} is not implemented (only 1)")
    windows = layer_windows(cfg)
    if any(w is not None and w < 1 for w in windows):
        raise UnsupportedModel(f"sliding_window = {cfg.sliding_window} is not a window")


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
    element = torch.empty((), dtype=dtype).element_size()
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


class LlamaRunner:
    def __init__(self, model, slots: int, max_len: int | None = None, limits: KvLimits | None = None):
        """slots: concurrent requests asked for (fewer when limits.kv_cache_memory cannot hold that many);
        max_len: cache columns per slot (default: the context plus TREE_ROOM)."""
        cfg = model.config
        check_config(cfg)
        limits = limits or KvLimits()
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.max_positions = min(cfg.max_position_embeddings, limits.max_model_len or cfg.max_position_embeddings)
        self.max_len = max_len or self.max_positions + TREE_ROOM  # room for a tree past the last position
        per_slot = self.max_len * kv_bytes_per_column(cfg, model.model.embed_tokens.weight.dtype)
        fit = limits.kv_cache_memory // per_slot
        if fit < 1:
            raise ValueError(f"a KV cache of {limits.kv_cache_memory / 2**20:.0f} MiB holds no request of "
                             f"{self.max_positions} positions (one needs {per_slot / 2**20:.0f} MiB): lower "
                             "--max-model-len or raise --kv-cache-memory")
        self.slots = min(slots, fit)
        self.rotary = model.model.rotary_emb
        w = _Weights(model)
        self.embed = w.take("model.embed_tokens.weight")  # [V, hidden]
        tied = "lm_head.weight" not in w.params  # tied to the embedding (named_parameters lists it once)
        self.lm_head = self.embed if tied else w.take("lm_head.weight")  # [V, hidden]
        self.final_norm = w.take("model.norm.weight")
        self.layers: list[_Layer] = []
        for i, window in enumerate(layer_windows(cfg)):
            att, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            self.layers.append(_Layer(
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
        self.dtype = self.embed.dtype  # weights, activations and KV cache (the checkpoint as loaded)
        # Columns are allocated as contexts reach them (doubling, up to max_len): memory follows the longest context
        # served, not the model's maximum; the budget above is checked against max_len, the most it can grow to.
        self.columns = min(self.max_len, INITIAL_COLUMNS)
        shape = (len(self.layers), self.slots, self.kv_heads, self.columns, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.dtype)

    def reserve(self, columns: int) -> None:
        """Grows every slot's cache to hold `columns` columns (at most max_len), keeping what it holds."""
        if columns <= self.columns:
            return
        if columns > self.max_len:
            raise ValueError(f"{columns} KV cache columns asked for, the cache holds at most {self.max_len}")
        grown_to = min(self.max_len, max(columns, 2 * self.columns))
        for name in ("k_cache", "v_cache"):
            old = getattr(self, name)
            grown = torch.zeros(*old.shape[:3], grown_to, old.shape[4], dtype=old.dtype)
            grown[:, :, :, :self.columns] = old
            setattr(self, name, grown)
        self.columns = grown_to

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # as Hugging Face's RMSNorm: in float32, back to the activations' dtype, then the weight
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, write_cols: torch.Tensor, bias: torch.Tensor,
                logits_at: torch.Tensor | None = None, slots: torch.Tensor | None = None) -> torch.Tensor:
        """One forward for the requests in `slots` [B] (None: slots 0..B-1, read as a view with no copy).

        tokens, positions, write_cols: [B, T] (token ids, rotary positions, cache column each token's KV goes to);
        bias: [B, 1, T, S] additive attention bias over cache columns 0..S-1 (0 visible, NEG hidden).
        logits_at: optional [B, m] indices into T; only those positions get logits (saves the vocab matmul).
        Returns logits [B, T or m, V].
        """
        b, t = tokens.shape
        s = bias.shape[-1]
        bias = bias.to(self.dtype)  # SDPA takes a mask of the queries' dtype (NEG stays hidden: -inf in fp16)
        self.reserve(max(s, int(write_cols.max()) + 1))
        x = F.embedding(tokens, self.embed)  # [B, T, hidden]
        cos, sin = self.rotary(x, positions)  # [B, T, head_dim]
        cos, sin = cos[:, None], sin[:, None]
        rows = (torch.arange(b) if slots is None else slots)[:, None].expand(b, t)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        windowed: dict[int, torch.Tensor] = {}  # window -> the bias with columns beyond it hidden
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.w_in)
            q, k, v = F.linear(h, layer.w_qkv, layer.b_qkv).split([q_size, kv_size, kv_size], dim=-1)
            q, k = q.view(b, t, self.heads, self.head_dim), k.view(b, t, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = self._norm(q, layer.q_norm), self._norm(k, layer.k_norm)
            q = self._rope(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
            k = self._rope(k.transpose(1, 2), cos, sin)
            v = v.view(b, t, self.kv_heads, self.head_dim)
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
                    out_of_window = torch.arange(s)[None, None, None, :] <= positions[:, None, :, None] - layer.window
                    windowed[layer.window] = bias.masked_fill(out_of_window, torch.finfo(self.dtype).min)
                mask = windowed[layer.window]
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                 enable_gqa=self.kv_heads != self.heads)
            x = x + F.linear(att.transpose(1, 2).reshape(b, t, q_size), layer.w_o, layer.b_o)
            gate, up = F.linear(self._norm(x, layer.w_post), layer.w_gate_up, layer.b_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.w_down, layer.b_down)
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(b, logits_at.shape[1], x.shape[-1]))
        return F.linear(self._norm(x, self.final_norm), self.lm_head)

    def keep(self, slot: int, start: int, columns: torch.Tensor) -> None:
        """KV compaction for one slot: columns [m] (all >= start) move to start..start+m-1, in that order."""
        if len(columns) == 0 or bool((columns == torch.arange(start, start + len(columns))).all()):
            return
        for cache in (self.k_cache, self.v_cache):
            # [layers, kv_heads, max_len, D] viewed as a batch of layers: gather then write back
            moved = gather_kv(cache[:, slot], columns[None].expand(cache.shape[0], -1))
            cache[:, slot, :, start:start + len(columns)] = moved

    def time_forward(self, batch: int, tokens: int, repeats: int = 3) -> float:
        """Median seconds of a forward of `tokens` tokens in each of `batch` slots (profiling; call it before any
        request is live: it overwrites the first columns of those slots)."""
        import statistics
        import time

        batch = min(batch, self.slots)
        ids = torch.zeros(batch, tokens, dtype=torch.long)
        cols = torch.arange(tokens)[None].expand(batch, tokens)
        bias = causal_bias([0] * batch, [tokens] * batch, tokens)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            self.forward(ids, cols, cols, bias)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])  # the first call warms caches

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copies a request's first `length` KV columns to another slot (keeps live slots packed at 0..B-1)."""
        for cache in (self.k_cache, self.v_cache):
            cache[:, dst, :, :length] = cache[:, src, :, :length]


def common_prefix(cached: list[int], tokens: list[int]) -> int:
    """Length of the longest common prefix: how many cached KV columns a slot can keep for `tokens`."""
    n = min(len(cached), len(tokens))
    if cached[:n] == tokens[:n]:  # the usual case (the request only grew): one C-level compare
        return n
    return next(i for i in range(n) if cached[i] != tokens[i])


def causal_bias(starts: list[int], lengths: list[int], width: int) -> torch.Tensor:
    """[B, 1, T, width] bias for feeding chains: row b feeds lengths[b] tokens written at starts[b]..; each sees
    columns < starts[b] + its index. Padding queries (past lengths[b]) see column 0 only (no all-hidden row)."""
    b, t = len(starts), max(lengths)
    cols = torch.arange(width)
    bias = torch.full((b, 1, t, width), NEG)
    for r, (start, n) in enumerate(zip(starts, lengths, strict=True)):
        visible = cols[None, :] <= (start + torch.arange(n))[:, None]  # [n, width]
        bias[r, 0, :n] = torch.where(visible, 0.0, NEG)
        bias[r, 0, n:, 0] = 0.0
    return bias
