"""A small asyncio Kubernetes API client on aiohttp (already a kopf dependency), for the objects the operator owns:
get, list by labels, create, JSON merge patch, delete, and create-or-patch ("apply") that writes only on drift.

kopf watches and patches the SpecFleet itself; this client is for the children (Deployments, Services,
ConfigMaps, Secrets) and the pods a scale-down drains. It logs in with kopf's own `ConnectionInfo`."""

from __future__ import annotations

import base64
import os
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

import aiohttp

KINDS: dict[str, tuple[str, str]] = {  # kind -> (API prefix, plural)
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Pod": ("/api/v1", "pods"),
    "SpecFleet": ("/apis/specfleet.io/v1alpha1", "specfleets"),
}
MERGE_PATCH = "application/merge-patch+json"


class KubeError(RuntimeError):
    """The API server refused a request; `status` is the HTTP status (404: not found, 409: conflict, ...)."""

    def __init__(self, status: int, method: str, path: str, message: str):
        super().__init__(f"{method} {path} failed with HTTP {status}: {message}")
        self.status = status


def object_path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: the operator handles {', '.join(KINDS)}")
    prefix, plural = KINDS[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name is not None:
        path += f"/{name}"
    if subresource is not None:
        path += f"/{subresource}"
    return path


def matches(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def drifted(desired: Any, live: Any) -> bool:
    """True when `live` differs from `desired` in any field desired sets (fields the server adds are ignored)."""
    if isinstance(desired, Mapping):
        if not isinstance(live, Mapping):
            return True
        return any(drifted(value, live.get(key)) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(live) != len(desired):
            return True
        return any(drifted(d, item) for d, item in zip(desired, live, strict=True))
    return desired != live


def _ssl_context(info: Any) -> ssl.SSLContext | bool:
    if getattr(info, "insecure", False):
        return False
    context = ssl.create_default_context(cafile=getattr(info, "ca_path", None))
    ca_data = getattr(info, "ca_data", None)
    if ca_data:
        context.load_verify_locations(cadata=(ca_data.decode() if isinstance(ca_data, bytes) else ca_data))
    cert_path, key_path = getattr(info, "certificate_path", None), getattr(info, "private_key_path", None)
    cert_data, key_data = getattr(info, "certificate_data", None), getattr(info, "private_key_data", None)
    if cert_data and key_data:  # load_cert_chain reads files only: write them to the writable /tmp
        folder = tempfile.mkdtemp(prefix="specfleet-operator-")
        cert_path, key_path = os.path.join(folder, "client.crt"), os.path.join(folder, "client.key")
        for path, data in ((cert_path, cert_data), (key_path, key_data)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as handle:
                handle.write(data if isinstance(data, bytes) else data.encode())
    if cert_path and key_path:
        context.load_cert_chain(cert_path, key_path)
    return context


class KubeClient:
    """One aiohttp session against one API server. Use `async with KubeClient.from_connection_info(info)`."""

    def __init__(self, server: str, headers: Mapping[str, str] | None = None, ssl_context: ssl.SSLContext | bool = True,
                 timeout_s: float = 30.0):
        self.server = server.rstrip("/")
        self._headers = dict(headers or {})
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_connection_info(cls, info: Any) -> KubeClient:
        """From a `kopf.ConnectionInfo` (what kopf's login handlers return)."""
        headers = {}
        if getattr(info, "token", None):
            headers["Authorization"] = f"{getattr(info, 'scheme', None) or 'Bearer'} {info.token}"
        elif getattr(info, "username", None):
            pair = f"{info.username}:{info.password or ''}".encode()
            headers["Authorization"] = f"Basic {base64.b64encode(pair).decode()}"
        return cls(str(info.server), headers, _ssl_context(info))

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None,
                       content_type: str = "application/json") -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self._session.request(method, self.server + path, json=body, params=params, headers=headers,
                                         ssl=self._ssl) as response:
            payload = await response.json(content_type=None) if response.content_length != 0 else {}
            if response.status >= 400:
                message = payload.get("message", "") if isinstance(payload, dict) else str(payload)
                raise KubeError(response.status, method, path, message)
            return payload if isinstance(payload, dict) else {}

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._request("GET", object_path(kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        """Objects of `kind` whose labels include `selector` (filtered here too, whatever the server did)."""
        text = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        reply = await self._request("GET", object_path(kind, namespace), params={"labelSelector": text})
        return [item for item in reply.get("items", []) if matches(item.get("metadata", {}).get("labels"), selector)]

    async def create(self, kind: str, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._request("POST", object_path(kind, namespace), dict(body))

    async def patch(self, kind: str, namespace: str, name: str, body: Mapping[str, Any],
                    subresource: str | None = None) -> dict[str, Any]:
        return await self._request("PATCH", object_path(kind, namespace, name, subresource), dict(body),
                                   content_type=MERGE_PATCH)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete it (its dependents are garbage-collected in the background); False when it was already gone."""
        try:
            await self._request("DELETE", object_path(kind, namespace, name),
                                {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise

    async def apply(self, body: Mapping[str, Any], namespace: str, live: Any = ...) -> str:
        """Create the object, or merge-patch it where it drifted from `body`; returns created|patched|unchanged.
        live: the object as already listed (None: known to be missing); left out, it is fetched."""
        kind, name = body["kind"], body["metadata"]["name"]
        if live is ...:
            live = await self.get(kind, namespace, name)
        if live is None:
            try:
                await self.create(kind, namespace, body)
                return "created"
            except KubeError as exc:
                if exc.status != 409:
                    raise
                live = await self.get(kind, namespace, name) or {}  # created meanwhile: patch it below
        if not drifted(body, live):
            return "unchanged"
        await self.patch(kind, namespace, name, body)
        return "patched"
