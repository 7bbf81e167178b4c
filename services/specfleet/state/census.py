"""A count of what a fleet keeps in Redis under its prefix, by kind of key (see `keys.py`), with the verify stream's
undelivered and pending entries: what a leak check after a soak or a fault run reads. A key is an orphan when nothing
bounds its life: it has no TTL and is not one of the fleet's fixed keys (the scores hash and the verify stream, one
each, whose contents are bounded: scores per (domain, drafter), the stream by live rounds)."""

from __future__ import annotations

from collections import Counter

FIXED_KINDS = ("scores", "stream:verify")  # one key each per prefix, no TTL by design


def kind_of(key: str, prefix: str) -> str:
    """`req`, `hb`, `drain`, `scores`, `stream:verify`, `stream:reply` (a router's reply stream), or the key's first
    name part after the prefix for anything else."""
    rest = key[len(prefix) + 1:]
    head, _, tail = rest.partition(":")
    if head == "stream":
        return "stream:" + tail.split(".", 1)[0]
    return head


def census(redis_url: str, prefix: str, group: str = "verifiers") -> dict:
    """Keys under `prefix` by kind (how many, how many without a TTL), requests by status, the verify stream's
    length and pending entries (XPENDING of `group`), reply streams' entries, and the orphans (keys with no TTL
    outside FIXED_KINDS). Synchronous (redis-py), for benchmarks and tests."""
    import redis

    from specfleet.state.keys import glob_escape

    client = redis.Redis.from_url(redis_url)
    try:
        keys = [k.decode() for k in client.scan_iter(match=glob_escape(prefix) + ":*", count=1000)]
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pttl(key)
            ttls = pipe.execute()
        kinds: Counter = Counter()
        no_ttl: Counter = Counter()
        orphans: list[str] = []
        requests: Counter = Counter()
        request_keys = [k for k in keys if kind_of(k, prefix) == "req"]
        with client.pipeline(transaction=False) as pipe:
            for key in request_keys:
                pipe.hget(key, "status")
            statuses = pipe.execute()  # None: expired since the SCAN
        for status in statuses:
            requests[(status or b"gone").decode()] += 1
        streams: dict[str, dict] = {}
        for key, ttl in zip(keys, ttls, strict=True):
            kind = kind_of(key, prefix)
            if ttl == -2:  # expired between SCAN and PTTL
                continue
            kinds[kind] += 1
            if ttl == -1:
                no_ttl[kind] += 1
                if kind not in FIXED_KINDS:
                    orphans.append(key)
            if kind.startswith("stream:"):
                entry = streams.setdefault(kind, {"keys": 0, "entries": 0, "pending": 0})
                entry["keys"] += 1
                entry["entries"] += int(client.xlen(key))
                if kind == "stream:verify":
                    try:
                        entry["pending"] += int(client.xpending(key, group)["pending"])
                    except redis.ResponseError:  # no consumer group yet: nothing was ever delivered
                        pass
        verify = streams.get("stream:verify", {"entries": 0, "pending": 0})
        return {"keys": len(keys), "by_kind": dict(sorted(kinds.items())), "without_ttl": dict(sorted(no_ttl.items())),
                "requests": dict(sorted(requests.items())), "streams": streams,
                "verify_undelivered": max(0, verify["entries"] - verify["pending"]),
                "verify_pending": verify["pending"], "orphans": len(orphans), "orphan_keys": orphans[:10]}
    finally:
        client.close()
