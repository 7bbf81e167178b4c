"""Confidence-based token fusion and tree merging: the fusion rule, the fused tree's shape, and the merge's
prefix deduplication (with a property test over random trees)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specfleet.engine.fusion import FusedTreeBuilder, fuse, fuse_step, merge_trees, merge_trees_with_origins
from specfleet.engine.tree import TokenTree


def as_lists(tree: TokenTree):
    return tree.tokens.tolist(), tree.parents.tolist(), [round(p, 4) for p in tree.probs.tolist()]


def paths(tree: TokenTree) -> dict[tuple[int, ...], float]:
    """Every root-to-node token path of a tree, with the node's prob."""
    result: dict[tuple[int, ...], float] = {}
    prefix: list[tuple[int, ...]] = []
    for token, parent, prob in zip(tree.tokens.tolist(), tree.parents.tolist(), tree.probs.tolist(), strict=True):
        path = (prefix[parent] if parent >= 0 else ()) + (token,)
        prefix.append(path)
        result[path] = max(prob, result.get(path, float("-inf")))
    return result


# --- fuse_step -------------------------------------------------------------------------------------------------


def test_most_confident_token_wins_and_losers_sorted():
    winner, confidence, losers = fuse_step([(5, 0.3), (7, 0.9), (9, 0.5)])
    assert (winner, confidence) == (7, 0.9)
    assert losers == [(9, 0.5), (5, 0.3)]


def test_same_token_from_several_drafters_combines_as_max():
    winner, confidence, losers = fuse_step([(5, 0.4), (7, 0.6), (5, 0.45)])
    assert (winner, confidence) == (7, 0.6)  # max, not sum: 0.4 + 0.45 would have beaten 0.6
    assert losers == [(5, 0.45)]


def test_duplicates_of_the_winner_are_not_losers():
    winner, confidence, losers = fuse_step([(3, 0.2), (3, 0.8), (4, 0.1)])
    assert (winner, confidence) == (3, 0.8)
    assert losers == [(4, 0.1)]


def test_ties_go_to_the_lower_drafter_index():
    assert fuse_step([(11, 0.5), (22, 0.5)])[0] == 11
    assert fuse_step([(22, 0.5), (11, 0.5)])[0] == 22
    assert fuse_step([(1, 0.9), (2, 0.3), (3, 0.3)])[2] == [(2, 0.3), (3, 0.3)]
    assert fuse_step([(1, 0.9), (3, 0.3), (2, 0.3)])[2] == [(3, 0.3), (2, 0.3)]


def test_single_drafter_and_errors():
    assert fuse_step([(8, 0.25)]) == (8, 0.25, [])
    with pytest.raises(ValueError):
        fuse_step([])
    with pytest.raises(ValueError):
        fuse_step([(1, float("nan"))])


# --- FusedTreeBuilder / fuse ----------------------------------------------------------------------------------

LEVELS = [
    [(10, 0.9), (11, 0.6), (10, 0.5)],  # 10 wins, 11 is a branch
    [(20, 0.3), (21, 0.7), (22, 0.4)],  # 21 wins (drafter 1), 22 and 20 branch
    [(30, 0.8), (30, 0.8), (30, 0.9)],  # unanimous
]


def test_builder_feeds_back_winners_and_hangs_losers_off_the_winners_parent():
    builder = FusedTreeBuilder()
    fed = [builder.add_level(level) for level in LEVELS]
    assert fed == [10, 21, 30] == builder.trunk
    tree = builder.build()
    tree.validate()
    tokens, parents, probs = as_lists(tree)
    assert tokens == [10, 11, 21, 22, 20, 30]
    assert parents == [-1, -1, 0, 0, 0, 2]  # winner first among its siblings, losers after it
    assert probs == [0.9, 0.6, 0.7, 0.4, 0.3, 0.9]
    assert tree.draft_probs is None
    assert builder.sources == [(0, 2), (1,), (1,), (2,), (0,), (0, 1, 2)]


def test_branch_caps():
    capped = fuse(LEVELS, max_branches_per_level=1)
    assert capped.tokens.tolist() == [10, 11, 21, 22, 30]
    trunk_only = fuse(LEVELS, max_branches_per_level=0)
    assert trunk_only.tokens.tolist() == [10, 21, 30]
    assert trunk_only.parents.tolist() == [-1, 0, 1]
    confident = fuse(LEVELS, min_branch_confidence=0.35)
    assert confident.tokens.tolist() == [10, 11, 21, 22, 30]
    default = fuse([[(1, 0.9), (2, 0.04), (3, 0.5), (4, 0.6)]])
    assert default.tokens.tolist() == [1, 4, 3]  # 2 below the 0.05 floor; two losers at most


def test_fuse_equals_the_builder():
    builder = FusedTreeBuilder(max_branches_per_level=1, min_branch_confidence=0.0)
    for level in LEVELS:
        builder.add_level(level)
    assert as_lists(builder.build()) == as_lists(fuse(LEVELS, 1, 0.0))
    assert as_lists(fuse([])) == ([], [], [])


def test_builder_rejects_empty_levels_and_bad_caps():
    with pytest.raises(ValueError):
        FusedTreeBuilder().add_level([])
    with pytest.raises(ValueError):
        FusedTreeBuilder(max_branches_per_level=-1)


# --- merge_trees ----------------------------------------------------------------------------------------------


def test_merge_deduplicates_shared_prefixes_and_orders_children_by_prob():
    fused = fuse(LEVELS)  # 10 -> 21 -> 30, with branches 11, 22, 20
    suffix = TokenTree.chain([10, 21, 31, 40], [0.5, 0.95, 0.99, 0.2])
    other = TokenTree.chain([12], [0.7])
    merged, origins = merge_trees_with_origins([fused, suffix, other])
    merged.validate()
    tokens, parents, probs = as_lists(merged)
    assert tokens == [10, 12, 11, 21, 22, 20, 31, 30, 40]
    assert parents == [-1, -1, -1, 0, 0, 0, 3, 3, 6]
    assert probs == [0.9, 0.7, 0.6, 0.95, 0.4, 0.3, 0.99, 0.9, 0.2]
    assert origins[0] == [(0, 0), (1, 0)] and origins[3] == [(0, 2), (1, 1)] and origins[1] == [(2, 0)]


def test_merge_edge_cases():
    assert len(merge_trees([])) == 0
    assert len(merge_trees([TokenTree.empty(), TokenTree.empty()])) == 0
    chain = TokenTree.chain([1, 2, 3], [0.5, 0.4, 0.3])
    assert as_lists(merge_trees([chain, chain])) == as_lists(chain)
    sampled = TokenTree.chain([1], [0.5], draft_probs=torch.full((1, 4), 0.25))
    with pytest.raises(ValueError):
        merge_trees([chain, sampled])


@st.composite
def random_trees(draw):
    n = draw(st.integers(0, 12))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # tiny vocab: many shared prefixes
    probs = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=n, max_size=n))
    return TokenTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long),
                     torch.tensor(probs, dtype=torch.float32))


@settings(max_examples=150, deadline=None)
@given(st.lists(random_trees(), max_size=4))
def test_merge_is_the_prefix_union(trees):
    merged = merge_trees(trees)
    merged.validate()  # topological order
    merged_paths = paths(merged)
    expected: dict[tuple[int, ...], float] = {}
    for tree in trees:
        for path, prob in paths(tree).items():
            expected[path] = max(prob, expected.get(path, float("-inf")))
    assert merged_paths == expected  # every input path is present, nothing else is, probs are the max
    assert len(merged) == len(expected)  # one node per distinct path
    siblings: dict[int, list[int]] = {}
    for i, parent in enumerate(merged.parents.tolist()):
        siblings.setdefault(parent, []).append(i)
    for kids in siblings.values():
        kid_tokens = [merged.tokens[i].item() for i in kids]
        assert len(set(kid_tokens)) == len(kid_tokens)  # no duplicate sibling tokens
        kid_probs = [merged.probs[i].item() for i in kids]
        assert kid_probs == sorted(kid_probs, reverse=True)
