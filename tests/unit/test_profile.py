"""The profiled cost model and the verifier's token cap: the line fit, the cap it gives, clear errors for a bad
profile file, and the batcher closing a batch before its tokens pass the cap (a single item is never refused)."""

import asyncio
import json

import pytest

from specfleet.engine.profile import fit_line, load, max_batch_tokens
from specfleet.runtime.server import Batcher


def test_fit_line_recovers_a_cost_model():
    fixed, per_token = fit_line([(t, 2.0 + 0.5 * t) for t in (1, 4, 16, 64)])
    assert fixed == pytest.approx(2.0) and per_token == pytest.approx(0.5)
    assert fit_line([(1, 3.0), (1, 3.0)]) == (3.0, 0.0)  # no spread in x: flat


def test_cap_fits_the_latency_bound():
    profile = {"verify_cost": {"fixed_ms": 5.0, "per_token_ms": 0.5}}
    assert max_batch_tokens(profile, 50.0) == 90
    assert max_batch_tokens(profile, 1.0) >= 9  # never below one sequence's worth of tree
    assert max_batch_tokens({"verify_cost": {"fixed_ms": 5.0, "per_token_ms": 0.0}}, 50.0) > 10**6


def test_bad_profiles_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="specfleet profile --output"):
        load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"verify_cost": {"fixed_ms": "x"}}))
    with pytest.raises(ValueError, match="not a specfleet profile"):
        load(bad)


def test_batcher_closes_a_batch_at_the_token_cap():
    batches = []

    def run(items):
        batches.append(list(items))
        return items

    async def main():
        batcher = Batcher(run, max_batch=10, weight=lambda n: n, max_weight=10)
        return await asyncio.gather(*(batcher.submit(w) for w in (0, 4, 4, 4, 12, 1)))

    results = asyncio.run(main())
    assert results == [0, 4, 4, 4, 12, 1]
    assert all(sum(b) <= 10 or len(b) == 1 for b in batches), batches
    assert sorted(x for b in batches for x in b) == [0, 1, 4, 4, 4, 12]  # nothing lost, nothing twice
