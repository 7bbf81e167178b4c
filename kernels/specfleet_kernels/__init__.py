"""Tree-attention masks, KV-cache compaction and acceptance kernels: a torch reference and a GPU (Triton) path."""

from __future__ import annotations

from types import ModuleType

import torch

from . import reference


def backend_for(device: torch.device | str | int) -> ModuleType:
    """The kernel module for tensors on `device`: `triton_kernels` on a CUDA device when Triton can run there
    (`triton_kernels.AVAILABLE`), else `reference`. Both share the reference's function names and signatures."""
    if torch.device(device).type == "cuda":
        from . import triton_kernels  # imported on demand: it probes for triton and CUDA

        if triton_kernels.AVAILABLE:
            return triton_kernels
    return reference
