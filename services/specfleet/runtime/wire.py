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
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
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
