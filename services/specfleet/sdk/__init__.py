"""Client library of the specfleet Router service (protos/specfleet/api/v1/router.proto), blocking and asyncio.

    with Client("127.0.0.1:50051") as client:
        for chunk in client.generate("def main():", max_new_tokens=32):
            print(chunk.text, end="")
"""

from specfleet.sdk.aio import AsyncClient
from specfleet.sdk.client import Client
from specfleet.sdk.core import Chunk, Completion, SpecfleetError, Usage

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "SpecfleetError", "Usage"]
