"""Redis key names, name validation and token-id packing for the specfleet state store.

KEY SCHEMA (``{p}`` is the prefix, default ``sf``; set one per release or test so fleets never share keys):

``{p}:req:{rid}`` — hash, one per request; the source of truth that lets any replica resume a request:
    ``prompt``         packed little-endian int32 token ids
    ``output``         packed little-endian int32 token ids committed so far
    ``offsets``        packed little-endian int32: ``offsets[r]`` = index in ``output`` where round ``r`` started
    ``round``          int, rounds committed so far (the next commit must name this round)
    ``status``         ``running`` | ``finished`` | ``failed``
    ``params``         JSON (sorted keys): temperature, top_p, top_k, seed, max_new_tokens, stop, ignore_eos, drafters
    ``finish_reason``  str (``""`` while running)
    ``created``/``updated``  unix ms, Redis server clock
    ``owner``          router pod id that created the request
  TTL: ``running_ttl_s`` (default 24 h, refreshed on every commit) while running, so an abandoned request cannot
  leak; ``finished_ttl_s`` (default 1 h) once finished or failed.

``{p}:hb:{role}:{pod}`` — string, heartbeat JSON with TTL (default 10 s): the load dict the pod sent (load,
  queue_depth, ``gpu``: NVML readings or null, ...) plus ``role``, ``pod``, ``ts_ms`` (server clock), ``ttl_s``,
  ``draining``.
``{p}:drain:{role}:{pod}`` — string ``1`` with TTL (default 1 h): the pod is draining (set by the operator or the
  pod itself); outlives heartbeats, is merged into them on read.
``{p}:scores`` — hash, field ``{domain_or_key}|{drafter}`` -> smoothed acceptance score (EMA, decimal string),
  for CoSine expertise routing. Drafter names never contain ``|``.
``{p}:stream:{name}`` — stream, a work queue with ONE consumer group; entries hold field ``d`` = payload bytes.
  Acknowledged entries are deleted, so the stream holds only work not yet done (delivered or not).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable

DEFAULT_PREFIX = "sf"

_PREFIX_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")  # role, pod, stream and group names: parsed back out of keys
_RID_MAX = 256
_SPACE = re.compile(r"\s")
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix) or prefix.endswith(":"):
        raise ValueError(f"bad key prefix {prefix!r}: 1-64 chars of [A-Za-z0-9._:-], not ending in ':'")
    return prefix


def check_name(kind: str, value: str) -> str:
    """Role, pod, stream, group and consumer names: [A-Za-z0-9._-], 1-128 chars (Kubernetes pod names fit)."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"bad {kind} {value!r}: 1-128 chars of [A-Za-z0-9._-]")
    return value


def check_rid(rid: str) -> str:
    """Request ids: 1-256 printable characters without whitespace."""
    if not isinstance(rid, str) or not 0 < len(rid) <= _RID_MAX or not rid.isprintable() or _SPACE.search(rid):
        raise ValueError(f"bad request id {rid!r}: 1-{_RID_MAX} printable characters without whitespace")
    return rid


def check_score_field(key: str, drafter: str) -> str:
    """The scores hash field for (key, drafter); the drafter may not contain '|', the key may."""
    if not isinstance(key, str) or not key or not key.isprintable():
        raise ValueError(f"bad score key {key!r}: a non-empty printable string")
    if not isinstance(drafter, str) or not drafter or "|" in drafter or not drafter.isprintable():
        raise ValueError(f"bad drafter name {drafter!r}: a non-empty printable string without '|'")
    return f"{key}|{drafter}"


def glob_escape(text: str) -> str:
    """Escape text for a Redis MATCH / KEYS glob pattern."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def pack_ids(ids: Iterable[int]) -> bytes:
    """Token ids as packed little-endian int32 bytes (the ``prompt``/``output``/``offsets`` encoding)."""
    values = [int(i) for i in ids]
    try:
        return struct.pack(f"<{len(values)}i", *values)
    except struct.error as exc:
        raise ValueError(f"token ids must fit in int32 [{INT32_MIN}, {INT32_MAX}]: {exc}") from None


def unpack_ids(data: bytes | None) -> list[int]:
    if not data:
        return []
    if len(data) % 4:
        raise ValueError(f"packed int32 field has {len(data)} bytes, not a multiple of 4")
    return list(struct.unpack(f"<{len(data) // 4}i", data))


class Keys:
    """Key names under one prefix; every name part is validated so keys can be parsed back and never collide."""

    def __init__(self, prefix: str = DEFAULT_PREFIX):
        self.prefix = check_prefix(prefix)

    def request(self, rid: str) -> str:
        return f"{self.prefix}:req:{check_rid(rid)}"

    def heartbeat(self, role: str, pod: str) -> str:
        return f"{self.prefix}:hb:{check_name('role', role)}:{check_name('pod', pod)}"

    def heartbeat_pattern(self, role: str | None = None) -> str:
        """SCAN MATCH pattern for all heartbeats, or those of one role."""
        base = glob_escape(f"{self.prefix}:hb:")
        return base + (glob_escape(check_name("role", role)) + ":*" if role is not None else "*")

    def parse_heartbeat(self, key: str) -> tuple[str, str]:
        """(role, pod) of a heartbeat key."""
        role, _, pod = key[len(self.prefix) + len(":hb:") :].partition(":")
        return role, pod

    def draining(self, role: str, pod: str) -> str:
        return f"{self.prefix}:drain:{check_name('role', role)}:{check_name('pod', pod)}"

    def scores(self) -> str:
        return f"{self.prefix}:scores"

    def stream(self, name: str) -> str:
        return f"{self.prefix}:stream:{check_name('stream name', name)}"

    def everything_pattern(self) -> str:
        """SCAN MATCH pattern for every key under this prefix (cleanup of a test or a retired release)."""
        return glob_escape(self.prefix) + ":*"
