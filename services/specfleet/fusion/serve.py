"""Starting the fusion service (`specfleet serve fusion`, or in-process)."""

from __future__ import annotations

from specfleet.api.v1 import internal_pb2_grpc
from specfleet.runtime.process import ServeOptions, publish_heartbeat, start_service
from specfleet.runtime.server import Running


async def start_fusion(opts: ServeOptions, port: int = 0) -> tuple[Running, object]:
    from specfleet.fusion.service import FusionService

    service = FusionService()
    running = await start_service(opts, internal_pb2_grpc.add_FusionServicer_to_server, service,
                                  "specfleet.api.v1.Fusion", port)
    await publish_heartbeat(opts, "fusion", running, service.snapshot)
    return running, service
