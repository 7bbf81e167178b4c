"""Triton GPU path for the token-tree kernels in `reference`: same signatures, same results (bit for bit).

- `tree_ancestor_mask`, `tree_depths`, `tree_attention_bias`, `tree_position_ids`: one kernel, one program per tree
  row, that walks the row's parent pointers up to the root (trees are small: n <= 128 or so).
- `gather_kv`: KV compaction, one program per output row (batch, head, kept slot) copying `dim` elements.
- `greedy_accept_batched`: greedy tree acceptance for a whole batch of (padded) trees, one program per request, so
  there is no Python loop per request. `greedy_accept_batched_reference` is the same algorithm in plain torch
  (any device, no triton) and the definition the kernel is tested against.

Triton is imported lazily: importing this module never needs triton. `AVAILABLE` says whether the kernels can run
here (triton installed and a CUDA device present); `UNAVAILABLE_REASON` says why not. The kernels are plain
functions below, compiled with `triton.jit` on first use (`_compiled`), which also binds the module global `tl`
they read. Every public kernel function validates its arguments like the reference (ValueError), then raises
RuntimeError(UNAVAILABLE_REASON) when the kernels cannot run here and ValueError for a tensor that is not on CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import torch

from .reference import ROOT, check_parents


def _probe() -> str:
    """Why the Triton path cannot run here, or "" when it can. Never raises."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install '.[gpu]')"
    try:
        if not torch.cuda.is_available():
            return "no CUDA device"
    except Exception as exc:  # a broken driver install must not break importing this module
        return f"no CUDA device ({exc})"
    try:
        import triton  # noqa: F401  (only on a CUDA machine with triton installed)
    except Exception as exc:
        return f"triton failed to import: {exc!r}"
    return ""


UNAVAILABLE_REASON: str = _probe()
AVAILABLE: bool = not UNAVAILABLE_REASON

tl = None  # triton.language, bound by _compiled(); the kernel bodies below read it as a module global


# ----------------------------------------------------------------------------------------------------------------
# Kernels (compiled by _compiled(); all index arithmetic that can exceed 2**31 is done in int64)
# ----------------------------------------------------------------------------------------------------------------


def _tree_rows_kernel(
    parents_ptr,     # [n] int32, topological (parents[i] < i), -1 = the root
    n,               # number of draft nodes
    depth_ptr,       # [n] int64 out: depth_offset + depth of each node (0 for children of the root)
    depth_offset,    # 0 for depths, prefix_len for position ids
    out_ptr,         # WRITE_BIAS: bias [n, row_stride]; else ancestor mask [n, n] as int8 (0 / 1)
    row_stride,      # elements between rows of out
    col0,            # column of node 0 in out: prefix_len for the bias, 0 for the mask
    hidden_ptr,      # [1] in out's dtype: the bias of a hidden entry (finfo.min); read only when WRITE_BIAS
    WRITE_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,  # _block(n): a power of 2 >= n
):
    row = tl.program_id(0)                 # this program's node i
    cols = tl.arange(0, BLOCK)             # [BLOCK] candidate ancestors j
    visible = cols < 0                     # [BLOCK] bool, all False: mask[i, j]
    node = row
    depth = -1
    # Walk i -> parent -> ... -> root. Node i has at most i ancestors, so i + 1 steps reach the root; once there
    # (node == -1) the remaining steps change nothing.
    for _ in range(row + 1):
        up = node >= 0
        visible = visible | (cols == node)  # -1 matches no column
        depth += up.to(tl.int32)
        node = tl.load(parents_ptr + node, mask=up, other=-1)
    tl.store(depth_ptr + row, (depth + depth_offset).to(tl.int64))

    out_row = out_ptr + row.to(tl.int64) * row_stride + col0 + cols  # [BLOCK] pointers to out[i, col0 + j]
    if WRITE_BIAS:
        hidden = tl.load(hidden_ptr)       # exact in out's dtype (a float arg would be rounded to fp32)
        tl.store(out_row, tl.where(visible, 0.0, hidden).to(out_ptr.dtype.element_ty), mask=cols < n)
    else:
        tl.store(out_row, visible.to(tl.int8), mask=cols < n)


def _gather_rows_kernel(
    cache_ptr,       # [B, H, S, D], any strides
    keep_ptr,        # [B, M] int64 slot indices, contiguous, all in [0, S)
    out_ptr,         # [B, H, M, D] contiguous
    H, M, D,
    stride_b, stride_h, stride_s, stride_d,  # cache strides, in elements
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)    # flat output row: (b * H + h) * M + j
    j = pid % M
    bh = pid // M
    b = bh // H
    h = bh % H
    slot = tl.load(keep_ptr + b * M + j)   # int64
    src = cache_ptr + b * stride_b + h * stride_h + slot * stride_s
    dst = out_ptr + pid * D
    for d0 in range(0, D, BLOCK_D):
        d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)  # [BLOCK_D]
        inside = d < D
        tl.store(dst + d, tl.load(src + d * stride_d, mask=inside), mask=inside)  # a plain copy: bitwise


def _greedy_walk_kernel(
    tokens_ptr,      # [B, n] int64 draft tokens, contiguous
    parents_ptr,     # [B, n] int32, contiguous; row b valid on [0, lengths[b])
    argmax_ptr,      # [B, n + 1] int64, contiguous: target's choice after the root (0) and after node i (i + 1)
    lengths_ptr,     # [B] int32: valid nodes per request (the rest is padding and is ignored)
    accept_ptr,      # [B] int64 out: accepted path length
    path_ptr,        # [B, n] int64 out, pre-filled with -1: accepted node indices in path order
    next_ptr,        # [B] int64 out: the target's choice after the last accepted node
    n,
    BLOCK: tl.constexpr,  # _block(n): a power of 2 >= n
):
    b = tl.program_id(0).to(tl.int64)      # this program's request
    m = tl.load(lengths_ptr + b)
    idx = tl.arange(0, BLOCK)              # [BLOCK] node indices
    live = idx < m
    tok = tl.load(tokens_ptr + b * n + idx, mask=live, other=0)        # [BLOCK]
    par = tl.load(parents_ptr + b * n + idx, mask=live, other=-2)      # [BLOCK]; -2 is nobody's index
    argmax_row = argmax_ptr + b * (n + 1)
    node = -1                              # last accepted node (-1: the root)
    count = 0                              # accepted so far
    # One step per level: accept the first child (in index order) of `node` whose token is the target's choice.
    # The path is at most m deep, so m + 1 steps always end on a step that finds no child; from then on the state
    # is a fixed point (the same lookup finds nothing again).
    for _ in range(m + 1):
        want = tl.load(argmax_row + node + 1)
        hit = live & (par == node) & (tok == want)                       # [BLOCK]
        child = tl.min(tl.where(hit, idx, BLOCK), axis=0)               # first hit, BLOCK when none
        found = child < BLOCK
        tl.store(path_ptr + b * n + count, child.to(tl.int64), mask=found)
        count += found.to(tl.int32)
        node = tl.where(found, child, node)
    tl.store(accept_ptr + b, count.to(tl.int64))
    tl.store(next_ptr + b, tl.load(argmax_row + node + 1))


@functools.cache
def _compiled() -> SimpleNamespace:
    """Imports triton, binds `tl` and jit-compiles the kernels above (once)."""
    global tl
    import triton
    import triton.language as tl

    return SimpleNamespace(
        tree_rows=triton.jit(_tree_rows_kernel),
        gather_rows=triton.jit(_gather_rows_kernel),
        greedy_walk=triton.jit(_greedy_walk_kernel),
        next_power_of_2=triton.next_power_of_2,
    )


def _ready(**tensors: torch.Tensor) -> SimpleNamespace:
    """The compiled kernels, after checking that they can run here and that every tensor is on a CUDA device."""
    if not AVAILABLE:
        raise RuntimeError(f"the Triton kernels cannot run here: {UNAVAILABLE_REASON}")
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise ValueError(f"{name} must be a CUDA tensor for the Triton path, got device {t.device}")
    return _compiled()


def _block(k: SimpleNamespace, size: int) -> int:
    """A power of 2 >= size, at least 16 (no degenerate 1-element blocks; the kernels mask the excess)."""
    return max(16, k.next_power_of_2(size))


# ----------------------------------------------------------------------------------------------------------------
# Tree masks and positions
# ----------------------------------------------------------------------------------------------------------------


def _walk_tree(parents: torch.Tensor, *, prefix_len: int = 0, bias_dtype: torch.dtype | None = None,
               depth_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of the tree kernel. Returns (out, depth_offset + depths [n] int64), where out is the additive
    bias [n, prefix_len + n] of bias_dtype when one is given, else the bool ancestor mask [n, n]."""
    check_parents(parents)
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    k = _ready(parents=parents)
    n, device = len(parents), parents.device
    depths = torch.empty(n, dtype=torch.long, device=device)
    if bias_dtype is None:
        out = torch.empty(n, n, dtype=torch.int8, device=device)
        hidden, row_stride, col0 = out, n, 0  # hidden is never read without WRITE_BIAS
    else:
        out = torch.zeros(n, prefix_len + n, dtype=bias_dtype, device=device)  # the prefix columns stay 0
        hidden = torch.full((1,), torch.finfo(bias_dtype).min, dtype=bias_dtype, device=device)
        row_stride, col0 = prefix_len + n, prefix_len
    if n > 0:
        k.tree_rows[(n,)](
            parents.to(torch.int32).contiguous(), n, depths, depth_offset, out, row_stride, col0, hidden,
            WRITE_BIAS=bias_dtype is not None, BLOCK=_block(k, n), num_warps=1,
        )
    return (out if bias_dtype is not None else out.view(torch.bool)), depths


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """[n] int64 depth of each node: 0 for children of the root."""
    return _walk_tree(parents)[1]


def tree_ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[n, n] bool: mask[i, j] is True when node j is node i or one of its ancestors."""
    return _walk_tree(parents)[0]


def tree_attention_bias(parents: torch.Tensor, prefix_len: int, dtype=torch.float32) -> torch.Tensor:
    """[n, prefix_len + n] additive bias: 0 where visible (the whole prefix, the node itself and its ancestors),
    torch.finfo(dtype).min elsewhere."""
    return _walk_tree(parents, prefix_len=prefix_len, bias_dtype=dtype)[0]


def tree_position_ids(parents: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """[n] int64 position of each node: prefix_len plus its depth (the kernel writes them directly)."""
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    return _walk_tree(parents, depth_offset=prefix_len)[1]


# ----------------------------------------------------------------------------------------------------------------
# KV compaction
# ----------------------------------------------------------------------------------------------------------------


def gather_kv(cache: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """KV compaction: cache [batch, heads, slots, dim] and keep [batch, m] slot indices -> [batch, heads, m, dim]
    (contiguous), a bitwise copy of cache[b, h, keep[b, j], :]."""
    if cache.dim() != 4 or keep.dim() != 2 or keep.shape[0] != cache.shape[0]:
        raise ValueError(f"cache must be [batch, heads, slots, dim] and keep [batch, m], got "
                         f"{tuple(cache.shape)} and {tuple(keep.shape)}")
    if keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dtype == torch.bool:
        raise ValueError(f"keep must hold integer slot indices, got {keep.dtype}")
    k = _ready(cache=cache, keep=keep)
    b, h, s, d = cache.shape
    m = keep.shape[1]
    out = torch.empty(b, h, m, d, dtype=cache.dtype, device=cache.device)
    if out.numel() == 0:
        return out
    if bool(((keep < 0) | (keep >= s)).any()):  # one sync; an unchecked index would read out of bounds
        raise ValueError(f"keep holds slot indices outside [0, {s})")
    block_d = min(_block(k, d), 1024)
    k.gather_rows[(b * h * m,)](
        cache, keep.to(torch.int64).contiguous(), out, h, m, d, *cache.stride(), BLOCK_D=block_d,
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Batched greedy acceptance
# ----------------------------------------------------------------------------------------------------------------


def _check_batch(tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor,
                 lengths: torch.Tensor) -> None:
    """Raises ValueError unless the shapes agree and every request's valid prefix is a topological tree."""
    if tokens.dim() != 2 or parents.shape != tokens.shape:
        raise ValueError(f"tokens and parents must both be [batch, n], got {tuple(tokens.shape)} and "
                         f"{tuple(parents.shape)}")
    bsz, n = tokens.shape
    if tuple(target_argmax.shape) != (bsz, n + 1):
        raise ValueError(f"target_argmax must be [batch, n + 1] = [{bsz}, {n + 1}], got {tuple(target_argmax.shape)}")
    if tuple(lengths.shape) != (bsz,):
        raise ValueError(f"lengths must be [batch] = [{bsz}], got {tuple(lengths.shape)}")
    for name, t in (("tokens", tokens), ("parents", parents), ("target_argmax", target_argmax), ("lengths", lengths)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    idx = torch.arange(n, device=parents.device)
    valid = idx[None, :] < lengths[:, None]  # [B, n]
    bad_parent = valid & ((parents < ROOT) | (parents >= idx[None, :]))
    if bool(((lengths < 0) | (lengths > n)).any() | bad_parent.any()):  # one sync
        raise ValueError("lengths must lie in [0, n] and each request's parents must satisfy -1 <= parents[i] < i "
                         "on its valid nodes")


def greedy_accept_batched_reference(tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor,
                                    lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`reference.greedy_accept` for a batch of padded trees, in plain torch (any device, no triton).

    tokens [B, n], parents [B, n]: request b's tree is tokens[b, :lengths[b]], parents[b, :lengths[b]] (the rest is
    padding and ignored). target_argmax [B, n + 1]: the target's choice after the root (0) and after node i (i + 1).
    Returns (accept_len [B], path [B, n], next_token [B]), all int64, where path[b, :accept_len[b]] are the accepted
    node indices in path order (then -1) and next_token[b] is the correction or bonus token: per request exactly
    greedy_accept(tokens[b, :m], parents[b, :m], target_argmax[b, :m + 1]) with m = lengths[b].

    Loops over tree levels (at most n + 1 steps, one sync each to stop early), never over requests.
    """
    _check_batch(tokens, parents, target_argmax, lengths)
    bsz, n = tokens.shape
    device = tokens.device
    tokens, parents, target_argmax = tokens.long(), parents.long(), target_argmax.long()
    idx = torch.arange(n, device=device)                        # [n]
    live = idx[None, :] < lengths.long()[:, None]                # [B, n]
    rows = torch.arange(bsz, device=device)                      # [B]
    node = torch.full((bsz,), ROOT, dtype=torch.long, device=device)
    count = torch.zeros(bsz, dtype=torch.long, device=device)
    path = torch.full((bsz, n + 1), ROOT, dtype=torch.long, device=device)  # column n absorbs writes of misses
    for _ in range(n + 1):
        want = target_argmax[rows, node + 1]                                      # [B]
        hit = live & (parents == node[:, None]) & (tokens == want[:, None])       # [B, n]
        child = torch.where(hit, idx, n).min(dim=1).values if n else torch.full_like(node, n)  # [B], n: none
        found = child < n
        if not bool(found.any()):
            break
        path[rows, torch.where(found, count, n)] = torch.where(found, child, ROOT)
        count += found.long()
        node = torch.where(found, child, node)
    return count, path[:, :n].contiguous(), target_argmax[rows, node + 1]


def greedy_accept_batched(tokens: torch.Tensor, parents: torch.Tensor, target_argmax: torch.Tensor,
                          lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of `greedy_accept_batched_reference` (same arguments, same results): one program per request
    walks its tree. CUDA tensors only."""
    _check_batch(tokens, parents, target_argmax, lengths)
    k = _ready(tokens=tokens, parents=parents, target_argmax=target_argmax, lengths=lengths)
    bsz, n = tokens.shape
    device = tokens.device
    accept_len = torch.zeros(bsz, dtype=torch.long, device=device)
    path = torch.full((bsz, n), ROOT, dtype=torch.long, device=device)
    next_token = torch.empty(bsz, dtype=torch.long, device=device)
    if bsz == 0:
        return accept_len, path, next_token
    k.greedy_walk[(bsz,)](
        tokens.to(torch.int64).contiguous(), parents.to(torch.int32).contiguous(),
        target_argmax.to(torch.int64).contiguous(), lengths.to(torch.int32).contiguous(),
        accept_len, path, next_token, n, BLOCK=_block(k, n), num_warps=1,
    )
    return accept_len, path, next_token
