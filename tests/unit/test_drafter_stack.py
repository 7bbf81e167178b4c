"""Drafters of one shape run as one group (one batched forward per draft level): the group's logits equal each
drafter's own, its KV bookkeeping (compaction, slot moves) acts on every member, shapes that differ are refused, and
the engine's output with grouped drafters equals the one with a forward per drafter (greedy: the target's own
decoding; sampled: the same seeded samples), also for requests that use only some members of a group."""

import pytest
import torch

from specfleet.bench.prompts import build_prompts
from specfleet.engine.drafters import ModelProposer, stack_drafters
from specfleet.engine.engine import Request
from specfleet.engine.factory import build_engine
from specfleet.engine.llama import LlamaRunner, causal_bias
from specfleet.engine.proposers import Draft
from specfleet.engine.sampling import SamplingParams

from conftest import MODELS_DIR

NAMES = ("python", "prose", "c")


@pytest.fixture(scope="module")
def drafters(load_model):
    return [load_model(f"drafter-{n}") for n in NAMES]


def _forward_both(singles, group, tokens, cols, bias, slots, last=None):
    want = torch.stack([r.forward(tokens, cols, cols, bias, logits_at=last, slots=slots) for r in singles])
    got = group.forward(tokens, cols, cols, bias, logits_at=last, slots=slots)
    return want, got.view(want.shape)


def test_group_forward_equals_each_member(drafters):
    singles = [LlamaRunner(m, slots=4, max_len=96) for m in drafters]
    group = LlamaRunner(drafters, slots=4, max_len=96)
    assert group.group == 3 and group.k_cache.shape[1] == 3 * 4
    torch.manual_seed(0)
    # two ragged requests prefilled into slots 2 and 0, logits only at each one's last token
    tokens = torch.randint(0, 8000, (2, 7))
    cols = torch.arange(7)[None].expand(2, 7)
    bias = causal_bias([0, 0], [7, 5], 7)
    slots = torch.tensor([2, 0])
    want, got = _forward_both(singles, group, tokens, cols, bias, slots, last=torch.tensor([[6], [4]]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # one more token each, reading the cache written above
    step = torch.randint(0, 8000, (2, 1))
    cols = torch.tensor([[7], [5]])
    want, got = _forward_both(singles, group, step, cols, causal_bias([7, 5], [1, 1], 8), slots)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # compaction and slot moves apply to every member's row of the slot
    for runner in [*singles, group]:
        runner.keep(2, 3, torch.tensor([5, 6, 7]))
        runner.move_slot(2, 1, 6)
    for m, single in enumerate(singles):
        for cache, single_cache in ((group.k_cache, single.k_cache), (group.v_cache, single.v_cache)):
            for slot in range(4):
                torch.testing.assert_close(cache[:, m * 4 + slot, :, :8], single_cache[:, slot, :, :8])


def test_group_of_different_shapes_is_refused(drafters, load_model):
    with pytest.raises(ValueError, match="one shape"):
        LlamaRunner([drafters[0], load_model("target")], slots=1, max_len=64)
    units = stack_drafters([("python", drafters[0]), ("target", load_model("target")), ("c", drafters[2])], 2)
    assert [u.names for u in units] == [("python", "c"), ("target",)]
    assert [u.names for u in stack_drafters([(n, m) for n, m in zip(NAMES, drafters, strict=True)], 2,
                                            stack=False)] == [(n,) for n in NAMES]


def test_subset_of_a_group_drafts_like_those_members_alone(drafters):
    """A request asking for two of three grouped drafters gets the tree those two give alone."""
    grouped = ModelProposer(stack_drafters(list(zip(NAMES, drafters, strict=True)), 2))
    alone = ModelProposer(stack_drafters(list(zip(NAMES[:2], drafters[:2], strict=True)), 2))
    assert grouped.drafts_in_one_forward and len(grouped.units) == 1
    context = list(range(100, 140))
    for sampled in (False, True):
        params = SamplingParams(0.8, 0.95, 0, 3) if sampled else None
        draft = Draft("r", context, 4, NAMES[:2], params, 3 if sampled else None, 0)
        got, want = grouped.propose([draft])[0], alone.propose([draft])[0]
        assert len(got) > 0 and got.origins == want.origins
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.parents, want.parents)
        grouped.stop("r", [])
        alone.stop("r", [])


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_grouped_and_separate_drafters_give_the_same_output(tokenizer, load_model, sampled):
    prompts = [tokenizer(p["prompt"], add_special_tokens=False).input_ids[-32:] for p in build_prompts()[:6]]
    outputs = []
    for stack in (True, False):  # one loaded target for both engines (and the session), as the other engine tests do
        engine = build_engine(MODELS_DIR, "fused", NAMES, batch_size=3, k=4, adaptive=False, stack=stack,
                              target=load_model("target"))
        assert engine.proposer.proposers[0].drafts_in_one_forward == stack
        params = [SamplingParams(0.8, 0.95, 0, 11 + i) if sampled else SamplingParams() for i in range(len(prompts))]
        results = engine.generate([Request(str(i), p, 20, params[i]) for i, p in enumerate(prompts)])
        outputs.append([r.token_ids for r in results])
    assert outputs[0] == outputs[1]


def test_profile_reports_grouped_steps(drafters, load_model):
    """`specfleet profile` times 2, 3, ... same-shape drafters as one forward beside one alone; other shapes apart."""
    from specfleet.engine.profile import DRAFTER_BATCHES, _group_steps, format_table

    loaded = {"drafter-python": drafters[0], "target": load_model("target"), "drafter-c": drafters[2]}
    steps = {name: [{"batch": b, "ms": 1.0} for b in DRAFTER_BATCHES] for name in loaded}
    groups = _group_steps(loaded, steps, repeats=1)
    assert list(groups) == ["python+c"] and [p["batch"] for p in groups["python+c"]] == list(DRAFTER_BATCHES)
    assert all(p["ms"] > 0 and p["vs_one"] == pytest.approx(p["ms"], abs=0.01) for p in groups["python+c"])
    table = format_table({"target_forward_ms": [{"batch": 1, "tokens": 1, "ms": 1.0}], "drafter_step_ms": steps,
                          "drafter_group_step_ms": groups, "verify_cost": {"fixed_ms": 1.0, "per_token_ms": 0.1}})
    assert "python+c as one forward" in table


def test_engine_bench_table_leads_with_speculative_vs_plain():
    from specfleet.bench.engine_bench import _add_ratios, format_table

    def r(system, mode, batch, tps, acc=None):
        return {"system": system, "mode": mode, "batch": batch, "tokens_per_s": tps, "mean_accepted_len": acc,
                "distinct_4": 0.5}

    results = [r("hf-greedy", "greedy", 1, 50.0), r("hf-sample", "sampled", 1, 40.0),
               r("specfleet-none", "sampled", 1, 80.0, 0.0), r("specfleet-fused", "sampled", 1, 100.0, 1.5),
               r("specfleet-none", "greedy", 1, 100.0, 0.0), r("specfleet-fused", "greedy", 1, 150.0, 2.5),
               r("specfleet-none", "greedy", 32, 400.0, 0.0), r("specfleet-fused", "greedy", 32, 396.0, 0.0)]
    _add_ratios(results)
    lines = format_table({"results": results}).splitlines()
    assert lines[0].startswith("speculative vs plain") and "Hugging Face" in lines[lines.index("") + 1]
    ours = lines[2:lines.index("")]
    assert [line.split()[:3] for line in ours][:2] == [["specfleet-none", "greedy", "1"],
                                                       ["specfleet-fused", "greedy", "1"]]
    assert "1.50x" in ours[1] and "0.99x" in ours[3] and all("hf-" not in line for line in ours)


def test_catch_up_is_reported_as_prefill_not_as_a_draft_level(drafters):
    """A drafter feeding a whole prompt (or tokens it missed) reports that time as prefill, so the cost model prices
    draft levels only; a round that feeds only the last committed tokens reports none."""
    proposer = ModelProposer(stack_drafters(list(zip(NAMES, drafters, strict=True)), 2))
    context = list(range(100, 164))
    proposer.propose([Draft("r", context, 2)])
    assert proposer.last_prefill_seconds > 0
    proposer.propose([Draft("r", context + [7, 8], 2)])
    assert proposer.last_prefill_seconds == 0.0
    proposer.propose([Draft("r", context + [7, 8], 0)])  # not drafting: nothing fed, nothing reported
    assert proposer.last_prefill_seconds == 0.0


@pytest.mark.parametrize("grouped", [False, True])
def test_a_forward_skipping_padding_gives_the_padded_forwards_outputs(drafters, grouped):
    """`lengths`: one long row (a tree, a drafter catching up) beside rows of one token costs its own tokens: the
    per-token layers skip the padding, and logits, hidden states and every real token's KV stay as padded."""
    model = drafters if grouped else drafters[0]
    padded, packed = LlamaRunner(model, slots=4, max_len=96), LlamaRunner(model, slots=4, max_len=96)
    torch.manual_seed(0)
    slots = torch.tensor([2, 0, 3])
    context = torch.randint(0, 8000, (3, 12))
    cols = torch.arange(12)[None].expand(3, 12)
    for runner in (padded, packed):
        runner.forward(context, cols, cols, causal_bias([0] * 3, [12] * 3, 12), slots=slots)
    starts, lengths = [12, 9, 5], [1, 6, 3]
    tokens = torch.randint(0, 8000, (3, 6))
    cols = torch.tensor(starts)[:, None] + torch.arange(6)[None]
    bias = causal_bias(starts, lengths, int(cols.max()) + 1)
    last = torch.tensor(lengths)[:, None] - 1
    want = padded.forward(tokens, cols, cols, bias, logits_at=last, slots=slots)
    got = packed.forward(tokens, cols, cols, bias, logits_at=last, slots=slots, lengths=lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    every = padded.forward(tokens, cols, cols, bias, slots=slots).view(len(drafters) if grouped else 1, 3, 6, -1)
    got = packed.forward(tokens, cols, cols, bias, slots=slots, lengths=lengths)  # packed: real tokens in row order
    want = torch.cat([every[m, r, :n] for m in range(every.shape[0]) for r, n in enumerate(lengths)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows = [m * 4 + int(s) for m in range(every.shape[0]) for s in slots]
    ends = [start + n for start, n in zip(starts, lengths, strict=True)] * every.shape[0]
    for row, end in zip(rows, ends, strict=True):
        for a, b in ((padded.k_cache, packed.k_cache), (padded.v_cache, packed.v_cache)):
            torch.testing.assert_close(b[:, row, :, :end], a[:, row, :, :end], rtol=1e-5, atol=1e-5)
    if not grouped:  # the target's features for a draft head: hidden states packed like the logits
        logits, hidden = packed.forward(tokens, cols, cols, bias, slots=slots, lengths=lengths, return_hidden=True)
        _, every_hidden = padded.forward(tokens, cols, cols, bias, slots=slots, return_hidden=True)
        want = torch.cat([every_hidden[r, :n] for r, n in enumerate(lengths)])
        torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
        assert logits.shape == (sum(lengths), every.shape[-1])
