"""Edits of a Hugging Face DynamicCache in place: keep chosen slots (compaction) or the first n (truncation)."""

from __future__ import annotations

import torch

from specfleet_kernels.reference import gather_kv


def compact(cache, keep: torch.Tensor) -> None:
    """Keeps the slots `keep` [batch, m] of every layer, in that order (KV of the accepted path)."""
    for layer in cache.layers:
        layer.keys = gather_kv(layer.keys, keep)
        layer.values = gather_kv(layer.values, keep)


def truncate(cache, length: int) -> None:
    """Keeps the first `length` slots of every layer."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]
