"""Sampling is lossless: warp_probs equals Hugging Face's warpers, and speculative sampling through
sampled_tree_accept reproduces the target's two-token distribution (chi-square) for single- and multi-draft trees."""

import functools
import math

import pytest
import torch

from specfleet.engine.sampling import SamplingParams, make_generator, warp_probs
from specfleet_kernels.reference import (
    ROOT,
    greedy_accept,
    position_gumbels,
    position_keyed_accept,
    position_keyed_sample,
    sampled_tree_accept,
)

# ---------------------------------------------------------------------------------------------------------------
# warp_probs against transformers' warpers, applied in generate's order.


def hf_warped_scores(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    dummy_ids = torch.zeros(len(scores), 1, dtype=torch.long)
    if params.temperature != 1.0:
        scores = TemperatureLogitsWarper(float(params.temperature))(dummy_ids, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k, min_tokens_to_keep=1)(dummy_ids, scores)
    if params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p, min_tokens_to_keep=1)(dummy_ids, scores)
    return scores


WARP_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=10),
    SamplingParams(temperature=0.8, top_p=0.95, top_k=20),
    SamplingParams(temperature=1.5, top_p=0.5, top_k=5),
    SamplingParams(temperature=0.3, top_p=0.99, top_k=1),
    SamplingParams(temperature=1.0, top_p=0.01),
    SamplingParams(temperature=2.0, top_k=1000),  # k above the vocabulary
]


@pytest.mark.parametrize("params", WARP_CASES, ids=str)
def test_warp_probs_matches_hugging_face(params):
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 50) * 3  # [2, 16, V]
    logits[0] = logits[0].round(decimals=0)  # many ties, also at the top-k and top-p boundaries
    probs = warp_probs(logits, params)  # [2, 16, V]
    reference = hf_warped_scores(logits.reshape(-1, 50), params).reshape(2, 16, 50)
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    assert torch.equal(probs > 0, reference > -math.inf), "same support"
    torch.testing.assert_close(probs, reference.softmax(-1), atol=1e-6, rtol=0)


def test_warp_probs_greedy_is_the_one_hot_argmax():
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0], [5.0, 1.0, 0.0, 0.0]], dtype=torch.bfloat16)
    probs = warp_probs(logits, SamplingParams(temperature=0.0, top_p=0.5, top_k=3))
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"seed": "7"}, "seed"),
])
def test_bad_params_say_what_to_fix(kwargs, message):
    params = SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=message):
        params.validate()
    with pytest.raises(ValueError, match=message):
        warp_probs(torch.zeros(4), params)


def test_params_defaults_are_greedy_and_valid():
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy
    SamplingParams().validate()
    SamplingParams(temperature=1, top_p=1, top_k=0, seed=3).validate()


# ---------------------------------------------------------------------------------------------------------------
# Two tiny Llamas and every next-token distribution up to three tokens after a fixed prefix.

VOCAB = 12
PREFIX = [3, 1, 4, 1, 5]
SAMPLES = 20_000
P_VALUE_FLOOR = 1e-3


def tiny_llama(weight_noise: float):
    """The target (noise 0) or a drafter: the target's weights plus fixed Gaussian noise, so it agrees only in part."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         initializer_range=0.3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.add_(torch.randn(weight.shape, generator=noise) * weight_noise)
    return model


def logits_after_every_context(model) -> list[torch.Tensor]:
    """levels[d]: [VOCAB ** d, VOCAB] logits after PREFIX + d tokens, rows in base-VOCAB order of those tokens."""
    continuations = torch.cartesian_prod(*[torch.arange(VOCAB)] * 3)  # [V^3, 3] lexicographic
    ids = torch.cat([torch.tensor(PREFIX).expand(len(continuations), -1), continuations], 1)
    with torch.no_grad():
        logits = model(ids).logits[:, len(PREFIX) - 1:]  # [V^3, 4, V]: after PREFIX, +1, +2, +3 tokens
    return [logits[::VOCAB ** (3 - d), d] for d in range(4)]


class Tables:
    """The (warped) next-token distribution after PREFIX + any context of up to three tokens."""

    def __init__(self, levels: list[torch.Tensor], params: SamplingParams):
        self.levels = [warp_probs(level, params) for level in levels]

    def after(self, context: torch.Tensor) -> torch.Tensor:
        """context [N, d] tokens -> [N, V] distributions."""
        place = VOCAB ** torch.arange(context.shape[1] - 1, -1, -1)
        return self.levels[context.shape[1]][(context * place).sum(1)]

    def two_token_joint(self) -> torch.Tensor:
        """[V, V]: probability of (x1, x2) = p1[x1] * p2[x1, x2]."""
        return self.levels[0][0][:, None] * self.levels[1]


@pytest.fixture(scope="module")
def model_logits():
    return logits_after_every_context(tiny_llama(0.0)), logits_after_every_context(tiny_llama(0.03))


# Trees proposed from the drafter's tables for N contexts at once: (tokens [N, n], draft_probs [N, n, V] or None).
CHAIN_PARENTS = [ROOT, 0]
BRANCH_PARENTS = [ROOT, ROOT, 0, 1]


def propose_chain(drafter: Tables, context: torch.Tensor, generator: torch.Generator):
    """(a) One draft of two tokens, each sampled from the drafter."""
    first_q = drafter.after(context)  # [N, V]
    first = torch.multinomial(first_q, 1, generator=generator)  # [N, 1]
    second_q = drafter.after(torch.cat([context, first], 1))
    second = torch.multinomial(second_q, 1, generator=generator)
    return torch.cat([first, second], 1), torch.stack([first_q, second_q], 1)


def propose_top2_greedy(drafter: Tables, context: torch.Tensor, generator: torch.Generator):
    """(b) Deterministic: the drafter's top-2 first tokens as siblings, each with its argmax child."""
    top2 = drafter.after(context).topk(2).indices  # [N, 2]
    children = [drafter.after(torch.cat([context, top2[:, j:j + 1]], 1)).argmax(-1) for j in range(2)]
    return torch.cat([top2, torch.stack(children, 1)], 1), None


def propose_two_sampled_drafts(drafter: Tables, context: torch.Tensor, generator: torch.Generator):
    """(c) Stochastic: two independent first tokens from the drafter (duplicates allowed), each with a sampled child."""
    first_q = drafter.after(context)  # [N, V]
    firsts = torch.multinomial(first_q, 2, replacement=True, generator=generator)  # [N, 2]
    child_qs = [drafter.after(torch.cat([context, firsts[:, j:j + 1]], 1)) for j in range(2)]
    children = [torch.multinomial(q, 1, generator=generator) for q in child_qs]
    draft_probs = torch.stack([first_q, first_q, *child_qs], 1)  # [N, 4, V]
    return torch.cat([firsts, *children], 1), draft_probs


PROPOSERS = {"chain": (propose_chain, CHAIN_PARENTS), "top2_greedy": (propose_top2_greedy, BRANCH_PARENTS),
             "two_sampled_drafts": (propose_two_sampled_drafts, BRANCH_PARENTS)}


def node_paths(parents: list[int]) -> list[list[int]]:
    """For each node, the node indices from the root's child down to itself."""
    paths: list[list[int]] = []
    for i, p in enumerate(parents):
        paths.append((paths[p] if p != ROOT else []) + [i])
    return paths


def speculative_round(target: Tables, drafter: Tables, proposer, parents: list[int], context: torch.Tensor,
                      accept, generator: torch.Generator) -> list[list[int]]:
    """One verification round after PREFIX + context [N, d] for every row: the tokens it emits (>= 1 each)."""
    tokens, draft_probs = proposer(drafter, context, generator)  # [N, n], [N, n, V] | None
    target_probs = torch.stack([target.after(context)] + [  # [N, n + 1, V]
        target.after(torch.cat([context, tokens[:, path]], 1)) for path in node_paths(parents)], 1)
    parents_tensor = torch.tensor(parents)
    emitted = []
    for row, row_tokens in enumerate(tokens.tolist()):
        path, next_token = accept(tokens[row], parents_tensor, target_probs[row],
                                  None if draft_probs is None else draft_probs[row], generator)
        emitted.append([row_tokens[i] for i in path] + [next_token])
    return emitted


def speculative_two_tokens(target: Tables, drafter: Tables, proposer, parents: list[int], accept,
                           samples: int, seed: int) -> torch.Tensor:
    """[samples, 2]: the first two tokens after PREFIX, by speculative sampling (a second round when needed)."""
    generator = make_generator(seed)
    first_round = speculative_round(target, drafter, proposer, parents, torch.empty(samples, 0, dtype=torch.long),
                                    accept, generator)
    short = [i for i, emitted in enumerate(first_round) if len(emitted) == 1]
    context = torch.tensor([[first_round[i][0]] for i in short], dtype=torch.long).reshape(len(short), 1)
    second_round = speculative_round(target, drafter, proposer, parents, context, accept, generator)
    for i, emitted in zip(short, second_round, strict=True):
        first_round[i].append(emitted[0])
    return torch.tensor([emitted[:2] for emitted in first_round])


def chi_square_p_value(pairs: torch.Tensor, joint: torch.Tensor) -> float:
    """p-value of the observed (x1, x2) pairs [N, 2] under the joint [V, V]; bins expecting < 5 are merged."""
    observed = torch.bincount(pairs[:, 0] * VOCAB + pairs[:, 1], minlength=VOCAB * VOCAB).double()
    expected = joint.flatten().double() * len(pairs)
    assert observed[expected == 0].sum() == 0, "a sample fell outside the target's support"
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    if expected[-1] < 5:  # fold a still-small merged bin into the smallest other bin
        smallest = int(expected[:-1].argmin())
        observed[smallest] += observed[-1]
        expected[smallest] += expected[-1]
        observed, expected = observed[:-1], expected[:-1]
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2))


SAMPLED_PARAMS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.95),
                  SamplingParams(temperature=0.8, top_k=5)]


@pytest.mark.parametrize("params", SAMPLED_PARAMS, ids=["t1", "t0.8-p0.95", "t0.8-k5"])
@pytest.mark.parametrize("tree", list(PROPOSERS))
def test_speculative_sampling_reproduces_the_target(model_logits, tree, params):
    target, drafter = Tables(model_logits[0], params), Tables(model_logits[1], params)
    proposer, parents = PROPOSERS[tree]
    pairs = speculative_two_tokens(target, drafter, proposer, parents, sampled_tree_accept, SAMPLES, seed=1234)
    assert chi_square_p_value(pairs, target.two_token_joint()) > P_VALUE_FLOOR


def accept_first_children(tokens, parents, target_probs, draft_probs, generator):
    """Wrong on purpose: always accepts the first child, so the output follows the drafter."""
    path, node, parent_list = [], ROOT, parents.tolist()
    while (child := next((i for i, p in enumerate(parent_list) if p == node), None)) is not None:
        path.append(child)
        node = child
    return path, int(torch.multinomial(target_probs[node + 1], 1, generator=generator))


def accept_without_residual(tokens, parents, target_probs, draft_probs, generator):
    """Wrong on purpose: the right per-child test, but a rejected child is never removed from the target."""
    one_hot = torch.nn.functional.one_hot(tokens, target_probs.shape[1]).float()  # [n, V]
    draft_probs = one_hot if draft_probs is None else draft_probs
    path, node, parent_list = [], ROOT, parents.tolist()
    while True:
        target = target_probs[node + 1]
        children = [i for i, p in enumerate(parent_list) if p == node]
        accepted = next((c for c in children if float(torch.rand((), generator=generator)) * draft_probs[c, tokens[c]]
                         < target[tokens[c]]), None)
        if accepted is None:
            return path, int(torch.multinomial(target, 1, generator=generator))
        path.append(accepted)
        node = accepted


@pytest.mark.parametrize("tree,wrong_accept", [("chain", accept_first_children),
                                               ("top2_greedy", accept_without_residual),
                                               ("two_sampled_drafts", accept_without_residual)])
def test_wrong_acceptance_fails_the_same_check(model_logits, tree, wrong_accept):
    """The chi-square check has power: plausible bugs are caught with the same sample size."""
    params = SamplingParams(temperature=1.0)
    target, drafter = Tables(model_logits[0], params), Tables(model_logits[1], params)
    proposer, parents = PROPOSERS[tree]
    pairs = speculative_two_tokens(target, drafter, proposer, parents, wrong_accept, SAMPLES, seed=1234)
    assert chi_square_p_value(pairs, target.two_token_joint()) < P_VALUE_FLOOR


# ---------------------------------------------------------------------------------------------------------------
# Reproducibility and edge cases.

# root -> 0 -> 1 -> 3 ; root -> 0 -> 2 ; root -> 4 -> 5
PARENTS = torch.tensor([-1, 0, 0, 1, -1, 4])


def random_tree(seed: int, vocab: int = 8):
    """tokens [6], target_probs [7, vocab], draft_probs [6, vocab] with each token drawn from its draft row."""
    generator = torch.Generator().manual_seed(seed)
    target_probs = torch.randn(len(PARENTS) + 1, vocab, generator=generator).softmax(-1)
    draft_probs = torch.randn(len(PARENTS), vocab, generator=generator).softmax(-1)
    tokens = torch.multinomial(draft_probs, 1, generator=generator)[:, 0]
    return tokens, target_probs, draft_probs


def test_same_seed_same_results():
    tokens, target_probs, draft_probs = random_tree(0)

    def run(seed):
        generator = make_generator(seed)
        return [sampled_tree_accept(tokens, PARENTS, target_probs, drafts, generator)
                for _ in range(100) for drafts in (draft_probs, None)]

    first = run(7)
    assert first == run(7)
    assert first != run(8)
    assert len({(tuple(path), token) for path, token in first}) > 5, "the outcomes vary from round to round"


def test_empty_tree_samples_the_target():
    target = torch.tensor([[0.5, 0.0, 0.3, 0.2]])  # [1, V]
    generator = make_generator(0)
    draws = [sampled_tree_accept(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), target, None,
                                 generator) for _ in range(4000)]
    assert all(path == [] for path, _ in draws)
    counts = torch.bincount(torch.tensor([token for _, token in draws]), minlength=4).double()
    assert counts[1] == 0
    statistic = ((counts[[0, 2, 3]] - 4000 * target[0, [0, 2, 3]]) ** 2 / (4000 * target[0, [0, 2, 3]])).sum()
    assert float(torch.special.gammaincc(torch.tensor(1.0, dtype=torch.float64), statistic / 2)) > P_VALUE_FLOOR


@pytest.mark.parametrize("sampled_draft", [False, True])
def test_token_the_target_never_samples_is_always_rejected(sampled_draft):
    target_probs = torch.tensor([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])  # [3, V]
    draft_probs = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]]) if sampled_draft else None
    generator = make_generator(0)
    for _ in range(500):  # two siblings, both token 0: both must be rejected
        path, token = sampled_tree_accept(torch.tensor([0, 0]), torch.tensor([-1, -1]), target_probs, draft_probs,
                                          generator)
        assert path == [] and token != 0


def test_one_hot_target_is_followed_exactly_like_greedy():
    vocab = 8
    generator = make_generator(3)
    for seed in range(30):
        tokens, _, draft_probs = random_tree(seed, vocab)
        target_argmax = torch.randint(0, vocab, (len(PARENTS) + 1,), generator=torch.Generator().manual_seed(seed))
        target_argmax[[1, 2, 5]] = tokens[[0, 1, 4]]  # some branches agree with the target
        target_probs = torch.nn.functional.one_hot(target_argmax, vocab).float()  # [n + 1, V]
        expected = greedy_accept(tokens, PARENTS, target_argmax)
        for drafts in (draft_probs, None):
            assert sampled_tree_accept(tokens, PARENTS, target_probs, drafts, generator) == expected


def test_draft_equal_to_the_target_is_always_accepted():
    tokens, target_probs, _ = random_tree(5)
    draft_probs = target_probs[PARENTS + 1]  # each node drafted from exactly the target's distribution
    generator = make_generator(0)
    for _ in range(300):
        path, _ = sampled_tree_accept(tokens, PARENTS, target_probs, draft_probs, generator)
        assert path == [0, 1, 3], "the first child at every level is accepted, down to a leaf"


def test_malformed_inputs_are_rejected():
    tokens, target_probs, draft_probs = random_tree(0)
    generator = make_generator(0)
    with pytest.raises(ValueError, match="target_probs"):
        sampled_tree_accept(tokens, PARENTS, target_probs[:-1], draft_probs, generator)
    with pytest.raises(ValueError, match="draft_probs"):
        sampled_tree_accept(tokens, PARENTS, target_probs, draft_probs[:, :-1], generator)
    with pytest.raises(ValueError, match="not a distribution"):
        sampled_tree_accept(tokens, PARENTS, torch.zeros_like(target_probs), draft_probs, generator)


# ---------------------------------------------------------------------------------------------------------------
# Stochastic drafts coupled by the request's noise: every drafter draws each level from its own q with the Gumbel
# noise of that output position (position_keyed_sample), deterministic lookups (suffix trees) mix into the same tree,
# and position_keyed_accept takes the child holding the target's own sample (drawn with p and the same noise).


@pytest.fixture(scope="module")
def second_drafter_logits():
    return logits_after_every_context(tiny_llama(0.06))


@pytest.fixture(scope="module")
def shared_noise():
    """Every coupled test draws with the same (seed, position) keys (SEED0.., positions 0-2): the noise is computed once
    for the module instead of once per draft, per verification and per test (the kernels' own cache holds 128 keys).
    The values are position_gumbels' own (the same pure function, cached without a bound); the cache goes with the
    module."""
    from specfleet_kernels import reference

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reference, "_gumbels", functools.lru_cache(maxsize=None)(reference._gumbels.__wrapped__))
        yield


def keyed_draws(probs: torch.Tensor, seeds: list[int], position: int) -> torch.Tensor:
    """position_keyed_sample(probs, seeds, [position] * N) as one batched argmax of log q + the rows' noise (the
    drafts only propose: the acceptance under test is called row by row). Checked against it on the first rows."""
    noise = torch.stack([position_gumbels(seed, position, probs.shape[-1]) for seed in seeds])  # [N, V]
    draws = (probs.float().log() + noise).argmax(-1)  # [N]
    head = slice(0, 64)
    assert torch.equal(draws[head], position_keyed_sample(probs[head], seeds[head], [position] * len(seeds[head])))
    return draws


def coupled_tree(drafters: list[Tables], lookup: Tables | None, context: torch.Tensor, seeds: list[int], start: int):
    """Per row a tree of sibling chains under the root: two levels sampled from each drafter with the row's noise,
    and with `lookup` one deterministic node (its argmax, as a suffix tree would propose a fixed token).
    Returns (tokens [N, n], parents [n], target contexts of every node [n] as [N, d] tensors)."""
    columns, parents, paths = [], [], []
    for drafter in drafters:
        first = keyed_draws(drafter.after(context), seeds, start)[:, None]  # [N, 1]
        second = keyed_draws(drafter.after(torch.cat([context, first], 1)), seeds, start + 1)[:, None]
        parents += [ROOT, len(columns)]
        paths += [torch.cat([context, first], 1), torch.cat([context, first, second], 1)]
        columns += [first, second]
    if lookup is not None:
        token = lookup.after(context).argmax(-1)[:, None]
        parents.append(ROOT)
        paths.append(torch.cat([context, token], 1))
        columns.append(token)
    return torch.cat(columns, 1), parents, paths


def coupled_two_tokens(target: Tables, drafters: list[Tables], lookup: Tables | None, accept,
                       samples: int) -> tuple[torch.Tensor, float]:
    """([samples, 2] first two tokens after PREFIX, mean drafted tokens accepted in the first round)."""
    seeds = list(range(SEED0, SEED0 + samples))
    emitted: list[list[int]] = [[] for _ in range(samples)]
    accepted_first = 0
    for start in (0, 1):
        rows = [i for i in range(samples) if len(emitted[i]) < 2]
        if not rows:
            break
        context = torch.tensor([emitted[i] for i in rows], dtype=torch.long).reshape(len(rows), start)
        row_seeds = [seeds[i] for i in rows]
        tokens, parents, paths = coupled_tree(drafters, lookup, context, row_seeds, start)
        target_probs = torch.stack([target.after(context)] + [target.after(p) for p in paths], 1)  # [N, n + 1, V]
        parents_tensor, token_rows = torch.tensor(parents), tokens.tolist()
        for j, i in enumerate(rows):
            path, nxt = accept(tokens[j], parents_tensor, target_probs[j], row_seeds[j], start)
            emitted[i] += [token_rows[j][n] for n in path] + [nxt]
            accepted_first += len(path) if start == 0 else 0
    return torch.tensor([e[:2] for e in emitted]), accepted_first / samples


SEED0 = 50_000
COUPLED_TREES = {"one_drafter": (1, False), "two_drafters": (2, False), "drafter_and_lookup": (1, True)}


@pytest.mark.parametrize("params", SAMPLED_PARAMS, ids=["t1", "t0.8-p0.95", "t0.8-k5"])
@pytest.mark.parametrize("tree", list(COUPLED_TREES))
def test_coupled_stochastic_drafts_reproduce_the_target(model_logits, second_drafter_logits, shared_noise, tree,
                                                        params):
    target = Tables(model_logits[0], params)
    pool = [Tables(model_logits[1], params), Tables(second_drafter_logits, params)]
    count, lookup = COUPLED_TREES[tree]
    pairs, accepted = coupled_two_tokens(target, pool[:count], pool[1] if lookup else None, position_keyed_accept,
                                         SAMPLES)
    assert chi_square_p_value(pairs, target.two_token_joint()) > P_VALUE_FLOOR
    assert accepted > 0.3  # the drafts do agree with the target's samples (the point of drawing them this way)


def accept_with_stale_noise(tokens, parents, target_probs, seed, start):
    """Wrong on purpose: every level of the walk reuses the first position's noise instead of its own."""
    children: dict[int, list[int]] = {}
    for i, p in enumerate(parents.tolist()):
        children.setdefault(p, []).append(i)
    path, node = [], ROOT
    while True:
        token = int(position_keyed_sample(target_probs[node + 1][None], [seed], [start])[0])
        child = next((c for c in children.get(node, ()) if int(tokens[c]) == token), None)
        if child is None:
            return path, token
        path.append(child)
        node = child


def accept_any_supported_draft(tokens, parents, target_probs, seed, start):
    """Wrong on purpose: trusts the first child whenever the target could have produced its token."""
    path, node, parent_list = [], ROOT, parents.tolist()
    while True:
        child = next((i for i, p in enumerate(parent_list) if p == node), None)
        if child is None or float(target_probs[node + 1][tokens[child]]) == 0:
            token = int(position_keyed_sample(target_probs[node + 1][None], [seed], [start + len(path)])[0])
            return path, token
        path.append(child)
        node = child


@pytest.mark.parametrize("wrong_accept", [accept_with_stale_noise, accept_any_supported_draft])
def test_a_wrong_coupled_acceptance_fails_the_same_check(model_logits, shared_noise, wrong_accept):
    params = SamplingParams(temperature=1.0)
    target, drafter = Tables(model_logits[0], params), Tables(model_logits[1], params)
    pairs, _ = coupled_two_tokens(target, [drafter], None, wrong_accept, SAMPLES)
    assert chi_square_p_value(pairs, target.two_token_joint()) < P_VALUE_FLOOR


def test_the_target_drafting_for_itself_is_always_accepted(model_logits, shared_noise):
    params = SamplingParams(temperature=0.8, top_p=0.95)
    target = Tables(model_logits[0], params)
    _, accepted = coupled_two_tokens(target, [target], None, position_keyed_accept, 2_000)
    assert accepted == 2.0  # both drafted levels, every time: same distribution, same noise


def test_position_keyed_samples_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    draws = position_keyed_sample(probs.expand(40_000, -1), list(range(40_000)), [7] * 40_000)
    observed = torch.bincount(draws, minlength=len(probs)).double()
    assert observed[-1] == 0  # never a zero-probability token
    expected = probs.double() * len(draws)
    statistic = ((observed[:-1] - expected[:-1]) ** 2 / expected[:-1]).sum()
    assert float(torch.special.gammaincc(torch.tensor(2.0, dtype=torch.float64), statistic / 2)) > P_VALUE_FLOOR
    again = position_keyed_sample(probs.expand(3, -1), [0, 1, 2], [7, 7, 7])
    assert torch.equal(again, draws[:3])  # a function of (seed, position) alone


def test_draft_probs_apply_the_requests_filters_on_the_drafters_top_tokens():
    from specfleet.engine.sampling import draft_probs

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    for params in SAMPLED_PARAMS:
        q = draft_probs(logits, params, support=64)
        exact = warp_probs(logits, params)
        assert torch.allclose(q.sum(-1), torch.ones(3))
        assert torch.equal(q.argmax(-1), logits.argmax(-1))  # the drafter's favourite always stays
        assert torch.equal(q > 0, exact > 0)  # the same support as the target's warp: nothing cut short
        assert torch.allclose(q, exact, atol=1e-6)
    wide = torch.zeros(1, 500)  # a flat distribution: its nucleus does not fit in 64 tokens
    assert torch.equal(draft_probs(wide, SAMPLED_PARAMS[1], support=64), warp_probs(wide, SAMPLED_PARAMS[1]))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=1.0,
                                                                                                 top_p=0.5, top_k=40)],
                         ids=str)
def test_warp_probs_with_a_real_vocabulary_matches_hugging_face(params):
    """Vocabularies of NUMPY_SORT_FROM tokens or more sort with numpy's quicksort: the same sorted values, so the
    same support and probabilities as Hugging Face's warpers, row for row."""
    from specfleet.engine.sampling import NUMPY_SORT_FROM

    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 8192, generator=generator) * 3  # continuous: no exact ties
    assert logits.shape[-1] >= NUMPY_SORT_FROM
    probs = warp_probs(logits, params)
    reference = hf_warped_scores(logits, params)
    assert torch.equal(probs > 0, reference > -math.inf), "same support"
    torch.testing.assert_close(probs, reference.softmax(-1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# The target's keyed sample straight from its logits (keyed_target_sample): the argmax over the warp's kept tokens of
# scores / T + the position's noise, with the full sort only when the whole-vocabulary argmax may lie in the tail.


def _kept_argmax(logits: torch.Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """The definition, by the exact mask: warp_probs' support (Hugging Face's, exact ties resolved by id)."""
    scores = logits.float() / params.temperature
    kept = warp_probs(logits[None], params)[0] > 0
    noisy = scores + position_gumbels(seed, position, logits.shape[-1])
    return int(noisy.masked_fill(~kept, -math.inf).argmax())


@pytest.mark.parametrize("vocab", [300, 4096])
def test_keyed_target_sample_is_the_argmax_over_the_warps_support(vocab):
    from specfleet.engine.sampling import keyed_target_sample

    generator = torch.Generator().manual_seed(3)
    cases = [SamplingParams(0.8, 0.95), SamplingParams(1.0, 0.5), SamplingParams(0.7, 0.9, top_k=20),
             SamplingParams(1.3, 1.0, top_k=5), SamplingParams(0.8, 0.95, top_k=1)]
    tails = 0
    for i in range(240):
        params = cases[i % len(cases)]
        logits = torch.randn(vocab, generator=generator) * (0.5 + 3 * (i % 4))  # flat to peaked
        if i % 7 == 0:
            logits[:vocab // 2] = logits[vocab // 2]  # many exact ties
        got = keyed_target_sample(logits, params, seed=i, position=i % 5)
        assert got == _kept_argmax(logits, params, i, i % 5), (i, params)
        noisy = logits / params.temperature + position_gumbels(i, i % 5, vocab)
        tails += got != int(noisy.argmax())
    assert tails > 0  # some draws fell in the tail the warp removes: the exact mask decided them


def test_keyed_tree_accept_equals_position_keyed_accept_over_warped_probs():
    """Walking the tree from raw logits, sampling only the rows it visits, accepts what position_keyed_accept
    accepts over warp_probs' rows (the same draws: Gumbel-max over the same support)."""
    from specfleet.engine.sampling import keyed_tree_accept

    generator = torch.Generator().manual_seed(5)
    params = SamplingParams(0.8, 0.95)
    parents = torch.tensor([-1, 0, 0, 1, -1])
    for seed in range(60):
        logits = torch.randn(6, 1500, generator=generator) * 2
        logits[:, 7] += 4  # a likely token: some trees accept
        tokens = torch.tensor([7, 7, 3, 7, 9])
        expected = position_keyed_accept(tokens, parents, warp_probs(logits, params), seed, 11)
        assert keyed_tree_accept(tokens, parents, logits, params, seed, 11) == expected


def test_keyed_draft_sample_couples_with_the_targets_keyed_sample():
    """A drafter whose logits are the target's drafts the target's own sample (the same noise, the same warp up to
    the tail): equal in nearly every draw, and every draft lies in the warp's support or among the likeliest."""
    from specfleet.engine.sampling import DRAFT_TAIL_SUPPORT, keyed_draft_sample, keyed_target_sample

    generator = torch.Generator().manual_seed(9)
    params = SamplingParams(0.8, 0.95)
    logits = torch.randn(400, 2048, generator=generator) * 2
    seeds, positions = list(range(400)), [3] * 400
    drafts, confidences, _ = keyed_draft_sample(logits, params, seeds, positions)
    targets = [keyed_target_sample(logits[r], params, seeds[r], 3) for r in range(400)]
    assert sum(d == t for d, t in zip(drafts, targets, strict=True)) >= 0.97 * 400
    kept = warp_probs(logits, params) > 0
    top = logits.topk(DRAFT_TAIL_SUPPORT, dim=-1)[1]
    for r, d in enumerate(drafts):
        assert bool(kept[r, d]) or d in top[r].tolist()
    assert all(0 < c <= 1 for c in confidences)
    unfiltered, _, _ = keyed_draft_sample(logits[:8], SamplingParams(1.0), seeds[:8], positions[:8])
    noisy = logits[:8] + torch.stack([position_gumbels(s, 3, 2048) for s in seeds[:8]])
    assert unfiltered == noisy.argmax(-1).tolist()  # no top-p: the plain Gumbel-max draw


def test_keyed_draft_siblings_are_the_next_best_under_the_same_noise():
    """Siblings of a sampled draft: distinct from it and from each other, the next best of the noisy scores among
    the likeliest tokens, and they cover the target's own sample where the draft misses it (a drafter whose
    logits differ from the target's)."""
    from specfleet.engine.sampling import DRAFT_TAIL_SUPPORT, keyed_draft_sample, keyed_target_sample

    generator = torch.Generator().manual_seed(11)
    params = SamplingParams(0.8, 0.95)
    target = torch.randn(300, 1024, generator=generator) * 2
    drafter = target + torch.randn(300, 1024, generator=generator)  # a drafter close to the target, not equal
    seeds, positions = list(range(300)), [5] * 300
    drafts, _, alternatives = keyed_draft_sample(drafter, params, seeds, positions, siblings=2)
    top = drafter.topk(DRAFT_TAIL_SUPPORT, dim=-1)[1]
    noisy = drafter / params.temperature + torch.stack([position_gumbels(s, 5, 1024) for s in seeds])
    for r, alts in enumerate(alternatives):
        tokens = [t for t, _ in alts]
        assert len(tokens) == 2 and drafts[r] not in tokens and len(set(tokens)) == 2
        assert all(t in top[r].tolist() for t in tokens) and all(0 < q <= 1 for _, q in alts)
        assert float(noisy[r, tokens[0]]) >= float(noisy[r, tokens[1]])
    samples = [keyed_target_sample(target[r], params, seeds[r], 5) for r in range(300)]
    alone = sum(d == s for d, s in zip(drafts, samples, strict=True))
    covered = sum(s == d or s in [t for t, _ in a] for d, s, a in zip(drafts, samples, alternatives, strict=True))
    assert covered >= alone + 0.1 * 300  # the siblings catch a good share of the misses
    assert keyed_draft_sample(drafter[:4], params, seeds[:4], positions[:4])[2] == [[], [], [], []]
