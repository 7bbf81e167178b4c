"""Pod heartbeats: every service publishes its load to Redis every couple of seconds (`{p}:hb:{role}:{pod}`), with
NVML readings where a GPU is present and `gpu: null` where none is. The operator and the router read them: the
operator to size each role, the router to find replicas and to stop sending to draining ones. A pod marked
draining (by the operator, in Redis) flips its gRPC health to NOT_SERVING, so load balancers stop sending too,
while its in-flight calls finish. A pod whose heartbeat cannot reach Redis answers NOT_SERVING as well (it cannot
read or commit request state) and SERVING again once a beat gets through, unless it is draining."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger("specfleet.heartbeat")

_nvml_state: dict[str, Any] = {}


def gpu_readings() -> dict[str, float] | None:
    """NVML readings of this pod's first visible GPU (utilisation %, memory MB, power W), or None without a GPU or
    driver. NVML is initialised once; a failure is remembered so pods without GPUs pay nothing per beat."""
    if _nvml_state.get("failed"):
        return None
    try:
        import pynvml

        if "handle" not in _nvml_state:
            pynvml.nvmlInit()
            _nvml_state["handle"] = pynvml.nvmlDeviceGetHandleByIndex(0)
        handle = _nvml_state["handle"]
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            power_w = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except pynvml.NVMLError:  # not every board reports power
            power_w = None
        return {"util": float(util.gpu), "mem_used_mb": mem.used / 2**20, "mem_total_mb": mem.total / 2**20,
                "power_w": power_w}
    except Exception as exc:  # no library, no driver, no device: report "no GPU" and carry on
        _nvml_state["failed"] = True
        log.info("no GPU readings (%s): heartbeats report gpu: null", exc)
        return None


def pod_name(role: str, port: int) -> str:
    """This pod's heartbeat id: SPECFLEET_POD_NAME (the Kubernetes pod name) or host-role-port."""
    return os.environ.get("SPECFLEET_POD_NAME") or f"{socket.gethostname()}-{role}-{port}"


def advertised_address(host: str, port: int) -> str:
    """The address other services reach this one at: SPECFLEET_POD_IP when set (Kubernetes), else the listen host
    (loopback when it listens on all interfaces, as on one machine)."""
    ip = os.environ.get("SPECFLEET_POD_IP") or (host if host not in ("0.0.0.0", "::", "") else "127.0.0.1")
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def rates(previous: Mapping[str, float], current: Mapping[str, float], seconds: float) -> dict[str, float]:
    """Load figures from two snapshots of a service's cumulative counters (busy_s, tokens, steps, wait_s, waited)."""
    def delta(key: str) -> float:
        return max(0.0, float(current.get(key, 0)) - float(previous.get(key, 0)))

    seconds = max(seconds, 1e-6)
    steps, waited = delta("steps"), delta("waited")
    return {"busy_frac": min(1.0, delta("busy_s") / seconds), "tokens_per_s": delta("tokens") / seconds,
            "rounds_per_s": delta("rounds") / seconds, "step_ms": 1000 * delta("busy_s") / steps if steps else 0.0,
            "queue_wait_ms": 1000 * delta("wait_s") / waited if waited else 0.0}


class HeartbeatPublisher:
    """Publishes `snapshot()` (cumulative counters + gauges) as load figures every interval_s, and keeps the pod's
    readiness in step with what the beats learn: the pod should stop receiving work while it is marked draining or
    while a beat cannot reach Redis. `on_drain(True)` is called once when that starts (the server flips health to
    NOT_SERVING) and `on_drain(False)` once when both have cleared. While Redis is away the last drain mark seen is
    kept, so a draining pod never turns SERVING again because Redis came back."""

    def __init__(self, store, role: str, pod: str, address: str, snapshot: Callable[[], dict[str, Any]],
                 on_drain: Callable[[bool], Any] | None = None, interval_s: float = 2.0, extra: Mapping | None = None,
                 beat_timeout_s: float | None = None):
        self.store, self.role, self.pod, self.address = store, role, pod, address
        self.snapshot, self.on_drain, self.interval_s = snapshot, on_drain, interval_s
        self.extra = dict(extra or {})
        # a beat that hangs (a stopped Redis, a dead network path) counts as a failed one after this long
        self.beat_timeout_s = beat_timeout_s if beat_timeout_s is not None else max(2 * interval_s, 2.0)
        self.draining = False  # the last drain mark a beat read
        self.redis_reachable = True  # whether the last beat reached Redis
        self.unready = False  # what on_drain was last told (draining or Redis unreachable)
        self.last: dict[str, Any] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> HeartbeatPublisher:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def stop(self) -> None:
        """Stops beating and withdraws the heartbeat, so no reader sends work to this pod after it has gone."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await asyncio.wait_for(self.store.withdraw_heartbeat(self.role, self.pod), self.beat_timeout_s)
        except Exception as exc:  # it expires with its TTL anyway
            log.warning("could not withdraw the heartbeat of %s %s: %s", self.role, self.pod, exc)

    async def beat(self, previous: dict[str, Any], seconds: float) -> dict[str, Any]:
        current = self.snapshot()
        load = {k: v for k, v in current.items()
                if k not in ("busy_s", "tokens", "steps", "wait_s", "waited", "rounds")}
        load.update(rates(previous, current, seconds), address=self.address, gpu=gpu_readings(), **self.extra)
        record = await asyncio.wait_for(
            self.store.heartbeat(self.role, self.pod, load, ttl_s=max(5 * self.interval_s, 3.0)), self.beat_timeout_s)
        self.last = record
        if not self.redis_reachable:
            log.info("%s %s reaches Redis again", self.role, self.pod)
        self.redis_reachable = True
        if record["draining"] != self.draining:
            self.draining = record["draining"]
            log.info("%s %s is %s", self.role, self.pod, "draining" if self.draining else "no longer draining")
        await self._update_readiness()
        return current

    async def _update_readiness(self) -> None:
        unready = self.draining or not self.redis_reachable
        if unready == self.unready:
            return
        self.unready = unready
        if self.on_drain is not None:
            result = self.on_drain(unready)
            if asyncio.iscoroutine(result):
                await result

    async def _loop(self) -> None:
        previous: dict[str, Any] = self.snapshot()
        then = time.monotonic()
        while True:
            try:
                now = time.monotonic()
                previous = await self.beat(previous, now - then)
                then = now
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:  # Redis away (OSError covers timeouts): not ready, retry next beat
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
                if self.redis_reachable:
                    log.warning("heartbeat of %s %s cannot reach Redis (%s): health NOT_SERVING until it can",
                                self.role, self.pod, reason)
                self.redis_reachable = False
                try:
                    await self._update_readiness()
                except Exception as inner:  # noqa: BLE001  (a failing callback must not end the heartbeat)
                    log.warning("readiness callback of %s %s failed: %s", self.role, self.pod, inner)
            except Exception as exc:  # noqa: BLE001  (anything else: say so, keep beating, readiness unchanged)
                log.warning("heartbeat of %s %s failed: %s", self.role, self.pod, exc)
            await asyncio.sleep(self.interval_s)
