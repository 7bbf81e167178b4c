"""CPU side of the GPU kernel path: importing specfleet_kernels.triton_kernels without triton, the backend
dispatcher, and the pure-torch batched greedy acceptance (the definition the Triton kernel is tested against)
checked request by request against reference.greedy_accept. The random tree and batch generators here are shared
with test_kernels_triton.py."""

import importlib.util
import inspect

import pytest
import torch

from specfleet_kernels import backend_for, reference
from specfleet_kernels import triton_kernels as tk

TREE_KINDS = ("chain", "star", "random", "bushy")
SHARED_NAMES = ("tree_depths", "tree_ancestor_mask", "tree_attention_bias", "tree_position_ids", "gather_kv")


def random_parents(n: int, kind: str, gen: torch.Generator) -> list[int]:
    """A topological parent list (-1 <= parents[i] < i) of the given shape."""
    if kind == "chain":
        return [i - 1 for i in range(n)]
    if kind == "star":
        return [-1] * n
    if kind == "random":  # uniform over the earlier nodes and the root
        return [int(torch.randint(-1, i, (), generator=gen)) for i in range(n)]
    if kind == "bushy":  # parent among the last few nodes: deep trees with a few siblings per level
        return [max(-1, i - 1 - int(torch.randint(0, 4, (), generator=gen))) for i in range(n)]
    raise ValueError(kind)


def random_batch(bsz: int, n: int, vocab: int, gen: torch.Generator):
    """(tokens [B, n], parents [B, n], target_argmax [B, n + 1], lengths [B]) of padded random trees.

    A small vocab gives siblings with equal tokens (the first in index order must win). Most rows get a target
    that follows a random root-to-node path, so that acceptance goes deep. The padding is adversarial: random
    tokens and parents that point at valid nodes, or out of range, and must be ignored."""
    lengths = torch.randint(0, n + 1, (bsz,), generator=gen)
    if bsz:
        lengths[0] = n
    tokens = torch.randint(0, vocab, (bsz, n), generator=gen)
    argmax = torch.randint(0, vocab, (bsz, n + 1), generator=gen)
    parents = torch.empty(bsz, n, dtype=torch.long)
    for b in range(bsz):
        m = int(lengths[b])
        kind = TREE_KINDS[int(torch.randint(0, len(TREE_KINDS), (), generator=gen))]
        pad = random_parents(n, "random", gen)
        if b % 3 == 1:
            pad = [7 * n + 5 if i % 2 else -9 for i in range(n)]  # invalid, but only as padding
        parents[b] = torch.tensor(random_parents(m, kind, gen) + pad[m:], dtype=torch.long)
        if float(torch.rand((), generator=gen)) < 0.8:
            node = -1
            while True:
                kids = [c for c in range(m) if int(parents[b, c]) == node]
                if not kids or float(torch.rand((), generator=gen)) < 0.1:
                    break
                c = kids[int(torch.randint(0, len(kids), (), generator=gen))]
                argmax[b, node + 1] = tokens[b, c]
                node = c
    return tokens, parents, argmax, lengths


def assert_matches_rows(result, tokens, parents, argmax, lengths) -> None:
    """result = (accept_len, path, next_token) equals reference.greedy_accept on each request's valid tree."""
    accept_len, path, next_token = (t.cpu() for t in result)
    tokens, parents, argmax, lengths = tokens.cpu(), parents.cpu(), argmax.cpu(), lengths.cpu()
    bsz, n = tokens.shape
    assert accept_len.shape == (bsz,) and path.shape == (bsz, n) and next_token.shape == (bsz,)
    assert accept_len.dtype == path.dtype == next_token.dtype == torch.long
    for b in range(bsz):
        m = int(lengths[b])
        want_path, want_next = reference.greedy_accept(tokens[b, :m], parents[b, :m], argmax[b, :m + 1])
        k = len(want_path)
        assert int(accept_len[b]) == k, b
        assert path[b, :k].tolist() == want_path, b
        assert path[b, k:].tolist() == [-1] * (n - k), b
        assert int(next_token[b]) == want_next, b


def test_importing_without_triton_says_why():
    assert isinstance(tk.AVAILABLE, bool) and isinstance(tk.UNAVAILABLE_REASON, str)
    assert tk.AVAILABLE == (tk.UNAVAILABLE_REASON == "")
    if importlib.util.find_spec("triton") is None:
        assert not tk.AVAILABLE
        assert "triton is not installed" in tk.UNAVAILABLE_REASON and ".[gpu]" in tk.UNAVAILABLE_REASON
    elif not torch.cuda.is_available():
        assert tk.UNAVAILABLE_REASON.startswith("no CUDA device")


def test_backend_for_picks_reference_off_cuda():
    assert backend_for("cpu") is reference
    assert backend_for(torch.device("cpu")) is reference
    assert backend_for("cuda") is (tk if tk.AVAILABLE else reference)
    assert backend_for(torch.device("cuda", 0)) is (tk if tk.AVAILABLE else reference)


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_both_backends_share_names_and_signatures(name):
    ref, gpu = inspect.signature(getattr(reference, name)), inspect.signature(getattr(tk, name))
    assert [(p.name, p.default) for p in ref.parameters.values()] == \
           [(p.name, p.default) for p in gpu.parameters.values()]


@pytest.mark.skipif(tk.AVAILABLE, reason="the Triton path can run here")
def test_triton_functions_refuse_to_run_without_triton():
    parents = torch.tensor([-1, 0, 0])
    with pytest.raises(RuntimeError, match="cannot run here"):
        tk.tree_attention_bias(parents, 4)
    with pytest.raises(RuntimeError, match="cannot run here"):
        tk.gather_kv(torch.zeros(1, 1, 2, 2), torch.tensor([[1, 0]]))
    with pytest.raises(RuntimeError, match="cannot run here"):
        tk.greedy_accept_batched(*random_batch(2, 3, 2, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError):  # arguments are still checked first, like the reference does
        tk.tree_depths(torch.tensor([0]))


def test_greedy_batched_reference_on_a_hand_made_tree():
    # root -> 0 -> 1 -> 3 ; root -> 0 -> 2 ; root -> 4 (the reference tests' tree), padded to n = 7
    tokens = torch.tensor([[7, 8, 9, 5, 6, 7, 9]] * 3)
    parents = torch.tensor([[-1, 0, 0, 1, -1, 0, 2]] * 3)  # nodes 5 and 6 are padding that would match
    argmax = torch.tensor([[7, 9, 0, 7, 0, 0, 0, 0],        # 0 -> 2, then 7: node 6 would match but is padding
                           [1, 0, 0, 0, 0, 0, 0, 0],        # nothing matches at the root
                           [7, 8, 5, 0, 4, 0, 0, 0]])       # 0 -> 1 -> 3, bonus 4
    lengths = torch.tensor([5, 5, 5])
    accept_len, path, next_token = tk.greedy_accept_batched_reference(tokens, parents, argmax, lengths)
    assert accept_len.tolist() == [2, 0, 3]
    assert path.tolist() == [[0, 2, -1, -1, -1, -1, -1], [-1] * 7, [0, 1, 3, -1, -1, -1, -1]]
    assert next_token.tolist() == [7, 1, 4]
    assert_matches_rows((accept_len, path, next_token), tokens, parents, argmax, lengths)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 16, 33, 64])
@pytest.mark.parametrize("bsz", [1, 2, 7, 32])
def test_greedy_batched_reference_matches_greedy_accept_per_request(bsz, n):
    gen = torch.Generator().manual_seed(1000 * n + bsz)
    for vocab in (2, 3, 50):
        tokens, parents, argmax, lengths = random_batch(bsz, n, vocab, gen)
        result = tk.greedy_accept_batched_reference(tokens, parents, argmax, lengths)
        assert_matches_rows(result, tokens, parents, argmax, lengths)
        # int32 inputs give the same answer
        result32 = tk.greedy_accept_batched_reference(tokens.int(), parents.int(), argmax.int(), lengths.int())
        assert all(torch.equal(a, b) for a, b in zip(result, result32, strict=True))


def test_greedy_batched_reference_on_an_empty_batch():
    accept_len, path, next_token = tk.greedy_accept_batched_reference(
        torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4, dtype=torch.long),
        torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert accept_len.shape == (0,) and path.shape == (0, 4) and next_token.shape == (0,)


@pytest.mark.parametrize("case", ["parents_shape", "argmax_shape", "lengths_shape", "length_too_big",
                                  "negative_length", "parent_not_before", "parent_below_root", "float_tokens"])
def test_greedy_batched_reference_rejects_bad_input(case):
    tokens, parents = torch.tensor([[1, 2, 3]]), torch.tensor([[-1, 0, 1]])
    argmax, lengths = torch.tensor([[1, 2, 3, 4]]), torch.tensor([3])
    if case == "parents_shape":
        parents = parents[:, :2]
    elif case == "argmax_shape":
        argmax = argmax[:, :3]
    elif case == "lengths_shape":
        lengths = torch.tensor([3, 3])
    elif case == "length_too_big":
        lengths = torch.tensor([4])
    elif case == "negative_length":
        lengths = torch.tensor([-1])
    elif case == "parent_not_before":
        parents = torch.tensor([[-1, 1, 1]])
    elif case == "parent_below_root":
        parents = torch.tensor([[-1, -2, 1]])
    elif case == "float_tokens":
        tokens = tokens.float()
    with pytest.raises(ValueError):
        tk.greedy_accept_batched_reference(tokens, parents, argmax, lengths)
