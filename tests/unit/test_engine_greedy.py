"""Greedy speculative decoding through tree verification equals the target's own greedy `generate`, for every
proposer, on held-out prompts (never the training split)."""

import pytest
import torch

from specfleet.engine.proposers import ModelProposer, NgramProposer, NoProposer
from specfleet.engine.target import TargetRunner, generate_greedy
from specfleet.engine.tree import TokenTree

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(tokenizer, held_out_text):
    out = []
    for text in held_out_text.values():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        out += [ids[s:s + 40] for s in (0, (len(ids) - 40) // 2, len(ids) - 40)]
    return out


def _reference(target, prompt, tokenizer):
    with torch.no_grad():
        ids = target.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
    return ids[0, len(prompt):].tolist()


def _assert_equal_or_near_tie(target, prompt, got, want):
    if got == want:
        return
    i = next(j for j, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    with torch.no_grad():
        logits = target(input_ids=torch.tensor([prompt + want[:i]])).logits[0, -1]
    top2 = logits.topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < 1e-4, f"outputs differ at new token {i} where the target's top-2 logit gap is {gap:.2e}"


@pytest.mark.parametrize("proposer_name", ["none", "ngram", "model"])
def test_greedy_equals_target_generate(proposer_name, load_model, tokenizer, prompts):
    target = load_model("target")
    runner = TargetRunner(target)
    for prompt in prompts:
        proposer = {"none": NoProposer(), "ngram": NgramProposer(),
                    "model": ModelProposer(load_model("drafter-python"))}[proposer_name]
        got, stats = generate_greedy(runner, proposer, prompt, NEW_TOKENS, k=4)
        _assert_equal_or_near_tie(target, prompt, got, _reference(target, prompt, tokenizer))
        if proposer_name == "none":
            assert stats["rounds"] == NEW_TOKENS and stats["draft_tokens"] == 0


def test_a_branching_tree_commits_only_the_accepted_path(load_model, tokenizer, prompts):
    target = load_model("target")
    prompt = prompts[0]
    want = _reference(target, prompt, tokenizer)
    runner = TargetRunner(target)
    state = runner.start(prompt)
    wrong = (want[0] + 1) % len(tokenizer)
    # root -> wrong ; root -> want[0] -> want[1] ; root -> want[0] -> wrong
    tree = TokenTree(torch.tensor([wrong, want[0], want[1], wrong]), torch.tensor([-1, -1, 1, 1]),
                     torch.ones(4))
    assert runner.verify(state, tree) == want[:3]
    assert state.cached_len == len(prompt) + 2  # pending + two accepted; the rejected branches' KV is gone
    assert runner.verify(state, TokenTree.empty()) == [want[3]]


def test_ngram_proposer_looks_up_the_latest_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert NgramProposer().propose(ctx, 2).tokens.tolist() == [7, 5]
    assert len(NgramProposer().propose([1, 2, 3], 4)) == 0
