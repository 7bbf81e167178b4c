"""The shared control loop against the real Redis, with replicas that publish heartbeats through the services' own
HeartbeatPublisher: load up -> the verifier pool grows; load gone -> it drains, then shrinks, and no replica is
stopped while it has a call in flight."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from specfleet.state import StateStore, connect
from specfleet.state.heartbeat import HeartbeatPublisher
from specfleet_operator.actuators import Autoscaler, autoscale_loop
from specfleet_operator.spec import FleetSpec

REDIS_URL = "redis://127.0.0.1:6379/0"


class Replica:
    """One replica: its load counters, and its heartbeat published as a real service publishes it."""

    def __init__(self, store: StateStore, role: str, pod: str, pool: str | None = None):
        self.inflight, self.busy = 0, 0.0
        self.stopped = False
        extra = {"pool": pool} if pool else None
        self.publisher = HeartbeatPublisher(store, role, pod, "127.0.0.1:0", self.snapshot, None, 0.1, extra)

    def snapshot(self) -> dict:
        return {"inflight": self.inflight, "busy_s": 0.0}

    async def beat(self) -> None:
        await self.publisher.beat(self.snapshot(), 1.0)
        assert self.publisher.last["pod"] == self.publisher.pod


class ProcessTable:
    """A LocalActuator over in-process replicas (what `specfleet up --autoscale` does with processes)."""

    def __init__(self, store: StateStore):
        self.store = store
        self.pods: dict[str, dict[str, Replica]] = {}
        self.started = 0
        self.stopped_with_work: list[str] = []

    def replicas(self, role: str) -> list[str]:
        return sorted(self.pods.get(role, {}))

    async def start_replica(self, role: str) -> None:
        self.started += 1
        pod = f"{role}-{self.started}"
        component, _, pool = role.partition("-")
        replica = Replica(self.store, component, pod, pool or None)
        self.pods.setdefault(role, {})[pod] = replica
        await replica.beat()

    async def drain_and_stop(self, role: str, pod: str) -> None:
        replica = self.pods[role].pop(pod)
        if replica.inflight:
            self.stopped_with_work.append(pod)
        replica.stopped = True

    async def beat_all(self, load: float) -> None:
        """Every live replica publishes its share of `load` (calls in flight spread over the role's replicas)."""
        for role, replicas in self.pods.items():
            share = load / max(1, len(replicas)) if role == "verifier" else 0.0
            for replica in replicas.values():
                replica.inflight = int(round(share))
                await replica.beat()


def with_store(body):
    """Run body(store) in a fresh event loop with a StateStore under a unique prefix, purged afterwards."""
    async def run():
        redis = connect(REDIS_URL)
        store = StateStore(redis, prefix=f"test-op-{uuid.uuid4().hex[:10]}")
        try:
            if not await store.ping():
                pytest.skip("no Redis at 127.0.0.1:6379")
            await asyncio.wait_for(body(store), timeout=30)
        finally:
            await store.purge()
            await redis.aclose()

    asyncio.run(run())


SPEC = FleetSpec.from_dict("demo", {
    "drafters": [{"name": "python", "minReplicas": 1, "maxReplicas": 2}],
    "verifier": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4},
    "autoscaling": {"stabilizationWindowSeconds": {"up": 0, "down": 0}, "cooldownSeconds": 0,
                    "scaleDownCooldownSeconds": 0, "maxStep": 4},
})


def test_load_up_grows_load_down_drains_then_shrinks():
    async def body(store):
        table = ProcessTable(store)
        clock = [1000.0]
        autoscaler = Autoscaler(SPEC, table, store, drain_grace_s=2.0, clock=lambda: clock[0])
        report = await autoscaler.step()  # nothing runs yet: one replica per role is started
        assert {role: len(pods) for role, pods in table.pods.items()} == {
            "router": 1, "fusion": 1, "drafter-python": 1, "verifier": 1}
        assert all(action == "start" for action, _, _ in report.actions)

        # load: verifiers report a queue wait 4x the target -> the pool grows to 4 (maxReplicas)
        async def verifier_load(wait_ms: float, live: int) -> None:
            for replica in table.pods["verifier"].values():
                await replica.publisher.store.heartbeat("verifier", replica.publisher.pod, {
                    "inflight": replica.inflight, "queue_wait_ms": wait_ms, "busy_frac": 0.9})
            for replica in table.pods["router"].values():
                await store.heartbeat("router", replica.publisher.pod, {"live": live, "inflight": live})

        await verifier_load(200.0, live=8)
        clock[0] += 5
        report = await autoscaler.step()
        assert report.desired["verifier"] == 4 and len(table.pods["verifier"]) == 4
        assert [d.role for d in report.decisions] == ["verifier"]

        # load gone, but two verifiers still finish calls: the idle ones are drained, nothing is stopped yet
        for pod, replica in table.pods["verifier"].items():
            replica.inflight = 1 if pod in ("verifier-5", "verifier-6") else 0
        await verifier_load(0.0, live=0)
        for replica in table.pods["router"].values():
            await store.heartbeat("router", replica.publisher.pod, {"live": 0, "inflight": 0})
        for replica in table.pods["verifier"].values():
            await store.heartbeat("verifier", replica.publisher.pod, {"inflight": replica.inflight})
        clock[0] += 65  # past the policy's 10 s metric smoothing and the 60-s panic the 4x queue wait started
        report = await autoscaler.step()
        assert report.desired["verifier"] == 1
        drained = {pod for action, role, pod in report.actions if action == "drain" and role == "verifier"}
        assert len(drained) == 3 and not any(a == "stop" for a, _, _ in report.actions)
        beats = {b["pod"]: b for b in await store.heartbeats("verifier")}
        assert all(beats[pod]["draining"] for pod in drained)  # the router sees the marks

        # after the grace period the idle drained ones stop; the ones with a call in flight stay
        clock[0] += 3
        for replica in table.pods["verifier"].values():
            await store.heartbeat("verifier", replica.publisher.pod, {"inflight": replica.inflight})
        report = await autoscaler.step()
        stopped = {pod for action, _, pod in report.actions if action == "stop"}
        busy = {pod for pod, r in table.pods["verifier"].items() if r.inflight}
        assert stopped and stopped <= drained and not busy & stopped
        # their calls finish: they go too, and the count reaches 1 with nothing stopped mid-call
        for replica in table.pods["verifier"].values():
            replica.inflight = 0
            await store.heartbeat("verifier", replica.publisher.pod, {"inflight": 0})
        clock[0] += 3
        await autoscaler.step()
        assert len(table.pods["verifier"]) == 1 and table.stopped_with_work == []
        assert not any(b["draining"] for b in await store.heartbeats("verifier")
                       if b["pod"] in table.pods["verifier"])

    with_store(body)


def test_autoscale_loop_runs_until_stopped():
    async def body(store):
        table = ProcessTable(store)
        stop = asyncio.Event()
        reports = []

        def on_step(report):
            reports.append(report)
            if len(reports) == 3:
                stop.set()

        autoscaler = await asyncio.wait_for(autoscale_loop(store, SPEC, table, 0.05, stop, on_step=on_step), 10)
        assert len(reports) == 3 and autoscaler.desired["verifier"] == 1
        assert {role: len(p) for role, p in table.pods.items()}["verifier"] == 1

    with_store(body)


def test_a_drain_mark_left_by_an_earlier_run_is_finished():
    """An operator restarted mid-drain sees the mark in Redis, waits the grace period, then stops the idle pod."""
    async def body(store):
        table = ProcessTable(store)
        for _ in range(2):
            await table.start_replica("verifier")
        await store.set_draining("verifier", "verifier-2", True)  # marked by the previous operator
        spec = FleetSpec.from_dict("demo", {"verifier": {"replicas": 1}, "autoscaling": {"enabled": False}})
        clock = [0.0]
        autoscaler = Autoscaler(spec, table, store, current={"verifier": 1}, drain_grace_s=2.0,
                                clock=lambda: clock[0])
        report = await autoscaler.step()
        assert ("stop", "verifier", "verifier-2") not in report.actions  # grace counts from now
        clock[0] = 3.0
        report = await autoscaler.step()
        assert ("stop", "verifier", "verifier-2") in report.actions
        assert table.replicas("verifier") == ["verifier-1"]

    with_store(body)
