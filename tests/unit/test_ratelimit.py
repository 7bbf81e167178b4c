"""The router's per-caller rate limits as pure logic with an injected clock: token buckets refill at their rate and
cap at their capacity, requests per second and generated tokens per minute are counted per caller, a refusal says
how long to wait and uses up nothing, and callers are keyed by a digest of their token (never the token)."""

import pytest

from specfleet.runtime.ratelimit import RateLimiter, TokenBucket, caller_key


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_at_its_rate_up_to_its_capacity():
    bucket = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1, 0.0) == pytest.approx(0.5)  # one token at 2/s
    assert bucket.level == 0.0  # a refused take takes nothing
    assert bucket.take(1, 0.5) == 0.0
    assert bucket.wait_s(4, 100.0) == 0.0 and bucket.level == 4.0  # capped at capacity after a long idle


def test_a_charge_may_overdraw_and_then_nothing_is_admitted_until_it_refills():
    bucket = TokenBucket(rate=1.0, capacity=10.0, now=0.0)
    bucket.charge(25, 0.0)
    assert bucket.level == -15.0
    assert bucket.wait_s(1, 0.0) == pytest.approx(16.0)
    assert bucket.wait_s(1, 16.0) == 0.0


def test_bad_bucket_parameters_are_refused():
    with pytest.raises(ValueError, match="rate > 0"):
        TokenBucket(0, 1, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        RateLimiter(rps=-1)
    with pytest.raises(ValueError, match="finite"):
        RateLimiter(tpm=float("inf"))


def test_requests_per_second_per_caller():
    clock = Clock()
    limiter = RateLimiter(rps=2, clock=clock)
    assert limiter.admit("a") == (0.0, "") and limiter.admit("a") == (0.0, "")
    wait, which = limiter.admit("a")
    assert wait == pytest.approx(0.5) and which == "2 requests per second"
    assert limiter.admit("b") == (0.0, "")  # another caller has its own bucket
    clock.now += 0.5
    assert limiter.admit("a") == (0.0, "")


def test_fractional_rps_allows_one_request_then_waits():
    clock = Clock()
    limiter = RateLimiter(rps=0.5, clock=clock)
    assert limiter.admit("a")[0] == 0.0
    assert limiter.admit("a")[0] == pytest.approx(2.0)


def test_generated_tokens_per_minute():
    clock = Clock()
    limiter = RateLimiter(tpm=60, clock=clock)  # one token a second, bursts of 60
    assert limiter.admit("a")[0] == 0.0
    limiter.charge("a", 90)  # a long generation overdraws the budget
    wait, which = limiter.admit("a")
    assert wait == pytest.approx(31.0) and which == "60 generated tokens per minute"
    limiter.charge("b", 10)
    assert limiter.admit("b")[0] == 0.0
    clock.now += 31
    assert limiter.admit("a")[0] == 0.0


def test_a_resumed_request_pays_only_for_tokens_it_did_not_have():
    clock = Clock()
    limiter = RateLimiter(tpm=60, clock=clock, max_requests=2)
    limiter.charge_completion("a", "r1", 10)  # tokens 0..9 streamed
    limiter.charge_completion("a", "r1", 20)  # 10..19
    level = lambda: limiter._buckets("a", clock.now)[1].level  # noqa: E731
    assert level() == pytest.approx(40)
    limiter.charge_completion("a", "r1", 20)  # the client resumed: 0..19 replayed from offset 0, free
    limiter.charge_completion("a", "r1", 25)  # then 5 new ones
    assert level() == pytest.approx(35)
    limiter.charge_completion("b", "r1", 5)  # the same id from another caller is another request
    assert level() == pytest.approx(35)
    limiter.charge_completion("a", "", 3)  # no id: charged as it comes
    assert level() == pytest.approx(32)
    limiter.charge_completion("a", "r2", 1)
    limiter.charge_completion("a", "r3", 1)  # bounded: r1 (least recently charged) is forgotten
    assert ("a", "r1") not in limiter._charged and len(limiter._charged) == 2


def test_replies_are_charged_by_their_place_in_the_completion():
    from specfleet.api.v1 import router_pb2
    from specfleet.runtime.ratelimit import _charge

    clock = Clock()
    limiter = RateLimiter(tpm=60, clock=clock)
    stream = [router_pb2.GenerateResponse(request_id="r", offset=i * 4, token_ids=[1, 2, 3, 4]) for i in range(3)]
    for reply in stream:
        _charge(limiter, "a", reply)
    replay = router_pb2.GenerateResponse(request_id="r", offset=0, token_ids=[1] * 12)  # the resumed stream
    _charge(limiter, "a", replay)
    _charge(limiter, "a", router_pb2.GenerateResponse(request_id="r", offset=12, token_ids=[5, 6], finished=True))
    assert limiter._buckets("a", clock.now)[1].level == pytest.approx(60 - 14)


def test_a_caller_refused_for_tokens_keeps_its_requests():
    clock = Clock()
    limiter = RateLimiter(rps=1, tpm=60, clock=clock)
    limiter.charge("a", 61)
    assert limiter.admit("a")[1].endswith("tokens per minute")
    clock.now += 2
    assert limiter.admit("a") == (0.0, "")  # the refusal above used up no request


def test_off_by_default_and_bounded_callers():
    assert not RateLimiter().enabled
    clock = Clock()
    limiter = RateLimiter(rps=1, clock=clock, max_callers=3)
    for name in "abcde":
        limiter.admit(name)
    assert len(limiter) == 3


def test_callers_are_keyed_by_a_digest_of_their_token():
    key = caller_key((("authorization", "Bearer s3cret-token"),), "ipv4:127.0.0.1:5555")
    assert key.startswith("token:") and "s3cret" not in key
    assert key == caller_key((("authorization", "Bearer s3cret-token"),), "ipv4:10.0.0.9:1")  # not by address
    assert key != caller_key((("authorization", "Bearer other"),), "ipv4:127.0.0.1:5555")
    assert caller_key((), "ipv4:127.0.0.1:5555") == "peer:ipv4:127.0.0.1"
