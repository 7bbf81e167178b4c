"""`specfleet up --autoscale`: the operator's control loop (`specfleet_operator.actuators.autoscale_loop`, the same
code that scales Deployments on Kubernetes) driving local processes. New replicas start as `specfleet serve` child
processes and join the fleet through their Redis heartbeats; surplus ones are drained first (the router stops sending
to them), then stopped with SIGTERM once nothing is in flight, so no request is lost."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
from collections.abc import Callable

ROLE_ARGS = {"verifier": ["verifier"], "fusion": ["fusion"]}


def role_args(role: str) -> list[str]:
    """`specfleet serve` arguments of one more replica of a role key (verifier, fusion, drafter-<pool>)."""
    if role.startswith("drafter-"):
        return ["drafter", "--pool", role.removeprefix("drafter-")]
    if role in ROLE_ARGS:
        return list(ROLE_ARGS[role])
    raise ValueError(f"local autoscaling cannot start a {role!r} replica")


class LocalReplicas:
    """The fleet's child processes by role key, and the LocalActuator the autoscaling loop drives.

    spawn(role, pod) starts one `specfleet serve` process whose heartbeat id is `pod` and returns it."""

    def __init__(self, spawn: Callable[[str, str], subprocess.Popen], grace_s: float = 10.0):
        # only roles the fleet started with grow (a fleet without fusion never gets one)
        self.spawn, self.grace_s = spawn, grace_s
        self.procs: dict[str, dict[str, subprocess.Popen]] = {}
        self.stopped: set[str] = set()  # pods stopped on purpose (their exit is no failure)
        self.started = 0
        self._lock = threading.Lock()

    def add(self, role: str, pod: str, proc: subprocess.Popen) -> None:
        with self._lock:
            self.procs.setdefault(role, {})[pod] = proc

    def all(self) -> list[tuple[str, subprocess.Popen]]:
        with self._lock:
            return [(pod, proc) for pods in self.procs.values() for pod, proc in pods.items()]

    def failed(self) -> list[str]:
        """Pods that exited without being asked to."""
        return [pod for pod, proc in self.all() if proc.poll() is not None and pod not in self.stopped]

    def count(self, role: str) -> int:
        return len(self.replicas(role))

    # ---- LocalActuator

    def replicas(self, role: str) -> list[str]:
        with self._lock:
            return [pod for pod, proc in self.procs.get(role, {}).items() if proc.poll() is None]

    async def start_replica(self, role: str) -> None:
        with self._lock:
            if role not in self.procs:  # a role this fleet runs without (fusion with one pool), or the router
                return
            taken = set(self.procs.get(role, {}))
        n = 1
        while f"{role}-{n}" in taken:
            n += 1
        pod = f"{role}-{n}"
        proc = await asyncio.to_thread(self.spawn, role, pod)
        self.add(role, pod, proc)
        self.started += 1

    async def drain_and_stop(self, role: str, pod: str) -> None:
        with self._lock:
            proc = self.procs.get(role, {}).get(pod)
        if proc is None or proc.poll() is not None:
            return
        self.stopped.add(pod)
        proc.send_signal(signal.SIGTERM)  # readiness flips, in-flight calls get the grace period
        try:
            await asyncio.to_thread(proc.wait, self.grace_s + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
        with self._lock:
            self.procs.get(role, {}).pop(pod, None)


def local_spec(pools: list[str], verifiers: int, max_verifiers: int, max_drafters: int, interval_s: float,
               fusion: bool = True):
    """The SpecFleet spec `up --autoscale` runs under: verifiers and every drafter pool scale between 1 and their max;
    router and fusion stay at one. Windows and cooldown are short, as befits one machine and a demo."""
    from specfleet_operator.spec import FleetSpec

    return FleetSpec.from_dict("local", {
        "router": {"replicas": 1, "minReplicas": 1, "maxReplicas": 1},
        # no fusion service (one pool): the role is pinned at 0 (the spec wants maxReplicas >= 1; nothing starts one)
        "fusion": {"replicas": int(fusion), "minReplicas": int(fusion), "maxReplicas": 1},
        "verifier": {"replicas": verifiers, "minReplicas": 1, "maxReplicas": max(verifiers, max_verifiers)},
        "drafters": [{"name": p, "model": f"drafter-{p}", "replicas": 1, "minReplicas": 1,
                      "maxReplicas": max_drafters} for p in pools],
        "autoscaling": {"enabled": True, "maxStep": 1, "cooldownSeconds": int(max(2, 3 * interval_s)),
                        "scaleDownCooldownSeconds": int(max(4, 6 * interval_s)),
                        "stabilizationWindowSeconds": {"up": int(max(2, 2 * interval_s)),
                                                       "down": int(max(10, 10 * interval_s))}},
    })


def local_smoothing_s(interval_s: float) -> float:
    """The metrics smoothing of the local loop: four steps, at least 4 s (two heartbeats of 2 s). The operator's 10 s
    suit its 15-s up window; beside `local_spec`'s 2-s one they would dilute a burst's first heartbeats with ten
    seconds of the load before it, and the scale-up would wait for the average to catch up."""
    return max(4.0, 4.0 * interval_s)


def start_autoscaler(replicas: LocalReplicas, redis_url: str, prefix: str, spec, interval_s: float,
                     log: Callable[[str], None]) -> tuple[threading.Thread, Callable[[], None]]:
    """Runs the control loop on its own event loop in a thread; returns (thread, stop)."""
    from specfleet.state import StateStore, connect
    from specfleet_operator.actuators import autoscale_loop

    loop = asyncio.new_event_loop()
    stop_event: list[asyncio.Event] = []

    def on_step(report) -> None:
        for d in report.decisions:
            log(f"{d.role}: {d.from_replicas} -> {d.to_replicas} replicas ({d.reason})")
        for action, role, pod in report.actions:
            if action in ("drain", "stop", "undrain"):
                log(f"{action} {pod or role}")

    async def main() -> None:
        stop_event.append(asyncio.Event())
        store = StateStore(connect(redis_url), prefix=prefix)
        current = {role.key: replicas.count(role.key) for role in spec.roles}
        try:
            await autoscale_loop(store, spec, replicas, interval_s, stop_event[0], on_step, current,
                                 smoothing_s=local_smoothing_s(interval_s))
        finally:
            await store.redis.aclose()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="specfleet-autoscale",
                              daemon=True)
    thread.start()

    def stop() -> None:
        if stop_event:
            loop.call_soon_threadsafe(stop_event[0].set)
        thread.join(timeout=30)

    return thread, stop
