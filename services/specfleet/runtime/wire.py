"""Conversions between engine objects and the wire (`specfleet.api.v1` messages): token trees as flat arrays with
probabilities packed as little-endian float32 bytes, and sampling parameters."""

from __future__ import annotations

import numpy as np
import torch

from specfleet.api.v1 import internal_pb2
from specfleet.engine.sampling import SamplingParams
from specfleet.engine.tree import TokenTree


def tree_to_pb(tree: TokenTree) -> internal_pb2.TokenTree:
    msg = internal_pb2.TokenTree(tokens=tree.tokens.tolist(), parents=tree.parents.tolist(),
                                 probs=tree.probs.numpy().astype("<f4").tobytes())
    if tree.draft_probs is not None:
        msg.draft_probs = tree.draft_probs.numpy().astype("<f4").tobytes()
    if tree.origins is not None:
        msg.origins.extend(",".join(o) for o in tree.origins)
    return msg


def tree_from_pb(msg: internal_pb2.TokenTree, vocab_size: int | None = None) -> TokenTree:
    """Raises ValueError on a malformed tree (wrong lengths, bad parents, token ids out of range)."""
    n = len(msg.tokens)
    probs = np.frombuffer(msg.probs, dtype="<f4") if msg.probs else np.ones(n, dtype="<f4")
    if len(msg.parents) != n or len(probs) != n or (msg.origins and len(msg.origins) != n):
        raise ValueError(f"malformed token tree: {n} tokens, {len(msg.parents)} parents, {len(probs)} probs")
    draft = None
    if msg.draft_probs:
        flat = np.frombuffer(msg.draft_probs, dtype="<f4")
        if n == 0 or len(flat) % n:
            raise ValueError("malformed token tree: draft_probs is not n x vocab float32")
        draft = torch.from_numpy(flat.reshape(n, -1).copy())
    origins = tuple(tuple(o.split(",")) if o else () for o in msg.origins) if msg.origins else None
    # checked on the Python lists (a few nodes): as TokenTree.validate() would, without a dozen tiny tensor ops per
    # tree, and trees cross the wire several times a round
    tokens, parents = list(msg.tokens), list(msg.parents)
    if any(not -1 <= p < i for i, p in enumerate(parents)):
        raise ValueError("parents must satisfy -1 <= parents[i] < i (topological order)")
    if vocab_size is not None and n and (min(tokens) < 0 or max(tokens) >= vocab_size):
        raise ValueError(f"token tree holds token ids outside [0, {vocab_size})")
    return TokenTree(torch.tensor(tokens, dtype=torch.long, device="cpu"),
                     torch.tensor(parents, dtype=torch.long, device="cpu"),
                     torch.from_numpy(probs.copy()), draft, origins)


def sampling_to_pb(params: SamplingParams) -> internal_pb2.SamplingParams:
    return internal_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                       seed=params.seed or 0, has_seed=params.seed is not None)


def sampling_from_pb(msg: internal_pb2.SamplingParams) -> SamplingParams:
    params = SamplingParams(msg.temperature, msg.top_p or 1.0, msg.top_k, msg.seed if msg.has_seed else None)
    params.validate()
    return params


def replayed_round(state, rnd: int) -> internal_pb2.VerifyResponse:
    """Round `rnd` as Redis holds it (a state.store.RequestState): the answer to a round committed already."""
    tokens = state.round_tokens(rnd)
    finished = state.status == "finished" and rnd == state.round - 1
    return internal_pb2.VerifyResponse(request_id=state.rid, round=rnd, token_ids=tokens,
                                       accepted=max(0, len(tokens) - 1), replayed=True, finished=finished,
                                       finish_reason=state.finish_reason if finished else "")


FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_FEATURE_DTYPE = "float16"  # half the bytes of float32; the head drafts from them (acceptance stays lossless)


def features_to_pb(rows: torch.Tensor, first: int, dtype: str = DEFAULT_FEATURE_DTYPE) -> internal_pb2.Features:
    """[n, H] target features of context positions first..first+n-1, packed little-endian in `dtype`."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")
    packed = rows.detach().to(FEATURE_DTYPES[dtype]).cpu().contiguous()  # one copy off the device, if any
    data = packed.view(torch.int16 if packed.element_size() == 2 else torch.int32).numpy().astype(
        "<i2" if packed.element_size() == 2 else "<i4").tobytes()
    return internal_pb2.Features(first=first, rows=rows.shape[0], width=rows.shape[1], dtype=dtype, data=data)


def features_from_pb(msg: internal_pb2.Features, width: int | None = None) -> torch.Tensor:
    """The rows of a Features message as a float32 [rows, width] tensor; ValueError when malformed."""
    if msg.dtype not in FEATURE_DTYPES:
        raise ValueError(f"features: dtype must be one of {', '.join(FEATURE_DTYPES)}, got {msg.dtype!r}")
    if msg.first < 0 or msg.rows < 0 or msg.width <= 0 or (width is not None and msg.width != width):
        raise ValueError(f"features: first {msg.first}, rows {msg.rows}, width {msg.width} (the target's hidden "
                         f"size is {width})")
    dtype = FEATURE_DTYPES[msg.dtype]
    size = dtype.itemsize
    if len(msg.data) != msg.rows * msg.width * size:
        raise ValueError(f"features: {len(msg.data)} bytes are not {msg.rows} x {msg.width} {msg.dtype}")
    if not msg.rows:
        return torch.empty(0, msg.width, device="cpu")
    ints = np.frombuffer(msg.data, dtype="<i2" if size == 2 else "<i4").astype("i2" if size == 2 else "i4")
    return torch.from_numpy(ints.copy()).view(dtype).reshape(msg.rows, msg.width).float()
