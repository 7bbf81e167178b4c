"""The acceptance measurement is exact: pure round accounting, and the target drafting for itself accepts all."""

import numpy as np
import pytest
import torch

from specfleet.training.acceptance import drafter_matches, greedy_continuation, rounds_for


@pytest.mark.parametrize("matches,k,expected", [
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 4, (2, 8)),  # 4 accepted + bonus, twice
    ([0, 0, 0], 4, (3, 0)),                        # every round emits only the target's token
    ([1, 0, 1, 1, 0], 4, (2, 3)),                  # [1,(0)] then [1,1,(0)]
    ([1, 1], 4, (1, 2)),                           # the last round stops at the end
    ([1, 1, 1, 1, 1], 2, (2, 4)),
])
def test_rounds_for(matches, k, expected):
    assert rounds_for(np.array(matches, dtype=bool), k) == expected


def test_target_drafting_for_itself_accepts_everything(load_model, tokenizer, held_out_text):
    target = load_model("target")
    ids = tokenizer(held_out_text["python"], return_tensors="pt").input_ids[0]
    prompts = torch.stack([ids[i:i + 32] for i in (0, 400, 800)])
    continuation = greedy_continuation(target, prompts, 24)
    # The KV-cached greedy loop equals HF generate.
    with torch.no_grad():
        reference = target.generate(prompts, do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                    pad_token_id=tokenizer.pad_token_id)[:, 32:]
    assert torch.equal(continuation, reference)
    matches = drafter_matches(target, prompts, continuation)
    assert matches.all()
    rounds, accepted = rounds_for(matches[0], 4)
    assert (rounds, accepted) == (5, 20)  # 24 tokens: 4 + bonus, four times, then 4 accepted


def test_distinct_n():
    from specfleet.training.acceptance import distinct_n

    assert distinct_n(torch.tensor([[1, 2, 3, 4, 5, 6]])) == 1.0
    assert distinct_n(torch.tensor([[7, 7, 7, 7, 7, 7, 7]])) == 0.25


def test_specialisation_compares_with_the_best_other_specialist():
    from specfleet.training.acceptance import format_table, specialisation

    def cell(v):
        return {"tokens_per_round": v, "accepted_per_round": v - 1, "top1_agreement": 0.5, "rounds": 10}

    matrix = {
        "drafter-python": {"python": cell(3.0), "prose": cell(2.0), "c": cell(1.0)},
        "drafter-prose": {"python": cell(2.5), "prose": cell(2.6), "c": cell(1.2)},
        "drafter-c": {"python": cell(1.5), "prose": cell(1.5), "c": cell(3.5)},
        "drafter-general": {"python": cell(2.9), "prose": cell(2.7), "c": cell(3.0)},
    }
    spec = specialisation(matrix)
    assert set(spec) == {"drafter-python", "drafter-prose", "drafter-c"}  # the generalist is no specialist
    assert spec["drafter-python"]["best_other_specialist"] == "drafter-prose"
    assert spec["drafter-python"]["ratio"] == 1.2
    assert spec["drafter-prose"]["ratio"] == 1.3
    table = format_table({"matrix": matrix, "target_distinct4": {"python": 0.5, "prose": 0.6, "c": 0.7}})
    assert "| drafter-general | 2.90 | **2.70** | 3.00 |" in table


def _warps(temperature=0.8, top_p=0.95):
    from specfleet.engine.sampling import SamplingParams, draft_probs, warp_probs
    from specfleet.training.acceptance import Warps
    from specfleet_kernels.reference import position_keyed_sample

    params = SamplingParams(temperature=temperature, top_p=top_p)
    return Warps(target_probs=lambda logits: warp_probs(logits, params),
                 draft_probs=lambda logits: draft_probs(logits, params), sample=position_keyed_sample)


def test_sampled_measurement_follows_the_engine(load_model, tokenizer, held_out_text, models_dir):
    """The sampled continuation is exactly what the engine emits for that seed (plain decoding), the target drafting
    for itself matches at every position with sum min(p, q) = 1, and a real drafter sits strictly between."""
    from specfleet.engine.engine import Request
    from specfleet.engine.factory import build_engine
    from specfleet.engine.sampling import SamplingParams
    from specfleet.training.acceptance import sampled_continuation, sampled_matches

    target = load_model("target")
    ids = tokenizer(held_out_text["python"], return_tensors="pt").input_ids[0]
    prompts = torch.stack([ids[i:i + 32] for i in (0, 400, 800)])
    seeds, warps = [11, 12, 13], _warps()
    sampled = sampled_continuation(target, prompts, 20, warps, seeds)
    engine = build_engine(models_dir, "none", batch_size=3, k=4, target=target)
    results = engine.generate([Request(f"r{b}", prompts[b].tolist(), 20, SamplingParams(0.8, 0.95, 0, seeds[b]),
                                       ignore_eos=True) for b in range(3)])
    assert [r.token_ids for r in results] == sampled.tolist()
    with torch.no_grad():
        target_logits = target(input_ids=torch.cat([prompts, sampled], 1)[:, :-1]).logits[:, 31:]
    matches, overlap = sampled_matches(target, target_logits, prompts, sampled, warps, seeds)
    assert matches.all() and np.allclose(overlap, 1.0, atol=1e-4)
    matches, overlap = sampled_matches(load_model("drafter-python"), target_logits, prompts, sampled, warps, seeds)
    assert 0 < overlap.mean() < 1 and 0 < matches.mean() < 1
