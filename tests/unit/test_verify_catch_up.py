"""A verifier whose cache lags a request (its last rounds were verified elsewhere: the stream queue, DSI) feeds the
missing context tokens in the verify forward itself, or after a prefill when many are missing, or rolls back when
the context dropped tokens it cached; every verdict is the target's own greedy continuation of its context."""

import pytest
import torch

from specfleet.engine.sampling import SamplingParams
from specfleet.engine.tree import TokenTree
from specfleet.engine.verify import FOLD_MAX, TargetVerifier, VerifyItem

PROMPT = "def parse_args(argv):\n    parser = "


@pytest.fixture(scope="module")
def reference(load_model, tokenizer):
    target = load_model("target")
    ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=FOLD_MAX + 24,
                              pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return target, ids, out


def test_lagging_cache_catches_up_in_the_forward_and_stays_exact(reference):
    target, ids, ref = reference
    verifier = TargetVerifier(target, slots=2)
    greedy = SamplingParams()

    def verify(rid, n_out, draft):
        (verdict,) = verifier.verify([VerifyItem(rid, ids + ref[:n_out], TokenTree.chain(draft), greedy)])
        return verdict.tokens

    assert verify("a", 0, []) == ref[:1]
    assert verify("a", 6, ref[6:9]) == ref[6:10]  # 6 tokens missed: fed with the tree
    assert verifier.known["a"] == ids + ref[:9]
    assert verify("a", 3, [ref[3], (ref[4] + 1) % 100]) == ref[3:5]  # rolled back to an earlier context
    assert verify("a", 5 + FOLD_MAX, ref[5 + FOLD_MAX:8 + FOLD_MAX]) == ref[5 + FOLD_MAX:9 + FOLD_MAX]  # prefill
    # a batch where one request is in step and another lags
    assert verify("b", 2, []) == ref[2:3]
    far = 9 + FOLD_MAX
    verdicts = verifier.verify([VerifyItem("a", ids + ref[:far], TokenTree.chain(ref[far:far + 2]), greedy),
                                VerifyItem("b", ids + ref[:10], TokenTree.chain(ref[10:12]), greedy)])
    assert [v.tokens for v in verdicts] == [ref[far:far + 3], ref[10:13]]
