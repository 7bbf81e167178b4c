"""The asyncio client of the Router service: the same options and guarantees as `Client`, over grpc.aio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc
import grpc.aio

from specfleet.api.v1 import router_pb2, router_pb2_grpc
from specfleet.sdk.core import (
    DEFAULT_TARGET,
    ENDED_EARLY,
    Attempts,
    Chunk,
    ClientOptions,
    Completion,
    Replicas,
    StreamCursor,
    build_request,
    completion_from,
    rpc_error_parts,
)


class AsyncClient:
    """A connection to a specfleet router for asyncio code: `async with AsyncClient(...) as client:`. `target` may
    list several router replicas, as for `Client`: calls start on them in turn, a failed attempt is retried on the
    next."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = 60.0,
                 retries: int = 3, backoff: float = 0.2, max_message_mb: float = 16):
        self.options = ClientOptions.build(target, token, tls, root_certificates, timeout, retries, backoff,
                                           max_message_mb)
        self._channels: list[grpc.aio.Channel] = []  # opened inside the event loop on first use
        self._stubs: list[router_pb2_grpc.RouterStub] = []
        self._replicas = Replicas(len(self.options.targets))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, [], []
        for channel in channels:
            await channel.close()

    def _router(self, replica: int) -> router_pb2_grpc.RouterStub:
        if not self._stubs:
            creds = self.options.credentials()
            opts = self.options.channel_options()
            self._channels = [grpc.aio.secure_channel(target, creds, options=opts) if creds is not None
                              else grpc.aio.insecure_channel(target, options=opts) for target in self.options.targets]
            self._stubs = [router_pb2_grpc.RouterStub(channel) for channel in self._channels]
        return self._stubs[replica % len(self._stubs)]

    def generate(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] = (), drafters: Sequence[str] = (),
                 ignore_eos: bool = False, request_id: str | None = None) -> AsyncIterator[Chunk]:
        """Streams the continuation (`async for chunk in client.generate(...)`); the last chunk has finished=True.
        Arguments are checked now (ValueError); failures while streaming raise SpecfleetError."""
        request = build_request(prompt, prompt_token_ids=prompt_token_ids, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                drafters=drafters, ignore_eos=ignore_eos, request_id=request_id)
        return self._stream(request)

    async def complete(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                       max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       seed: int | None = None, stop: Sequence[str] = (), drafters: Sequence[str] = (),
                       ignore_eos: bool = False, request_id: str | None = None) -> Completion:
        """The whole continuation in one call."""
        request = build_request(prompt, prompt_token_ids=prompt_token_ids, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                drafters=drafters, ignore_eos=ignore_eos, request_id=request_id)
        return await self._complete(request)

    async def chat(self, messages: Sequence[Mapping[str, str]], **params) -> Completion:
        """The assistant's whole answer to `messages` ([{"role": "system" | "user" | "assistant", "content": str},
        ...]), which the router renders with the model's chat template. `params` as for complete()."""
        return await self._complete(build_request(messages=messages, **params))

    def chat_stream(self, messages: Sequence[Mapping[str, str]], **params) -> AsyncIterator[Chunk]:
        """The assistant's answer streamed (`async for chunk in client.chat_stream(...)`); `params` as for chat()."""
        return self._stream(build_request(messages=messages, **params))

    async def _complete(self, request: router_pb2.GenerateRequest) -> Completion:
        attempts = Attempts(self.options.retries, self.options.backoff, request.request_id)
        replica = self._replicas.first()
        while True:
            attempts.start()
            try:
                response = await self._router(replica).Complete(request, timeout=self.options.timeout,
                                                         metadata=self.options.metadata())
                return completion_from(response, request.request_id, attempts.made)
            except grpc.RpcError as exc:
                delay = attempts.failed(*rpc_error_parts(exc))
                replica += 1  # the next attempt goes to the next router replica
                await asyncio.sleep(delay)

    async def _stream(self, request: router_pb2.GenerateRequest) -> AsyncIterator[Chunk]:
        cursor = StreamCursor(request.request_id)
        attempts = Attempts(self.options.retries, self.options.backoff, request.request_id)
        replica = self._replicas.first()
        while True:
            attempts.start()
            cursor.new_attempt()
            received = len(cursor.token_ids)
            call = self._router(replica).Generate(request, timeout=self.options.timeout,
                                                  metadata=self.options.metadata())
            try:
                async for message in call:
                    chunk = cursor.accept(message)
                    if chunk is not None:
                        yield chunk
                    if cursor.finished:
                        return
                code, details = ENDED_EARLY
            except grpc.RpcError as exc:
                code, details = rpc_error_parts(exc)
            finally:
                call.cancel()
            delay = attempts.failed(code, details, progressed=len(cursor.token_ids) > received)
            replica += 1
            await asyncio.sleep(delay)
