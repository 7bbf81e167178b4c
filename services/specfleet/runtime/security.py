"""Secrets and transport security for the fleet: tokens read from files or the environment (never argv), TLS / mTLS
credentials for servers and the router's internal channels, `specfleet certs` (a throwaway CA with loopback
server and client certificates for development) and `specfleet redis-acl` (a least-privilege Redis ACL user)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import secrets
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV, INTERNAL_TOKEN_ENV = "SPECFLEET_TOKEN", "SPECFLEET_INTERNAL_TOKEN"
TOKEN_FILE_ENV, INTERNAL_TOKEN_FILE_ENV = "SPECFLEET_TOKEN_FILE", "SPECFLEET_INTERNAL_TOKEN_FILE"


# ---------------------------------------------------------------- tokens

def read_tokens(path: str | Path) -> tuple[str, ...]:
    """The tokens in a file, one a line (blank lines and `#` comments skipped): a Kubernetes Secret mounted as a file,
    or several callers' tokens for a router (each gets its own rate limit). Raises ValueError saying what to fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ValueError(f"the token file {path} holds no token (one token a line)")
    bad = [i for i, t in enumerate(tokens) if any(c.isspace() for c in t) or not t.isprintable()]
    if bad:
        raise ValueError(f"the token file {path}: token {bad[0] + 1} has whitespace or unprintable characters")
    return tokens


def resolve_tokens(value: str | None, file: str | Path | None, flag: str, env: str | None = None,
                   file_env: str | None = None) -> tuple[str, ...]:
    """Tokens from `--X` or `--X-file`, else from the environment variables `env` / `file_env` (read here, not as
    argparse defaults, which --help would print); giving both a token and a file is an error."""
    if not value and not file:
        value = os.environ.get(env) if env else None
        file = os.environ.get(file_env) if file_env else None
    if value and file:
        raise ValueError(f"give {flag} or {flag}-file, not both")
    if file:
        return read_tokens(file)
    return (value,) if value else ()


def single(tokens: tuple[str, ...] | str | None) -> str | None:
    """The one token a client sends (the first of several)."""
    if isinstance(tokens, str) or tokens is None:
        return tokens or None
    return tokens[0] if tokens else None


def token_tuple(tokens: tuple[str, ...] | list[str] | str | None) -> tuple[str, ...]:
    if not tokens:
        return ()
    return (tokens,) if isinstance(tokens, str) else tuple(tokens)


# ---------------------------------------------------------------- TLS

def _read_pem(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"the {what} {path} is not PEM (expected a '-----BEGIN ...' block)")
    return data


_SERVER_PEMS = ("TLS certificate", "TLS key", "client CA certificate")
_CHANNEL_PEMS = ("internal CA certificate", "internal client certificate", "internal client key")


def _read_pems(paths, what: tuple[str, ...]) -> tuple[bytes | None, ...]:
    return tuple(_read_pem(path, name) for path, name in zip(paths, what, strict=True))


def _server_configuration(cert: bytes, key: bytes, ca: bytes | None):
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def _stamp(paths: tuple[Path | None, ...]) -> tuple | None:
    """What changes when any of the files is replaced (a Kubernetes Secret volume swaps a symlink: new inode), or
    None when one cannot be read right now."""
    try:
        stats = [None if p is None else p.stat() for p in paths]
    except OSError:
        return None
    return tuple(None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)


@dataclass(frozen=True)
class ServerTls:
    """A server's certificate and key; with `client_ca`, callers must present a certificate signed by it (mTLS).
    Made from files (`from_files`), it re-reads them when they change, so a renewed certificate (cert-manager
    rewriting a mounted Secret) serves new handshakes without a restart; a half-written or invalid set is ignored
    and the last good one kept."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None
    paths: tuple[Path | None, Path | None, Path | None] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_files(cls, cert: str | Path | None, key: str | Path | None,
                   client_ca: str | Path | None = None) -> ServerTls | None:
        if cert is None and key is None:
            if client_ca is not None:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (the server's own certificate)")
            return None
        if cert is None or key is None:
            raise ValueError("give both --tls-cert and --tls-key (PEM files), or neither")
        paths = (Path(cert), Path(key), None if client_ca is None else Path(client_ca))
        return cls(*_read_pems(paths, _SERVER_PEMS), paths=paths)

    def credentials(self) -> grpc.ServerCredentials:
        require = self.client_ca is not None
        if self.paths is None:
            return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                               require_client_auth=require)
        paths, lock = self.paths, threading.Lock()
        seen = {"stamp": _stamp(paths)}

        def fetch():  # called by gRPC before each handshake: a stat of three files, a read only when they changed
            stamp = _stamp(paths)
            if stamp is None or stamp == seen["stamp"]:
                return None
            with lock:
                if stamp == seen["stamp"]:
                    return None
                try:
                    config = _server_configuration(*_read_pems(paths, _SERVER_PEMS))
                except Exception as exc:  # keep serving with the last good set (and say so once per change)
                    seen["stamp"] = stamp
                    log.warning("TLS files changed but cannot be used (%s); keeping the last certificate", exc)
                    return None
                seen["stamp"] = stamp
                log.info("TLS certificate reloaded from %s", paths[0])
                return config

        return grpc.dynamic_ssl_server_credentials(_server_configuration(self.cert, self.key, self.client_ca),
                                                   fetch, require_client_authentication=require)


@dataclass(frozen=True)
class ChannelTls:
    """How the router reaches internal services over TLS: the CA that signed their certificates (None: system roots),
    the router's own client certificate and key for mTLS, and optionally the name their certificates carry when it
    differs from the address dialled (pod IPs found in heartbeats)."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None
    paths: tuple[Path | None, Path | None, Path | None] | None = field(default=None, compare=False, repr=False)
    stamp: tuple | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_files(cls, ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None,
                   server_name: str | None = None) -> ChannelTls | None:
        if ca is None and cert is None and key is None:
            return None
        if (cert is None) != (key is None):
            raise ValueError("give both --internal-tls-cert and --internal-tls-key (the router's client "
                             "certificate), or neither")
        paths = tuple(None if p is None else Path(p) for p in (ca, cert, key))
        stamp = _stamp(paths)
        return cls(*_read_pems(paths, _CHANNEL_PEMS), server_name or None, paths, stamp)

    def reloaded(self) -> ChannelTls | None:
        """The files as they are now, when they were replaced since these were read (a renewed certificate), else
        None (also while one cannot be read). Replaced files that are not PEM give this one's contents back, with the
        new stamp, so the warning comes once. Compare the result with this one (`!=` compares contents) to know
        whether anything but the files' identity changed."""
        if self.paths is None:
            return None
        stamp = _stamp(self.paths)
        if stamp is None or stamp == self.stamp:
            return None
        try:
            ca, cert, key = _read_pems(self.paths, _CHANNEL_PEMS)
            fresh = replace(self, ca=ca, cert=cert, key=key, stamp=stamp)
        except ValueError as exc:  # the same contents under the new stamp: said once, nothing rebuilt
            log.warning("internal TLS files changed but cannot be used (%s); keeping the last ones", exc)
            return replace(self, stamp=stamp)
        return fresh

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def write_dev_certs(folder: str | Path, hosts: list[str] | None = None, days: int = 30) -> dict[str, Path]:
    """Writes a throwaway CA plus a server and a client certificate signed by it into `folder` (keys mode 0600):
    ca.pem, server.pem, server-key.pem, client.pem, client-key.pem. For development on loopback only: in a cluster
    use cert-manager or your own PKI. Needs the `cryptography` package."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise ValueError("`specfleet certs` needs the cryptography package: pip install 'specfleet[tls]'") from None
    hosts = hosts or ["127.0.0.1", "localhost", "::1"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "specfleet dev"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("specfleet dev CA")).issuer_name(name("specfleet dev CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, sans: list[x509.GeneralName]):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client, client_key = leaf("specfleet-router", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("specfleet-router")])

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    files = {"ca": ("ca.pem", ca.public_bytes(serialization.Encoding.PEM), 0o644),
             "server": ("server.pem", server.public_bytes(serialization.Encoding.PEM), 0o644),
             "server_key": ("server-key.pem", pem_key(server_key), 0o600),
             "client": ("client.pem", client.public_bytes(serialization.Encoding.PEM), 0o644),
             "client_key": ("client-key.pem", pem_key(client_key), 0o600)}
    out = {}
    for label, (filename, data, mode) in files.items():
        path = folder / filename
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)
        out[label] = path
    return out  # the CA's key is never written: nothing more can be signed with this CA


# ---------------------------------------------------------------- Redis ACL

# Every command the state store (state/store.py, its Lua scripts in state/lua.py, redis-py's script loading) and the
# heartbeat publisher send, and nothing else: no FLUSHALL, CONFIG, KEYS, DEBUG, MODULE, SHUTDOWN, ACL, CLIENT KILL...
REDIS_COMMANDS = (
    # health checks (redis-py's CLIENT SETINFO on connect may be refused: it ignores that)
    "ping", "time", "echo",
    "evalsha", "eval", "script|load", "script|exists",  # the Lua scripts (state/lua.py), loaded on first use
    "exists", "hset", "hget", "hgetall", "hscan", "expire",  # request hashes and scores (also inside the scripts)
    "get", "set", "mget", "del", "unlink", "scan",  # heartbeats, drain marks, cleanup
    "multi", "exec", "discard",  # transactional pipelines
    "xadd", "xgroup|create", "xreadgroup", "xread", "xack", "xdel", "xautoclaim", "xlen", "xpending", "xrange",
    "xclaim",  # a busy verifier keeping its jobs claimed (StateStore.keep_claims)
)


def redis_password(path: str | Path) -> str:
    """The password in `path`, or a new random one written there (mode 0600) when the file does not exist."""
    path = Path(path)
    if path.exists():
        password = path.read_text(encoding="utf-8").strip()
        if not password:
            raise ValueError(f"the password file {path} is empty")
        return password
    password = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
    return password


def redis_acl_rules(prefix: str, password: str) -> list[str]:
    """The ACL rules of a user that can run the state store under `prefix` and nothing else."""
    from specfleet.state.keys import check_prefix

    check_prefix(prefix)  # also guarantees no glob characters in the key pattern
    digest = hashlib.sha256(password.encode()).hexdigest()  # the rule carries a hash, never the password
    return ["reset", "on", f"#{digest}", f"~{prefix}:*", "resetchannels", "-@all",
            *(f"+{command}" for command in REDIS_COMMANDS)]


def redis_acl_setuser(user: str, prefix: str, password: str) -> str:
    """`ACL SETUSER user rule...`, ready for redis-cli or an ACL file (`user ...` lines take the same rules)."""
    if not user or any(c.isspace() for c in user) or not user.isprintable():
        raise ValueError(f"bad Redis user name {user!r}: non-empty, printable, no spaces")
    return " ".join(["ACL", "SETUSER", user, *redis_acl_rules(prefix, password)])
