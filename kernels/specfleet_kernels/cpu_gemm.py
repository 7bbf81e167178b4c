"""The CPU runner's matmul: fp32 weights packed once into panels, one sequential pass over them per forward.

`PackedWeight(w, b)(x)` computes `F.linear(x, w, b)` for fp32 CPU tensors with `cpu_gemm.c`, which the host's C
compiler builds at first use (`-O3 -march=native -fopenmp`) into a cache folder. It is 2-4x faster than torch's
MKL call for the few rows a decode step, a draft tree or a small batch feeds, and batch-invariant: each output is
summed in one fixed order, so a row's result does not depend on the other rows beside it (see the C file).

Without a compiler (or with SPECFLEET_CPU_GEMM=0) `available()` is False, `unavailable_reason()` says why, and
callers keep torch's matmul. The cache folder is $SPECFLEET_KERNEL_CACHE, else ~/.cache/specfleet/kernels, else
the temp folder (read-only root filesystems); a build is keyed by the source, the compiler and the CPU's flags.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_gemm.c")
SWITCH = "SPECFLEET_CPU_GEMM"  # "0": never use the kernel
CACHE = "SPECFLEET_KERNEL_CACHE"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _cache_dirs() -> list[Path]:
    dirs = [Path(os.environ[CACHE])] if os.environ.get(CACHE) else []
    return dirs + [Path.home() / ".cache" / "specfleet" / "kernels", Path(tempfile.gettempdir()) / "specfleet-kernels"]


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode())
    name = f"cpu_gemm-{key.hexdigest()[:16]}.so"
    errors = []
    for folder in _cache_dirs():
        target = folder / name
        if not target.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
                os.close(fd)
                done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                      timeout=120)
                if done.returncode != 0:
                    os.unlink(tmp)
                    raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
                os.replace(tmp, target)  # atomic: processes building at once each land a whole library
            except OSError as e:
                errors.append(f"{folder}: {e}")
                continue
        lib = ctypes.CDLL(str(target))
        lib.sf_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 4 + [ctypes.c_int]
        lib.sf_gemm.restype = None
        lib.sf_pack.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
        lib.sf_pack.restype = None
        lib.sf_panel_width.restype = ctypes.c_long
        p, n = ctypes.c_void_p, ctypes.c_long
        lib.sf_layer.argtypes = [p, n, n, n, p, p, ctypes.c_float, p, p, p, p, p, p, n, p, p, p, p, p, p, p, p, n, n,
                                 n, n, p, p, p, p, n, p, n, ctypes.c_int]
        lib.sf_layer.restype = ctypes.c_long
        lib.sf_layer_fields.restype = ctypes.c_long
        lib.sf_layers.argtypes = [p, n, p, n, n, n, ctypes.c_float, p, p, n, n, n, n, p, p, p, p, n, p, ctypes.c_int]
        lib.sf_layers.restype = ctypes.c_long
        return lib
    raise RuntimeError("no writable cache folder: " + "; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The built kernel library, or None (see `unavailable_reason`)."""
    global _lib, _reason, _tried
    if os.environ.get(SWITCH, "1") == "0":
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                _reason = str(e)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not used (None when it is)."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    return None if library() is not None else _reason


class PackedWeight:
    """A linear layer's weight [out, in] (and bias [out]) packed for `cpu_gemm.c`: call it like F.linear.

    A group of G models of one shape (drafters run as one): weight [G, out, in], bias [G, out]; the input's rows
    are then member-major (the first 1/G of them member 0's) and so are the outputs'."""

    __slots__ = ("packed", "bias", "groups", "out_features", "in_features", "width", "dtype", "_lib")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        lib = library()
        if lib is None:
            raise RuntimeError(f"the CPU matmul kernel is not available: {unavailable_reason()}")
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() not in (2, 3):
            raise ValueError(f"PackedWeight takes a float32 CPU weight [out, in] or [G, out, in], got "
                             f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
        w = weight.detach().reshape(-1, *weight.shape[-2:]).contiguous()
        self.groups, self.out_features, self.in_features = w.shape
        self.width = width = lib.sf_panel_width()
        size = -(-self.out_features // width) * self.in_features * width
        self.packed = torch.empty(self.groups, size, dtype=torch.float32, device="cpu")
        for member in range(self.groups):
            lib.sf_pack(w[member].data_ptr(), self.packed[member].data_ptr(), self.out_features, self.in_features)
        if bias is not None and tuple(bias.shape) != (*weight.shape[:-2], self.out_features):
            raise ValueError(f"bias {tuple(bias.shape)} for a weight {tuple(weight.shape)}")
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.dtype = torch.float32
        self._lib = lib

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features) if self.groups == 1 else (
            self.groups, self.out_features, self.in_features)

    def unpack(self) -> torch.Tensor:
        """The weight as it was given."""
        panels = self.packed.view(self.groups, -1, self.in_features, self.width)  # [G, panels, in, width]
        w = panels.permute(0, 1, 3, 2).reshape(self.groups, -1, self.in_features)[:, :self.out_features]
        return w.contiguous().view(self.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"input [..., {x.shape[-1]}] {x.dtype} on {x.device} for a packed weight of "
                             f"{self.in_features} float32 inputs (on the CPU)")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] % self.groups:
            raise ValueError(f"{flat.shape[0]} input rows do not split among {self.groups} group members")
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = torch.empty(flat.shape[0], self.out_features, dtype=torch.float32, device="cpu")
        if flat.shape[0]:
            self._lib.sf_gemm(flat.data_ptr(), self.packed.data_ptr(),
                              None if self.bias is None else self.bias.data_ptr(), out.data_ptr(), self.groups,
                              flat.shape[0] // self.groups, self.out_features, self.in_features,
                              torch.get_num_threads())
        return out.view(*lead, self.out_features)


HUGE_PAGE = 2 << 20  # bytes of a transparent huge page (x86-64; the common arm64 kernels too)


def _huge_buffer(floats: int) -> torch.Tensor:
    """A float32 CPU tensor of `floats` elements, 2 MiB-aligned, on memory advised for transparent huge pages
    before its first touch (Linux' default THP mode, "madvise", backs nothing else with them); ordinary memory
    where the OS has no such advice. The tensor keeps the mapping alive and unmaps it when freed."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or floats == 0:
        return torch.empty(floats, dtype=torch.float32)
    try:
        # private: a shared anonymous mapping is shmem, which THP's own switch (usually never) governs
        area = mmap.mmap(-1, floats * 4 + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.madvise(advice)
    except (OSError, ValueError):
        return torch.empty(floats, dtype=torch.float32)
    raw = torch.frombuffer(area, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + floats * 4].view(torch.float32)


def gather(weights: list[PackedWeight]) -> None:
    """Moves these weights' panels into one buffer on transparent huge pages (same values, same layout).

    A drafter step at batch 1 streams every weight once, and a group of G drafters G times as many: 26 MB for
    four of the bundled ones, 6,300 pages of 4 KiB, over the reach of the CPU's TLB (a few thousand entries), so
    the grouped step also paid a page walk every 4 KiB of its weights. On 2 MiB pages it is 13 entries. Measured
    at batch 1, one thread, on a busy 2-core EPYC (two paired runs, medians of thread time): a group of 3
    1.73 / 1.43 -> 1.14 / 1.09 ms, of 4 2.28 / 1.94 -> 1.55 / 1.69 ms, one drafter 0.51 -> 0.49 ms; batch 4 and
    16 (compute, not page walks, dominates there) unchanged. The values and their layout are the same: outputs
    are bit for bit what they were."""
    sizes = [-(-w.packed.numel() // 16) * 16 for w in weights]  # each weight's panels start on a cache line
    arena = _huge_buffer(sum(sizes))
    at = 0
    for w, size in zip(weights, sizes, strict=True):
        part = arena[at:at + w.packed.numel()].view(w.packed.shape)
        part.copy_(w.packed)
        w.packed = part
        at += size


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def decoder_layer(x: torch.Tensor, *, groups: int, heads: int, eps: float, w_in: torch.Tensor,
                  w_post: torch.Tensor, qkv: PackedWeight, o: PackedWeight, gate_up: PackedWeight,
                  down: PackedWeight, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor, bias: torch.Tensor, bias_row: torch.Tensor, positions: torch.Tensor,
                  window: int | None) -> None:
    """One decoder layer in place on x [P, hidden] (fp32, contiguous; P = groups x tokens, member-major): see
    `sf_layer` in cpu_gemm.c. cos, sin [P, head_dim]; caches [rows, kv_heads, columns, head_dim]; token p writes
    its key and value at (rows[p], cols[p]) and attends over its row's columns 0..S-1 with bias[bias_row[p]] [S]
    (hidden: float32's min) and, with a window, only columns > positions[p] - window."""
    lib = qkv._lib  # the library the weights were packed by (no lookup per layer)
    tensors = [x, w_in, w_post, cos, sin, k_cache, v_cache, bias] + [t for t in (q_norm, k_norm) if t is not None]
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("decoder_layer takes contiguous float32 tensors")
    indices = [rows, cols, bias_row, positions]
    if any(t.device.type != "cpu" for t in tensors + indices):  # a pointer into another device: never
        raise ValueError("decoder_layer takes CPU tensors only (the C kernel reads them by address)")
    if any(t.dtype != torch.long or not t.is_contiguous() or t.shape != (x.shape[0],) for t in indices):
        raise ValueError("decoder_layer takes contiguous int64 rows, cols, bias_row and positions, one per token")
    tokens, hidden = x.shape
    _, kv_heads, columns, head_dim = k_cache.shape
    shapes = {"qkv": (qkv.groups, qkv.out_features, qkv.in_features), "o": (o.groups, o.out_features, o.in_features),
              "gate_up": (gate_up.groups, gate_up.out_features, gate_up.in_features),
              "down": (down.groups, down.out_features, down.in_features)}
    want = {"qkv": (groups, (heads + 2 * kv_heads) * head_dim, hidden), "o": (groups, hidden, heads * head_dim),
            "gate_up": (groups, 2 * down.in_features, hidden), "down": (groups, hidden, down.in_features)}
    wrong = [f"{k} {shapes[k]} (want {want[k]})" for k in shapes if shapes[k] != want[k]]
    norms = (("w_in", w_in, groups * hidden), ("w_post", w_post, groups * hidden),
             ("q_norm", q_norm, groups * head_dim), ("k_norm", k_norm, groups * head_dim))
    wrong += [f"{k} {tuple(t.shape)}" for k, t, n in norms if t is not None and t.numel() != n]
    wrong += [f"{k} {tuple(t.shape)} (want [{tokens}, {head_dim}])" for k, t in (("cos", cos), ("sin", sin))
              if tuple(t.shape) != (tokens, head_dim)]
    if v_cache.shape != k_cache.shape or bias.numel() % max(bias.shape[-1], 1) or tokens % groups or heads % kv_heads:
        wrong.append("caches, bias or groups")
    if wrong:
        raise ValueError("decoder_layer: shapes do not fit: " + "; ".join(wrong))
    done = lib.sf_layer(
        x.data_ptr(), x.shape[0], groups, x.shape[1], w_in.data_ptr(), w_post.data_ptr(), eps,
        qkv.packed.data_ptr(), _ptr(qkv.bias), o.packed.data_ptr(), _ptr(o.bias), gate_up.packed.data_ptr(),
        _ptr(gate_up.bias), gate_up.out_features // 2, down.packed.data_ptr(), _ptr(down.bias), _ptr(q_norm),
        _ptr(k_norm), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kv_heads, columns,
        head_dim, heads, rows.data_ptr(), cols.data_ptr(), bias.data_ptr(), bias_row.data_ptr(), bias.shape[-1],
        positions.data_ptr(), window or 0, torch.get_num_threads())
    if done != 0:
        why = "head_dim over 1024 or tokens not split among members" if done == -1 else "out of memory"
        raise RuntimeError(f"sf_layer failed: {why}")


def _failed(done: int) -> RuntimeError:
    why = "head_dim over 1024 or tokens not split among members" if done == -1 else "out of memory"
    return RuntimeError(f"sf_layer failed: {why}")


class LayerTable:
    """Every decoder layer of a model (or a group of G models of one shape) over its KV cache, checked once and run
    in one C call per forward (`sf_layers`): the per-forward cost is one ctypes call and a few checks of that
    forward's own tensors, not `decoder_layer`'s checks and ~34 marshalled arguments for every layer.

    layers: one dict per layer with decoder_layer's weight arguments (w_in, w_post, qkv, o, gate_up, down, q_norm,
    k_norm, window); k_cache, v_cache: [layers, rows, kv_heads, columns, head_dim]. The table holds the addresses
    of these tensors (and references to them, so none is freed under it): build a new one when the caches are
    reallocated (`key` says which buffers it was built for) or a weight is replaced."""

    __slots__ = ("lib", "groups", "heads", "hidden", "eps", "kv_heads", "columns", "head_dim", "count", "key",
                 "_table", "_keep")

    def __init__(self, layers: list[dict], *, groups: int, heads: int, hidden: int, eps: float,
                 k_cache: torch.Tensor, v_cache: torch.Tensor):
        lib = library()
        if lib is None:
            raise RuntimeError(f"the CPU matmul kernel is not available: {unavailable_reason()}")
        if k_cache.dim() != 5 or v_cache.shape != k_cache.shape or k_cache.shape[0] != len(layers):
            raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} for {len(layers)} layers")
        _, _, kv_heads, columns, head_dim = k_cache.shape
        entries: list[int] = []
        keep: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            kc, vc = k_cache[i], v_cache[i]
            qkv, o, gate_up, down = layer["qkv"], layer["o"], layer["gate_up"], layer["down"]
            norms = [layer["w_in"], layer["w_post"]] + [t for t in (layer["q_norm"], layer["k_norm"]) if t is not None]
            weights = [w for w in (qkv, o, gate_up, down) if type(w) is PackedWeight]
            if len(weights) != 4:
                raise ValueError(f"layer {i}: decoder layers take PackedWeight linear weights")
            tensors = norms + [kc, vc] + [w.packed for w in weights] + [w.bias for w in weights if w.bias is not None]
            if any(t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" for t in tensors):
                raise ValueError(f"layer {i}: decoder layers take contiguous float32 CPU tensors")
            shapes = {k: (w.groups, w.out_features, w.in_features)
                      for k, w in (("qkv", qkv), ("o", o), ("gate_up", gate_up), ("down", down))}
            want = {"qkv": (groups, (heads + 2 * kv_heads) * head_dim, hidden), "o": (groups, hidden, heads * head_dim),
                    "gate_up": (groups, 2 * down.in_features, hidden), "down": (groups, hidden, down.in_features)}
            wrong = [f"{k} {shapes[k]} (want {want[k]})" for k in shapes if shapes[k] != want[k]]
            sizes = (("w_in", layer["w_in"], groups * hidden), ("w_post", layer["w_post"], groups * hidden),
                     ("q_norm", layer["q_norm"], groups * head_dim), ("k_norm", layer["k_norm"], groups * head_dim))
            wrong += [f"{k} {tuple(t.shape)}" for k, t, n in sizes if t is not None and t.numel() != n]
            if (layer["q_norm"] is None) != (layer["k_norm"] is None) or heads % kv_heads or head_dim > 1024:
                wrong.append("q/k norms, heads or head_dim")
            if wrong:
                raise ValueError(f"layer {i}: shapes do not fit: " + "; ".join(wrong))
            window = layer["window"] or 0
            entries += [layer["w_in"].data_ptr(), layer["w_post"].data_ptr(), qkv.packed.data_ptr(),
                        _ptr(qkv.bias) or 0, o.packed.data_ptr(), _ptr(o.bias) or 0, gate_up.packed.data_ptr(),
                        _ptr(gate_up.bias) or 0, gate_up.out_features // 2, down.packed.data_ptr(),
                        _ptr(down.bias) or 0, _ptr(layer["q_norm"]) or 0, _ptr(layer["k_norm"]) or 0,
                        kc.data_ptr(), vc.data_ptr(), window]
            keep += tensors
        if len(entries) != len(layers) * lib.sf_layer_fields():
            raise RuntimeError("the kernel library's layer table does not match cpu_gemm.py")
        self._table = torch.tensor(entries, dtype=torch.long, device="cpu")
        self._keep = keep + [k_cache, v_cache]
        self.lib, self.groups, self.heads, self.hidden, self.eps = lib, groups, heads, hidden, eps
        self.kv_heads, self.columns, self.head_dim, self.count = kv_heads, columns, head_dim, len(layers)
        self.key = (k_cache.data_ptr(), v_cache.data_ptr())

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor, bias: torch.Tensor, bias_row: torch.Tensor, positions: torch.Tensor) -> None:
        """Every layer in place on x [P, hidden]: `decoder_layer`'s per-token arguments, checked here once for all
        layers. The caller keeps rows and cols inside the cache (the kernel writes there) and bias_row inside bias."""
        p = x.shape[0]
        for t in (x, cos, sin, bias):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("the decoder layers take contiguous float32 CPU tensors")
        for t in (rows, cols, bias_row, positions):
            if t.dtype != torch.long or not t.is_contiguous() or t.device.type != "cpu" or t.shape != (p,):
                raise ValueError("the decoder layers take contiguous int64 rows, cols, bias_row and positions, one "
                                 "per token (on the CPU)")
        s = bias.shape[-1]
        if (x.dim() != 2 or x.shape[1] != self.hidden or p % self.groups or cos.shape != (p, self.head_dim)
                or sin.shape != cos.shape or bias.numel() % max(s, 1) or s > self.columns):
            raise ValueError(f"decoder layers: shapes do not fit: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin "
                             f"{tuple(sin.shape)}, bias {tuple(bias.shape)} for {self.columns} cache columns")
        done = self.lib.sf_layers(
            self._table.data_ptr(), self.count, x.data_ptr(), p, self.groups, self.hidden, self.eps, cos.data_ptr(),
            sin.data_ptr(), self.kv_heads, self.columns, self.head_dim, self.heads, rows.data_ptr(), cols.data_ptr(),
            bias.data_ptr(), bias_row.data_ptr(), s, positions.data_ptr(), torch.get_num_threads())
        if done != 0:
            raise _failed(done)
