"""Router servicer: the public `specfleet.api.v1.Router`. Per request it keeps Redis state, routes each round to
the drafter pools best at the request (expertise routing in `engine.control`), fuses their drafts, has a verifier
verify and commit the round, and streams the committed tokens. A retried request id resumes from Redis."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
import uuid
import zlib
from dataclasses import dataclass

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from specfleet.api.v1 import internal_pb2, internal_pb2_grpc, router_pb2, router_pb2_grpc
from specfleet.engine.control import CostModel, SpeculationController
from specfleet.engine.head import HEAD
from specfleet.engine.sampling import SamplingParams
from specfleet.engine.tree import TokenTree
from specfleet.fusion.service import fuse_drafts
from specfleet.router.limits import HANDED_OVER, MAX_STOP_CHARS, MAX_STOP_STRINGS, MIN_TEMPERATURE, NO_HANDOVER
from specfleet.runtime.chat import chat_prompt_ids, check_messages
from specfleet.runtime.server import FAST_RECONNECT
from specfleet.runtime.telemetry import client_interceptors
from specfleet.runtime.text import TextDeltas
from specfleet.runtime.wire import FEATURE_DTYPES, replayed_round, sampling_to_pb, tree_from_pb, tree_to_pb

log = logging.getLogger("specfleet.router")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
# when the caller's call ends (its gRPC deadline; monotonic clock), for the rounds made on its behalf: a round waiting
# its turn in the verify stream keeps its place until then (at most FleetConfig.max_round_wait_s)
_CALLER_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("caller_deadline", default=None)
SUSPECT_S = 10.0  # a verifier that just failed or timed out is tried last this long (a heartbeat's lifetime)


@dataclass(eq=False)
class LiveStream:
    """One Generate call in progress, for the handover of a draining router."""

    task: asyncio.Task
    resumable: bool  # the caller resumes by request id (the SDK); the HTTP front cannot
    in_round: bool = True  # inside the request's rounds (not handing a message to gRPC): safe to cancel
    handed: bool = False  # cancelled by the handover deadline, not by the caller


class PendingFeatures:
    """One request's target features (from the verifier's replies) not yet passed to the head pool: rows of context
    positions first..first+rows-1, packed as the verifier sent them. Rows already sent are not kept: a head replica
    that lacks them (a failover, a failed call) rebuilds them from the context."""

    def __init__(self):
        self.first, self.rows, self.width, self.dtype, self.data = 0, 0, 0, "", b""
        self.seen = False  # a reply carried features: before that the head pool would rebuild the prompt's

    def add(self, msg: internal_pb2.Features) -> None:
        self.seen = True
        end = self.first + self.rows
        if self.rows and (msg.width, msg.dtype) == (self.width, self.dtype) and self.first <= msg.first <= end:
            size = self.width * FEATURE_DTYPES[self.dtype].itemsize  # rows from msg.first on are replaced
            self.data = self.data[:(msg.first - self.first) * size] + msg.data
            self.rows = msg.first - self.first + msg.rows
        else:  # rows before the pending ones (already sent, now rewritten) or after a gap: these alone
            self.first, self.rows, self.width, self.dtype, self.data = (msg.first, msg.rows, msg.width, msg.dtype,
                                                                        msg.data)

    def take(self) -> internal_pb2.Features | None:
        """The pending rows as a message (None when there are none); they count as sent."""
        if not self.rows:
            return None
        msg = internal_pb2.Features(first=self.first, rows=self.rows, width=self.width, dtype=self.dtype,
                                    data=self.data)
        self.first, self.rows, self.data = self.first + self.rows, 0, b""
        return msg


@dataclass
class FleetConfig:
    drafters: dict[str, str]  # pool name -> address
    verifiers: list[str]
    fusion: str | None = None
    internal_token: str | None = None
    internal_tls: object | None = None  # security.ChannelTls: TLS (mTLS with a client cert) to internal services
    k_max: int = 4
    max_fused_nodes: int = 24
    rpc_timeout_s: float = 30.0
    max_concurrent: int = 256  # admission control: more live requests than this get RESOURCE_EXHAUSTED
    adaptive: bool = True  # speculation control; False: always draft k_max levels (pools still routed)
    discover_s: float = 1.0  # replicas are re-read from Redis heartbeats this often (0: static addresses only)
    pipeline: bool = True  # draft the next round while this one is verified (PipeInfer); False: strictly in turn
    routing: bool = True  # expertise routing; False: one drafter pool picked at random each round (ablation)
    # "stream": rounds go through the Redis stream `{prefix}:stream:verify` (consumer group `verifiers`: any verifier
    # takes a round, a dead one's are reclaimed); "rpc": straight gRPC calls, sticky per request
    verify_queue: str = "stream"
    # DSI speculation parallelism (with >= 2 verifiers): while round r is verified, the round after it is verified
    # too, on the context that assumes r accepts its most likely path; it is committed only when r confirms that
    dsi: bool = True
    # admission by queue wait (stream queue): while the oldest round waiting in the verify stream is older than
    # this, new requests get RESOURCE_EXHAUSTED at once instead of queueing behind it (0: off)
    max_queue_wait_ms: float = 0.0
    # stream queue: a round still waiting its turn after rpc_timeout_s keeps its place up to the caller's deadline,
    # and at most this long without one (under overload, failing it would send the request to the back of the line)
    max_round_wait_s: float = 600.0
    # a draining router (SIGTERM, or the operator's drain mark) with another router replica alive hands its live
    # streams over: each ends after its next round with UNAVAILABLE naming the request id, which the client resumes
    # on another replica. False: streams finish on the draining router within the grace period (cut after it)
    handover: bool = True


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(self, config: FleetConfig, store, tokenizer, max_positions: int, vocab_size: int,
                 eos_token_id: int | None):
        if not config.verifiers:
            raise ValueError("the router needs at least one verifier address")
        self.config, self.store, self.tokenizer = config, store, tokenizer
        self.max_positions, self.vocab_size, self.eos_token_id = max_positions, vocab_size, eos_token_id
        metadata = (("authorization", f"Bearer {config.internal_token}"),) if config.internal_token else ()
        self._metadata = metadata
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retiring: set[asyncio.Task] = set()  # closing channels made with replaced TLS credentials
        names = list(config.drafters) or ["none"]
        # drafter pools run side by side (separate services): a level costs one pool's step, not the sum; without
        # adaptive control every round drafts k_max levels, with the drafters still chosen by expertise routing
        self.controller = SpeculationController(names, k_max=config.k_max, cost=CostModel(parallel_drafters=True),
                                                fixed_k=not config.adaptive)
        self.live = 0
        self.rounds = 0
        self.tokens = 0
        self.used_ahead = 0  # rounds whose draft was made during the previous verification
        self.cancelled_ahead = 0  # drafts made ahead and dropped because verification invalidated them
        self.acceptance = 0.0  # EMA of tokens emitted per round
        # replicas found in heartbeats: role or "drafter:<pool>" -> live, non-draining addresses
        self.members: dict[str, list[str]] = {}
        self.draining: set[str] = set()
        self._suspect: dict[str, float] = {}  # verifier address -> monotonic time until which it is tried last
        self._discovery: asyncio.Task | None = None
        if config.verify_queue not in ("stream", "rpc"):
            raise ValueError(f"verify_queue must be 'stream' or 'rpc', got {config.verify_queue!r}")
        self.queue = None
        if config.verify_queue == "stream":
            from specfleet.verifier.queue import VerifyQueueClient

            self.queue = VerifyQueueClient(store)
        self.queue_stats = {"depth": 0, "pending": 0, "oldest_age_ms": 0}  # the verify stream, read with members
        self._refreshes = self._queue_ticket = 0
        self.speculated = 0  # DSI rounds verified concurrently with the round before them
        self.speculated_used = 0  # ... and committed (the round before confirmed their context)
        # a draft head pool drafts from the target's features: the verifier returns each round's new rows, kept here
        # per live request until the head pool's next Draft call carries them
        self.features_wanted = HEAD in config.drafters
        self.pending: dict[str, PendingFeatures] = {}
        # rolling updates: this router's address in heartbeats (set by start_router), its live streams, and whether
        # it is draining (handing streams over) and until when its streams may run (monotonic; None: no deadline)
        self.address = ""
        self.streams: set[LiveStream] = set()
        self.handing_over = False
        self.handover_deadline: float | None = None
        self.handed_over = 0  # streams ended with "resume elsewhere"
        self.handover_cuts = 0  # ... of them interrupted inside a round at the handover deadline (round withdrawn)
        self._cut_timer: asyncio.TimerHandle | None = None

    def snapshot(self) -> dict:
        """Heartbeat counters: live requests, rounds and committed tokens, mean tokens per round."""
        return {"live": self.live, "inflight": self.live, "queue_depth": self.queue_stats["depth"],
                "queue_oldest_ms": self.queue_stats["oldest_age_ms"], "rounds": self.rounds, "steps": self.rounds,
                "tokens": self.tokens, "acceptance": round(self.acceptance, 3), "drafts_ahead_used": self.used_ahead,
                "drafts_ahead_cancelled": self.cancelled_ahead,
                "dsi_rounds": self.speculated, "dsi_rounds_used": self.speculated_used,
                "handed_over": self.handed_over, "handover_cuts": self.handover_cuts}

    # ------------------------------------------------------------------ rolling updates

    def peers(self) -> list[str]:
        """Other router replicas alive and not draining (from heartbeats): where a handed-over stream resumes."""
        return [a for a in self.members.get("router", []) if a != self.address]

    def start_handover(self, within_s: float | None = None) -> None:
        """This router is going away (SIGTERM, or marked draining): it takes no new request, and each live stream
        a client can resume ends after its next round with UNAVAILABLE naming its request id, while another router
        replica is alive (without one, streams run on as before). `within_s`: the grace left; a stream still inside
        a round shortly before it ends is interrupted (its round withdrawn) and told the same, so no stream is cut by
        the server's shutdown."""
        if not self.config.handover:
            return
        self.handing_over = True
        if self.config.discover_s > 0:  # the replicas as they are now, not as at the last discovery (up to 1 s ago)
            refresh = asyncio.get_running_loop().create_task(self.refresh_members())
            self._retiring.add(refresh)
            refresh.add_done_callback(lambda task: (self._retiring.discard(task), task.cancelled() or task.exception()))
        if within_s is None:
            return
        margin = min(1.0, 0.25 * within_s)  # the time left to end the calls before gRPC's shutdown cuts them
        self.handover_deadline = time.monotonic() + within_s - margin
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        self._cut_timer = asyncio.get_running_loop().call_later(within_s - margin, self._cut_remaining)
        log.warning("router draining: %d live streams are handed over (router replicas last seen: %s)",
                    len(self.streams), ", ".join(self.peers()) or "none; streams finish here within the grace")

    def stop_handover(self) -> None:
        """The drain mark was cleared: take requests again."""
        if self.handover_deadline is None:
            self.handing_over = False

    def _cut_remaining(self) -> None:
        """The handover deadline: streams still inside a round are interrupted; the rest end at their next message."""
        for stream in list(self.streams):
            if stream.in_round and not stream.task.done():
                stream.handed = True
                self.handover_cuts += 1
                stream.task.cancel()

    def _hand_over_now(self, stream: LiveStream) -> bool:
        if not self.handing_over:
            return False
        if self.handover_deadline is not None and time.monotonic() >= self.handover_deadline:
            return True
        return stream.resumable and bool(self.peers())

    # ------------------------------------------------------------------ membership

    async def refresh_members(self) -> None:
        """Reads the fleet's replicas from Redis heartbeats: new replicas (autoscaling) join, draining ones stop
        getting new rounds. Where no heartbeat names a role, the configured addresses stand. Refreshes may overlap
        (the discovery loop, an explicit call): one that started earlier never overwrites a later one's reading."""
        self._refreshes += 1
        ticket = self._refreshes
        beats = await self.store.heartbeats()
        members: dict[str, list[str]] = {}
        draining = set()
        for beat in beats:
            address = beat.get("address")
            if not address:
                continue
            key = f"drafter:{beat.get('pool')}" if beat["role"] == "drafter" else beat["role"]
            if beat.get("draining"):
                draining.add(address)
            else:
                members.setdefault(key, []).append(address)
        self.members = {k: sorted(v) for k, v in members.items()}
        self.draining = draining
        if self.queue is not None:
            from specfleet.verifier.queue import VERIFY_GROUP, VERIFY_STREAM

            stats = await self.store.queue_stats(VERIFY_STREAM, VERIFY_GROUP)
            if ticket > self._queue_ticket:
                self.queue_stats, self._queue_ticket = stats, ticket

    def reload_tls(self) -> bool:
        """A renewed internal certificate (its files replaced, e.g. cert-manager rewriting the mounted Secret) is
        used from here on: new channels are made with it; the old ones are closed once the calls on them have had
        their deadline. Returns whether the credentials changed."""
        tls = self.config.internal_tls
        fresh = tls.reloaded() if tls is not None else None
        if fresh is None:
            return False
        self.config.internal_tls = fresh
        if fresh == tls:  # touched, same contents
            return False
        old, self._channels = self._channels, {}
        log.info("internal TLS credentials changed: new channels to %d internal services", len(old))

        async def close_later() -> None:
            await asyncio.sleep(self.config.rpc_timeout_s + 1.0)
            for channel in old.values():
                await channel.close()

        self._retiring.add(task := asyncio.get_running_loop().create_task(close_later()))
        task.add_done_callback(self._retiring.discard)
        return True

    async def _discover_loop(self) -> None:
        while True:
            self.reload_tls()
            try:
                await self.refresh_members()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep the last known members
                log.warning("reading replicas from Redis failed: %s", exc)
            await asyncio.sleep(self.config.discover_s)

    def ensure_discovery(self) -> None:
        if self._discovery is None and self.config.discover_s > 0:
            self._discovery = asyncio.get_running_loop().create_task(self._discover_loop())

    def _replicas(self, key: str, configured: list[str]) -> list[str]:
        found = self.members.get(key)
        if found:
            return found
        return [a for a in configured if a not in self.draining] or configured

    # ------------------------------------------------------------------ plumbing

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            # reconnect quickly after a peer restarts (gRPC's default backoff grows to minutes); with tracing on,
            # each call gets a client span whose trace context travels in its metadata
            tls = self.config.internal_tls
            self._channels[address] = (
                grpc.aio.secure_channel(address, tls.credentials(), options=FAST_RECONNECT + tls.options(),
                                        interceptors=client_interceptors(address)) if tls is not None
                else grpc.aio.insecure_channel(address, options=FAST_RECONNECT,
                                               interceptors=client_interceptors(address)))
        return self._channels[address]

    def _drafter(self, pool: str, rid: str = ""):
        """The pool's replica for this request: sticky by request id, so its drafter KV cache stays warm."""
        replicas = self._replicas(f"drafter:{pool}", [self.config.drafters[pool]])
        return internal_pb2_grpc.DrafterStub(self._channel(replicas[zlib.crc32(rid.encode()) % len(replicas)]))

    def _verifiers_for(self, rid: str) -> list[str]:
        """Sticky by request id (its KV cache stays warm on one verifier), the others as fall-backs in order;
        draining verifiers come last (only if every other one fails)."""
        vs = self._replicas("verifier", self.config.verifiers)
        first = zlib.crc32(rid.encode()) % len(vs)
        spare = [v for v in self.config.verifiers if v in self.draining and v not in vs]
        ordered = vs[first:] + vs[:first] + spare
        now = time.monotonic()  # one that just failed (a hung one costs a whole deadline) goes last, keeping the order
        return sorted(ordered, key=lambda v: self._suspect.get(v, 0.0) > now)

    async def close(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
        if self.queue is not None:
            await self.queue.close()
        for channel in self._channels.values():
            await channel.close()
        for task in list(self._retiring):
            task.cancel()

    # ------------------------------------------------------------------ validation

    def _prepare(self, request: router_pb2.GenerateRequest) -> tuple[str, list[int], SamplingParams]:
        """(request id, prompt ids, sampling params); raises ValueError saying what to fix."""
        if request.prompt and request.prompt_token_ids:
            raise ValueError("give either prompt or prompt_token_ids, not both")
        if request.messages:
            if request.prompt or request.prompt_token_ids:
                raise ValueError("give either messages or a prompt (prompt / prompt_token_ids), not both")
            conversation = check_messages([{"role": m.role, "content": m.content} for m in request.messages])
            ids = chat_prompt_ids(self.tokenizer, conversation)
        elif request.prompt:
            ids = self.tokenizer(request.prompt, add_special_tokens=False).input_ids
        else:
            ids = list(request.prompt_token_ids)
        if not ids:
            raise ValueError("the prompt is empty; give some text (prompt) or token ids (prompt_token_ids)")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt_token_ids must be in [0, {self.vocab_size})")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if len(ids) + request.max_new_tokens > self.max_positions:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                             f"model's context of {self.max_positions}; shorten the prompt or ask for fewer tokens")
        unknown = [d for d in request.drafters if d not in self.config.drafters]
        if unknown:
            raise ValueError(f"unknown drafter pool(s) {', '.join(unknown)}; this fleet has "
                             f"{', '.join(self.config.drafters) or 'none'}")
        if len(request.request_id) > 128:
            raise ValueError("request_id is longer than 128 characters")
        if len(request.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in request.stop):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
        if 0 < request.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g}, got {request.temperature!r}: "
                             "smaller ones overflow the logits")
        # seed has no presence in proto3: 0 is a seed like any other, so equal requests give equal samples
        params = SamplingParams(request.temperature, request.top_p or 1.0, request.top_k, request.seed)
        params.validate()
        return request.request_id or uuid.uuid4().hex, ids, params

    # ------------------------------------------------------------------ rounds

    async def _draft(self, rid: str, context: list[int], k: int, pools: list[str], params: SamplingParams,
                     prompt_len: int, timings: router_pb2.RoundTimings | None = None) -> tuple[TokenTree, float]:
        """The round's draft tree and the seconds it took; `timings` (profiling) gets the drafter RPCs' and the
        fusion call's wall times and the slowest drafter's own drafting time."""
        if HEAD in pools and rid in self.pending and not self.pending[rid].seen:
            # no features yet (a request's first round here): the verifier's reply brings the prompt's, which the
            # head pool would otherwise compute again with a target forward of its own
            pools = [p for p in pools if p != HEAD]
        if k <= 0 or not pools:
            return TokenTree.empty(), 0.0
        start = time.perf_counter()
        # a sampled request's drafts are drawn with its own noise at each output position (keyed by its seed)
        item = internal_pb2.DraftItem(request_id=rid, context=context, k=k, position=len(context) - prompt_len,
                                      sampling=None if params.greedy else sampling_to_pb(params))
        items = {p: item for p in pools}
        if HEAD in pools and rid in self.pending:  # the head pool gets the feature rows it has not had yet
            rows = self.pending[rid].take()
            if rows is not None:
                items[HEAD] = head_item = internal_pb2.DraftItem()
                head_item.CopyFrom(item)
                head_item.features.CopyFrom(rows)
        calls = [self._drafter(p, rid).Draft(internal_pb2.DraftRequest(items=[items[p]]),
                                             timeout=self.config.rpc_timeout_s, metadata=self._metadata)
                 for p in pools]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        if timings is not None:
            drafted = time.perf_counter()
            timings.draft_s = drafted - start
            timings.draft_compute_s = max((r.seconds for r in replies if not isinstance(r, Exception)), default=0.0)
        trees, names = [], []
        for pool, reply in zip(pools, replies, strict=True):
            if isinstance(reply, Exception):  # a drafter down costs speed, never output: draft without it
                log.warning("drafter %s failed for %s: %s", pool, rid, reply)
                continue
            if reply.trees[0].tokens:  # an empty draft (e.g. the suffix pool found no match) adds nothing to a merge
                trees.append(reply.trees[0])
                names.append(pool)
        if not trees:
            return TokenTree.empty(), time.perf_counter() - start
        if len(trees) == 1 or self.config.fusion is None:
            if len(pools) > 1 and self.config.fusion is not None:
                # one non-empty draft of several: the fusion service would return it merged with nothing, i.e.
                # deduplicated, siblings ordered by confidence and cut to max_fused_nodes; the same here, no RPC
                alone = tree_from_pb(trees[0], self.vocab_size)
                if alone.draft_probs is None:  # (the fusion service refuses sampled drafts: the draft alone then)
                    return fuse_drafts([alone], names[:1], self.config.max_fused_nodes), time.perf_counter() - start
            return self._single_draft(trees[0], names[0]), time.perf_counter() - start
        stub = internal_pb2_grpc.FusionStub(self._channel(self.config.fusion))
        try:
            fused = await stub.Fuse(internal_pb2.FuseRequest(request_id=rid, drafts=trees, drafters=names,
                                                             max_nodes=self.config.max_fused_nodes),
                                    timeout=self.config.rpc_timeout_s, metadata=self._metadata)
            tree = tree_from_pb(fused.tree, self.vocab_size)
        except grpc.aio.AioRpcError as exc:  # fusion down costs speed, never output: the best-routed draft alone
            log.warning("fusion failed for %s: %s; using the %s draft alone", rid, exc.code().name, names[0])
            tree = self._single_draft(trees[0], names[0])
        end = time.perf_counter()
        if timings is not None:
            timings.fuse_s = end - drafted
        return tree, end - start

    def _single_draft(self, draft: internal_pb2.TokenTree, pool: str) -> TokenTree:
        """One pool's draft as the round's tree, every node credited to that pool (acceptance per pool)."""
        tree = tree_from_pb(draft, self.vocab_size)
        return TokenTree(tree.tokens, tree.parents, tree.probs, None, tuple((pool,) for _ in range(len(tree))))

    def _pools_for(self, rid: str, rnd: int, routed: list[str], asked: list[str]) -> list[str]:
        """The pools that draft this round: the routed ones (expertise routing), or, with routing off, one pool
        picked at random (seeded by request and round, so a rerun drafts the same); without fusion, one pool."""
        if not self.config.routing:
            return [asked[random.Random(f"{rid}:{rnd}").randrange(len(asked))]]
        pools = [p for p in routed if p in asked] or asked
        return pools[:1] if self.config.fusion is None else pools

    def _draft_ahead(self, rid: str, context: list[int], tree: TokenTree, k: int, pools: list[str],
                     remaining: int, params: SamplingParams, prompt_len: int) -> tuple[asyncio.Task, list[int]] | None:
        """PipeInfer-style continuous speculation: while the verifier checks `tree`, the drafters draft the next
        round from the optimistic continuation (the tree's most confident path fully accepted), one level deeper so
        its first level guesses the target's bonus token. Returns (task, the path's tokens) or None."""
        # the head pool drafts only from the features of committed tokens: it sits out drafts made ahead
        pools = [p for p in pools if p != HEAD]
        if not self.config.pipeline or k <= 0 or not len(tree) or remaining <= tree.max_depth + 2 or not pools:
            return None
        path = [int(tree.tokens[i]) for i in tree.best_path()]
        return asyncio.get_running_loop().create_task(self._draft(rid, context + path, k + 1, pools, params,
                                                                            prompt_len)), path

    async def _confirm_ahead(self, ahead: tuple[asyncio.Task, list[int]], committed: list[int],
                             finished: bool) -> TokenTree | None:
        """The draft made ahead, when the round committed exactly the path it assumed and a bonus token it drafted
        (its subtree under that token is the next round's draft, drafted from the very context the next round has);
        otherwise it is cancelled (early cancellation) and the next round drafts afresh."""
        task, path = ahead
        if finished or len(committed) != len(path) + 1 or committed[:-1] != path:
            task.cancel()
            self.cancelled_ahead += 1
            return None
        try:
            tree, _ = await task
        except Exception:  # a drafter failed: the next round drafts afresh
            return None
        for i in range(len(tree)):
            if int(tree.parents[i]) == -1 and int(tree.tokens[i]) == committed[-1]:
                self.used_ahead += 1
                return tree.subtree(i)
        self.cancelled_ahead += 1
        return None

    async def _verify(self, rid: str, rnd: int, context: list[int], prompt_len: int, tree: TokenTree,
                      params: SamplingParams, remaining: int, ignore_eos: bool,
                      speculative: bool = False, timed: bool = False) -> internal_pb2.VerifyResponse:
        msg = internal_pb2.VerifyRequest(request_id=rid, round=rnd, context=context, prompt_len=prompt_len,
                                         tree=tree_to_pb(tree), sampling=sampling_to_pb(params),
                                         max_new_tokens=remaining, ignore_eos=ignore_eos, speculative=speculative,
                                         features=self.features_wanted)
        if timed:  # the verifier answers with where the round's time went
            msg.sent_unix = time.time()
        if self.queue is not None:  # any verifier takes it from the stream; a dead one's is reclaimed
            return await self.queue.verify(msg, self.config.rpc_timeout_s, self._round_wait_s())
        order = self._verifiers_for(rid)
        if speculative and len(order) > 1:  # the request's own verifier has the round before this one
            order = order[1:] + order[:1]
        last: Exception | None = None
        for address in order:  # a dead verifier's round goes to the next (commits are idempotent)
            try:
                return await internal_pb2_grpc.VerifierStub(self._channel(address)).Verify(
                    msg, timeout=self.config.rpc_timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise
                self._suspect[address] = time.monotonic() + SUSPECT_S
                last = exc
        raise last  # type: ignore[misc]

    def _round_wait_s(self) -> float:
        """How long a round may wait its turn in the verify stream: until the caller's deadline, if it gave one."""
        deadline = _CALLER_DEADLINE.get()
        cap = self.config.max_round_wait_s
        return cap if deadline is None else max(0.0, min(cap, deadline - time.monotonic()))

    def _dsi_on(self) -> bool:
        return self.config.dsi and len(self._replicas("verifier", self.config.verifiers)) >= 2

    def _speculate(self, rid: str, rnd: int, context: list[int], prompt_len: int, ahead, k: int, pools: list[str],
                   params: SamplingParams, remaining: int, ignore_eos: bool) -> asyncio.Task | None:
        """DSI speculation parallelism: once the draft made ahead is ready, verify the round after this one
        concurrently with it, on the context that assumes this round accepts its most likely path and its bonus token
        is the ahead draft's most confident root. Returns a task giving (assumed tokens, tree, reply, draft made ahead
        for the round after that) or None, or None when there is no room for another round."""
        if ahead is None or not self._dsi_on():
            return None
        task, path = ahead

        async def speculate():
            tree, _ = await asyncio.shield(task)
            roots = [i for i in range(len(tree)) if int(tree.parents[i]) == -1]
            if not roots:
                return None
            guess = max(roots, key=lambda i: float(tree.probs[i]))
            assumed = path + [int(tree.tokens[guess])]
            left = remaining - len(assumed)
            if left < 1:
                return None
            sub = tree.subtree(guess).prune_depth(min(k, left - 1)) if left > 1 else TokenTree.empty()
            spec_context = context + assumed
            self.speculated += 1
            next_ahead = self._draft_ahead(rid, spec_context, sub, k, pools, left, params, prompt_len)
            try:
                reply = await self._verify(rid, rnd + 1, spec_context, prompt_len, sub, params, left, ignore_eos,
                                           speculative=True)
            except BaseException:
                if next_ahead is not None:
                    next_ahead[0].cancel()
                raise
            return assumed, sub, reply, next_ahead

        return asyncio.get_running_loop().create_task(speculate())

    async def _use_speculation(self, spec: asyncio.Task | None, rid: str, rnd: int, output: list[int],
                               confirmed: bool):
        """The speculated round's (tree, reply, draft made ahead) when this round committed exactly the tokens it
        assumed; the reply is then committed here, as the verifier would have (it did not: its context was not
        committed yet). Otherwise the speculation is cancelled (early cancellation) and None returned."""
        if spec is None:
            return None
        if not confirmed:
            spec.cancel()
            return None
        try:
            got = await spec
        except Exception as exc:  # noqa: BLE001  (a failed speculation costs speed, never output)
            log.debug("speculative round of %s failed: %s", rid, exc)
            return None
        if got is None:
            return None
        assumed, tree, reply, next_ahead = got
        if output[-len(assumed):] != assumed:
            if next_ahead is not None:
                next_ahead[0].cancel()
            return None
        result = await self.store.commit_round(rid, rnd, list(reply.token_ids), finished=reply.finished,
                                               finish_reason=reply.finish_reason)
        if not result.applied:  # committed by another run of this request: its tokens stand
            if next_ahead is not None:
                next_ahead[0].cancel()
            if rnd >= result.state.round:
                return None
            reply = replayed_round(result.state, rnd)
            next_ahead = None
        self.speculated_used += 1
        return tree, reply, next_ahead

    async def _run(self, request: router_pb2.GenerateRequest, context):
        """Yields GenerateResponse messages for one request (resuming from Redis when the id is known)."""
        try:
            rid, prompt, params = self._prepare(request)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        spec = {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k, "seed": params.seed,
                "max_new_tokens": request.max_new_tokens, "stop": list(request.stop),
                "ignore_eos": request.ignore_eos, "drafters": list(request.drafters)}
        try:
            state = await self.store.create_request(rid, prompt, spec)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        output = list(state.output_ids)
        rnd, finished, reason = state.round, state.status == "finished", state.finish_reason
        usage = {"rounds": rnd, "draft_tokens": 0, "accepted_tokens": 0}
        streamer = TextDeltas(self.tokenizer, list(request.stop))
        if output:  # a resumed request: everything committed so far, from offset 0
            text, cut = streamer.feed(output)
            yield self._message(rid, text, output, 0, finished or cut, reason or ("stop" if cut else ""), prompt,
                                output, usage)
            if cut and not finished:
                await self.store.commit_round(rid, rnd, [], finished=True, finish_reason="stop")
                finished = True
        pools_asked = [p for p in request.drafters] or list(self.config.drafters)
        ready: TokenTree | None = None  # the next round's draft, made while this round was verified (pipelining)
        if self.features_wanted:
            self.pending[rid] = PendingFeatures()
        ahead = dsi = None
        timed = request.round_timings
        try:
            while not finished:
                round_start = time.perf_counter()
                timings = router_pb2.RoundTimings() if timed else None
                remaining = request.max_new_tokens - len(output)
                plan = self.controller.decide([rid], max_k={rid: remaining - 1},
                                              kinds={rid: params.kind})[rid]
                pools = self._pools_for(rid, rnd, plan.drafters, pools_asked)
                if timed:
                    timings.plan_s = time.perf_counter() - round_start
                if ready is not None and plan.k > 0:
                    tree, draft_s = ready.prune_depth(plan.k), None  # drafted during the last verification
                    if timed:
                        timings.drafted_ahead = True
                else:
                    tree, draft_s = await self._draft(rid, prompt + output, plan.k, pools if plan.k > 0 else [],
                                                      params, len(prompt), timings)
                ready = None
                ahead = self._draft_ahead(rid, prompt + output, tree, plan.k, pools, remaining, params, len(prompt))
                dsi = self._speculate(rid, rnd, prompt + output, len(prompt), ahead, plan.k, pools, params, remaining,
                                       request.ignore_eos)
                start = time.perf_counter()
                try:
                    reply = await self._verify(rid, rnd, prompt + output, len(prompt), tree, params, remaining,
                                               request.ignore_eos, timed=timed)
                except BaseException:
                    for task in (ahead[0] if ahead else None, dsi):
                        if task is not None:
                            task.cancel()
                    raise
                verify_s = time.perf_counter() - start
                if timed:
                    v = reply.timings
                    timings.MergeFrom(router_pb2.RoundTimings(
                        verify_s=verify_s, queue_s=v.queue_s, batch_wait_s=v.batch_wait_s, forward_s=reply.seconds,
                        commit_s=v.commit_s, verifier_s=v.handle_s, batch=reply.batch))
                    answered = time.perf_counter()
                if ahead is not None:
                    ready = await self._confirm_ahead(ahead, list(reply.token_ids), reply.finished)
                if self.controller.cost is not None:
                    if plan.k > 0 and len(tree) and draft_s is not None:
                        self.controller.cost.observe_draft(1, max(1, len(pools)), plan.k, draft_s)
                    self.controller.cost.observe_verify(len(tree) + 1, verify_s)
                rounds = [(tree, reply)]
                while rounds:
                    tree, reply = rounds.pop()
                    if reply.HasField("features") and rid in self.pending:  # committed: its rows are the context's
                        self.pending[rid].add(reply.features)
                    new, offset = list(reply.token_ids), len(output)
                    self._account(rid, plan, tree, reply, usage)
                    output += new
                    rnd += 1
                    finished, reason = reply.finished, reply.finish_reason
                    text, cut = streamer.feed(new)
                    if cut and not finished:
                        await self.store.commit_round(rid, rnd, [], finished=True, finish_reason="stop")
                        finished, reason = True, "stop"
                    message = self._message(rid, text, new, offset, finished, reason, prompt, output, usage)
                    if timings is not None:  # the first round of the batch (a DSI round's hops were not measured)
                        timings.account_s = time.perf_counter() - answered
                        timings.sent_unix = time.time()
                        message.timings.CopyFrom(timings)
                        timings = None
                    yield message
                    # DSI: the round after this one, verified concurrently, stands when this one confirmed its context
                    used = await self._use_speculation(dsi, rid, rnd, output, ready is not None and not finished)
                    dsi = None
                    if used is not None:
                        spec_tree, spec_reply, spec_ahead = used
                        rounds.append((spec_tree, spec_reply))
                        ready = None
                        if spec_ahead is not None:
                            ready = await self._confirm_ahead(spec_ahead, list(spec_reply.token_ids),
                                                              spec_reply.finished)
        finally:
            # the call ended, finished or not (the client went away, a deadline, an error): nothing made for this
            # request runs on after it (a draft made ahead, a speculative DSI round waiting in the verify stream)
            self._stop_pending(ahead, dsi)
            self.pending.pop(rid, None)
            self.controller.forget(rid)
            # its drafter and verifier caches are freed; a client that resumes it rebuilds them from Redis
            asyncio.get_running_loop().create_task(self._release(rid, output))

    @staticmethod
    def _stop_pending(ahead: tuple[asyncio.Task, list[int]] | None, dsi: asyncio.Task | None) -> None:
        """Cancels a request's pending work: its draft made ahead and its speculative round (and the draft that
        round made ahead, when it already finished)."""
        if ahead is not None:
            ahead[0].cancel()
        if dsi is None:
            return
        if not dsi.done():
            dsi.cancel()
        elif not dsi.cancelled() and dsi.exception() is None and dsi.result() is not None:
            next_ahead = dsi.result()[3]
            if next_ahead is not None:
                next_ahead[0].cancel()

    def _account(self, rid: str, plan, tree: TokenTree, reply: internal_pb2.VerifyResponse, usage: dict) -> None:
        """A committed round's statistics: expertise routing's feedback, counters, usage."""
        nodes = list(reply.accepted_nodes)
        credited = [tree.origins[i] for i in nodes] if tree.origins else None
        self.controller.observe(rid, plan, tree.max_depth, len(nodes), credited, len(tree))
        usage["rounds"] += 1
        self.rounds += 1
        self.tokens += len(reply.token_ids)
        self.acceptance = len(reply.token_ids) if self.rounds == 1 else (
            0.95 * self.acceptance + 0.05 * len(reply.token_ids))
        usage["draft_tokens"] += len(tree)
        usage["accepted_tokens"] += reply.accepted

    async def _release(self, rid: str, output: list[int]) -> None:
        msg = internal_pb2.ReleaseRequest(request_id=rid, output=output)
        calls = [self._drafter(p, rid).Release(msg, timeout=5, metadata=self._metadata) for p in self.config.drafters]
        calls += [internal_pb2_grpc.VerifierStub(self._channel(v)).Release(msg, timeout=5, metadata=self._metadata)
                  for v in self.config.verifiers]
        await asyncio.gather(*calls, return_exceptions=True)  # best effort: caches are also evicted when full

    @staticmethod
    def _message(rid, text, new, offset, finished, reason, prompt, output, usage) -> router_pb2.GenerateResponse:
        return router_pb2.GenerateResponse(
            request_id=rid, text=text, token_ids=new, offset=offset, finished=finished, finish_reason=reason,
            usage=router_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=len(output), **usage))

    # ------------------------------------------------------------------ RPCs

    async def Generate(self, request, context):
        self.ensure_discovery()
        if self.live >= self.config.max_concurrent:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the fleet is at capacity ({self.config.max_concurrent} live requests); retry later")
        waited = self.queue_stats["oldest_age_ms"]
        if self.config.max_queue_wait_ms and waited > self.config.max_queue_wait_ms:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the verifiers are behind: a round has waited {waited} ms in the verify queue (limit "
                                f"{self.config.max_queue_wait_ms:g} ms); retry later")
        if self.handing_over and self.peers():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this router is draining (rolling update); retry on "
                                "another router replica (the same request_id resumes a request)")
        self.live += 1
        remaining = context.time_remaining()
        _CALLER_DEADLINE.set(None if remaining is None else time.monotonic() + remaining)
        resumable = NO_HANDOVER not in tuple(context.invocation_metadata() or ())
        stream = LiveStream(asyncio.current_task(), resumable)
        self.streams.add(stream)
        handed = sent = None  # the last message sent, when the stream was handed over / in any case
        try:
            try:
                # closed here, not when collected: a client that goes away stops the request's work at once
                async with contextlib.aclosing(self._run(request, context)) as messages:
                    async for message in messages:
                        stream.in_round = False
                        sent = message
                        yield message
                        if not message.finished and self._hand_over_now(stream):
                            handed = message
                            break
                        stream.in_round = True
            except asyncio.CancelledError:
                if not stream.handed:  # the caller went away (or its deadline passed)
                    raise
                asyncio.current_task().uncancel()  # the handover deadline: the round was withdrawn, say so
                handed = sent or router_pb2.GenerateResponse(request_id=request.request_id)
        except grpc.aio.AioRpcError as exc:  # every replica of a role failed: say so with a code the client retries
            code = grpc.StatusCode.UNAVAILABLE if exc.code() in RETRYABLE else grpc.StatusCode.INTERNAL
            await context.abort(code, f"an internal service failed ({exc.code().name}: {exc.details()}); retry with "
                                      "the same request_id to resume where the stream stopped")
        except (RedisConnectionError, RedisTimeoutError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the state store (Redis) is unreachable ({exc}); retry "
                                                             "with the same request_id to resume")
        finally:
            self.live -= 1
            self.streams.discard(stream)
        if handed is not None:
            self.handed_over += 1
            rid = handed.request_id or request.request_id
            delivered = handed.usage.completion_tokens if handed.HasField("usage") else 0
            resume = f"resume with request_id {rid}" if rid else "send the request again"
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{HANDED_OVER}: stream handed over after {delivered} "
                                                             f"tokens; {resume} on another router replica")

    async def Complete(self, request, context):
        texts, ids, last = [], [], None
        async for message in self.Generate(request, context):
            texts.append(message.text)
            ids += message.token_ids
            last = message
        return router_pb2.GenerateResponse(request_id=last.request_id, text="".join(texts), token_ids=ids,
                                           finished=True, finish_reason=last.finish_reason, usage=last.usage)
