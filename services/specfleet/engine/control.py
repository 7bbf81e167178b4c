"""Adaptive speculation control (CoSine, DSI): per round and request, how many levels to draft and with which
drafters, chosen to maximise the batch's committed tokens per second, and never slower than plain decoding.

Pure: no clocks, no torch. The engine measures wall times and feeds them in; everything is deterministic.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field


def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens committed by one round drafting a k-level chain with per-position acceptance alpha:
    1 + alpha + ... + alpha^k (the accepted prefix plus the target's own correction or bonus token)."""
    if alpha >= 1.0:
        return k + 1.0
    alpha = max(alpha, 0.0)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


class _LinearFit:
    """y = a + b*x by least squares over the last `window` observations, regularised toward a prior line.

    The prior line (the profiled costs), scaled to the observations' level, enters as `prior_weight`
    pseudo-observations split between x = 1 and x = `span`: observations with little spread in x (most rounds at one
    size) cannot swing the slope on timing noise, while many observations over a range of x overrule the prior.
    A negative fitted slope or intercept is clamped (times never shrink with size, nor go below zero).
    """

    def __init__(self, intercept: float, slope: float, window: int, span: float = 16.0, prior_weight: float = 8.0):
        self.prior = (intercept, slope)
        self.span, self.prior_weight = span, prior_weight
        self.points: deque[tuple[float, float]] = deque(maxlen=window)
        self.intercept, self.slope = intercept, slope
        # running sums over `points` (n, x, y, x*x, x*y): a fit per observation costs O(1), not O(window) (the
        # router fits twice a round); recomputed exactly every `window` observations, so rounding never drifts
        self._sums = (0, 0.0, 0.0, 0.0, 0.0)
        self._added = 0

    def __call__(self, x: float) -> float:
        return self.intercept + self.slope * x

    def set_prior(self, intercept: float, slope: float) -> None:
        self.prior = (intercept, slope)
        self.intercept, self.slope = self._fit() if self.points else self.prior

    def add(self, x: float, y: float) -> None:
        x, y = float(x), float(y)
        n, sx, sy, sxx, sxy = self._sums
        if len(self.points) == self.points.maxlen:
            ox, oy = self.points[0]
            n, sx, sy, sxx, sxy = n - 1, sx - ox, sy - oy, sxx - ox * ox, sxy - ox * oy
        self.points.append((x, y))
        self._added += 1
        if self._added % max(1, self.points.maxlen or 1) == 0:
            self._sums = (len(self.points), sum(px for px, _ in self.points), sum(py for _, py in self.points),
                          sum(px * px for px, _ in self.points), sum(px * py for px, py in self.points))
        else:
            self._sums = (n + 1, sx + x, sy + y, sxx + x * x, sxy + x * y)
        self.intercept, self.slope = self._fit()

    def _fit(self) -> tuple[float, float]:
        n, sx, sy, sxx, sxy = self._sums
        a0, b0 = self.prior
        # the prior's level follows the observations at once (a loaded machine is slower at every size); its
        # shape, the split between fixed and per-unit cost, is what the pseudo-observations hold in place
        predicted = n * a0 + b0 * sx
        scale = sy / predicted if predicted > 0 else 1.0
        a0, b0 = a0 * scale, b0 * scale
        half = self.prior_weight / 2
        # the observations (weight 1 each) and two pseudo-observations of weight `half` on the prior line
        y1, y2 = a0 + b0, a0 + b0 * self.span
        w = n + 2 * half
        wx, wy = sx + half * (1.0 + self.span), sy + half * (y1 + y2)
        wxx, wxy = sxx + half * (1.0 + self.span * self.span), sxy + half * (y1 + self.span * y2)
        mean_x, mean_y = wx / w, wy / w
        slope = (wxy - w * mean_x * mean_y) / (wxx - w * mean_x * mean_x)
        intercept = mean_y - slope * mean_x
        if slope < 0:
            return mean_y, 0.0
        if intercept < 0:  # refit through the origin
            return 0.0, wxy / wxx
        return intercept, slope


class CostModel:
    """Online round cost estimates: a drafter step as a + b*batch, a verifier forward as a + b*tokens (a is the
    fixed per-forward cost: weights read, launch, sync). Priors make a draft step ~10x cheaper than a forward.

    `parallel_drafters`: drafters run side by side (separate services), so a step costs one drafter's time, not
    the sum over drafters.
    """

    def __init__(self, draft_prior: tuple[float, float] = (2e-3, 2e-4),
                 verify_prior: tuple[float, float] = (2e-2, 2e-4), window: int = 64,
                 parallel_drafters: bool = False):
        self.draft_step = _LinearFit(*draft_prior, window)
        self.verify = _LinearFit(*verify_prior, window)
        self.parallel_drafters = parallel_drafters
        # seconds of one token of a drafter catch-up (a prefill) in every drafter, where profiled (`calibrate`);
        # None: priced as a draft level's per-request seconds
        self.catch_up_token: float | None = None

    def set_priors(self, draft_prior: tuple[float, float], verify_prior: tuple[float, float]) -> None:
        """Replaces the priors with profiled values (seconds), e.g. from `SpecEngine.calibrate`."""
        self.draft_step.set_prior(*draft_prior)
        self.verify.set_prior(*verify_prior)

    def drafter_factor(self, drafters: int) -> int:
        """How many drafter steps one draft level costs: every drafter's, or one when they run in parallel."""
        return 1 if self.parallel_drafters else max(drafters, 1)

    def observe_draft(self, batch: int, drafters: int, steps: int, seconds: float) -> None:
        """A draft phase: `drafters` drafters each ran `steps` steps over `batch` requests in `seconds`."""
        if batch <= 0 or steps <= 0 or drafters <= 0:
            return
        self.draft_step.add(batch, seconds / (steps * self.drafter_factor(drafters)))

    def observe_verify(self, tokens: int, seconds: float) -> None:
        """A verifier forward over `tokens` tokens (all requests' tree nodes + roots) took `seconds`."""
        if tokens > 0:
            self.verify.add(tokens, seconds)

    def draft_time(self, batch: int, drafters: int, k: int) -> float:
        if batch <= 0 or drafters <= 0 or k <= 0:
            return 0.0
        return k * self.drafter_factor(drafters) * self.draft_step(batch)

    def verify_time(self, tokens: int | float) -> float:
        return self.verify(tokens) if tokens > 0 else 0.0

    def verify_seconds_per_token(self) -> float:
        """Marginal verifier seconds of one more token in a forward."""
        return self.verify.slope

    def draft_seconds_per_request(self, drafters: int, k: int) -> float:
        """Marginal draft seconds of one more request in a draft batch of k steps (the fixed part excluded)."""
        return k * self.drafter_factor(drafters) * self.draft_step.slope


MAX_EXPLORE_BACKOFF = 8  # explorations that keep confirming the best drafter space out to 8x explore_every


class AcceptanceTracker:
    """One request's recent acceptance: alpha (per-position acceptance rate) and each drafter's contribution.

    Alpha estimator: a round drafting k levels and accepting a of them saw a accepted positions and one rejected
    position when a < k (a truncated geometric sample). The maximum-likelihood alpha over rounds is
    sum(a) / sum(a + [a < k]); we keep both sums as exponential moving averages (factor `decay` per round, seeded
    with `prior_weight` pseudo-positions at `alpha_prior`), so alpha follows recent rounds.
    """

    def __init__(self, alpha_prior: float = 0.6, prior_weight: float = 2.0, decay: float = 0.8):
        self.decay = decay
        self._accepted = alpha_prior * prior_weight
        self._positions = prior_weight
        self.share: dict[str, float] = {}  # drafter -> EMA of the share of accepted tokens it proposed
        self.unique: dict[str, float] = {}  # drafter -> EMA of the share of accepted tokens only it proposed
        self.fusion_rounds = 0  # rounds with several drafters and attribution (accepted tokens or none)
        self.width = 0.0  # EMA of tree nodes per level; 0 until observed
        self.rounds_without_draft = 0  # consecutive rounds that drafted nothing (drives probing)
        self.speculative_rounds = 0  # rounds that drafted something
        self.since_explore = 0  # speculative rounds since the last exploration round (drives drafter exploration)
        self.explore_backoff = 1  # exploration interval multiplier: doubles while explorations confirm the best
        self.explored_best: str | None = None  # the best drafter after the last exploration round
        self.inherited = False  # shares taken from earlier requests of its kind: no warm-up exploration
        self.drafted_upto = 0  # context length at its last drafting round: what its drafters' caches hold

    @property
    def alpha(self) -> float:
        return min(max(self._accepted / self._positions, 0.0), 1.0) if self._positions > 0 else 0.0

    def observe(self, drafted_levels: int, accepted: int, drafters: list[str],
                accepted_by: list[tuple[str, ...]] | None, drafted_nodes: int | None = None,
                explored: bool = False) -> None:
        """accepted_by: for each accepted draft token, the drafters that proposed it (None: not attributed).
        explored: the round fused every drafter to re-rank them (`exploring`)."""
        if drafted_levels <= 0:
            self.rounds_without_draft += 1
            return
        self.rounds_without_draft = 0
        self.speculative_rounds += 1
        self.since_explore = 0 if explored else self.since_explore + 1
        if explored:
            self._update_backoff(drafters, accepted_by, accepted)
        accepted = min(max(accepted, 0), drafted_levels)
        self._accepted = self.decay * self._accepted + accepted
        self._positions = self.decay * self._positions + accepted + (1 if accepted < drafted_levels else 0)
        if drafted_nodes is not None:
            level_width = drafted_nodes / drafted_levels
            self.width = level_width if self.width == 0 else self.decay * self.width + (1 - self.decay) * level_width
        if accepted_by is None or len(drafters) < 2:
            return  # only fusion rounds (several drafters, attributed tokens) say who helps
        # a fusion round that accepted nothing ranks too (nobody helped), so exploration ends after the warm-up even
        # where no draft is accepted; without it every round would call every pool for as long as none is
        self.fusion_rounds += 1
        if accepted == 0:
            return
        for name in drafters:
            proposed = sum(1 for who in accepted_by if name in who) / accepted
            alone = sum(1 for who in accepted_by if tuple(who) == (name,)) / accepted
            self.share[name] = self.decay * self.share.get(name, proposed) + (1 - self.decay) * proposed
            self.unique[name] = self.decay * self.unique.get(name, alone) + (1 - self.decay) * alone

    def _update_backoff(self, drafters: list[str], accepted_by, accepted: int) -> None:
        """After an exploration round (before its shares are folded in): an exploration whose evidence keeps the
        same best drafter doubles the interval to the next one (up to MAX_EXPLORE_BACKOFF times explore_every), one
        that changes it, or finds nothing accepted, goes back to every explore_every rounds. Exploring fuses every
        drafter (each catching up on the tokens it missed), which on a stable request buys nothing after the
        first few confirmations; a change of text that changes the best drafter is still found within
        MAX_EXPLORE_BACKOFF * explore_every rounds."""
        if accepted_by is None or accepted <= 0 or len(drafters) < 2:
            self.explore_backoff = 1
            return
        proposed = {name: sum(1 for who in accepted_by if name in who) for name in drafters}
        best = max(drafters, key=lambda name: proposed[name])  # this round's own evidence
        confirmed = best == self.explored_best
        self.explored_best = best
        self.explore_backoff = min(self.explore_backoff * 2, MAX_EXPLORE_BACKOFF) if confirmed else 1

    def routed_drafters(self, drafters: list[str], keep_share: float) -> list[str]:
        """Expertise routing for one request: its best drafter (largest share of accepted tokens in fusion rounds;
        the first one before any evidence) plus any other whose *unique* share (accepted tokens only it proposed)
        is >= keep_share. A drafter that only agrees with the best one costs a step and adds nothing."""
        if len(drafters) <= 1:
            return list(drafters)
        best = max(drafters, key=lambda name: self.share.get(name, 0.0))  # max keeps the first on ties
        return [name for name in drafters if name == best or self.unique.get(name, 0.0) >= keep_share]

    def exploring(self, drafters: list[str], explore_every: int, warmup: int = 2) -> bool:
        """Whether this round should fuse every drafter to (re)rank them: the first `warmup` speculative rounds,
        then every `explore_every`-th (times the backoff while explorations keep confirming the best drafter), so
        a drafter can earn its way back when the text changes."""
        if len(drafters) <= 1:
            return False
        due = explore_every > 0 and self.since_explore >= explore_every * self.explore_backoff - 1
        return (self.fusion_rounds < warmup and not self.inherited) or due

    def active_drafters(self, drafters: list[str], keep_share: float, explore_every: int) -> list[str]:
        """The drafters for this round: every one while exploring, else the routed ones."""
        if self.exploring(drafters, explore_every):
            return list(drafters)
        return self.routed_drafters(drafters, keep_share)


class LeafPricer:
    """Whether optional nodes of a tree earn their verification, per request kind and role (the draft head's r-th
    siblings and continued children, the suffix tree's lookups beside the models). A role's value is its accepted
    nodes per drafted node (exponential averages over rounds, from an optimistic prior: every role is tried first);
    it pays while value >= the batch's tokens per second x the seconds one more node costs (a verified token, plus
    a drafting row where the node needs one). `pricing()` gives (tokens per second, verify seconds per node, draft
    seconds per row), or None where nothing is priced (every role drafts). A role that does not pay is still drafted
    one round in EXPLORE_EVERY, so that its value follows the text and the load; each exploration that finds nothing
    paying doubles that interval (up to MAX_BACKOFF times), and a role that pays again resets it: an exploring round
    verifies its optional nodes at full price (a lone request's 16 lookup nodes cost about a plain round), which at
    every 16th round took ~5% of sampled decoding's time where they never paid."""

    PRIOR_NODES, PRIOR_VALUE, DECAY, EXPLORE_EVERY, MAX_BACKOFF = 8.0, 0.2, 0.97, 16, 8

    def __init__(self, pricing=None):
        self.pricing = pricing
        self.stats: dict[tuple[str, object], list[float]] = {}  # (kind, role) -> [accepted, nodes] (decayed)
        self.rounds: dict[str, int] = {}  # rounds since the kind's last exploration
        self.interval: dict[str, int] = {}  # rounds between its explorations (EXPLORE_EVERY, doubled while unpaid)
        self.explorations: dict[str, int] = {}

    def _tally(self, kind: str, role) -> tuple[float, float]:
        """(accepted, drafted) nodes of the role, decayed; the optimistic prior before any round."""
        return self.stats.get((kind, role), (self.PRIOR_VALUE * self.PRIOR_NODES, self.PRIOR_NODES))

    def value(self, kind: str, role) -> float:
        accepted, nodes = self._tally(kind, role)
        return accepted / nodes

    def prices(self) -> tuple[float, float, float] | None:
        """This round's prices, or None: unpriced, every role drafts."""
        return self.pricing() if self.pricing is not None else None

    def exploring(self, kind: str) -> bool:
        """Counts a round of `kind`: True once in its interval (roles that do not pay are drafted then), after which
        the interval doubles until `paid` resets it."""
        self.rounds[kind] = self.rounds.get(kind, 0) + 1
        interval = self.interval.get(kind, self.EXPLORE_EVERY)
        if self.rounds[kind] < interval:
            return False
        self.rounds[kind] = 0
        self.interval[kind] = min(2 * interval, self.EXPLORE_EVERY * self.MAX_BACKOFF)
        self.explorations[kind] = self.explorations.get(kind, 0) + 1
        return True

    def paid(self, kind: str) -> None:
        """Some role of `kind` pays: explorations go back to every EXPLORE_EVERY rounds."""
        self.interval[kind] = self.EXPLORE_EVERY

    def pays(self, kind: str, role, prices: tuple[float, float, float] | None, rows: float = 0.0) -> bool:
        """Whether a node of `role` (needing `rows` drafting rows) pays at `prices` (None: it does)."""
        if prices is None:
            return True
        rate, node_seconds, row_seconds = prices
        return self.value(kind, role) >= rate * (node_seconds + rows * row_seconds)

    def observe(self, kind: str, role, accepted: int, nodes: int) -> None:
        """A round drafted `nodes` nodes of `role` for a request of `kind`, and the walk accepted `accepted`."""
        if nodes <= 0:
            return
        acc, total = self._tally(kind, role)
        self.stats[(kind, role)] = [self.DECAY * acc + accepted, self.DECAY * total + nodes]


class RealizedRates:
    """What whole rounds achieved, by batch size: committed tokens per second of rounds that drafted (speculative) and
    of rounds that did not (plain), each a ratio of exponentially averaged seconds and tokens. The cost model
    predicts; this checks the prediction against the clock (DSI: never slower than the target alone). A speculative
    round's fixed costs that the model's verify line cannot tell apart from its tokens' (the acceptance walk, the
    tree's masks, the draft head's features) make plain decoding look slower than it is: on session 15's AVX-512 Xeon
    the model expected 1.46x for the draft head on sampled text while its rounds ran at 0.93x plain decoding's speed.

    Each mode is measured in bursts of WINDOW consecutive rounds at the end of a PERIOD (a short run, or the first
    PERIOD rounds, speculate as planned): plain decoding in the first period and every REFRESH periods while
    speculation wins, speculation every period while it loses. Plain rounds cost about the same each, so a burst
    decides their rate (SHORT memory); speculative rounds vary several-fold (a lookup that matches five tokens, one
    that matches none), so their rate is averaged over about LONG rounds: over six a greedy suffix tree's unlucky
    stretch read slower than plain and switched it off for a period (fused greedy 1.76x -> 1.33x)."""

    WINDOW = 6
    PERIOD = 128  # rounds; the burst of the other mode costs WINDOW / PERIOD of them
    REFRESH = 4  # while speculation wins, plain decoding is re-measured every REFRESH periods
    SHORT, LONG = 6, 24  # rounds of memory (decay 1 - 1/memory per round) of plain and of speculative rounds

    def __init__(self):
        self.sums: dict[tuple[int, bool], list[float]] = {}  # (batch, speculative) -> [seconds, tokens, rounds]
        self.rounds: dict[int, int] = {}  # rounds whose plan drafted, per batch size

    def observe(self, batch: int, speculative: bool, seconds: float, tokens: int) -> None:
        if batch > 0 and seconds > 0 and tokens > 0:
            sums = self.sums.setdefault((batch, speculative), [0.0, 0.0, 0])
            decay = 1.0 - 1.0 / (self.LONG if speculative else self.SHORT)
            sums[0], sums[1], sums[2] = decay * sums[0] + seconds, decay * sums[1] + tokens, sums[2] + 1

    def rate(self, batch: int, speculative: bool) -> float | None:
        """Measured tokens per second of the mode (None before it has run WINDOW rounds)."""
        seconds, tokens, rounds = self.sums.get((batch, speculative), (0.0, 0.0, 0))
        return tokens / seconds if rounds >= self.WINDOW and seconds > 0 else None

    def allow(self, batch: int) -> str:
        """For a round whose plan drafts: "speculate" (as planned) or "plain"."""
        if not self.sums:  # nobody reports rounds (a router planning for services): the plans as they are
            return "speculate"
        n = self.rounds.get(batch, 0)
        self.rounds[batch] = n + 1
        period, phase = divmod(n, self.PERIOD)
        burst = phase >= self.PERIOD - self.WINDOW
        plain, spec = self.rate(batch, False), self.rate(batch, True)
        if spec is not None and plain is not None and spec < plain:
            return "speculate" if burst else "plain"  # slower than plain decoding here: re-tried in bursts
        if burst and (plain is None or period % self.REFRESH == 0):
            return "plain"  # plain decoding measured first, and now and then while speculation wins
        return "speculate"


@dataclass(frozen=True)
class Plan:
    """One request's round: draft k levels with these drafters (k = 0: plain decoding, no drafters)."""

    k: int
    drafters: list[str] = field(default_factory=list)
    probe: bool = False  # speculating only to re-measure acceptance while speculation is off


@dataclass
class _Candidate:
    rid: str
    alpha: float
    width: float  # verified tokens per drafted level
    cap: int
    catch_up: float = 0.0  # seconds of its drafters' prefill of the tokens they missed, paid when it drafts next


CATCH_UP_ROUNDS = 8  # the plan spreads a request's catch-up over this many rounds (a probe pays it whole)
INHERIT_AFTER = 8  # fusion rounds of a kind's requests before a new request starts from their drafters' shares
PROBE_FULL_GAIN = 0.25  # a best-case gain of 25% or more earns the whole probe budget; less, its share


class SpeculationController:
    """Chooses every request's draft length and drafters for one batch round.

    For each common draft length K in 1..k_max it maximises the batch's expected committed tokens per second,
    sum_i E(alpha_i, k_i) / (draft_time(speculating requests, drafters, K) + verify_time(sum_i (k_i*width_i + 1))),
    with k_i <= K, by Dinkelbach's ratio iteration (for a fixed rate the choice separates per request), and keeps
    the best K unless plain decoding (every k_i = 0) is expected at least as fast, allowing `min_gain` margin for
    estimation noise. Low alpha makes deep levels worthless; a loaded verifier (many tokens per forward) raises
    the batch rate and so the price of every drafted token: both give smaller k.

    Probing: a request that drafted nothing for `probe_every` consecutive rounds drafts `probe_k` levels once,
    so its alpha (and the draft cost) can recover. Probes are priced and paid from a budget that grows by
    `probe_share` of every round's expected plain time: a probe's draft levels and its verified nodes, by the cost
    model, and afterwards its drafters' catch-up on the tokens it missed (`charge_probes`). So probing takes at most
    about probe_share of the time at any batch size, one request at a time (longest off first) instead of a whole
    batch at once — less where even perfect drafts could gain little (`probe_scale`: a large batch).
    """

    def __init__(self, drafters: list[str], k_max: int = 8, cost: CostModel | None = None, *,
                 max_width: int = 3, keep_share: float = 0.2, explore_every: int = 8, probe_every: int = 16,
                 probe_k: int = 2, min_gain: float = 1.02, alpha_prior: float = 0.6, decay: float = 0.9,
                 fixed_k: bool = False, probe_share: float = 0.03):
        if not drafters:
            raise ValueError("SpeculationController needs at least one drafter name")
        self.drafters = list(drafters)
        self.k_max = k_max
        self.cost = cost if cost is not None else CostModel()
        self.max_width = max_width
        self.keep_share, self.explore_every = keep_share, explore_every
        self.probe_every, self.probe_k = probe_every, probe_k
        self.probe_share = probe_share
        self.probe_credit = 0.0  # seconds of probing paid for so far and not yet spent
        self._priced_catch_up = 0.0  # of the last decide's probes: the catch-up seconds already paid in their price
        self.min_gain = min_gain
        self.alpha_prior, self.decay = alpha_prior, decay
        self.fixed_k = fixed_k  # always draft the most levels allowed (routing still picks the drafters)
        self.trackers: dict[str, AcceptanceTracker] = {}
        # Every request's rounds, slowly forgotten: a new request starts from what recent ones of its kind saw, not
        # the prior. Kinds (`decide(kinds=...)`, e.g. greedy / sampled) keep apart requests that accept very
        # differently: drafts accept ~0.7 of a greedy level and ~0.4 of a sampled one, and a sampled request that
        # starts from greedy's figure drafts rounds that do not pay (a whole batch of them, at a large batch).
        self.overall = AcceptanceTracker(alpha_prior, prior_weight=4.0, decay=0.98)
        self.overall_of: dict[str, AcceptanceTracker] = {"": self.overall}
        self.kind_of: dict[str, str] = {}
        self.last_rates = (0.0, 0.0)  # (plain, chosen) expected tokens/s of the last decide, for metrics
        self.forced_plain = False  # the last decide's round made plain by the clock's check (lookups off too)
        self.realized = RealizedRates()  # the clock's check on the plans (`observe_round`)
        self.last_batch = 0  # requests in the last decide

    def tracker(self, rid: str) -> AcceptanceTracker:
        """A request's tracker; a new one starts from its kind's recent acceptance and, once requests of its kind
        have fused INHERIT_AFTER rounds, from their drafters' shares: it is routed to the kind's best drafters at
        once, instead of fusing every drafter for its first rounds, and explores on the usual schedule from there."""
        if rid not in self.trackers:
            overall = self._overall(rid)
            tracker = AcceptanceTracker(overall.alpha, prior_weight=4.0, decay=self.decay)
            if overall.fusion_rounds >= INHERIT_AFTER and overall.share:  # shares: some round accepted a draft
                tracker.share, tracker.unique = dict(overall.share), dict(overall.unique)
                tracker.inherited = True
            self.trackers[rid] = tracker
        return self.trackers[rid]

    def _overall(self, rid: str) -> AcceptanceTracker:
        kind = self.kind_of.get(rid, "")
        if kind not in self.overall_of:
            self.overall_of[kind] = AcceptanceTracker(self.alpha_prior, prior_weight=4.0, decay=0.98)
        return self.overall_of[kind]

    def forget(self, rid: str) -> None:
        self.trackers.pop(rid, None)
        self.kind_of.pop(rid, None)

    def observe(self, rid: str, plan: Plan, drafted_levels: int, accepted: int,
                accepted_by: list[tuple[str, ...]] | None = None, drafted_nodes: int | None = None) -> None:
        """After verification: the tree had `drafted_levels` levels (`drafted_nodes` nodes), `accepted` drafted
        tokens were accepted (not counting the target's own correction/bonus token), and accepted_by lists, per
        accepted token, the drafters that proposed it."""
        levels = drafted_levels if plan.k > 0 else 0
        explored = len(self.drafters) > 1 and len(plan.drafters) == len(self.drafters)
        self.tracker(rid).observe(levels, accepted, plan.drafters, accepted_by, drafted_nodes, explored)
        self._overall(rid).observe(levels, accepted, plan.drafters, accepted_by)  # the kind's shares too

    def decide(self, requests: list[str], extra_verify_tokens: int = 0,
               max_k: Mapping[str, int] | None = None, kinds: Mapping[str, str] | None = None,
               lengths: Mapping[str, int] | None = None, lookups: bool = False) -> dict[str, Plan]:
        """Plans for one batch round.

        extra_verify_tokens: other work in the same verifier forward (prefill chunks, requests decoded elsewhere),
        valued at one token each, so a busy verifier makes every drafted token dearer and k shrinks (valued at
        zero, a big sunk forward would make drafts look free). max_k: per-request caps (e.g. tokens left before
        max_new_tokens, minus one for the target's own token). kinds: per-request kind (e.g. "greedy", "sampled"),
        read when a request is first seen: it starts from what recent requests of its kind accepted. lengths:
        per-request context length (prompt + output), where the drafters hold a cache per request that catches up
        on the tokens committed while it did not draft (`catch_up_seconds`); None: drafting has no such cost.
        lookups: the caller drafts free lookups beside the plans (a suffix tree) unless told otherwise: then a round
        with lookups is a speculative round to the clock's check (`RealizedRates`), and `forced_plain` says when the
        check made this round plain (no lookups either).
        """
        self.forced_plain = False
        if kinds:
            for rid in requests:
                if rid not in self.trackers and rid in kinds:
                    self.kind_of[rid] = kinds[rid]
        # Costs are planned for the routed drafters; exploration rounds add the others on top (their price is
        # the exploration's cost, and planning with it would switch speculation off before anyone is ranked).
        drafters_of = {rid: self.tracker(rid).routed_drafters(self.drafters, self.keep_share) for rid in requests}
        if self.fixed_k:
            return {rid: Plan(k, self.trackers[rid].active_drafters(self.drafters, self.keep_share,
                                                                    self.explore_every) if k > 0 else [])
                    for rid in requests
                    for k in [self.k_max if max_k is None else max(0, min(self.k_max, max_k.get(rid, self.k_max)))]}
        used = {name for names in drafters_of.values() for name in names}
        candidates = []
        for rid in requests:
            cap = self.k_max if max_k is None else max(0, min(self.k_max, max_k.get(rid, self.k_max)))
            tracker = self.trackers[rid]
            width = tracker.width or min(len(drafters_of[rid]), self.max_width)
            catch_up = self.catch_up_seconds(tracker, lengths[rid], len(drafters_of[rid])) \
                if lengths is not None and rid in lengths else 0.0
            candidates.append(_Candidate(rid, tracker.alpha, max(width, 1.0), cap, catch_up))

        self.last_batch = len(requests)
        batch_tokens = len(requests) + extra_verify_tokens
        plain_rate = batch_tokens / self.cost.verify_time(batch_tokens) if requests else 0.0
        n_drafters = len(used)
        best_rate, best_ks = self._plan(candidates, n_drafters, extra_verify_tokens, plain_rate)
        self.last_rates = (plain_rate, best_rate)

        probes = self._probes(candidates, best_ks, batch_tokens, n_drafters)
        if (any(best_ks.values()) or probes or lookups) and self.realized.allow(len(requests)) == "plain":
            best_ks, probes = {rid: 0 for rid in best_ks}, {}  # measured slower than plain decoding here: plain
            self.forced_plain = True
        plans = {}
        for c in candidates:
            k, probe = best_ks[c.rid], c.rid in probes
            if probe:
                k = probes[c.rid]
            names = self.trackers[c.rid].active_drafters(self.drafters, self.keep_share,
                                                         self.explore_every) if k > 0 else []
            plans[c.rid] = Plan(k, names, probe)
            if k > 0 and lengths is not None and c.rid in lengths:
                self.trackers[c.rid].drafted_upto = lengths[c.rid]  # its drafters catch up this round
        return plans

    def current_rate(self) -> float:
        """Tokens per second the batch runs at: as measured over its recent speculative rounds where rounds are
        reported (`observe_round`), else as the last plan expected (0.0 before any plan)."""
        measured = self.realized.rate(self.last_batch, True) if self.last_batch else None
        return measured or self.last_rates[1] or self.last_rates[0]

    def observe_round(self, batch: int, plans: Mapping[str, Plan], seconds: float, tokens: int,
                      drafted: bool | None = None) -> None:
        """A whole round of `batch` requests under `plans` took `seconds` (drafting, its catch-up, verification) and
        committed `tokens`: the measured rates `decide` checks its plans against (`RealizedRates`). drafted: whether
        the round drafted anything (lookups included); None: whether some plan had k > 0."""
        speculative = any(plan.k > 0 for plan in plans.values()) if drafted is None else drafted
        self.realized.observe(batch, speculative, seconds, tokens)

    def catch_up_seconds(self, tracker: AcceptanceTracker, length: int, drafters: int) -> float:
        """What drafting next costs a request beyond its levels: each drafter's prefill of the context it has not
        seen (its prompt, at first; afterwards the tokens committed while it did not draft), priced per token at the
        profiled `CostModel.catch_up_token` or, unprofiled, at a drafter's marginal seconds per request-level (about
        a prefill token's on a CPU, dearer than a GPU's: the error errs toward not drafting). Unpriced, a batch whose
        requests each switch back on or probe after N rounds off pays N tokens x every drafter for one round's
        gain (bench/engine.json sampled batch 16: ~6% of the time)."""
        behind = max(length - tracker.drafted_upto, 0)
        per_token = self.cost.catch_up_token
        return behind * (self.cost.draft_seconds_per_request(max(drafters, 1), 1) if per_token is None else per_token)

    def _plan(self, candidates: list[_Candidate], n_drafters: int, extra_tokens: int,
              plain_rate: float) -> tuple[float, dict[str, int]]:
        """The best common depth's plan (rate, rid -> k); all k = 0 unless it beats plain decoding by min_gain."""
        best_rate, best_ks = plain_rate, {c.rid: 0 for c in candidates}
        # speculation off and no request able to gain (the usual round at a large batch): no Dinkelbach per depth
        top = 0 if self._hopeless(candidates, plain_rate, n_drafters) else max((c.cap for c in candidates), default=0)
        for depth in range(1, top + 1):
            rate, ks = self._best_for_depth(candidates, depth, n_drafters, extra_tokens, plain_rate)
            if rate > best_rate * (1.0 if any(best_ks.values()) else self.min_gain):
                best_rate, best_ks = rate, ks
        return best_rate, best_ks

    def _hopeless(self, candidates: list[_Candidate], rate: float, n_drafters: int) -> bool:
        """True when no request would draft at any depth starting from `rate` (plain decoding's), so every depth's
        Dinkelbach would stop at its first step with all k = 0. Level j is worth alpha^j tokens at a price of at
        least rate * (width * verify seconds per token + one level's per-request draft seconds), and drafting at
        all pays the request's share of its catch-up (`catch_up_seconds` / CATCH_UP_ROUNDS) once: a request is
        hopeless when no k up to its cap has its levels' worth above that (the best case, a plan of depth k; a
        deeper plan's draft levels only cost more). Without the catch-up term a batch whose requests start from a
        high alpha but are priced off by their catch-up would run every depth's Dinkelbach every round (~1 ms a
        round at batch 16). The margin keeps the borderline cases, where rounding could tip `_best_k`, on the full
        computation."""
        verify_per_token = self.cost.verify_seconds_per_token()
        draft_level = self.cost.draft_seconds_per_request(n_drafters, 1)
        for c in candidates:
            if c.cap <= 0:
                continue
            level_price = rate * (verify_per_token * c.width + draft_level)
            fixed = rate * c.catch_up / CATCH_UP_ROUNDS
            alpha, worth, power, levels = min(c.alpha, 1.0), 0.0, 1.0, 0
            for _ in range(c.cap):
                power *= alpha
                if power < level_price * (1 - 1e-6):
                    break  # deeper levels are worth less still
                worth += power - level_price
                levels += 1
            if levels and worth >= fixed - 1e-6 * (fixed + level_price):
                return False
        return True

    def charge_probes(self, seconds: float) -> None:
        """The measured cost of this round's probes' catch-up: the drafters' prefill of the tokens a probing request
        committed while it did not draft. What the plan already priced in (`catch_up_seconds`, given lengths) is
        settled, the difference charged or refunded; the budget may go below zero and then delays the next probe,
        so probing keeps to about probe_share of the time whatever the catch-up costs."""
        self.probe_credit -= max(float(seconds), 0.0) - self._priced_catch_up
        self._priced_catch_up = 0.0

    def _probes(self, candidates: list[_Candidate], ks: dict[str, int], batch_tokens: int,
                n_drafters: int) -> dict[str, int]:
        """Which requests that speculation left off probe this round (rid -> k), paid from the probe budget."""
        round_seconds = self.cost.verify_time(batch_tokens)
        self._priced_catch_up = 0.0
        self.probe_credit += self.probe_share * self.probe_scale(candidates, batch_tokens) * round_seconds
        due = [c for c in candidates if ks[c.rid] == 0 and c.cap > 0
               and self.trackers[c.rid].rounds_without_draft >= self.probe_every]
        if not due:  # budget unspent while nobody needs a probe does not pile up for a later burst
            self.probe_credit = min(self.probe_credit, self.probe_share * round_seconds * self.probe_every)
            return {}
        due.sort(key=lambda c: -self.trackers[c.rid].rounds_without_draft)
        probes = {}
        for c in due:
            k = min(self.probe_k, c.cap)
            # its draft levels, its verified nodes and its drafters' catch-up on the tokens missed while off (where
            # the engine gave lengths; any error of that price is settled after the round: `charge_probes`)
            seconds = (self.cost.draft_time(1, max(n_drafters, 1), k)
                       + self.cost.verify_seconds_per_token() * k * c.width + c.catch_up)
            if seconds > self.probe_credit:
                break
            self.probe_credit -= seconds
            self._priced_catch_up += c.catch_up
            probes[c.rid] = k
        return probes

    def probe_scale(self, candidates: list[_Candidate], batch_tokens: int) -> float:
        """The share of the probe budget this round earns: what speculation could gain at best, as a fraction of
        PROBE_FULL_GAIN (at most 1). Best: every request drafts its cap in one chain the target accepts whole,
        priced at the verifier's seconds per token and the drafters' per-request level. A lone request on a CPU can
        gain several-fold and probes with the full budget; a large batch whose forward grows by a token's full cost
        per token can gain a few percent at most, and a probe there costs more than its finding could repay."""
        drafted = sum(max(c.cap, 0) for c in candidates)
        if drafted <= 0 or batch_tokens <= 0:
            return 0.0
        plain = batch_tokens / max(self.cost.verify_time(batch_tokens), 1e-9)
        seconds = (self.cost.verify_time(batch_tokens + drafted)
                   + drafted * self.cost.draft_seconds_per_request(1, 1))
        gain = (batch_tokens + drafted) / max(seconds, 1e-9) / plain - 1.0
        return min(max(gain / PROBE_FULL_GAIN, 0.0), 1.0)

    def _best_for_depth(self, candidates: list[_Candidate], depth: int, n_drafters: int, extra_tokens: int,
                        rate: float) -> tuple[float, dict[str, int]]:
        """Dinkelbach: maximise tokens(ks) / seconds(ks) with every k_i <= depth, starting from `rate`."""
        verify_per_token = self.cost.verify_seconds_per_token()
        # Only the per-request part of drafting separates per request; the fixed part is paid once per round.
        draft_per_request = self.cost.draft_seconds_per_request(n_drafters, depth)
        best_rate, best_ks = 0.0, {c.rid: 0 for c in candidates}
        for _ in range(32):
            # a request's catch-up is spread over CATCH_UP_ROUNDS: once caught up it drafts on at no such cost
            ks = {c.rid: self._best_k(c, depth, rate, verify_per_token,
                                      draft_per_request + c.catch_up / CATCH_UP_ROUNDS) for c in candidates}
            speculating = sum(1 for k in ks.values() if k > 0)
            if not speculating:
                break
            tokens = extra_tokens + sum(expected_tokens(c.alpha, ks[c.rid]) for c in candidates)
            verified = extra_tokens + len(candidates) + sum(ks[c.rid] * c.width for c in candidates)
            seconds = (self.cost.draft_time(speculating, n_drafters, depth) + self.cost.verify_time(verified)
                       + sum(c.catch_up for c in candidates if ks[c.rid] > 0) / CATCH_UP_ROUNDS)
            new_rate = tokens / seconds
            if new_rate > best_rate:
                best_rate, best_ks = new_rate, ks
            if new_rate <= rate * (1 + 1e-9):
                break
            rate = new_rate
        return best_rate, best_ks

    @staticmethod
    def _best_k(c: _Candidate, depth: int, rate: float, verify_per_token: float, draft_per_request: float) -> int:
        """argmax over k in {0} and 1..min(depth, cap) of E(alpha, k) - rate * (marginal seconds of k)."""
        top = min(depth, c.cap)
        if top <= 0:
            return 0
        # Level j adds alpha^j expected tokens and width * verify_per_token seconds: worth it while
        # alpha^j >= threshold, so the best k >= 1 is the largest such j (at least 1).
        threshold = rate * verify_per_token * c.width
        if c.alpha >= 1.0:
            k = top if threshold <= 1.0 else 1
        elif c.alpha <= 0.0 or threshold >= 1.0:
            k = 1
        elif threshold <= 0.0:
            k = top
        else:
            k = min(top, max(1, math.floor(math.log(threshold) / math.log(c.alpha) + 1e-9)))
        gain = expected_tokens(c.alpha, k) - rate * (verify_per_token * c.width * k + draft_per_request)
        return k if gain > 1.0 else 0
