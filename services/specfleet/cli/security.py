"""`specfleet certs` (development TLS certificates) and `specfleet redis-acl` (a least-privilege Redis user)."""

from __future__ import annotations

import sys
from pathlib import Path

from specfleet.cli.options import positive_int


def cmd_certs(args) -> int:
    from specfleet.runtime.security import write_dev_certs

    try:
        files = write_dev_certs(args.dir, [h.strip() for h in args.hosts.split(",") if h.strip()], args.days)
    except (ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    for label, path in files.items():
        print(f"{label:>10}: {path}")
    return 0


def cmd_redis_acl(args) -> int:
    from specfleet.runtime.security import redis_acl_setuser, redis_password

    try:
        print(redis_acl_setuser(args.user, args.prefix, redis_password(args.password_file)))
    except (ValueError, OSError) as exc:
        sys.exit(f"error: {exc}")
    return 0



def add_parser(sub, fmt) -> None:
    p = sub.add_parser("certs", formatter_class=fmt, help="write a development CA and loopback TLS certificates",
                       description="Writes a throwaway CA (ca.pem) and a server (server.pem, server-key.pem) and "
                                   "client (client.pem, client-key.pem) certificate signed by it, for TLS / mTLS "
                                   "between fleet services on this machine; the CA's key is not kept. Development "
                                   "only: in a cluster use cert-manager or your own PKI. Needs the cryptography "
                                   "package.",
                       epilog="then: specfleet serve verifier --tls-cert DIR/server.pem --tls-key DIR/server-key.pem "
                              "--tls-client-ca DIR/ca.pem ...; specfleet serve router --internal-tls-ca DIR/ca.pem "
                              "--internal-tls-cert DIR/client.pem --internal-tls-key DIR/client-key.pem ...")
    p.add_argument("dir", type=Path, help="folder to write the PEM files into (created if missing)")
    p.add_argument("--hosts", default="127.0.0.1,localhost,::1",
                   help="comma-separated IPs / DNS names the server certificate is valid for")
    p.add_argument("--days", type=positive_int, default=30, help="validity in days")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("redis-acl", formatter_class=fmt, help="print a least-privilege Redis ACL user for one fleet",
                       description="Prints `ACL SETUSER NAME ...` granting only the commands the state store uses "
                                   "on keys PREFIX:* (no FLUSHALL, CONFIG, KEYS, ACL, no pub/sub channels); the "
                                   "password is given as its SHA-256, so the line holds no secret. Run it with "
                                   "redis-cli, or put it (without 'ACL SETUSER', as `user NAME ...`) in an ACL file; "
                                   "see docs/redis.md.",
                       epilog="then: SPECFLEET_REDIS_URL=redis://NAME:$(cat PASSWORD_FILE)@HOST:6379/0")
    p.add_argument("--user", required=True, help="the Redis user name")
    p.add_argument("--prefix", default="sf", help="the fleet's key prefix (--key-prefix of its services)")
    p.add_argument("--password-file", type=Path, required=True,
                   help="the user's password; a new random one is written there (mode 0600) if the file is missing")
    p.set_defaults(func=cmd_redis_acl)
