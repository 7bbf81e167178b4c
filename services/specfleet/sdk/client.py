"""The blocking client of the Router service: `Client(...).generate(...)` streams, `.complete(...)` returns it all;
retries resume the same request (same request_id) and each token reaches the caller once."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import grpc

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


class Client:
    """A connection to a specfleet router. Use as a context manager, or call close(). `target` may list several
    router replicas ("host:port" each): calls start on them in turn, and a failed attempt is retried on the next (a
    router that is killed, or drains in a rolling update and hands its streams over, is resumed on another by
    request id)."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = 60.0,
                 retries: int = 3, backoff: float = 0.2, max_message_mb: float = 16):
        self.options = ClientOptions.build(target, token, tls, root_certificates, timeout, retries, backoff,
                                           max_message_mb)
        creds = self.options.credentials()
        opts = self.options.channel_options()
        self._channels = [grpc.secure_channel(target, creds, options=opts) if creds is not None
                          else grpc.insecure_channel(target, options=opts) for target in self.options.targets]
        self._stubs = [router_pb2_grpc.RouterStub(channel) for channel in self._channels]
        self._replicas = Replicas(len(self._stubs))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def generate(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] = (), drafters: Sequence[str] = (),
                 ignore_eos: bool = False, request_id: str | None = None) -> Iterator[Chunk]:
        """Streams the continuation as chunks; the last has finished=True. Arguments are checked now (ValueError);
        failures while streaming raise SpecfleetError."""
        request = build_request(prompt, prompt_token_ids=prompt_token_ids, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                drafters=drafters, ignore_eos=ignore_eos, request_id=request_id)
        return self._stream(request)

    def complete(self, prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] = (), drafters: Sequence[str] = (),
                 ignore_eos: bool = False, request_id: str | None = None) -> Completion:
        """The whole continuation in one call."""
        request = build_request(prompt, prompt_token_ids=prompt_token_ids, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                drafters=drafters, ignore_eos=ignore_eos, request_id=request_id)
        return self._complete(request)

    def chat(self, messages: Sequence[Mapping[str, str]], **params) -> Completion:
        """The assistant's whole answer to `messages` ([{"role": "system" | "user" | "assistant", "content": str},
        ...]), which the router renders with the model's chat template. `params` as for complete():
        max_new_tokens, temperature, top_p, top_k, seed, stop, drafters, ignore_eos, request_id."""
        return self._complete(build_request(messages=messages, **params))

    def chat_stream(self, messages: Sequence[Mapping[str, str]], **params) -> Iterator[Chunk]:
        """The assistant's answer to `messages` streamed as chunks, like generate(); `params` as for chat()."""
        return self._stream(build_request(messages=messages, **params))

    def _complete(self, request: router_pb2.GenerateRequest) -> Completion:
        attempts = Attempts(self.options.retries, self.options.backoff, request.request_id)
        replica = self._replicas.first()
        while True:
            attempts.start()
            try:
                response = self._stubs[replica % len(self._stubs)].Complete(request, timeout=self.options.timeout,
                                                                            metadata=self.options.metadata())
                return completion_from(response, request.request_id, attempts.made)
            except grpc.RpcError as exc:
                delay = attempts.failed(*rpc_error_parts(exc))
                replica += 1  # the next attempt goes to the next router replica
                time.sleep(delay)

    def _stream(self, request: router_pb2.GenerateRequest) -> Iterator[Chunk]:
        cursor = StreamCursor(request.request_id)
        attempts = Attempts(self.options.retries, self.options.backoff, request.request_id)
        replica = self._replicas.first()
        while True:
            attempts.start()
            cursor.new_attempt()
            received = len(cursor.token_ids)
            call = self._stubs[replica % len(self._stubs)].Generate(request, timeout=self.options.timeout,
                                                                    metadata=self.options.metadata())
            try:
                for message in call:
                    chunk = cursor.accept(message)
                    if chunk is not None:
                        yield chunk
                    if cursor.finished:
                        return
                code, details = ENDED_EARLY
            except grpc.RpcError as exc:
                code, details = rpc_error_parts(exc)
            finally:
                call.cancel()  # no-op when done; frees the stream when the caller stops early
            delay = attempts.failed(code, details, progressed=len(cursor.token_ids) > received)
            replica += 1
            time.sleep(delay)
