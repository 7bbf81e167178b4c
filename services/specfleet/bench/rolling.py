"""`specfleet bench reliability --stages rolling`: a rolling update of every role under long streams. The fleet runs
two router replicas; for each service in turn (the routers first, then drafters, fusion, verifiers) the same mixed
streams (greedy and seeded sampled) run while the service is sent SIGTERM, exits by itself within its grace, and a
new process takes its place on the same port. The SDK is given both routers: a draining router hands its streams
over (it ends each with UNAVAILABLE naming the request id after its next round) and the SDK resumes them on the other
by request id. Every output is compared with the update-free run: the goal is 0 truncated, 0 differing, with streams
that last at least 3x the grace period."""

from __future__ import annotations

import re
import signal
import time
from typing import Any

from specfleet.bench.under_load import SAMPLED, mixed_requests, run_streams, summarize


def roll_order(fleet: Any) -> list[str]:
    """The services in the order a rolling update replaces them: routers, drafters, fusion, verifiers."""
    names = list(fleet.services)
    return ([n for n in names if n == "router" or n.startswith("router-")]
            + [n for n in names if n.startswith("drafter-")] + [n for n in names if n == "fusion"]
            + [n for n in names if n.startswith("verifier-")])


def replace(fleet: Any, name: str, record: dict) -> None:
    """What a rolling update does to one pod: SIGTERM, wait for it to exit by itself (the grace, plus start-up slack),
    then a new process on the same port, ready. `record` gets how it went."""
    service = fleet.services[name]
    start = time.monotonic()
    fleet.signal(name, signal.SIGTERM)
    try:
        service.proc.wait(fleet.grace_s + 60)
    except Exception:  # noqa: BLE001  (did not stop by itself: recorded, then killed)
        service.proc.kill()
        service.proc.wait(10)
    exited = time.monotonic() - start
    time.sleep(0.2)  # the log reader takes the last lines
    record.update(calls_done_s=calls_done(service.log), exit_s=round(exited, 2), exit_code=service.proc.returncode,
                  live_at_drain=live_at_drain(service.log) if name.startswith("router") else None)
    service.start()
    fleet.wait_ready([name])
    record["replaced_after_s"] = round(time.monotonic() - start, 1)


def calls_done(log_lines) -> float | None:
    """Seconds from the stop signal until the stopped service's in-flight calls were done (its log says so); the
    rest of `exit_s` is the process's own teardown."""
    found = None
    for line in log_lines:
        match = re.search(r"in-flight calls done ([0-9.]+) s after the stop signal", line)
        if match:
            found = float(match.group(1))
    return found


def live_at_drain(log_lines) -> int | None:
    """The live streams a stopped router had when it began to drain (its log's last 'router draining' line)."""
    found = None
    for line in log_lines:
        match = re.search(r"router draining: (\d+) live streams are handed over", line)
        if match:
            found = int(match.group(1))
    return found


def rolling_update(fleet: Any, prompts: list[list[int]], streams: int, new_tokens: int, deadline_s: float,
                   seed: int = 0, say=lambda text: None) -> dict:
    """The `rolling_update` section of the reliability report (see the module's docstring)."""
    if len(getattr(fleet, "router_addresses", ())) < 2:
        raise ValueError("a rolling update of the routers needs two router replicas (ProcessFleet(routers=2))")
    requests = mixed_requests(prompts, streams, seed)
    say(f"rolling update: update-free run of {streams} streams of {new_tokens} tokens")
    baseline, timing = run_streams(fleet, requests, new_tokens, deadline_s)
    update_free = {"seconds": timing["seconds"], **summarize(baseline, None)}
    inject_at = max(1, sum(len(o.tokens) for o in baseline) // 5)  # early: the streams have most of their way to go
    grace = fleet.grace_s
    runs = []
    for i, name in enumerate(roll_order(fleet)):
        say(f"rolling update {i + 1}/{len(fleet.services)}: SIGTERM and replace {name} under {streams} streams")
        record: dict = {}
        outcomes, timing = run_streams(fleet, requests, new_tokens, deadline_s,
                                       (lambda n=name, r=record: replace(fleet, n, r), lambda: None), inject_at, 0.0)
        summary = summarize(outcomes, baseline)
        runs.append({"service": name, **record, **timing, **summary, "truncated": summary["lost"],
                     "streams_longer_than_3x_grace": sum(o.seconds >= 3 * grace for o in outcomes),
                     "crashed": fleet.crashed()})
    return {"streams": streams, "greedy": sum(r.temperature == 0 for r in requests),
            "sampled": sum(r.temperature > 0 for r in requests), "sampling": SAMPLED, "max_new_tokens": new_tokens,
            "grace_s": grace, "routers": len(fleet.router_addresses), "inject_at_tokens": inject_at,
            "update_free": update_free, "services_replaced": len(runs),
            "streams_total": sum(r["requests"] for r in runs),
            "truncated": sum(r["truncated"] for r in runs), "differing": sum(r["differing"] for r in runs),
            "late": sum(r["late"] for r in runs),
            "streams_longer_than_3x_grace": sum(r["streams_longer_than_3x_grace"] for r in runs),
            "unclean_exits": sum(r["exit_code"] != 0 for r in runs),
            "slowest_calls_done_s": max((r["calls_done_s"] or 0.0 for r in runs), default=0.0), "runs": runs}


def format_table(section: dict) -> list[str]:
    s = section
    lines = [f"rolling update: {s['routers']} routers, {s['streams']} streams ({s['greedy']} greedy, {s['sampled']} "
             f"sampled) of {s['max_new_tokens']} tokens per service replaced, grace {s['grace_s']:g} s: "
             f"{s['services_replaced']} services replaced, streams {s['streams_total']}, truncated {s['truncated']}, "
             f"differing {s['differing']}, longer than 3x the grace {s['streams_longer_than_3x_grace']}, "
             f"unclean exits {s['unclean_exits']}"]
    for r in s["runs"]:
        handed = f", {r['live_at_drain']} live at the drain" if r.get("live_at_drain") is not None else ""
        lines.append(f"  {r['service']:<16} live {r.get('live_at_injection', 0):>3}  calls done in "
                     f"{r['calls_done_s']} s, exited in {r['exit_s']:>5} s (code {r['exit_code']}{handed})  "
                     f"completed {r['completed']}/{r['requests']}  truncated {r['truncated']}  differing "
                     f"{r['differing']}  latest {r['latest_end_s']} s")
    return lines
