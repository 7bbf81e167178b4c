"""What a process fleet leaves behind, for `bench reliability` and the soak: its Redis census once the work has
settled (keys by kind, orphans, verify-stream entries; `state.census`), and how soon a request's work stops after its
client goes away (the cancellation stage)."""

from __future__ import annotations

import time

CANCEL_BOUND_S = 2.0  # a cancelled request's work must stop within this


def settled_census(redis_url: str, prefix: str, live: int = 0, settle_s: float = 10.0) -> dict:
    """The census once the verify stream is empty (or after settle_s), with the bound it is judged by: no orphan
    (a key without a TTL outside the fixed ones), no pending or waiting verify entry, and no more running requests
    than `live` (the calls still open) plus those a client left (each bounded by the running TTL)."""
    from specfleet.state.census import census

    deadline = time.monotonic() + settle_s
    while True:
        found = census(redis_url, prefix)
        if (found["verify_pending"] == 0 and found["verify_undelivered"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    found["live_requests"] = live
    found["leak_free"] = found["orphans"] == 0 and found["verify_pending"] == 0 and found["verify_undelivered"] == 0
    return found


def cancellation_run(router_address: str, redis_url: str, prefix: str, token: str | None, requests: int = 8,
                     after_messages: int = 3, watch_s: float = 6.0) -> dict:
    """`requests` long greedy streams, one at a time, each cancelled by its client after `after_messages` messages.
    For each, Redis is watched for `watch_s` (every 50 ms): the request's last commit (`updated`, Redis clock) and
    the last time a verify job of it was in the stream (waiting, or taken and not answered). Their latest, minus the
    moment of the cancel, is when its verification stopped; drafting stops with the cancelled Draft calls (drafters
    skip a call whose caller left), which Redis does not see: `tests/integration/test_leaks.py` checks the drafters'
    and verifiers' own counters in process."""
    import uuid

    import grpc
    import redis

    from specfleet.api.v1 import router_pb2, router_pb2_grpc
    from specfleet.state.keys import Keys

    keys = Keys(prefix)
    client = redis.Redis.from_url(redis_url)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    stopped: list[float] = []
    runs = []

    def redis_ms() -> int:
        seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    try:
        with grpc.insecure_channel(router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for i in range(requests):
                rid = f"cancel-{uuid.uuid4().hex}"
                call = stub.Generate(router_pb2.GenerateRequest(request_id=rid, prompt_token_ids=[5, 6, 7 + i],
                                                                max_new_tokens=600, ignore_eos=True),
                                     timeout=300, metadata=metadata)
                got = 0
                for n, message in enumerate(call, 1):
                    got += len(message.token_ids)
                    if n >= after_messages:
                        break
                call.cancel()
                cancelled_ms = redis_ms()
                last_seen_ms = cancelled_ms
                end = time.monotonic() + watch_s
                while time.monotonic() < end:
                    entries = client.xrange(keys.stream("verify"))
                    if any(rid.encode() in fields.get(b"d", b"") for _, fields in entries):
                        last_seen_ms = redis_ms()
                    time.sleep(0.05)
                updated = int(client.hget(keys.request(rid), "updated") or 0)
                after = max(0, max(updated, last_seen_ms) - cancelled_ms) / 1000
                stopped.append(after)
                runs.append({"tokens_before_cancel": got, "work_stopped_after_s": round(after, 3)})
    finally:
        client.close()
    return {"requests": requests, "bound_s": CANCEL_BOUND_S, "watched_s": watch_s,
            "work_stopped_after_s_max": round(max(stopped, default=0.0), 3),
            "within_bound": sum(s <= CANCEL_BOUND_S for s in stopped), "runs": runs}
