"""The Triton kernels against the torch reference, for exact equality: bool masks and integers exactly, the bias
and the gathered KV bit for bit. Random trees (chains, stars, random and bushy topological parents, n from 1 to
128), several batch sizes and dtypes. Needs triton and a CUDA device: the whole module is skipped otherwise, with
the reason (triton_kernels.UNAVAILABLE_REASON)."""

import pytest
import torch
from test_kernels_dispatch import TREE_KINDS, assert_matches_rows, random_batch, random_parents

from specfleet_kernels import reference
from specfleet_kernels import triton_kernels as tk

if not tk.AVAILABLE:
    pytest.skip(tk.UNAVAILABLE_REASON, allow_module_level=True)

CUDA = torch.device("cuda")
TREE_SIZES = [1, 2, 3, 5, 8, 16, 31, 32, 33, 64, 100, 128]
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor, on the CPU (so that equality is bitwise, -0.0 and NaNs included)."""
    return t.detach().cpu().contiguous().view(BITS[t.dtype])


def random_bits(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """A float tensor of uniformly random bit patterns: NaNs, infinities, subnormals and -0.0 included."""
    idt = BITS[dtype]
    info = torch.iinfo(idt)
    return torch.randint(info.min, info.max, shape, dtype=idt, generator=gen).view(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Tree masks, depths, positions, bias
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", TREE_SIZES)
@pytest.mark.parametrize("kind", TREE_KINDS)
def test_tree_kernels_equal_the_reference(kind, n):
    gen = torch.Generator().manual_seed(n)
    for trial in range(3):
        cpu = torch.tensor(random_parents(n, kind, gen), dtype=torch.long)
        for parents in (cpu.to(CUDA), cpu.to(CUDA, torch.int32)):
            mask = tk.tree_ancestor_mask(parents)
            assert mask.dtype == torch.bool and mask.device.type == "cuda"
            assert torch.equal(mask.cpu(), reference.tree_ancestor_mask(cpu)), (kind, n, trial)
            depths = tk.tree_depths(parents)
            assert depths.dtype == torch.long
            assert torch.equal(depths.cpu(), reference.tree_depths(cpu)), (kind, n, trial)
            for prefix_len in (0, 1, 37):
                positions = tk.tree_position_ids(parents, prefix_len)
                assert positions.dtype == torch.long
                assert torch.equal(positions.cpu(), reference.tree_position_ids(cpu, prefix_len))
                for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                    bias = tk.tree_attention_bias(parents, prefix_len, dtype)
                    want = reference.tree_attention_bias(cpu, prefix_len, dtype)
                    assert bias.dtype == dtype and bias.shape == want.shape
                    assert torch.equal(bits(bias), bits(want)), (kind, n, trial, prefix_len, dtype)
            assert tk.tree_attention_bias(parents, 3).dtype == torch.float32  # the default dtype


def test_tree_kernels_on_an_empty_tree():
    cpu = torch.zeros(0, dtype=torch.long)
    parents = cpu.to(CUDA)
    assert tk.tree_ancestor_mask(parents).shape == reference.tree_ancestor_mask(cpu).shape == (0, 0)
    assert tk.tree_depths(parents).shape == (0,)
    assert tk.tree_position_ids(parents, 4).shape == (0,)
    assert tk.tree_attention_bias(parents, 4).shape == reference.tree_attention_bias(cpu, 4).shape == (0, 4)


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, -2], [[-1]]])
def test_tree_kernels_reject_bad_parents(parents):
    with pytest.raises(ValueError):
        tk.tree_depths(torch.tensor(parents, device=CUDA))
    with pytest.raises(ValueError):
        tk.tree_attention_bias(torch.tensor(parents, device=CUDA), 3)


def test_tree_kernels_reject_cpu_tensors_and_negative_prefix():
    with pytest.raises(ValueError, match="CUDA"):
        tk.tree_ancestor_mask(torch.tensor([-1, 0]))
    with pytest.raises(ValueError):
        tk.tree_attention_bias(torch.tensor([-1, 0], device=CUDA), -1)


# ---------------------------------------------------------------------------------------------------------------
# KV gather
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gather_kv_equals_the_reference_bitwise(dtype):
    gen = torch.Generator().manual_seed(7)
    shapes = [(1, 1, 1, 1), (1, 2, 8, 16), (2, 3, 40, 64), (5, 4, 129, 80), (3, 8, 300, 128), (2, 2, 17, 256),
              (1, 1, 5, 1500)]  # dim 1500 > the 1024 block: two chunks
    for b, h, s, d in shapes:
        for layout in ("contiguous", "bshd"):
            if layout == "contiguous":
                cache = random_bits((b, h, s, d), dtype, gen)
            else:  # [batch, slots, heads, dim] storage seen as [batch, heads, slots, dim]: non-contiguous strides
                cache = random_bits((b, s, h, d), dtype, gen).transpose(1, 2)
            for m in (0, 1, s, 2 * s + 3):  # with repeats, in any order
                keep = torch.randint(0, s, (b, m), generator=gen)
                # The reference run on the bit patterns themselves: torch.gather on a CPU half tensor does not keep
                # every NaN payload, so the float reference is compared with NaNs equal and the bits with this.
                want_bits = reference.gather_kv(cache.view(BITS[dtype]), keep)
                want = reference.gather_kv(cache, keep)
                for keep_dtype in (torch.int64, torch.int32):
                    out = tk.gather_kv(cache.to(CUDA), keep.to(CUDA, keep_dtype))
                    assert out.dtype == dtype and out.shape == (b, h, m, d) and out.is_contiguous()
                    assert torch.equal(bits(out), want_bits), (b, h, s, d, layout, m, keep_dtype)
                    torch.testing.assert_close(out.cpu(), want, rtol=0, atol=0, equal_nan=True)


def test_gather_kv_keeps_committed_then_accepted_slots():
    cache = torch.arange(2 * 3 * 8 * 4, dtype=torch.float32).reshape(2, 3, 8, 4)
    keep = torch.tensor([[0, 1, 2, 5], [0, 1, 3, 4]])
    assert torch.equal(tk.gather_kv(cache.to(CUDA), keep.to(CUDA)).cpu(), reference.gather_kv(cache, keep))


@pytest.mark.parametrize("keep", [[[0, 8]], [[-1, 0]]])
def test_gather_kv_rejects_slots_out_of_range(keep):
    with pytest.raises(ValueError, match="outside"):
        tk.gather_kv(torch.zeros(1, 2, 8, 4, device=CUDA), torch.tensor(keep, device=CUDA))


# ---------------------------------------------------------------------------------------------------------------
# Batched greedy acceptance
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 16, 31, 33, 64, 128])
@pytest.mark.parametrize("bsz", [1, 3, 17, 64])
def test_greedy_accept_batched_equals_the_reference(bsz, n):
    gen = torch.Generator().manual_seed(100 * n + bsz)
    for vocab in (2, 3, 50):
        tokens, parents, argmax, lengths = random_batch(bsz, n, vocab, gen)
        want = tk.greedy_accept_batched_reference(tokens, parents, argmax, lengths)
        on_gpu = [t.to(CUDA) for t in (tokens, parents, argmax, lengths)]
        for args in (on_gpu, [on_gpu[0].int(), on_gpu[1].int(), on_gpu[2].int(), on_gpu[3].int()]):
            got = tk.greedy_accept_batched(*args)
            assert all(t.device.type == "cuda" and t.dtype == torch.long for t in got)
            assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want, strict=True)), (bsz, n, vocab)
        assert_matches_rows(got, tokens, parents, argmax, lengths)
        # the torch reference gives the same on the GPU too
        on_device = tk.greedy_accept_batched_reference(*on_gpu)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(on_device, want, strict=True))


def test_greedy_accept_batched_on_an_empty_batch_and_bad_input():
    empty = tk.greedy_accept_batched(torch.zeros(0, 4, dtype=torch.long, device=CUDA),
                                     torch.zeros(0, 4, dtype=torch.long, device=CUDA),
                                     torch.zeros(0, 5, dtype=torch.long, device=CUDA),
                                     torch.zeros(0, dtype=torch.long, device=CUDA))
    assert [tuple(t.shape) for t in empty] == [(0,), (0, 4), (0,)]
    tokens, argmax = torch.tensor([[1, 2]], device=CUDA), torch.tensor([[1, 2, 3]], device=CUDA)
    with pytest.raises(ValueError):  # node 1 is its own parent
        tk.greedy_accept_batched(tokens, torch.tensor([[-1, 1]], device=CUDA), argmax, torch.tensor([2], device=CUDA))
    with pytest.raises(ValueError, match="CUDA"):
        tk.greedy_accept_batched(tokens.cpu(), torch.tensor([[-1, 0]]), argmax.cpu(), torch.tensor([2]))
