"""The CPU runner's packed matmul (specfleet_kernels.cpu_gemm): F.linear's result, batch-invariant, and a runner
that uses it decodes as the one on torch's matmul."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from specfleet_kernels import cpu_gemm

pytestmark = pytest.mark.skipif(not cpu_gemm.available(),
                                reason=f"CPU kernel not built here: {cpu_gemm.unavailable_reason()}")


@pytest.mark.parametrize("out_features, in_features", [(1152, 384), (100, 37), (64, 64), (5, 3), (1, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_weight_computes_linear(out_features, in_features, with_bias):
    gen = torch.Generator().manual_seed(out_features * 31 + in_features)
    w = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if with_bias else None
    packed = cpu_gemm.PackedWeight(w, b)
    assert torch.equal(packed.unpack(), w)
    for rows in (0, 1, 2, 5, 6, 7, 13, 40):
        x = torch.randn(rows, in_features, generator=gen)
        torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    x = torch.randn(2, 3, in_features, generator=gen)  # leading dimensions kept
    torch.testing.assert_close(packed(x), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(packed(x.transpose(0, 1)), F.linear(x.transpose(0, 1), w, b), rtol=1e-5, atol=1e-4)


def test_each_row_is_computed_alike_whatever_is_beside_it():
    """Batch invariance: a row's outputs are bit-identical alone, in any slice of a batch and at any thread count
    (one summation order per output) — a token's logits do not depend on what else shares its forward."""
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(1000, 384, generator=gen), torch.randn(1000, generator=gen)
    packed = cpu_gemm.PackedWeight(w, b)
    x = torch.randn(41, 384, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = packed(x)
        for lo, hi in [(0, 1), (5, 6), (3, 9), (7, 41), (40, 41)]:
            assert torch.equal(packed(x[lo:hi]), full[lo:hi])
        torch.set_num_threads(1)
        assert torch.equal(packed(x), full)
    finally:
        torch.set_num_threads(threads)


def test_a_group_packs_each_member_apart():
    gen = torch.Generator().manual_seed(2)
    w, b = torch.randn(3, 70, 48, generator=gen), torch.randn(3, 70, generator=gen)
    packed = cpu_gemm.PackedWeight(w, b)
    assert packed.shape == (3, 70, 48) and torch.equal(packed.unpack(), w)
    x = torch.randn(3 * 4, 48, generator=gen)  # member-major rows: 4 per member
    want = torch.cat([F.linear(x[4 * g:4 * g + 4], w[g], b[g]) for g in range(3)])
    torch.testing.assert_close(packed(x), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="do not split among 3"):
        packed(torch.randn(4, 48))



def test_gathered_weights_keep_their_values_and_results_bit_for_bit():
    """`gather` moves packed weights into one huge-page buffer: same panels, same outputs, each on a cache line."""
    gen = torch.Generator().manual_seed(3)
    weights = [cpu_gemm.PackedWeight(torch.randn(3, 70, 48, generator=gen), torch.randn(3, 70, generator=gen)),
               cpu_gemm.PackedWeight(torch.randn(100, 37, generator=gen)), cpu_gemm.PackedWeight(torch.randn(5, 3))]
    inputs = [torch.randn(6, 48, generator=gen), torch.randn(7, 37, generator=gen), torch.randn(2, 3)]
    before = [(w.unpack(), w(x)) for w, x in zip(weights, inputs, strict=True)]
    cpu_gemm.gather(weights)
    storage = {w.packed.untyped_storage().data_ptr() for w in weights}
    assert len(storage) == 1  # one buffer
    for w, x, (unpacked, out) in zip(weights, inputs, before, strict=True):
        assert w.packed.data_ptr() % 64 == 0
        assert torch.equal(w.unpack(), unpacked) and torch.equal(w(x), out)

def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="float32 CPU weight"):
        cpu_gemm.PackedWeight(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        cpu_gemm.PackedWeight(torch.randn(4, 4), torch.randn(5))
    packed = cpu_gemm.PackedWeight(torch.randn(4, 8))
    with pytest.raises(ValueError, match="8 float32 inputs"):
        packed(torch.randn(2, 7))
    with pytest.raises(ValueError, match="8 float32 inputs"):
        packed(torch.randn(2, 8, dtype=torch.float64))


def test_no_compiler_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_gemm.CACHE, str(tmp_path))
    with pytest.raises((RuntimeError, OSError)):
        cpu_gemm._build()
    monkeypatch.setenv(cpu_gemm.SWITCH, "0")
    assert not cpu_gemm.available() and cpu_gemm.unavailable_reason() == f"{cpu_gemm.SWITCH}=0"


def test_the_runner_decodes_alike_on_either_matmul(monkeypatch):
    """The bundled target on the packed kernel and on torch's matmul: the same greedy tokens, logits within fp32
    rounding, and on the kernel a request's logits do not change when another request shares the forward."""
    from specfleet.engine.factory import load_model
    from specfleet.engine.llama import LlamaRunner, causal_bias

    model = load_model(Path(__file__).resolve().parents[2] / "models", "target")
    packed = LlamaRunner(model, slots=2, max_len=96)
    monkeypatch.setenv(cpu_gemm.SWITCH, "0")
    plain = LlamaRunner(model, slots=2, max_len=96)
    monkeypatch.delenv(cpu_gemm.SWITCH)
    assert (packed.matmul, plain.matmul) == ("packed", "torch")
    prompt = torch.randint(2, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    outputs = []
    for runner in (packed, plain):
        tokens, ids, logits_seen = [], prompt, []
        start = 0
        for _ in range(8):
            n = ids.shape[1]
            cols = (start + torch.arange(n))[None]
            logits = runner.forward(ids, cols, cols, causal_bias([start], [n], start + n))[0, -1]
            logits_seen.append(logits)
            start += n
            ids = logits.argmax()[None, None]
            tokens.append(int(ids))
        outputs.append((tokens, torch.stack(logits_seen)))
    assert outputs[0][0] == outputs[1][0]
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-4, atol=1e-3)
    # the same last token in slot 0 alone and beside another request in slot 1: bit-identical on the kernel
    cols = torch.arange(24)[None]
    packed.forward(prompt, cols, cols, causal_bias([0], [24], 24), slots=torch.tensor([1]))
    packed.forward(prompt, cols, cols, causal_bias([0], [24], 24), slots=torch.tensor([0]))
    one = torch.tensor([[24]])
    alone = packed.forward(prompt[:, -1:], one, one, causal_bias([24], [1], 25), slots=torch.tensor([0]))
    both = packed.forward(torch.cat([prompt[:, -1:], prompt[:, :1]]), one.repeat(2, 1), one.repeat(2, 1),
                          causal_bias([24, 24], [1, 1], 25), slots=torch.tensor([0, 1]))
    assert torch.equal(alone[0], both[0])


def test_verifying_a_tree_gives_the_logits_of_plain_decoding_bit_for_bit():
    """On the kernel a token's logits are the same bits whether it is decoded alone or verified inside a draft tree
    beside siblings: every product and every attention sum runs in one order over the same visible columns."""
    from specfleet.engine.factory import load_model
    from specfleet.engine.llama import NEG, LlamaRunner, causal_bias

    runner = LlamaRunner(load_model(Path(__file__).resolve().parents[2] / "models", "target"), slots=2, max_len=96)
    assert runner.matmul == "packed"
    prompt = torch.randint(2, runner.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    cols = torch.arange(20)[None]
    for slot in (0, 1):
        runner.forward(prompt, cols, cols, causal_bias([0], [20], 20), slots=torch.tensor([slot]))
    a, x, b = 11, 222, 3333
    plain = []
    for i, token in enumerate((a, b)):  # slot 0: decode a at position 20, then b at 21
        at = torch.tensor([[20 + i]])
        plain.append(runner.forward(torch.tensor([[token]]), at, at, causal_bias([20 + i], [1], 21 + i),
                                    slots=torch.tensor([0]))[0, 0])
    # slot 1: one forward of the tree a, x (a's sibling), b (a's child) at columns 20, 21, 22
    bias = torch.full((1, 1, 3, 23), NEG)
    bias[..., :20] = 0.0
    for node, seen in enumerate(([20], [21], [20, 22])):
        bias[0, 0, node, seen] = 0.0
    tree = runner.forward(torch.tensor([[a, x, b]]), torch.tensor([[20, 20, 21]]), torch.tensor([[20, 21, 22]]), bias,
                          slots=torch.tensor([1]))[0]
    assert torch.equal(tree[0], plain[0]) and torch.equal(tree[2], plain[1])


def test_decoder_layer_refuses_what_it_cannot_read():
    packed = cpu_gemm.PackedWeight(torch.randn(8, 8))
    args = dict(groups=1, heads=1, eps=1e-6, w_in=torch.ones(8), w_post=torch.ones(8), qkv=packed, o=packed,
                gate_up=packed, down=packed, q_norm=None, k_norm=None, cos=torch.ones(1, 8), sin=torch.zeros(1, 8),
                k_cache=torch.zeros(1, 1, 4, 8), v_cache=torch.zeros(1, 1, 4, 8), bias=torch.zeros(1, 4),
                rows=torch.zeros(1, dtype=torch.long), cols=torch.zeros(1, dtype=torch.long),
                bias_row=torch.zeros(1, dtype=torch.long), positions=torch.zeros(1, dtype=torch.long), window=None)
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_gemm.decoder_layer(torch.zeros(8, 2).t(), **args)
    with pytest.raises(ValueError, match="shapes do not fit: qkv"):
        cpu_gemm.decoder_layer(torch.zeros(1, 8), **args)
    with pytest.raises(ValueError, match="int64"):
        cpu_gemm.decoder_layer(torch.zeros(1, 8), **{**args, "rows": torch.zeros(1, dtype=torch.int32)})


def test_tensors_off_the_cpu_are_refused_before_the_kernel_reads_them():
    packed = cpu_gemm.PackedWeight(torch.randn(4, 8))
    with pytest.raises(ValueError, match="on meta"):
        packed(torch.randn(2, 8, device="meta"))


def _layer_case(seed: int, *, groups: int, tokens: int, columns: int, head_dim: int, kv_heads: int, heads: int,
                window: int | None, hidden_share: float, qk_norm: bool, rows: torch.Tensor | None = None,
                loud: float = 1.0, soft_bias: bool = False):
    """A random decoder layer and its inputs (tokens per member, S = columns): keys and values already in the
    cache, some columns hidden per token (a tree mask; the others' bias 0, or random with soft_bias), NaN in the
    cache's unwritten columns."""
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, g, p = 96, 160, groups, groups * tokens
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731

    def weight(out_features, in_features):
        shape = (g, out_features, in_features) if g > 1 else (out_features, in_features)
        return cpu_gemm.PackedWeight(r(*shape) * 0.1, r(*shape[:-1]) * 0.01)

    k_cache, v_cache = r(2 * g, kv_heads, columns + 4, head_dim) * loud, r(2 * g, kv_heads, columns + 4, head_dim)
    k_cache[:, :, columns:], v_cache[:, :, columns:] = float("nan"), float("nan")
    bias = torch.where(torch.rand(p, columns, generator=gen) < hidden_share, torch.finfo(torch.float32).min,
                       r(p, columns) if soft_bias else 0.0)
    angle = torch.rand(p, head_dim // 2, generator=gen) * 6
    norm = (lambda: r(g * head_dim).abs() + 0.5) if qk_norm else (lambda: None)
    args = dict(groups=g, heads=heads, eps=1e-6, w_in=r(g * hidden).abs() + 0.5, w_post=r(g * hidden).abs() + 0.5,
                qkv=weight((heads + 2 * kv_heads) * head_dim, hidden), o=weight(hidden, heads * head_dim),
                gate_up=weight(2 * inter, hidden), down=weight(hidden, inter), q_norm=norm(), k_norm=norm(),
                cos=torch.cat([angle.cos()] * 2, -1), sin=torch.cat([angle.sin()] * 2, -1), k_cache=k_cache,
                v_cache=v_cache, rows=torch.randint(0, 2 * g, (p,), generator=gen) if rows is None else rows,
                cols=torch.randint(max(columns - tokens, 0), columns, (p,), generator=gen), bias=bias,
                bias_row=torch.randperm(p, generator=gen), positions=torch.randint(0, columns + 1, (p,), generator=gen),
                window=window)
    return r(p, hidden) * loud, args


def _run_layer(lib, x, args):
    """decoder_layer on copies (x, caches) with the given library: (x, k_cache, v_cache) after it."""
    for name in ("qkv", "o", "gate_up", "down"):
        args[name]._lib = lib
    x = x.clone()
    copies = {**args, "k_cache": args["k_cache"].clone(), "v_cache": args["v_cache"].clone()}
    cpu_gemm.decoder_layer(x, **copies)
    return x, copies["k_cache"], copies["v_cache"]


def test_attention_is_the_plain_loop_bit_for_bit(monkeypatch, tmp_path):
    """sf_layer's attention (16 columns' dots at once, the vector expf, a run of tokens per pass over a head's
    keys and values) gives the bits of the plain per-(token, head) loop it replaced, built with -DSF_PLAIN_ATTENTION
    (same dot order, scalar expf): shapes with a head_dim tail, grouped heads, group members, windows, hidden
    columns, q/k norms, scores spread enough to underflow expf, at one thread and two."""
    monkeypatch.setenv(cpu_gemm.CACHE, str(tmp_path))
    monkeypatch.setattr(cpu_gemm, "FLAGS", [*cpu_gemm.FLAGS, "-DSF_PLAIN_ATTENTION"])
    plain, fast = cpu_gemm._build(), cpu_gemm.library()
    cases = [dict(groups=1, tokens=1, columns=1, head_dim=64, kv_heads=6, heads=6, window=None, hidden_share=0.0,
                  qk_norm=False),
             dict(groups=1, tokens=5, columns=150, head_dim=64, kv_heads=2, heads=6, window=None, hidden_share=0.3,
                  qk_norm=True),
             dict(groups=1, tokens=20, columns=333, head_dim=64, kv_heads=6, heads=6, window=64, hidden_share=0.1,
                  qk_norm=False, rows=torch.ones(20, dtype=torch.long)),
             dict(groups=3, tokens=7, columns=47, head_dim=48, kv_heads=1, heads=2, window=5, hidden_share=0.5,
                  qk_norm=True),
             dict(groups=1, tokens=9, columns=600, head_dim=80, kv_heads=3, heads=3, window=None, hidden_share=0.95,
                  qk_norm=False),
             dict(groups=1, tokens=4, columns=99, head_dim=48, kv_heads=2, heads=2, window=None, hidden_share=0.1,
                  qk_norm=False, soft_bias=True),
             dict(groups=1, tokens=3, columns=17, head_dim=8, kv_heads=1, heads=1, window=None, hidden_share=1.0,
                  qk_norm=False),
             dict(groups=1, tokens=12, columns=200, head_dim=128, kv_heads=2, heads=4, window=300, hidden_share=0.2,
                  qk_norm=False, loud=30.0)]
    threads = torch.get_num_threads()
    try:
        for n, case in enumerate(cases):
            x, args = _layer_case(n, **case)
            for t in (1, 2):
                torch.set_num_threads(t)
                want, got = _run_layer(plain, x, args), _run_layer(fast, x, args)
                for a, b in zip(want, got, strict=True):
                    assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (n, t, case)
    finally:
        torch.set_num_threads(threads)


def test_the_vector_expf_is_this_libm_expf():
    """The attention's 16-lane expf returns expf's bits (checked on all 2^32 floats where it was written; here on
    one float in 251, all over the range, against this machine's libm)."""
    lib = cpu_gemm.library()
    lib.sf_expf_mismatches.argtypes = [ctypes.c_ulong, ctypes.c_ulong]
    lib.sf_expf_mismatches.restype = ctypes.c_long
    assert lib.sf_expf_mismatches(0, 251) == 0
    assert lib.sf_expf_mismatches(0xBF800000, 1 << 12) == 0  # [-1, -0.5) and up, finer


def test_a_tokens_attention_does_not_depend_on_the_tokens_beside_it():
    """Tokens on one cache row are attended in runs of up to 8 per pass over a head's keys: each token's layer
    output is still the bits it gets alone (its cache writes made first, as in a tree's forward)."""
    x, args = _layer_case(11, groups=1, tokens=19, columns=260, head_dim=64, kv_heads=6, heads=6, window=None,
                          hidden_share=0.2, qk_norm=False, rows=torch.ones(19, dtype=torch.long))
    args["cols"] = 241 + torch.randperm(19, generator=torch.Generator().manual_seed(5))
    lib = cpu_gemm.library()
    _, args["k_cache"], args["v_cache"] = _run_layer(lib, x, args)  # every token's key and value in place
    together = _run_layer(lib, x, args)[0]
    for p in (0, 7, 8, 15, 18):
        one = {**args, **{k: args[k][p:p + 1].contiguous() for k in ("cos", "sin", "rows", "cols", "positions")}}
        one["bias"], one["bias_row"] = args["bias"][args["bias_row"][p]][None].contiguous(), torch.zeros(1).long()
        assert torch.equal(_run_layer(lib, x[p:p + 1], one)[0][0], together[p])


def _layer_args(runner, i):
    layer = runner.layers[i]
    return dict(w_in=layer.w_in, w_post=layer.w_post, qkv=layer.w_qkv, o=layer.w_o, gate_up=layer.w_gate_up,
                down=layer.w_down, q_norm=layer.q_norm, k_norm=layer.k_norm, window=layer.window)


def test_the_layer_table_runs_the_layers_as_decoder_layer_does():
    """One sf_layers call over the runner's table: x and both caches bit for bit what decoder_layer, layer by layer,
    leaves; the table is rebuilt when `reserve` reallocates the caches."""
    from specfleet.engine.factory import load_model
    from specfleet.engine.llama import LlamaRunner, causal_bias

    model = load_model(Path(__file__).resolve().parents[2] / "models", "target")
    runner = LlamaRunner(model, slots=2, max_len=600)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(2, model.config.vocab_size, (2, 30), generator=generator)
    cols = torch.arange(30)[None].expand(2, 30)
    runner.forward(ids, cols, cols, causal_bias([0, 0], [30, 30], 30))  # something in the caches
    table = runner._layers_table()
    p = 5
    x = torch.randn(p, model.config.hidden_size, generator=generator)
    positions = torch.tensor([30, 31, 31, 30, 32])
    cos, sin = runner._cos_sin(x, positions)
    rows, write = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([30, 31, 32, 30, 31])
    bias = causal_bias([30, 30], [3, 2], 33).view(-1, 33).contiguous()
    bias_row = torch.tensor([0, 1, 2, 3, 4])
    caches = runner.k_cache.clone(), runner.v_cache.clone()
    want = x.clone()
    for i in range(len(runner.layers)):
        cpu_gemm.decoder_layer(want, groups=1, heads=runner.heads, eps=runner.eps, cos=cos, sin=sin,
                               k_cache=caches[0][i], v_cache=caches[1][i], rows=rows, cols=write, bias=bias,
                               bias_row=bias_row, positions=positions, **_layer_args(runner, i))
    got = x.clone()
    table(got, cos, sin, rows, write, bias, bias_row, positions)
    assert torch.equal(got, want)
    assert torch.equal(runner.k_cache, caches[0]) and torch.equal(runner.v_cache, caches[1])
    with pytest.raises(ValueError, match="int64"):
        table(got, cos, sin, rows.int(), write, bias, bias_row, positions)
    with pytest.raises(ValueError, match="contiguous float32"):
        table(got.t().contiguous().t(), cos, sin, rows, write, bias, bias_row, positions)
    with pytest.raises(ValueError, match="shapes do not fit"):
        table(got, cos[:4], sin[:4], rows, write, bias, bias_row, positions)
    runner.reserve(400)  # new cache buffers: a new table over them
    assert runner._layers_table() is not table and runner._layers_table().key == (runner.k_cache.data_ptr(),
                                                                                   runner.v_cache.data_ptr())


def test_the_layer_table_refuses_weights_it_cannot_run():
    packed = cpu_gemm.PackedWeight(torch.randn(8, 8))
    layer = dict(w_in=torch.ones(8), w_post=torch.ones(8), qkv=packed, o=packed, gate_up=packed, down=packed,
                 q_norm=None, k_norm=None, window=None)
    caches = torch.zeros(1, 1, 1, 4, 8), torch.zeros(1, 1, 1, 4, 8)
    with pytest.raises(ValueError, match="shapes do not fit: qkv"):
        cpu_gemm.LayerTable([layer], groups=1, heads=1, hidden=8, eps=1e-6, k_cache=caches[0], v_cache=caches[1])
    with pytest.raises(ValueError, match="PackedWeight"):
        cpu_gemm.LayerTable([{**layer, "o": torch.randn(8, 8)}], groups=1, heads=1, hidden=8, eps=1e-6,
                            k_cache=caches[0], v_cache=caches[1])
    with pytest.raises(ValueError, match="for 2 layers"):
        cpu_gemm.LayerTable([layer, layer], groups=1, heads=1, hidden=8, eps=1e-6, k_cache=caches[0],
                            v_cache=caches[1])


def test_the_packed_runner_refuses_slots_and_columns_outside_its_cache():
    """The C layers write where they are told: a slot past the cache or a negative column is refused before, with
    and without padding rows."""
    from specfleet.engine.factory import load_model
    from specfleet.engine.llama import LlamaRunner, causal_bias

    model = load_model(Path(__file__).resolve().parents[2] / "models", "target")
    runner = LlamaRunner(model, slots=2, max_len=64)
    ids, cols = torch.ones(2, 3, dtype=torch.long), torch.arange(3)[None].expand(2, 3)
    bias = causal_bias([0, 0], [3, 3], 3)
    for lengths in (None, [3, 2]):
        with pytest.raises(ValueError, match="slots must be"):
            runner.forward(ids, cols, cols, bias, slots=torch.tensor([0, 2]), lengths=lengths)
        with pytest.raises(ValueError, match="slots must be"):
            runner.forward(ids, cols, cols, bias, slots=torch.tensor([-1, 0]), lengths=lengths)
        with pytest.raises(ValueError, match="slots must be"):
            runner.forward(ids, cols - 1, cols - 1, bias, lengths=lengths)
    with pytest.raises(ValueError, match="slots must be"):  # three rows, two slots
        runner.forward(torch.ones(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long),
                       torch.zeros(3, 1, dtype=torch.long), causal_bias([0] * 3, [1] * 3, 1))
    runner.forward(ids, cols, cols, bias, slots=torch.tensor([1, 0]))  # in range: runs
