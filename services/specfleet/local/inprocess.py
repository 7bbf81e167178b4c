"""Every role of the fleet in one process, on one event loop in a background thread (`LocalFleet`): real gRPC
servers on loopback, for tests and benchmarks. Every service listens on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import io
import threading
from dataclasses import dataclass, field

from specfleet.drafter.serve import DRAFTER_POOLS, start_drafter
from specfleet.fusion.serve import start_fusion
from specfleet.router.serve import start_router
from specfleet.runtime.process import ServeOptions
from specfleet.runtime.security import ChannelTls, ServerTls
from specfleet.runtime.server import Running
from specfleet.verifier.serve import start_verifier


@dataclass
class LocalFleet:
    """Every role in one process, on one event loop in a background thread: real gRPC servers on loopback."""

    opts: ServeOptions
    pools: tuple[str, ...] = DRAFTER_POOLS
    verifiers: int = 1
    fusion: bool = True
    k_max: int = 4
    adaptive: bool = True
    pipeline: bool = True
    routing: bool = True
    verify_queue: str = "stream"
    dsi: bool = True
    router_port: int = 0
    routers: int = 1  # router replicas, each its own RouterService on the same fleet: "router", "router-1", ...
    internal_token: str | None = None
    internal_tls: ServerTls | None = None  # the internal services' certificate (mTLS with a client CA)
    internal_client_tls: ChannelTls | None = None  # what the router presents to them
    servers: list[Running] = field(default_factory=list)
    services: dict[str, object] = field(default_factory=dict)
    retired: list[Running] = field(default_factory=list)
    router_address: str = ""  # the first router's
    router_addresses: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="specfleet-fleet", daemon=True)

    def run(self, coro, timeout: float | None = None):
        """Runs a coroutine on the fleet's loop from another thread and waits for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> LocalFleet:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        from specfleet.router.service import FleetConfig

        inner = self._internal_opts()
        drafters = {}
        for pool in self.pools:
            running, service = await start_drafter(pool, inner)
            self._keep(f"drafter-{pool}", running, service)
            drafters[pool] = f"127.0.0.1:{running.port}"
        verifiers = []
        for i in range(self.verifiers):
            running, service = await start_verifier(inner)
            self._keep(f"verifier-{i}", running, service)
            verifiers.append(f"127.0.0.1:{running.port}")
        fusion = None
        if self.fusion and len(self.pools) > 1:
            running, service = await start_fusion(inner)
            self._keep("fusion", running, service)
            fusion = f"127.0.0.1:{running.port}"
        for i in range(self.routers):
            config = FleetConfig(drafters=drafters, verifiers=verifiers, fusion=fusion, k_max=self.k_max,
                                 adaptive=self.adaptive, pipeline=self.pipeline, routing=self.routing,
                                 verify_queue=self.verify_queue, dsi=self.dsi)
            running, service = await start_router(self.opts, config, self.router_port if i == 0 else 0,
                                                  self.internal_token, self.internal_client_tls)
            self._keep("router" if i == 0 else f"router-{i}", running, service)
            self.router_addresses.append(f"127.0.0.1:{running.port}")
        self.router_address = self.router_addresses[0]

    def _internal_opts(self) -> ServeOptions:
        """The internal services' options: as the router's, but they accept only the internal token (and, with
        internal_tls, only TLS callers)."""
        return dataclasses.replace(self.opts, token=self.internal_token, tls=self.internal_tls)

    def stop_role(self, name: str, grace: float = 0.5) -> int:
        """Stops one service (e.g. "drafter-python"); returns its port. Its server object is kept: dropping a
        stopped grpc.aio server lets its finaliser close a descriptor number a new server may already reuse."""
        index = list(self.services).index(name)
        running = self.servers[index]
        self.run(running.stop(grace))
        self.retired.append(running)
        return running.port

    def restart_drafter(self, pool: str) -> None:
        """Stops the drafter pool's server and starts a fresh one (empty caches) on the same port."""
        name = f"drafter-{pool}"
        port = self.stop_role(name)
        inner = self._internal_opts()
        running, service = self.run(start_drafter(pool, inner, port=port))
        index = list(self.services).index(name)
        self.servers[index], self.services[name] = running, service

    def _keep(self, name: str, running: Running, service) -> None:
        self.servers.append(running)
        self.services[name] = service

    def stop(self, grace: float = 2.0) -> None:
        async def stop_all():
            routers = [s for name, s in self.services.items() if name == "router" or name.startswith("router-")]
            for running in reversed(self.servers):
                await running.stop(grace)
            for router in routers:
                await router.close()
            for task in asyncio.all_tasks():  # batchers' loops
                if task is not asyncio.current_task():
                    task.cancel()

        try:
            self.run(stop_all(), timeout=grace + 30)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the local fleet did not stop within {grace + 30:g} s; its loop's tasks:\n"
                               + _task_stacks(self._loop)) from None
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> LocalFleet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _task_stacks(loop: asyncio.AbstractEventLoop) -> str:
    """Where each task of a (stuck) loop waits: what a hung stop is diagnosed from."""
    out = io.StringIO()
    for task in list(asyncio.all_tasks(loop)):
        task.print_stack(limit=8, file=out)
    return out.getvalue()
