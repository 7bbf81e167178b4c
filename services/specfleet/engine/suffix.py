"""SuffixDecoding after ArcticInference: model-free draft trees read off depth-bounded suffix tries over the request's
own tokens and over earlier requests' outputs, for repetitive workloads (agents, code edits, self-refinement)."""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch

from specfleet.engine.proposers import Draft
from specfleet.engine.tree import TokenTree

_EPS = 1e-9  # slack for ceil(max_spec_factor * match_len + max_spec_offset) against float error


class TrieNode:
    """One token of a suffix trie; the path from the root spells an n-gram (n <= max_depth).

    A node that only one occurrence passes through has a single chain below it, so it is kept as a *chain node*
    (children None): `owner` holds the occurrence's tokens, which continue at owner.tokens[pos:stop] (stop = where
    the suffix reaches max_depth). Unique text thus costs O(1) nodes per token, not O(max_depth). A chain node is
    materialized one level (children dict, its next token as a new chain node) when a second occurrence enters it.
    """

    __slots__ = ("count", "children", "owner", "pos", "stop")

    def __init__(self, count: int = 0, children: dict[int, TrieNode] | None = None, owner: _Sequence | None = None,
                 pos: int = 0, stop: int = 0) -> None:
        # How many suffix occurrences pass through this node: the number of positions where the n-gram occurs.
        # The children's counts may sum to less: occurrences that end here (at a sequence's end) have no next token.
        self.count = count
        self.children = children
        self.owner, self.pos, self.stop = owner, pos, stop

    def items(self) -> Iterable[tuple[int, TrieNode]]:
        """(token, child) pairs; a chain node's single child is made on the fly (not stored)."""
        if self.children is not None:
            return self.children.items()
        tokens, pos = self.owner.tokens, self.pos
        if pos < self.stop and pos < len(tokens):
            return ((tokens[pos], TrieNode(1, None, self.owner, pos + 1, self.stop)),)
        return ()

    def child(self, token: int) -> TrieNode | None:
        if self.children is not None:
            return self.children.get(token)
        for next_token, child in self.items():
            if next_token == token:
                return child
        return None


class _Sequence:
    """One stored sequence and its suffixes that still run through shared (materialized) nodes."""

    __slots__ = ("tokens", "starts", "nodes")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        # Suffixes still being extended node by node, longest first: the one starting at tokens[starts[i]] ends
        # at nodes[i]. A suffix whose n-gram becomes unique parks in a chain node and leaves these lists.
        self.starts: list[int] = []
        self.nodes: list[TrieNode] = []


class Speculation(NamedTuple):
    tree: TokenTree  # probs = path probability of each node given the matched suffix
    score: float  # sum of the path probabilities: an estimate of the tokens the target will accept
    match_len: int  # length of the context suffix the tree continues (0 when nothing matched)


class _Candidate(NamedTuple):
    """A speculation before it becomes tensors (only the winner of a round does)."""

    tokens: list[int]
    parents: list[int]
    probs: list[float]
    score: float
    match_len: int

    def to_speculation(self) -> Speculation:
        tree = TokenTree(torch.tensor(self.tokens, dtype=torch.long, device="cpu"),
                         torch.tensor(self.parents, dtype=torch.long, device="cpu"),
                         torch.tensor(self.probs, dtype=torch.float32, device="cpu"))
        return Speculation(tree, self.score, self.match_len)


_NO_CANDIDATE = _Candidate([], [], [], 0.0, 0)


class SuffixTree:
    """A suffix trie over many token sequences, bounded to max_depth tokens per suffix.

    Every position of every sequence starts a suffix that is inserted up to max_depth tokens deep, so a node's count
    is the number of occurrences of its n-gram, and child.count / node.count estimates P(next token | n-gram).
    Sequences grow by `extend` in O(max_depth) per token and leave by `remove` (counts go back down).
    """

    def __init__(self, max_depth: int = 24):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2 (one matched token and one to propose), got {max_depth}")
        self.max_depth = max_depth
        self.root = TrieNode(0, {})  # root.count = total tokens stored
        self._seqs: dict[Hashable, _Sequence] = {}  # in insertion order (oldest first)

    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def __iter__(self) -> Iterator[Hashable]:
        """Sequence ids, oldest first."""
        return iter(self._seqs)

    def sequence(self, seq_id: Hashable) -> list[int]:
        """The tokens stored for seq_id (the live list: do not modify)."""
        return self._seqs[seq_id].tokens

    def extend(self, seq_id: Hashable, tokens: Iterable[int]) -> None:
        """Appends tokens to sequence seq_id (created if new): O(suffixes in shared nodes) <= O(max_depth) a token."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seqs[seq_id] = _Sequence()
        root, limit, seen = self.root, self.max_depth, seq.tokens
        for token in tokens:
            token = int(token)
            seen.append(token)
            end = len(seen)  # the suffix starting at tokens[start] now spans end - start tokens
            root.count += 1
            starts, nodes = [], []
            for start, node in zip([*seq.starts, end - 1], [*seq.nodes, root], strict=True):
                child = node.children.get(token)  # suffixes in seq.nodes always sit at materialized nodes
                if child is None:  # a new n-gram: the suffix parks in a chain node that grows with seq itself
                    node.children[token] = TrieNode(1, None, seq, end, start + limit)
                    continue
                child.count += 1
                if child.children is None:
                    self._materialize(child)
                if end - start < limit:  # at max_depth the suffix grows no further
                    starts.append(start)
                    nodes.append(child)
            seq.starts, seq.nodes = starts, nodes

    def _materialize(self, node: TrieNode) -> None:
        """Turns a chain node that a second occurrence just entered into a shared node, one level deep."""
        owner, pos, stop = node.owner, node.pos, node.stop
        node.children, node.owner = {}, None
        if pos >= stop:
            return
        if pos < len(owner.tokens):
            node.children[owner.tokens[pos]] = TrieNode(1, None, owner, pos + 1, stop)
        else:  # the owner's suffix ends here for now (another sequence caught up): track it node by node again
            start = stop - self.max_depth
            i = bisect.bisect_left(owner.starts, start)
            owner.starts.insert(i, start)
            owner.nodes.insert(i, node)

    def remove(self, seq_id: Hashable) -> None:
        """Takes sequence seq_id out: every count it added goes back down, and emptied nodes are dropped."""
        tokens = self._seqs.pop(seq_id).tokens
        self.root.count -= len(tokens)
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start:start + self.max_depth]:
                child = node.children[token]
                child.count -= 1
                if child.count == 0:  # the rest was this suffix alone (every chain node ends up here)
                    del node.children[token]
                    break
                node = child

    def speculate(self, context: Sequence[int], max_tokens: int, max_levels: int | None = None, *,
                  max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
                  min_token_prob: float = 0.1) -> Speculation:
        """Draft tree continuing `context` (which need not be stored here); see `_search` for the rules."""
        return self._search(self._matches(context), max_tokens, max_levels, max_spec_factor, max_spec_offset,
                            min_token_prob).to_speculation()

    def speculate_sequence(self, seq_id: Hashable, max_tokens: int, max_levels: int | None = None, *,
                           max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
                           min_token_prob: float = 0.1) -> Speculation:
        """Like `speculate(self.sequence(seq_id), ...)` but reuses the sequence's active nodes: no matching cost."""
        return self._search(self._sequence_matches(seq_id), max_tokens, max_levels, max_spec_factor,
                            max_spec_offset, min_token_prob).to_speculation()

    # -- matching: (match_len, node) pairs, longest match first ------------------------------------------------

    def _find(self, context: Sequence[int], length: int) -> TrieNode | None:
        """The node spelling the last `length` tokens of context, or None."""
        node = self.root
        for i in range(len(context) - length, len(context)):
            node = node.child(context[i])
            if node is None:
                return None
        return node

    def _matches(self, context: Sequence[int]) -> Iterator[tuple[int, TrieNode]]:
        """Every suffix of context found in the trie, longest first. The trie holds every substring (<= max_depth)
        of its sequences, so it is closed under suffixes: the found lengths are exactly 1..L, and L is found by
        binary search. A match of max_depth tokens has nothing below it, so lengths stop at max_depth - 1."""
        low, high, node_low = 0, min(len(context), self.max_depth - 1), self.root
        while low < high:  # invariant: the suffix of length low is in the trie, longer than high is not
            mid = (low + high + 1) // 2
            node = self._find(context, mid)
            if node is None:
                high = mid - 1
            else:
                low, node_low = mid, node
        if low:
            yield low, node_low
        for length in range(low - 1, 0, -1):
            yield length, self._find(context, length)

    def _sequence_matches(self, seq_id: Hashable) -> Iterator[tuple[int, TrieNode]]:
        """The sequence's suffixes in shared nodes. The others (parked) spell n-grams seen only at the very end,
        so nothing follows them: skipping them changes no result."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            end = len(seq.tokens)
            yield from ((end - start, node) for start, node in zip(seq.starts, seq.nodes, strict=True))

    # -- growing a tree below a match ---------------------------------------------------------------------------

    def _search(self, matches: Iterable[tuple[int, TrieNode]], max_tokens: int, max_levels: int | None,
                max_spec_factor: float, max_spec_offset: float, min_token_prob: float) -> _Candidate:
        """Tries match lengths long to short (as ArcticInference does) and keeps the highest score (ties: the longer
        match). A match of m tokens may propose ceil(max_spec_factor * m + max_spec_offset) nodes, at most
        max_tokens, so the budget only shrinks as m does and the search stops once it cannot beat the best.

        Skipped, with the same result: a shorter match whose count equals the last grown (longer) one's. Then every
        occurrence of it is an occurrence of the longer one, so its tree is the same with a budget no larger,
        unless the longer one's tree was cut by max_depth rather than by the level limit."""
        levels = self.max_depth if max_levels is None else max_levels
        best = _NO_CANDIDATE
        if max_tokens <= 0 or levels <= 0:
            return best
        same_as_grown = -1  # count of the last grown match when a same-count shorter one cannot beat it
        for match_len, node in matches:
            budget = min(max_tokens, math.ceil(max_spec_factor * match_len + max_spec_offset - _EPS))
            if budget <= best.score:  # every path probability is <= 1, so score <= budget
                break
            if node.count == same_as_grown:
                continue
            candidate = _grow(node, budget, levels, min_token_prob, match_len)
            if candidate.score > best.score:
                best = candidate
            same_as_grown = node.count if self.max_depth - match_len >= levels else -1
        return best


def _grow(match: TrieNode, budget: int, max_levels: int, min_token_prob: float, match_len: int) -> _Candidate:
    """Best-first tree below `match`: repeatedly takes the most probable frontier node (path probability = product
    of child.count / parent.count from the match down), skipping any below min_token_prob, until `budget` nodes
    or nothing is left. Nodes come out in topological order, and siblings most frequent first."""
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    score = 0.0
    # frontier entries: (-path_prob, insertion order (tie-break: first seen first), token, node, parent index, level)
    frontier: list[tuple[float, int, int, TrieNode, int, int]] = []
    order = 0
    for token, child in match.items():
        prob = child.count / match.count
        if prob >= min_token_prob:
            frontier.append((-prob, order, token, child, -1, 0))
            order += 1
    heapq.heapify(frontier)
    while frontier and len(tokens) < budget:
        neg_prob, _, token, node, parent, level = heapq.heappop(frontier)
        index = len(tokens)
        tokens.append(token)
        parents.append(parent)
        probs.append(-neg_prob)
        score -= neg_prob
        if level + 1 < max_levels:
            for next_token, child in node.items():
                prob = -neg_prob * child.count / node.count
                if prob >= min_token_prob:
                    heapq.heappush(frontier, (-prob, order, next_token, child, index, level + 1))
                    order += 1
    return _Candidate(tokens, parents, probs, score, match_len)


class SuffixProposer:
    """SuffixDecoding as a `Proposer`: each round drafts from the request's own trie (prompt + output so far) and
    from a global trie of earlier requests' outputs, and returns the higher-scoring tree.

    Knobs: max_depth bounds the tries (matched suffix + draft <= max_depth tokens); a match of m tokens may draft
    ceil(max_spec_factor * m + max_spec_offset) nodes; nodes whose path probability is below min_token_prob are
    skipped; a round's tree has at most min(max_tree_nodes, k * nodes_per_level) nodes and k levels. The global trie
    keeps the outputs of the last max_cached_requests requests (FIFO; 0 turns it off).
    """

    name = "suffix"

    def __init__(self, max_depth: int = 24, max_spec_factor: float = 1.0, max_spec_offset: float = 0.0,
                 min_token_prob: float = 0.1, max_tree_nodes: int = 16, nodes_per_level: int = 4,
                 max_cached_requests: int = 1000):
        self.max_depth = max_depth
        self.max_spec_factor, self.max_spec_offset = max_spec_factor, max_spec_offset
        self.min_token_prob = min_token_prob
        self.max_tree_nodes, self.nodes_per_level = max_tree_nodes, nodes_per_level
        self.max_cached_requests = max_cached_requests
        self._global = SuffixTree(max_depth)  # seq_id = rid, one sequence per finished request's output
        self._finished: dict[str, list[int]] = {}  # outputs not yet in the global trie, oldest first
        self._local: dict[str, SuffixTree] = {}  # rid -> trie over its prompt + output so far, as sequence 0
        self._prompts: dict[str, list[int]] = {}  # started requests whose trie is not built yet

    # Tries are built when a lookup first needs them, not when a request starts or stops: a batch of sampled
    # requests that speculation leaves off never looks anything up, and building a prompt's trie and adding each
    # output to the global one cost ~4% of plain decoding's time at batch 16 (bench/engine.json, sampled).

    def start(self, rid: str, prompt: list[int]) -> None:
        self._local.pop(rid, None)
        self._prompts[rid] = list(prompt)

    def local_tree(self, rid: str) -> SuffixTree | None:
        """The request's own trie (prompt + output as far as its last lookup), built now if not yet; None for a
        request never started."""
        tree = self._local.get(rid)
        if tree is None and rid in self._prompts:
            tree = self._local[rid] = SuffixTree(self.max_depth)
            tree.extend(0, self._prompts.pop(rid))
        return tree

    @property
    def global_tree(self) -> SuffixTree:
        """The trie of the last max_cached_requests finished requests' outputs (seq_id = rid), with the outputs
        finished since it was last read added now, in the order they finished."""
        self._add_finished()
        return self._global

    def _add_finished(self) -> None:
        for rid, output in self._finished.items():
            if rid in self._global:  # a reused rid: its newer output replaces the older one
                self._global.remove(rid)
            self._global.extend(rid, output)
            while len(self._global) > self.max_cached_requests:
                self._global.remove(next(iter(self._global)))  # the oldest
        self._finished.clear()

    def stop(self, rid: str, output: list[int]) -> None:
        self._local.pop(rid, None)
        self._prompts.pop(rid, None)
        if self.max_cached_requests <= 0 or not output:
            return
        self._finished.pop(rid, None)  # a reused rid's newer output replaces the older one and becomes the newest
        self._finished[rid] = list(output)
        if len(self._finished) > self.max_cached_requests:  # more than it keeps: add them now (bounded memory)
            self._add_finished()

    def propose(self, batch: list[Draft]) -> list[TokenTree]:
        return [self._propose_one(draft) for draft in batch]

    def _propose_one(self, draft: Draft) -> TokenTree:
        context, k = draft.context, draft.k
        if k <= 0 or not context:
            return TokenTree.empty()
        knobs = (min(self.max_tree_nodes, k * self.nodes_per_level), k, self.max_spec_factor,
                 self.max_spec_offset, self.min_token_prob)
        best = _NO_CANDIDATE
        local = self.local_tree(draft.rid)
        if local is not None:  # an unknown rid (never started) still gets the global trie
            local = self._sync(draft.rid, local, context)
            best = local._search(local._sequence_matches(0), *knobs)
        global_tree = self.global_tree
        if len(global_tree):
            candidate = global_tree._search(global_tree._matches(context), *knobs)
            if candidate.score > best.score:
                best = candidate
        return best.to_speculation().tree if best.tokens else TokenTree.empty()

    def _sync(self, rid: str, tree: SuffixTree, context: list[int]) -> SuffixTree:
        """Brings the request's trie up to `context` with only the new tokens. Contexts only grow between rounds;
        when the last max_depth tokens the trie has seen are not where they were (a rollback or an edit), it is
        rebuilt. Checking only that tail keeps a round O(max_depth); it is all the matching depends on."""
        seen = tree.sequence(0)
        n = len(seen)
        tail = min(n, self.max_depth)
        if len(context) >= n and list(context[n - tail:n]) == seen[n - tail:]:
            if len(context) > n:
                tree.extend(0, context[n:])
            return tree
        tree = SuffixTree(self.max_depth)
        tree.extend(0, context)
        self._local[rid] = tree
        return tree
