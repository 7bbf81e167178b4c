"""Reference tree kernels: masks, positions, KV gather and greedy acceptance on hand-made trees, and tree
attention checked against plain causal attention run on each branch alone."""

import pytest
import torch

from specfleet_kernels.reference import (
    gather_kv,
    greedy_accept,
    tree_ancestor_mask,
    tree_attention_bias,
    tree_depths,
    tree_position_ids,
)

# root -> 0 -> 1 -> 3 ; root -> 0 -> 2 ; root -> 4
PARENTS = torch.tensor([-1, 0, 0, 1, -1])


def test_depths_positions_and_mask():
    assert tree_depths(PARENTS).tolist() == [0, 1, 1, 2, 0]
    assert tree_position_ids(PARENTS, 10).tolist() == [10, 11, 11, 12, 10]
    mask = tree_ancestor_mask(PARENTS).int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 0, 1, 0, 0],
                    [1, 1, 0, 1, 0],
                    [0, 0, 0, 0, 1]]


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, -2], [[-1]]])
def test_bad_parents_are_rejected(parents):
    with pytest.raises(ValueError):
        tree_depths(torch.tensor(parents))


def test_tree_attention_equals_each_branch_alone():
    torch.manual_seed(0)
    prefix, n, d = 6, len(PARENTS), 16
    q = torch.randn(n, d)
    k_prefix, v_prefix = torch.randn(prefix, d), torch.randn(prefix, d)
    k_tree, v_tree = torch.randn(n, d), torch.randn(n, d)
    bias = tree_attention_bias(PARENTS, prefix)
    k, v = torch.cat([k_prefix, k_tree]), torch.cat([v_prefix, v_tree])
    out = torch.softmax(q @ k.T / d**0.5 + bias, dim=-1) @ v
    mask = tree_ancestor_mask(PARENTS)
    for i in range(n):
        branch = mask[i].nonzero().flatten()  # the chain root..i
        kb, vb = torch.cat([k_prefix, k_tree[branch]]), torch.cat([v_prefix, v_tree[branch]])
        alone = torch.softmax(q[i] @ kb.T / d**0.5, dim=-1) @ vb
        torch.testing.assert_close(out[i], alone)


def test_gather_kv_keeps_accepted_slots():
    cache = torch.arange(2 * 3 * 8 * 4, dtype=torch.float32).reshape(2, 3, 8, 4)
    keep = torch.tensor([[0, 1, 2, 5], [0, 1, 3, 4]])
    out = gather_kv(cache, keep)
    assert out.shape == (2, 3, 4, 4)
    for b in range(2):
        torch.testing.assert_close(out[b], cache[b][:, keep[b]])


def test_greedy_accept_walks_the_matching_branch():
    tokens = torch.tensor([7, 8, 9, 5, 6])
    # target after root -> 7 (node 0), after 0 -> 9 (node 2), after 2 -> 3 (no child): correction 3
    argmax = torch.tensor([7, 9, 0, 3, 0, 0])
    assert greedy_accept(tokens, PARENTS, argmax) == ([0, 2], 3)
    # nothing matches at the root: only the target's own token
    assert greedy_accept(tokens, PARENTS, torch.tensor([1, 0, 0, 0, 0, 0])) == ([], 1)
    # full branch 0 -> 1 -> 3, then the bonus token after node 3
    assert greedy_accept(tokens, PARENTS, torch.tensor([7, 8, 5, 0, 4, 0])) == ([0, 1, 3], 4)
