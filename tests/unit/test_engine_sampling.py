"""Sampling through the real engine on the bundled models is lossless: after the end of a held-out line of code (from
the `requests` package, never in any training split) at temperature 0.8 and top-p 0.95, the first two tokens that
SpecEngine commits, drafting every round (proposer model and fused, k=3, batch 16), follow the target's exact
two-token distribution, computed from its logits with warp_probs (which equals Hugging Face generate's warping;
see test_sampling.py). Chi-square over (x1, x2) and over x1 alone, plus a support check; negative controls show
each check has power at the same sample size. The tiny-model tests in test_sampling.py use far larger samples on
a 12-token vocabulary; this one checks the whole engine path (prefill, drafting, tree verification, KV
compaction, acceptance) on the real vocabulary."""

import pytest
import torch

from specfleet.engine.engine import Request
from specfleet.engine.factory import build_engine
from specfleet.engine.sampling import SamplingParams, make_generator, warp_probs

from conftest import MODELS_DIR

# requests/sessions.py, Session.mount: the next two tokens open the docstring (84 tokens in the top-p nucleus). The
# line's last 9 tokens, not all 22: the engine prefills every request's prompt, so this prefix makes the fixture ~2x
# cheaper; its distribution is, if anything, easier to tell apart from the wrong ones below (chi-square
# noncentrality at this file's sample sizes, this prefix vs the whole line: wrong temperature 2025 vs 239, second
# token from the wrong context 171 vs 113), so every check keeps at least its power.
PREFIX = 'BaseAdapter) -> None:\n        """'
PARAMS = SamplingParams(temperature=0.8, top_p=0.95)
REQUESTS_PER_PROPOSER = 512  # 32 batches of 16
BATCH = 16
# Two tokens are checked; a third lets the first round draft two levels (the engine drafts at most remaining - 1),
# so the second token is sometimes an accepted depth-2 draft, not only the target's bonus token.
NEW_TOKENS = 3
FIRST_TOKENS_MASS = 0.99  # p(x2 | x1) is computed for the likeliest first tokens covering this much of p1
MAX_FIRST_TOKENS = 64
P_VALUE_FLOOR = 1e-3
PROPOSERS = {"model": ("python", 10_000), "fused": ("python,prose,c", 20_000)}  # drafters, first seed per request
if (MODELS_DIR / "head" / "head.json").exists():  # the bundled draft head fused with the specialists
    PROPOSERS["fused-head"] = ("python,prose,c,head", 30_000)


class TwoTokens:
    """The target's exact (warped) distribution of the next two tokens after PREFIX."""

    def __init__(self, target, prefix_ids: list[int], params: SamplingParams, firsts: torch.Tensor | None = None):
        self.target, self.prefix_ids, self.params = target, prefix_ids, params
        with torch.no_grad():
            self.p1 = warp_probs(target(input_ids=torch.tensor([prefix_ids])).logits[0, -1], params)  # [V]
        if firsts is None:  # the likeliest first tokens, enough to cover FIRST_TOKENS_MASS
            ranked = self.p1.sort(descending=True)
            covering = int((ranked.values.cumsum(0) < FIRST_TOKENS_MASS).sum()) + 1
            firsts = ranked.indices[:min(covering, MAX_FIRST_TOKENS)]
        self.firsts = firsts  # [F]
        self.p2 = self.second(firsts.tolist())  # [F, V]
        self.joint = self.p1[firsts, None] * self.p2  # [F, V]: p(x1, x2) for x1 in firsts

    def second(self, firsts: list[int]) -> torch.Tensor:
        """[len(firsts), V]: p(x2 | x1) for each x1, from one batched forward."""
        ids = torch.tensor([self.prefix_ids + [x1] for x1 in firsts])
        with torch.no_grad():
            return warp_probs(self.target(input_ids=ids, logits_to_keep=1).logits[:, -1], self.params)

    def joint_bins(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(observed, expected) counts over every (x1 in firsts, x2) bin plus one last bin for all other x1."""
        vocab = len(self.p1)
        where = torch.full((vocab,), -1, dtype=torch.long)
        where[self.firsts] = torch.arange(len(self.firsts))
        row = where[pairs[:, 0]]
        index = torch.where(row >= 0, row * vocab + pairs[:, 1], len(self.firsts) * vocab)
        observed = torch.bincount(index, minlength=len(self.firsts) * vocab + 1).double()
        expected = torch.cat([self.joint.flatten(), (1 - self.joint.sum()).reshape(1)]).double() * len(pairs)
        return observed, expected

    def first_bins(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(observed, expected) counts of the first token alone."""
        observed = torch.bincount(pairs[:, 0], minlength=len(self.p1)).double()
        return observed, self.p1.double() * len(pairs)

    def outside_support(self, pairs: torch.Tensor) -> int:
        """How many pairs the target can never produce (x1 or x2 has probability 0 after warping)."""
        bad = int((self.p1[pairs[:, 0]] == 0).sum())
        known = {int(x1): i for i, x1 in enumerate(self.firsts)}
        others = sorted({int(x1) for x1 in pairs[:, 0]} - set(known))
        p2_other = self.second(others) if others else None
        for x1, x2 in pairs.tolist():
            row = self.p2[known[x1]] if x1 in known else p2_other[others.index(x1)]
            bad += int(row[x2] == 0)
        return bad


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square p-value; bins expecting < 5 (zero-probability ones too) are merged into one "other" bin,
    and that bin, if still < 5, into the smallest remaining one. Support is checked separately."""
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if expected[-1] < 5:
        smallest = int(expected[:-1].argmin())
        observed[smallest] += observed[-1]
        expected[smallest] += expected[-1]
        observed, expected = observed[:-1], expected[:-1]
    assert len(expected) >= 5, f"only {len(expected)} bins: the check would have no resolution"
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2))


@pytest.fixture(scope="module")
def target(load_model):
    return load_model("target")


@pytest.fixture(scope="module")
def prefix_ids(tokenizer, held_out_text):
    assert PREFIX in held_out_text["python"], "the prefix ends a line of requests/sessions.py"
    ids = tokenizer(PREFIX, add_special_tokens=False).input_ids
    assert 6 <= len(ids) <= 12
    return ids


@pytest.fixture(scope="module")
def exact(target, prefix_ids):
    return TwoTokens(target, prefix_ids, PARAMS)


@pytest.fixture(scope="module")
def engine_runs(target, prefix_ids, models_dir):
    """proposer -> (pairs [N, 2] of the first two committed tokens, results)."""
    runs = {}
    for proposer, (drafters, first_seed) in PROPOSERS.items():
        engine = build_engine(models_dir, proposer.removesuffix("-head"), drafters, batch_size=BATCH, k=3,
                              adaptive=False, target=target)
        requests = [Request(f"r{i}", list(prefix_ids), NEW_TOKENS,
                            SamplingParams(PARAMS.temperature, PARAMS.top_p, PARAMS.top_k, first_seed + i),
                            ignore_eos=True)  # end-of-text is a token like any other here
                    for i in range(REQUESTS_PER_PROPOSER)]
        results = engine.generate(requests)
        assert all(len(r.token_ids) == NEW_TOKENS for r in results)
        runs[proposer] = torch.tensor([r.token_ids[:2] for r in results]), results
    return runs


def test_the_exact_distribution_is_well_covered(exact):
    assert float(exact.p1.sum()) == pytest.approx(1.0, abs=1e-5)
    assert float(exact.p1[exact.firsts].sum()) > 0.95
    assert torch.allclose(exact.p2.sum(-1), torch.ones(len(exact.firsts)), atol=1e-5)
    assert 1 < int((exact.p1 > 0).sum()) < len(exact.p1), "top-p removed part of the vocabulary, not all of it"


@pytest.mark.parametrize("proposer", list(PROPOSERS))
def test_engine_samples_follow_the_target(proposer, engine_runs, exact):
    pairs, results = engine_runs[proposer]
    assert exact.outside_support(pairs) == 0, "a sample the target can never produce"
    assert chi_square_p_value(*exact.joint_bins(pairs)) > P_VALUE_FLOOR, "joint of the first two tokens"
    assert chi_square_p_value(*exact.first_bins(pairs)) > P_VALUE_FLOOR, "first token alone"
    # the check is only meaningful if drafted tokens were accepted, at depth 1 and at depth 2
    accepted = torch.tensor([r.stats["accepted_tokens"] for r in results])
    assert all(r.stats["draft_tokens"] > 0 for r in results), "adaptive=False: every request drafted"
    assert int((accepted >= 1).sum()) >= len(results) // 10 and int((accepted >= 2).sum()) >= 10


def test_pooled_engine_samples_follow_the_target(engine_runs, exact):
    """Every proposer's samples together: twice the sample, finer bins (the wrong-context control's size)."""
    pairs = torch.cat([pairs for pairs, _ in engine_runs.values()])
    assert chi_square_p_value(*exact.joint_bins(pairs)) > P_VALUE_FLOOR


def test_different_seeds_give_independent_samples(engine_runs):
    """Sanity for the test itself: distinct per-request seeds do not repeat one sample."""
    pairs, _ = engine_runs["model"]
    assert len({tuple(p) for p in pairs.tolist()}) > 50


def sample_from(tables: TwoTokens, n: int, seed: int) -> torch.Tensor:
    """[n, 2] pairs drawn directly from exact tables; x2 is drawn only for x1 in tables.firsts, else it is -1 (such
    pairs fall in the "other" bin whatever x2 is)."""
    generator = make_generator(seed)
    x1 = torch.multinomial(tables.p1, n, replacement=True, generator=generator)
    where = {int(t): i for i, t in enumerate(tables.firsts)}
    x2 = [int(torch.multinomial(tables.p2[where[t]], 1, generator=generator)) if t in where else -1
          for t in x1.tolist()]
    return torch.stack([x1, torch.tensor(x2)], 1)


def test_the_check_has_power_against_a_wrong_temperature(target, prefix_ids, exact):
    """Samples at temperature 1.0 instead of 0.8 fail the same chi-square checks at the same sample size."""
    wrong = TwoTokens(target, prefix_ids, SamplingParams(temperature=1.0, top_p=PARAMS.top_p), exact.firsts)
    pairs = sample_from(wrong, REQUESTS_PER_PROPOSER, seed=5)
    assert chi_square_p_value(*exact.joint_bins(pairs)) < P_VALUE_FLOOR
    assert chi_square_p_value(*exact.first_bins(pairs)) < P_VALUE_FLOOR


def test_the_joint_check_catches_a_second_token_from_the_wrong_context(exact):
    """A plausible engine bug, the second token drawn after another first token (a wrong logits row), leaves the
    first-token marginal exact; the joint check catches it at the pooled sample size."""
    n = len(PROPOSERS) * REQUESTS_PER_PROPOSER
    generator = make_generator(7)
    x1 = torch.multinomial(exact.p1, n, replacement=True, generator=generator)
    wrong_row = torch.multinomial(exact.p1[exact.firsts], n, replacement=True, generator=generator)
    x2 = torch.cat([torch.multinomial(exact.p2[row], 1, generator=generator) for row in wrong_row.tolist()])
    pairs = torch.stack([x1, x2], 1)
    assert chi_square_p_value(*exact.first_bins(pairs)) > P_VALUE_FLOOR
    assert chi_square_p_value(*exact.joint_bins(pairs)) < P_VALUE_FLOOR


def test_the_support_check_catches_a_missing_top_p(target, prefix_ids, exact):
    """Samples without top-p (the tail the target never samples) are caught at the same sample size."""
    wrong = TwoTokens(target, prefix_ids, SamplingParams(temperature=PARAMS.temperature), exact.firsts)
    pairs = sample_from(wrong, REQUESTS_PER_PROPOSER, seed=6)
    assert int((exact.p1[pairs[:, 0]] == 0).sum()) > 0, "first tokens outside the nucleus"
    inside = pairs[(pairs[:, 1] >= 0) & (exact.p1[pairs[:, 0]] > 0)]
    assert exact.outside_support(inside) > 0, "second tokens outside the nucleus"


def test_the_target_drafting_for_itself_accepts_every_sampled_draft(target, prefix_ids):
    """Sanity of stochastic drafts: with the target as its own drafter, each level is drawn from the same warped
    distribution with the same noise as the target's own sample, so every drafted token is accepted."""
    from specfleet.engine.drafters import DrafterModel, ModelProposer
    from specfleet.engine.engine import SpecEngine

    engine = SpecEngine(target, ModelProposer([DrafterModel("target", target, 8)]), max_batch=8, k=3)
    results = engine.generate([Request(f"s{i}", list(prefix_ids), 24, SamplingParams(0.8, 0.95, 0, 77 + i),
                                       ignore_eos=True) for i in range(8)])
    drafted = sum(r.stats["draft_tokens"] for r in results)
    accepted = sum(r.stats["accepted_tokens"] for r in results)
    # all of them but for float rounding: the drafter's incremental forward and the tree forward differ in the last
    # bits, which can flip a near-tie of the noisy scores
    assert drafted > 100 and accepted >= 0.98 * drafted
