"""The five serving systems the simulator compares, each as one round of a replica: given which slots decode, how
long the round takes and how many tokens each request gains. All of them use continuous batching at the target and
share the event core (`engine.simulate`); they differ in how drafting and verification are arranged.

- plain: the target alone, one token per request per forward.
- specinfer (coupled speculative inference): draft k levels of a token tree, then verify it; serial per round,
  drafter co-located on the target's GPUs.
- pipeinfer: asynchronous continuous speculation; a drafter on its own GPU drafts while the target verifies, so a
  round costs max(draft, verify); invalidated drafts are cancelled early and cost no verification.
- dsi: speculation parallelism; SP target instances verify successive speculative prefixes at once while a
  non-speculative thread keeps the target's own cadence, so a request is never slower than the target alone.
- cosine: drafter pools sized apart from the verifiers; the router picks the best drafters per domain, fusion
  merges their drafts into one tree (higher acceptance), drafting is pipelined with verification, and the batch
  scheduler picks the draft length per round from the cost model (k = 0 when speculation would not pay).

A round's arrays are [R, S]: R replicas, S batch slots; `alpha` is each slot's per-position acceptance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specfleet_operator.simulator.costs import (
    CostModel,
    alpha_from_accepted,
    dsi_parallelism,
    expected_gain,
    fuse_alpha,
)

SYSTEMS = ("plain", "specinfer", "pipeinfer", "dsi", "cosine")
DSI_MAX_RUN = 64  # DSI's drafter keeps going past k; cap the sampled run of accepted tokens


def sample_accepted(alpha: np.ndarray, k, rng: np.random.Generator) -> np.ndarray:
    """Accepted draft tokens per slot: position i is accepted with alpha given positions < i were, so the count is
    geometric, truncated at k. alpha [R, S], k scalar or [R, 1]."""
    u = rng.random(alpha.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        run = np.floor(np.log(u) / np.log(np.clip(alpha, 1e-12, 1 - 1e-12)))
    run = np.where(alpha <= 0, 0.0, run)
    return np.minimum(run, k)


@dataclass(frozen=True)
class Round:
    """What one round of every replica costs and yields."""

    ms: np.ndarray  # [R] round duration
    gain: np.ndarray  # [R, S] tokens each decoding slot gains (ignored for slots that do not decode)
    k: np.ndarray  # [R] draft length used (0 for plain)


class System:
    """One serving system; subclasses set `name` and implement `round` and `gpus_per_replica`."""

    name = ""

    def __init__(self, costs: CostModel):
        self.costs = costs

    def request_alpha(self, domain: np.ndarray) -> np.ndarray:
        """Per-position acceptance for each request, from its domain and the drafter(s) this system uses."""
        c = self.costs
        table = np.array([c.alpha[c.general_drafter][d] for d in c.domains]) if c.alpha else np.zeros(len(c.domains))
        return table[domain]

    def gpus_per_replica(self) -> float:
        raise NotImplementedError

    def round(self, decoding: np.ndarray, alpha: np.ndarray, batch: np.ndarray, prefill_tokens: np.ndarray,
              new_seqs: np.ndarray, rng: np.random.Generator) -> Round:
        raise NotImplementedError


class Plain(System):
    name = "plain"

    def gpus_per_replica(self) -> float:
        return self.costs.target_gpus

    def round(self, decoding, alpha, batch, prefill_tokens, new_seqs, rng):
        ms = self.costs.target.ms(batch + prefill_tokens, batch + new_seqs)
        return Round(ms, np.ones(decoding.shape), np.zeros(len(batch)))


class SpecInfer(System):
    name = "specinfer"

    def request_alpha(self, domain):
        c = self.costs
        single = super().request_alpha(domain)
        # a tree of `tree_width` branches from one drafter's top candidates: fused like several drafts
        return np.array([fuse_alpha([a] * c.tree_width, c.fusion_independence) for a in single])

    def gpus_per_replica(self) -> float:
        return self.costs.target_gpus  # the small drafter runs on the target's GPUs

    def round(self, decoding, alpha, batch, prefill_tokens, new_seqs, rng):
        c = self.costs
        branches = batch * c.tree_width
        draft = c.k * c.drafter.ms(branches, branches)
        verify = c.target.ms(batch * (1 + c.k * c.tree_width) + prefill_tokens, batch + new_seqs)
        return Round(draft + verify, 1 + sample_accepted(alpha, c.k, rng), np.full(len(batch), c.k))


class PipeInfer(System):
    name = "pipeinfer"

    def gpus_per_replica(self) -> float:
        return self.costs.target_gpus + self.costs.drafter_gpus

    def round(self, decoding, alpha, batch, prefill_tokens, new_seqs, rng):
        c = self.costs
        draft = c.k * c.drafter.ms(batch, batch)
        verify = c.target.ms(batch * (1 + c.k) + prefill_tokens, batch + new_seqs)
        ms = np.where(batch + new_seqs > 0, np.maximum(draft, verify) + c.network_ms, 0.0)
        return Round(ms, 1 + sample_accepted(alpha, c.k, rng), np.full(len(batch), c.k))


class DSI(System):
    name = "dsi"

    def __init__(self, costs: CostModel):
        super().__init__(costs)
        self.parallelism = dsi_parallelism(costs)

    def gpus_per_replica(self) -> float:
        return self.parallelism * self.costs.target_gpus + self.costs.drafter_gpus

    def round(self, decoding, alpha, batch, prefill_tokens, new_seqs, rng):
        c = self.costs
        # the non-speculative thread: one target forward per round, as plain decoding
        cadence = c.target.ms(batch + prefill_tokens, batch + new_seqs)
        # one verifier instance's forward of k drafts per request; it takes its share of this round's prefills too
        verify = c.target.ms(batch * (1 + c.k) + prefill_tokens, batch + new_seqs)[:, None]
        # the drafter hands k drafts to a verifier instance every k * t_draft; with too few instances for this
        # batch it waits for a free one, so speculation slows down instead of queueing without bound
        draft = np.maximum(c.drafter.ms(batch, batch)[:, None], verify / (self.parallelism * c.k))
        run = sample_accepted(alpha, DSI_MAX_RUN, rng)
        # a run of `run` accepted drafts plus the target's correction arrives after run * t_draft + t_verify;
        # the non-speculative thread guarantees at least one token per cadence
        with np.errstate(divide="ignore", invalid="ignore"):
            speculative = (run + 1) * cadence[:, None] / (run * draft + verify)
        gain = np.maximum(1.0, np.nan_to_num(speculative, nan=1.0))
        return Round(cadence, gain, np.full(len(batch), c.k))


@dataclass(frozen=True)
class MeasuredRounds:
    """A benchmark's measured round shape, replacing the model's own choice of k and acceptance (the reproduction
    check, `reproduce.py`): per request and round, `draft_tokens` tree nodes verified over `depth` drafting levels,
    `accepted` of them accepted on average (the committed tokens per round are 1 + accepted). `speculative_share`:
    the share of rounds that speculate (the others make only the plain round's hop); the fleet's network charge per
    request is the plain round's plus this share of a speculative round's extra."""

    accepted: float
    draft_tokens: float
    depth: float
    speculative_share: float = 1.0


class CoSine(System):
    name = "cosine"

    def __init__(self, costs: CostModel, measured: MeasuredRounds | None = None):
        super().__init__(costs)
        self.measured = measured

    def request_alpha(self, domain):
        c = self.costs
        if self.measured is not None:  # one per-position acceptance whose truncated mean is the measured count
            return np.full(len(domain), alpha_from_accepted(self.measured.accepted, c.k))
        fused = []
        for d in c.domains:  # the router's expertise choice: the best drafters for the request's domain
            best = c.best_drafters(d, c.cosine_drafters_per_request)
            fused.append(fuse_alpha([c.alpha[name][d] for name in best], c.fusion_independence))
        return np.array(fused)[domain]

    def gpus_per_replica(self) -> float:
        return self.costs.target_gpus + self.costs.cosine_drafter_ratio * self.costs.drafter_gpus

    def _draft_ms(self, ks, batch):
        """[K, R] drafting time for each candidate length: the pools draft side by side (separate services), each
        over its share of the batch."""
        c = self.costs
        pool_batch = batch * c.cosine_drafters_per_request / c.cosine_drafter_ratio  # drafting work per instance
        return ks * c.drafter.ms(pool_batch, pool_batch)[None]

    def _network_ms(self, ks):
        """[K, 1] the fleet's hops per round for each candidate length: a round with k = 0 makes only the plain
        round's (router -> verifier), one that speculates the speculative round's; a measured shape pays the plain
        round's plus its share of speculating rounds' extra."""
        c = self.costs
        plain, speculative = c.plain_round_network_ms, c.network_ms
        if self.measured is not None:
            return np.full(ks.shape, plain + self.measured.speculative_share * (speculative - plain))
        return np.where(ks > 0, speculative, plain)

    def _round_ms(self, verify, draft, seqs, network):
        """[K, R] round time from verification and drafting: pipelined (the fleet overlaps them) plus the fleet's
        hops; where the services share a machine's cores, nothing overlaps and each request's hops add up."""
        c = self.costs
        if c.shared_cores:
            return c.fleet_compute_factor * (verify + draft) + network * np.maximum(seqs, 1)[None]
        return np.maximum(verify, draft) + network

    def round(self, decoding, alpha, batch, prefill_tokens, new_seqs, rng):
        c = self.costs
        drafts = c.cosine_drafters_per_request
        mean_alpha = np.where(batch > 0, (alpha * decoding).sum(1) / np.maximum(batch, 1), 0.0)
        if self.measured is not None:  # the benchmark's round shape: fixed depth and tree size
            m = self.measured
            ks = np.array([[m.depth]])
            tree = np.array([[m.draft_tokens]])
        else:
            ks = np.arange(c.k + 1)[:, None]  # [K, 1] candidate draft lengths
            # fusion merges identical candidates: per level one winner plus the losers that differ from it
            tree = ks * (1 + (drafts - 1) * (1 - mean_alpha))[None]
        verify = c.target.ms(batch[None] * (1 + tree) + prefill_tokens[None], (batch + new_seqs)[None])
        ms = self._round_ms(verify, self._draft_ms(ks, batch), batch + new_seqs, self._network_ms(ks))  # [K, R]
        if self.measured is not None:
            choice = np.zeros(len(batch), dtype=np.int64)
            cap = np.full((len(batch), 1), c.k)
        else:
            # the batch scheduler: the draft length with the most expected tokens per second for this batch
            rate = (batch[None] * expected_gain(mean_alpha[None], ks) + new_seqs[None]) / np.maximum(ms, 1e-9)
            choice = np.argmax(rate, axis=0)  # [R]
            cap = choice[:, None]
        chosen_ms = np.take_along_axis(ms, choice[None], 0)[0]
        chosen_ms = np.where(batch + new_seqs > 0, chosen_ms, 0.0)
        return Round(chosen_ms, 1 + sample_accepted(alpha, cap, rng), ks[choice, 0].astype(np.float64))


class InProcessCoSine(CoSine):
    """CoSine in one process (`SpecEngine`, what `specfleet bench engine` and `specfleet generate` run): the same
    routing, fusion and acceptance, but draft then verify one after another on one device, the drafters as one
    grouped forward per level (each in turn where the profile has no group timing), and no network. Not one of the
    compared systems; the reproduction check's engine rows."""

    name = "cosine-engine"

    def gpus_per_replica(self) -> float:
        return self.costs.target_gpus

    def _draft_ms(self, ks, batch):
        """A draft level is one grouped forward of the engine's drafters where the profile timed one
        (`engine_draft_level`), else the chosen drafters' steps in turn."""
        c = self.costs
        if c.engine_draft_level is not None:
            return ks * c.engine_draft_level.ms(batch, batch)[None]
        return ks * c.cosine_drafters_per_request * c.drafter.ms(batch, batch)[None]

    def _round_ms(self, verify, draft, seqs, network):
        return verify + draft


def build(name: str, costs: CostModel) -> System:
    classes = {cls.name: cls for cls in (Plain, SpecInfer, PipeInfer, DSI, CoSine, InProcessCoSine)}
    if name not in classes:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(classes)}")
    return classes[name](costs)
