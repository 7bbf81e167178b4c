"""The draft head as a proposer: an EAGLE-style head (training/head.py) drafting from the target's own features.

The verifier keeps each request's features (the target's last hidden state after its final norm, per cached token:
`TargetVerifier(features=True)`); every round the head first catches up on the pairs (f_i, x_{i+1}) it has not seen
-- the context tokens and the accepted nodes of the last verification -- in one forward over its own one-layer KV
cache, then drafts level by level from its own predicted features: the prediction at the last pair gives the first
draft token, and (predicted feature, drafted token) is fed for the next. Greedy rows draft the head's argmax and keep
its runner-up as a sibling; sampled rows draw with the request's noise at that output position (as the model
drafters do) and keep the next two best under that noise as siblings. Acceptance is the engine's, so the output is
the target's whatever the head drafts.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from specfleet.engine.control import LeafPricer
from specfleet.engine.drafters import PREFILL_FEED, candidates
from specfleet.engine.llama import NEG, KvLimits, LlamaRunner, causal_bias, common_prefix
from specfleet.engine.proposers import Draft
from specfleet.engine.sampling import SubVocab
from specfleet.engine.tree import TokenTree
from specfleet.training.head import DRAFT_VOCAB, read_head
from specfleet_kernels import cpu_gemm

HEAD = "head"  # the head's name among drafters (plans, credits, --drafters)


class HeadModel:
    """A draft head loaded for one target: its decoder layer in a LlamaRunner (slot KV cache) sharing the target's
    embedding and LM head, and the `fc` joining a feature and a token embedding into the layer's input."""

    def __init__(self, head_dir: Path, target, slots: int, limits: KvLimits | None = None,
                 target_dir: Path | None = None):
        from transformers import LlamaForCausalLM

        config, weights, self.info = read_head(head_dir, target_dir)
        tcfg = target.config
        if (config.hidden_size, config.vocab_size) != (tcfg.hidden_size, tcfg.vocab_size):
            raise ValueError(f"draft head {head_dir}: hidden size {config.hidden_size} / vocabulary "
                             f"{config.vocab_size} do not match the target's {tcfg.hidden_size} / {tcfg.vocab_size}")
        embed = target.model.embed_tokens.weight
        with torch.device("cpu"):  # built on the host, then moved to the target's device below
            model = LlamaForCausalLM(config)
        vocab = weights.pop(DRAFT_VOCAB, None)
        state = {k: v for k, v in weights.items() if k != "fc.weight"}
        state["model.embed_tokens.weight"] = embed.detach().float()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"draft head {head_dir}: weights missing {sorted(set(missing) - {'lm_head.weight'})}, "
                             f"not implemented {sorted(unexpected)}")
        model = model.to(device=embed.device, dtype=embed.dtype).eval()  # on the target's device
        model.model.embed_tokens.weight = embed  # the target's own tensor: one copy in memory
        self.runner = LlamaRunner(model, slots=slots, limits=limits)
        if self.runner.slots < slots:
            raise ValueError(f"draft head: a KV cache of {self.runner.slots} slots fits the budget but {slots} are "
                             "needed; raise --kv-cache-memory or lower --max-model-len")
        self.fc = weights["fc.weight"].to(device=embed.device, dtype=embed.dtype)
        if self.runner.matmul == "packed":  # the runner's CPU kernel for the fc too
            self.fc = cpu_gemm.PackedWeight(self.fc)
        self.embed = embed.detach()
        self.vocab_size = tcfg.vocab_size
        # a draft vocabulary: the LM head's rows for those tokens only; logits come back over them (column c: token
        # sub_vocab.ids[c]), and the proposer draws over them with each token's own noise (no [V] -inf row built)
        self.sub_vocab = None if vocab is None else SubVocab(vocab.to(embed.device), self.vocab_size)
        if vocab is not None:
            self.runner.keep_logit_rows(vocab)

    def inputs(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """fc(cat(feature, embedding of the next token)): features [..., H], tokens [...] -> [..., H]."""
        tokens = tokens.to(self.embed.device)
        features = features.to(device=self.embed.device, dtype=self.fc.dtype)
        joined = torch.cat([features, F.embedding(tokens, self.embed)], dim=-1)
        return self.fc(joined) if isinstance(self.fc, cpu_gemm.PackedWeight) else F.linear(joined, self.fc)


# Leaves beside each level's drafted token, by the request's kind. A greedy row keeps the head's runner-up; a sampled
# row the next two best under the request's noise (`keyed_draft_sample`): on the held-out prompts at k = 4 they
# raised accepted tokens per round from 2.07 (one sibling, the head's argmax) to 2.36 at the same CPU time per round.
# That was a CPU whose verify forward costs about the same for 1 and 16 tokens; where each verified token costs
# ~10% of a forward (AVX-512 Xeon, 2 cores: 2.7 ms at 1 token, 6.7 ms at 16) the chain alone pays more. So these
# are the most a level gets: `TreeShaper` keeps each kind of leaf only while it earns its verification.
SIBLINGS = {"greedy": 1, "sampled": 2}
CONTINUE_SIBLING = True  # draft one child under each level's first sibling (but the last level's)
CONTINUED = -1  # a node's role: the child drafted under a level's first sibling (0: the chain, r: the r-th sibling)


class TreeShaper(LeafPricer):
    """Which leaves beside the chain pay, per request kind: the r-th sibling of each level (role r), the continued
    sibling's child (role CONTINUED). A sibling accepted at level L stands where the target would have sampled that
    very token itself, so it adds its bonus token: one token per acceptance; a continued child one more, and it
    costs a row in the head's forward too. Ranks are nested (the r-th sibling only with the first r - 1)."""

    def __init__(self, siblings: dict[str, int], continued: bool, pricing=None):
        super().__init__(pricing)
        self.most, self.continued = dict(siblings), continued

    def shape(self, kind: str) -> tuple[int, bool]:
        """(siblings per level, whether to continue the first one) for this round's requests of `kind`."""
        most, prices = self.most.get(kind, 0), None if self.exploring(kind) else self.prices()
        count = 0
        while count < most and self.pays(kind, count + 1, prices):
            count += 1
        keep = self.continued and count > 0 and self.pays(kind, CONTINUED, prices, rows=1)
        if prices is not None and count:
            self.paid(kind)
        return count, keep

    def credit(self, kind: str, roles: list[int], accepted: list[int]) -> None:
        """One round's tree (each node's role) and the nodes the walk accepted (indices into it)."""
        taken = [roles[i] for i in accepted]
        for role in set(roles) - {0}:
            self.observe(kind, role, taken.count(role), roles.count(role))


class HeadProposer:
    """Drafts a chain (with siblings at each level: SIBLINGS) for every request from the target's features."""

    name = HEAD
    needs_features = True  # the engine hands each Draft the verifier's features of its context
    drafts_in_one_forward = True

    def __init__(self, head: HeadModel, siblings: bool = True, continue_siblings: bool = CONTINUE_SIBLING):
        self.head = head
        self.runner = head.runner
        # the leaves beside the chain, each kept while it pays (`price_with` gives the shaper the engine's costs)
        self.shaper = TreeShaper(SIBLINGS if siblings else {}, continue_siblings and siblings)
        self.drafted: dict[str, tuple[str, list[int], list[int], list[int]]] = {}  # rid -> its last tree's roles
        self.drafters = {HEAD: self}
        self.last_prefill_seconds = 0.0
        self.free = list(range(self.runner.slots - 1, -1, -1))
        self.slot: dict[str, int] = {}
        self.seen: dict[str, list[int]] = {}  # rid -> tokens behind the true pairs in its cache (pairs = len - 1)

    def start(self, rid: str, prompt: list[int]) -> None:
        pass

    def stop(self, rid: str, output: list[int]) -> None:
        self.drafted.pop(rid, None)
        if rid in self.slot:
            self.free.append(self.slot.pop(rid))
            del self.seen[rid]

    def price_with(self, pricing) -> None:
        """pricing() -> (tokens per second of the batch, verify seconds of one more node, head seconds of one more
        row): what a leaf must earn to stay in the trees (`TreeShaper`)."""
        self.shaper.pricing = pricing

    def observe_accepted(self, rid: str, accepted: list[int]) -> None:
        """The draft tokens the target accepted for `rid` in the round its last tree went to (in path order, from a
        tree that may hold other proposers' nodes too): the head's own nodes on that path credit their roles."""
        kind, tokens, parents, roles = self.drafted.pop(rid, ("", [], [], []))
        path, parent = [], -1
        for token in accepted:
            node = next((i for i, (t, p) in enumerate(zip(tokens, parents, strict=True)) if p == parent and t == token),
                        None)
            if node is None:
                break
            path.append(node)
            parent = node
        if roles:
            self.shaper.credit(kind, roles, path)

    def step_seconds(self, batch: int, tokens: int = 1) -> float:
        """Profiled seconds of one draft level over `batch` requests (`tokens`: of that many tokens in each)."""
        return self.runner.time_forward(batch, tokens)

    def _slot_for(self, rid: str) -> int:
        if rid not in self.slot:
            if not self.free:
                raise RuntimeError(f"draft head: all {self.runner.slots} slots are busy")
            self.slot[rid] = self.free.pop()
            self.seen[rid] = []
        return self.slot[rid]

    @torch.no_grad()
    def propose(self, batch: list[Draft]) -> list[TokenTree]:
        trees = [TokenTree.empty()] * len(batch)
        self.last_prefill_seconds = 0.0
        for d in batch:
            self.drafted.pop(d.rid, None)
        rows = [i for i, d in enumerate(batch) if d.k > 0 and d.features is not None and len(d.context) >= 2
                and len(d.features) == len(d.context) - 1 and (d.drafters is None or HEAD in d.drafters)]
        if not rows:
            return trees
        drafts = [batch[i] for i in rows]
        logits, feature = self._catch_up(drafts)
        built = self._draft(drafts, logits, feature)
        for i, tree in zip(rows, built, strict=True):
            trees[i] = tree
        return trees

    def _catch_up(self, drafts: list[Draft]) -> tuple[torch.Tensor, torch.Tensor]:
        """Feeds each request's pairs (f_i, x_{i+1}) its cache lacks; returns the logits and predicted feature at
        its last pair: [B, V], [B, H]."""
        slots, starts, chunks = [], [], []
        for d in drafts:
            slots.append(self._slot_for(d.rid))
            pairs = len(d.features)
            kept = max(min(len(self.seen[d.rid]), common_prefix(self.seen[d.rid], d.context)) - 1, 0)
            start = min(kept, pairs - 1)  # feed at least the last pair: its prediction is the first draft
            starts.append(start)
            chunks.append(self.head.inputs(d.features[start:pairs],
                                           torch.tensor(d.context[start + 1:pairs + 1], device=self.runner.device)))
            self.seen[d.rid] = list(d.context[:pairs + 1])
        lengths = [len(c) for c in chunks]
        t = max(lengths)
        started = time.perf_counter()
        dev = self.runner.device
        inputs = torch.zeros(len(drafts), t, chunks[0].shape[-1], dtype=chunks[0].dtype, device=dev)
        for r, c in enumerate(chunks):
            inputs[r, :len(c)] = c
        cols = torch.tensor(starts, device=dev)[:, None] + torch.arange(t, device=dev)[None]
        bias = causal_bias(starts, lengths, max(starts) + t, dev)
        last = torch.tensor(lengths, device=dev)[:, None] - 1
        # lengths: a row catching up on many pairs beside rows fed one costs its own pairs, not t for every row
        logits, hidden = self.runner.forward(torch.zeros(len(drafts), t, dtype=torch.long, device=dev), cols, cols,
                                             bias, logits_at=last, slots=torch.tensor(slots, device=dev),
                                             inputs=inputs, return_hidden=True, lengths=lengths)
        self.last_prefill_seconds = time.perf_counter() - started if t > PREFILL_FEED else 0.0
        if hidden.dim() == 2:  # packed: the real pairs in row order, each row's last at its running total - 1
            feature = hidden[torch.tensor(lengths, device=dev).cumsum(0) - 1]
        else:
            feature = hidden.gather(1, last[..., None].expand(len(drafts), 1, hidden.shape[-1]))[:, 0]
        return logits[:, 0], feature  # over the draft vocabulary (`HeadModel.sub_vocab`)

    def _draft(self, drafts: list[Draft], logits: torch.Tensor, feature: torch.Tensor) -> list[TokenTree]:
        """Level by level: each row's chain, its siblings, and (CONTINUE_SIBLING) one child under the first sibling
        of each level but the last. The chain's token at level L is fed at column len(features) + L; a continued
        sibling rides in the same forward at column len(features) + K + L (K: the deepest chain), seeing the
        context and its own ancestors only (the chain up to its parent), so the chain never sees it and the next
        round overwrites nothing it needs (its chain's columns are rewritten before they are read)."""
        nodes: list[list[tuple[int, int, float, int]]] = [[] for _ in drafts]  # (token, parent, confidence, role)
        kinds = ["sampled" if d.sampled else "greedy" for d in drafts]
        shapes = {kind: self.shaper.shape(kind) for kind in set(kinds)}
        siblings = {kind: count for kind, (count, _) in shapes.items()}
        continued = {kind: keep for kind, (_, keep) in shapes.items()}
        tip = [-1] * len(drafts)  # each chain's last node
        rows = list(range(len(drafts)))
        deepest = max(d.k for d in drafts)
        dev = self.runner.device
        sib_rows: list[tuple[int, int]] = []  # (request row, node index of the sibling fed) in the last forward
        for level in range(deepest):
            # the chains' rows (with siblings) and the continued siblings' children, drafted at this level's output
            # position too, in one call: one softmax and one noise draw for the level, not two
            width = len(rows)
            chosen, confidence, alternatives = candidates(logits.float(), [drafts[r] for r in rows] +
                                                          [drafts[r] for r, _ in sib_rows], level, siblings,
                                                          sibling_rows=width, vocab=self.head.sub_vocab)
            for (r, node), token, q in zip(sib_rows, chosen[width:], confidence[width:], strict=True):
                nodes[r].append((token, node, q, CONTINUED))
            pending: list[tuple[int, int, int]] = []  # (request row, sibling node index, its token) to continue
            for j, r in enumerate(rows):
                parent = tip[r]
                nodes[r].append((chosen[j], parent, confidence[j], 0))
                tip[r] = len(nodes[r]) - 1
                first_sibling = len(nodes[r])
                nodes[r].extend((alt, parent, q, rank) for rank, (alt, q) in enumerate(alternatives[j], 1))
                if continued[kinds[r]] and alternatives[j] and level + 1 < drafts[r].k:
                    pending.append((j, first_sibling, alternatives[j][0][0]))
            keep = [j for j, r in enumerate(rows) if level + 1 < drafts[r].k]
            if not keep:
                break
            pending = [(j, node, token) for j, node, token in pending
                       if len(drafts[rows[j]].features) + deepest + level < self.runner.max_len]
            sib_rows = [(rows[j], node) for j, node, _ in pending]
            order = keep + [j for j, _, _ in pending]  # this level's output rows the next forward feeds
            fed = torch.tensor([chosen[j] for j in keep] + [token for _, _, token in pending], device=dev)
            x = self.head.inputs(feature[torch.tensor(order, device=dev)], fed)[:, None]  # [B', 1, H]
            rows = [rows[j] for j in keep]
            owners = rows + [r for r, _ in sib_rows]
            at = [len(drafts[r].features) + level for r in rows] + \
                 [len(drafts[r].features) + deepest + level for r, _ in sib_rows]
            at_host = torch.tensor(at, device="cpu")
            cols = at_host[:, None].to(dev)
            # on the host: each fed token sees the columns up to its own (the siblings' rows are masked below)
            visible = torch.arange(max(at) + 1, device="cpu")[None] <= at_host[:, None]
            bias = torch.where(visible, 0.0, NEG)[:, None, None]
            for i, (r, _) in enumerate(sib_rows):  # a sibling sees the context and the chain above its parent only
                bias[len(rows) + i, 0, 0, len(drafts[r].features) + level:at[len(rows) + i]] = NEG
            slots = torch.tensor([self.slot[drafts[r].rid] for r in owners], device=dev)
            logits, hidden = self.runner.forward(torch.zeros(len(owners), 1, dtype=torch.long, device=dev),
                                                 cols, cols, bias.to(dev), slots=slots, inputs=x,
                                                 return_hidden=True)
            logits, feature = logits[:, 0], hidden[:, 0]
        trees = []
        for d, kind, chain in zip(drafts, kinds, nodes, strict=True):
            tokens, parents = [n[0] for n in chain], [n[1] for n in chain]
            self.drafted[d.rid] = (kind, tokens, parents, [n[3] for n in chain])
            trees.append(TokenTree(torch.tensor(tokens, dtype=torch.long, device="cpu"),
                                   torch.tensor(parents, dtype=torch.long, device="cpu"),
                                   torch.tensor([n[2] for n in chain], dtype=torch.float32, device="cpu"),
                                   origins=((HEAD,),) * len(chain)))
        return trees
