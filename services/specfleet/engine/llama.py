"""A lean Llama forward over a preallocated, slot-addressed KV cache: the engine's model runner for the target
and the drafters. Same weights and math as Hugging Face's `LlamaForCausalLM` (fp32), a fraction of its per-call
overhead, and batches of ragged requests with arbitrary (tree) attention in one call.

Cache layout: keys/values [layers, slots, kv_heads, max_len, head_dim]. Each live request owns one slot; the
engine keeps live requests in slots 0..B-1 so a batch reads a view, never a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specfleet_kernels.reference import gather_kv

NEG = torch.finfo(torch.float32).min


class LlamaRunner:
    def __init__(self, model, slots: int, max_len: int | None = None):
        cfg = model.config
        if cfg.model_type != "llama":
            raise ValueError(f"LlamaRunner runs Llama models, got model_type={cfg.model_type!r}")
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.max_positions = cfg.max_position_embeddings
        self.max_len = max_len or self.max_positions + 64  # room for a tree past the last position
        self.slots = slots
        base = model.model
        self.rotary = base.rotary_emb
        self.embed = base.embed_tokens.weight.detach()  # [V, hidden]
        self.lm_head = model.lm_head.weight.detach()  # [V, hidden] (tied to embed in the bundled models)
        self.final_norm = base.norm.weight.detach()
        self.layers = []
        for layer in base.layers:
            att, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(),
                torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).detach(),  # one matmul
                att.o_proj.weight.detach(),
                layer.post_attention_layernorm.weight.detach(),
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),  # one matmul
                mlp.down_proj.weight.detach(),
            ))
        shape = (len(self.layers), slots, self.kv_heads, self.max_len, self.head_dim)
        self.k_cache = torch.zeros(shape)
        self.v_cache = torch.zeros(shape)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

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
        x = F.embedding(tokens, self.embed)  # [B, T, hidden]
        cos, sin = self.rotary(x, positions)  # [B, T, head_dim]
        cos, sin = cos[:, None], sin[:, None]
        rows = (torch.arange(b) if slots is None else slots)[:, None].expand(b, t)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, (w_in, w_qkv, w_o, w_post, w_gate_up, w_down) in enumerate(self.layers):
            h = self._norm(x, w_in)
            q, k, v = F.linear(h, w_qkv).split([q_size, kv_size, kv_size], dim=-1)
            q = self._rope(q.view(b, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)  # [B, H, T, D]
            k = self._rope(k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(b, t, self.kv_heads, self.head_dim)
            kc, vc = self.k_cache[i], self.v_cache[i]  # [slots, kv_heads, max_len, D]
            kc[rows, :, write_cols] = k.transpose(1, 2)  # [B, T, kv_heads, D] into the slots' columns
            vc[rows, :, write_cols] = v
            if slots is None:
                keys, values = kc[:b, :, :s], vc[:b, :, :s]
            else:
                keys, values = kc[:, :, :s].index_select(0, slots), vc[:, :, :s].index_select(0, slots)
            att = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias,
                                                 enable_gqa=self.kv_heads != self.heads)
            x = x + F.linear(att.transpose(1, 2).reshape(b, t, q_size), w_o)
            gate, up = F.linear(self._norm(x, w_post), w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_down)
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
