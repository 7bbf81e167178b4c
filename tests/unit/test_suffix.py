"""SuffixDecoding: trie counts under extend/remove, the draft trees it grows (tokens, budget, levels, branching,
path probabilities) and the proposer's per-request and global tries. Pure Python, no models."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specfleet.engine.proposers import Draft
from specfleet.engine.suffix import SuffixProposer, SuffixTree, TrieNode
from specfleet.engine.tree import TokenTree


def dump(node: TrieNode, prefix: tuple[int, ...] = ()) -> dict[tuple[int, ...], int]:
    """Every n-gram in the trie with its count."""
    out = {prefix: node.count}
    for token, child in node.items():
        out.update(dump(child, prefix + (token,)))
    return out


def occurrences(seq: list[int], pattern: list[int]) -> int:
    n = len(pattern)
    return sum(seq[i:i + n] == pattern for i in range(len(seq) - n + 1))


def brute_counts(seqs: list[list[int]], max_depth: int) -> dict[tuple[int, ...], int]:
    """What a suffix trie over seqs must hold: every n-gram (n <= max_depth) with its number of occurrences."""
    counts = {(): sum(map(len, seqs))}
    for seq in seqs:
        for start in range(len(seq)):
            for end in range(start + 1, min(start + max_depth, len(seq)) + 1):
                gram = tuple(seq[start:end])
                counts[gram] = counts.get(gram, 0) + 1
    return counts


def brute_best_score(seqs, context, max_depth, max_tokens, levels, factor, min_prob) -> float:
    """ArcticInference's search without shortcuts: for every matched suffix, best-first growth takes the `budget`
    most probable continuations (path probability = count(suffix + path) / count(suffix), >= min_prob)."""
    counts = brute_counts(seqs, max_depth)
    best = 0.0
    for match_len in range(1, min(len(context), max_depth - 1) + 1):
        suffix = tuple(context[-match_len:])
        if suffix not in counts:
            break
        budget = min(max_tokens, math.ceil(factor * match_len - 1e-9))
        probs = sorted((count / counts[suffix] for gram, count in counts.items()
                        if len(gram) > match_len and gram[:match_len] == suffix and len(gram) - match_len <= levels),
                       reverse=True)
        best = max(best, sum(p for p in probs[:budget] if p >= min_prob))
    return best


def paths(tree: TokenTree) -> list[list[int]]:
    """Tokens from the root down to each node."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    out: list[list[int]] = []
    for i, parent in enumerate(parents):
        out.append((out[parent] if parent >= 0 else []) + [tokens[i]])
    return out


def check_tree(tree: TokenTree, max_nodes: int, max_levels: int) -> None:
    tree.validate()  # parents[i] < i
    assert len(tree) <= max_nodes
    assert tree.max_depth <= max_levels
    probs, parents = tree.probs.tolist(), tree.parents.tolist()
    assert all(0.0 < p <= 1.0 for p in probs)
    assert all(p <= probs[parent] + 1e-6 for p, parent in zip(probs, parents, strict=True) if parent >= 0)


def test_counts_after_extend():
    tree = SuffixTree(max_depth=3)
    tree.extend("a", [1, 2, 1, 2])
    counts = dump(tree.root)
    assert counts == {(): 4, (1,): 2, (2,): 2, (1, 2): 2, (2, 1): 1, (1, 2, 1): 1, (2, 1, 2): 1}
    assert tree.sequence("a") == [1, 2, 1, 2] and len(tree) == 1 and "a" in tree


def test_incremental_extend_equals_from_scratch():
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3]
    whole, pieces = SuffixTree(5), SuffixTree(5)
    whole.extend(0, seq)
    for a, b in [(0, 1), (1, 7), (7, 8), (8, 20), (20, 26)]:
        pieces.extend(0, seq[a:b])
    assert dump(pieces.root) == dump(whole.root)
    for gram, count in dump(whole.root).items():
        assert count == (occurrences(seq, list(gram)) if gram else len(seq))


def test_remove_restores_counts():
    tree = SuffixTree(4)
    tree.extend("x", [1, 2, 3, 1, 2])
    before = dump(tree.root)
    tree.extend("y", [2, 3, 7, 7, 1, 2, 3])
    tree.extend("x", [4])
    tree.remove("y")
    reference = SuffixTree(4)
    reference.extend("x", [1, 2, 3, 1, 2, 4])
    assert dump(tree.root) == dump(reference.root)
    tree.remove("x")
    assert dump(tree.root) == {(): 0} and len(tree) == 0
    assert before != dump(tree.root)


def test_repeated_phrase_in_prompt_is_proposed():
    phrase = list(range(100, 112))
    prompt = [1, 2] + phrase + [3, 4, 5] + phrase[:6]
    proposer = SuffixProposer()
    proposer.start("r", prompt)
    [tree] = proposer.propose([Draft("r", prompt, 4)])
    assert tree.tokens.tolist() == phrase[6:10]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    # The only earlier occurrence continues with the phrase; the other ends the context: probability 1/2 each.
    assert torch.allclose(tree.probs, torch.full((4,), 0.5))


def test_budget_grows_with_match_length():
    phrase = list(range(50, 70))
    tree = SuffixTree(24)
    tree.extend(0, phrase)
    for match_len in range(1, 8):
        spec = tree.speculate(phrase[:match_len], max_tokens=16, max_levels=16)
        assert spec.match_len == match_len
        assert spec.tree.tokens.tolist() == phrase[match_len:2 * match_len]  # ceil(1.0 * match_len) tokens
        assert spec.score == pytest.approx(match_len)
    doubled = tree.speculate(phrase[:3], max_tokens=16, max_levels=16, max_spec_factor=2.0)
    assert doubled.tree.tokens.tolist() == phrase[3:9]
    offset = tree.speculate(phrase[:3], max_tokens=16, max_levels=16, max_spec_offset=2.0)
    assert len(offset.tree) == 5


def test_levels_and_node_cap():
    # Many continuations of [7, 8] that branch at every level.
    tree = SuffixTree(10)
    for i, seq in enumerate([[7, 8, 1, 2, 3, 4], [7, 8, 1, 2, 5, 6], [7, 8, 1, 9, 3, 4], [7, 8, 2, 2, 3, 4]]):
        tree.extend(i, seq)
    for k in (1, 2, 3):
        spec = tree.speculate([7, 8], max_tokens=16, max_levels=k, max_spec_factor=8.0, min_token_prob=0.0)
        check_tree(spec.tree, 16, k)
        assert spec.tree.max_depth == k
    capped = tree.speculate([7, 8], max_tokens=3, max_levels=4, max_spec_factor=8.0, min_token_prob=0.0)
    check_tree(capped.tree, 3, 4)
    assert len(capped.tree) == 3
    # Through the proposer: k levels, and at most min(max_tree_nodes, k * nodes_per_level) nodes.
    proposer = SuffixProposer(max_spec_factor=8.0, min_token_prob=0.0, max_tree_nodes=5, nodes_per_level=2)
    proposer.start("r", [7, 8, 1, 2, 3, 4, 7, 8, 1, 2, 5, 6, 7, 8, 1, 9, 3, 4, 7, 8, 2, 2, 3, 4, 0, 7, 8])
    for k, cap in [(1, 2), (2, 4), (4, 5)]:
        [draft] = proposer.propose([Draft("r", proposer.local_tree("r").sequence(0)[:], k)])
        check_tree(draft, cap, k)
        assert len(draft) == cap


def test_branching_siblings_most_frequent_first():
    tree = SuffixTree(8)
    tree.extend(0, [5, 6, 1, 9, 5, 6, 2, 8, 5, 6, 1, 7])
    spec = tree.speculate([4, 5, 6], max_tokens=16, max_levels=1)
    assert spec.match_len == 2
    assert spec.tree.tokens.tolist() == [1, 2]
    assert spec.tree.parents.tolist() == [-1, -1]
    assert spec.tree.probs.tolist() == pytest.approx([2 / 3, 1 / 3])
    # Best first: 1 (2/3), then 2 (1/3) before 1's children 9 and 7 (1/3 each, queued later).
    deeper = tree.speculate([5, 6], max_tokens=4, max_levels=2, max_spec_factor=2.0)
    assert deeper.tree.tokens.tolist() == [1, 2, 9, 7]
    assert deeper.tree.parents.tolist() == [-1, -1, 0, 0]
    assert deeper.score == pytest.approx(2 / 3 + 3 * (1 / 3))


def test_global_tree_proposes_from_earlier_output():
    proposer = SuffixProposer()
    proposer.start("first", [1, 2, 3])
    answer = [40, 41, 42, 43, 44, 45, 46, 47]
    proposer.stop("first", answer)
    assert "first" not in proposer._local and "first" in proposer.global_tree
    context = [9, 9, 40, 41, 42, 43]
    proposer.start("second", context)
    [tree] = proposer.propose([Draft("second", context, 3)])
    assert tree.tokens.tolist() == [44, 45, 46]
    assert torch.allclose(tree.probs, torch.ones(3))
    [unstarted] = proposer.propose([Draft("never-started", context, 3)])  # no own trie, the global one still
    assert unstarted.tokens.tolist() == [44, 45, 46]


def test_global_tree_evicts_oldest():
    proposer = SuffixProposer(max_depth=6, max_cached_requests=2)
    outputs = {"a": [1, 2, 3, 4], "b": [2, 3, 5, 6], "c": [3, 4, 5, 1]}
    for rid, out in outputs.items():
        proposer.start(rid, [0])
        proposer.stop(rid, out)
    assert list(proposer.global_tree) == ["b", "c"]
    reference = SuffixTree(6)
    reference.extend("b", outputs["b"])
    reference.extend("c", outputs["c"])
    assert dump(proposer.global_tree.root) == dump(reference.root)
    proposer.start("b", [0])
    proposer.stop("b", [8, 8])  # a reused rid replaces its older output and becomes the newest
    assert list(proposer.global_tree) == ["c", "b"]
    assert proposer.global_tree.sequence("b") == [8, 8]


def test_unknown_rid_empty_context_and_zero_k_give_empty_trees():
    proposer = SuffixProposer()
    drafts = [Draft("never-started", [1, 2, 3], 4), Draft("never-started", [], 4)]
    proposer.start("r", [])
    drafts += [Draft("r", [], 4), Draft("r", [1, 1, 1], 0), Draft("r", [1, 2], 4)]
    for tree in proposer.propose(drafts):
        assert len(tree) == 0
        tree.validate()
    proposer.stop("unknown", [])
    proposer.stop("r", [])


def test_context_that_is_not_an_extension_rebuilds():
    proposer = SuffixProposer()
    proposer.start("r", [1, 2, 3, 4, 1, 2])
    [first] = proposer.propose([Draft("r", [1, 2, 3, 4, 1, 2], 2)])
    assert first.tokens.tolist() == [3, 4]
    [second] = proposer.propose([Draft("r", [5, 6, 7, 5, 6], 2)])  # rewritten history
    assert second.tokens.tolist() == [7, 5]
    assert proposer.local_tree("r").sequence(0) == [5, 6, 7, 5, 6]
    [third] = proposer.propose([Draft("r", [5, 6, 7, 5, 6, 7, 5], 2)])  # incremental again
    assert third.tokens.tolist() == [6, 7]


def test_incremental_rounds_equal_fresh_start():
    context = [1, 2, 3, 1, 2, 4, 1, 2, 3, 1, 2, 4, 1, 2]
    rounds, fresh = SuffixProposer(max_depth=5), SuffixProposer(max_depth=5)
    rounds.start("r", context[:3])
    for end in range(3, len(context) + 1):
        rounds.propose([Draft("r", context[:end], 3)])
    fresh.start("r", context)
    assert dump(rounds.local_tree("r").root) == dump(fresh.local_tree("r").root)
    [a], [b] = rounds.propose([Draft("r", context, 3)]), fresh.propose([Draft("r", context, 3)])
    assert a.tokens.tolist() == b.tokens.tolist() and torch.equal(a.parents, b.parents)


@settings(max_examples=150, deadline=None)
@given(context=st.lists(st.integers(0, 3), min_size=1, max_size=60), max_depth=st.integers(2, 8),
       max_tokens=st.integers(1, 12), levels=st.integers(1, 6), factor=st.sampled_from([0.5, 1.0, 2.0]),
       min_prob=st.sampled_from([0.0, 0.1, 0.3]))
def test_paths_follow_the_matched_suffix(context, max_depth, max_tokens, levels, factor, min_prob):
    tree = SuffixTree(max_depth)
    tree.extend(0, context)
    spec = tree.speculate(context, max_tokens, levels, max_spec_factor=factor, min_token_prob=min_prob)
    same = tree.speculate_sequence(0, max_tokens, levels, max_spec_factor=factor, min_token_prob=min_prob)
    assert same.tree.tokens.tolist() == spec.tree.tokens.tolist() and same.match_len == spec.match_len
    check_tree(spec.tree, max_tokens, levels)
    if not len(spec.tree):
        assert spec.score == 0.0
        return
    suffix = context[-spec.match_len:]
    for path, prob in zip(paths(spec.tree), spec.tree.probs.tolist(), strict=True):
        assert len(suffix) + len(path) <= max_depth
        # The path occurs right after an occurrence of the suffix, and its probability is the share of the
        # suffix's occurrences that continue with it (the telescoped product of child.count / parent.count).
        assert prob == pytest.approx(occurrences(context, suffix + path) / occurrences(context, suffix), rel=1e-5)
        assert prob >= min_prob
    assert spec.score == pytest.approx(sum(spec.tree.probs.tolist()), rel=1e-5)


@settings(max_examples=80, deadline=None)
@given(outputs=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=30), max_size=4),
       context=st.lists(st.integers(0, 4), min_size=1, max_size=40), k=st.integers(1, 5))
def test_proposer_paths_occur_in_context_or_earlier_outputs(outputs, context, k):
    proposer = SuffixProposer(max_depth=6, max_cached_requests=3)
    for i, out in enumerate(outputs):
        proposer.start(f"old{i}", [0])
        proposer.stop(f"old{i}", out)
    proposer.start("r", context[:len(context) // 2])
    [tree] = proposer.propose([Draft("r", context, k)])
    check_tree(tree, min(16, 4 * k), k)
    sources = [context] + outputs[-3:]
    for path in paths(tree):  # a matched suffix continues with path, so its last token does too
        assert any(occurrences(seq, context[-1:] + path) for seq in sources)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 3), max_size=12), st.booleans()),
                    max_size=12), max_depth=st.integers(2, 7))
def test_interleaved_extends_and_removes_keep_exact_counts(ops, max_depth):
    tree, live = SuffixTree(max_depth), {}
    for seq_id, tokens, remove in ops:
        if remove and seq_id in live:
            tree.remove(seq_id)
            del live[seq_id]
        else:
            tree.extend(seq_id, tokens)
            live.setdefault(seq_id, []).extend(tokens)
        assert dump(tree.root) == brute_counts(list(live.values()), max_depth)
    assert list(tree) == list(live) and all(tree.sequence(i) == seq for i, seq in live.items())


@settings(max_examples=150, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=25), min_size=1, max_size=3),
       context=st.lists(st.integers(0, 3), min_size=1, max_size=12), max_depth=st.integers(2, 8),
       max_tokens=st.integers(1, 10), levels=st.integers(1, 5), factor=st.sampled_from([0.5, 1.0, 3.0]),
       min_prob=st.sampled_from([0.0, 0.1, 0.3]))
def test_search_finds_the_best_score(seqs, context, max_depth, max_tokens, levels, factor, min_prob):
    tree = SuffixTree(max_depth)
    for i, seq in enumerate(seqs):  # interleaved, so chains get shared and split across sequences
        tree.extend(i, seq[:len(seq) // 2])
    for i, seq in enumerate(seqs):
        tree.extend(i, seq[len(seq) // 2:])
    spec = tree.speculate(context, max_tokens, levels, max_spec_factor=factor, min_token_prob=min_prob)
    expected = brute_best_score(seqs, context, max_depth, max_tokens, levels, factor, min_prob)
    assert spec.score == pytest.approx(expected, rel=1e-5, abs=1e-6)
    check_tree(spec.tree, max_tokens, levels)


def test_tries_are_built_only_when_a_lookup_needs_them():
    """A request that never looks anything up (speculation off, sampled, in a batch) costs no trie: its prompt's is
    built at its first lookup, and finished outputs join the global trie when it is next read, in finish order."""
    proposer = SuffixProposer(max_depth=6, max_cached_requests=2)
    proposer.start("quiet", [1, 2, 3, 1, 2])
    assert "quiet" not in proposer._local
    proposer.stop("quiet", [7, 8, 9])
    proposer.start("b", [0])
    proposer.stop("b", [2, 3, 5])
    assert len(proposer._global) == 0  # nothing built yet
    assert list(proposer.global_tree) == ["quiet", "b"]
    proposer.start("r", [1, 2, 3, 1, 2])
    [tree] = proposer.propose([Draft("r", [1, 2, 3, 1, 2], 1)])
    assert tree.tokens.tolist() == [3] and "r" in proposer._local
