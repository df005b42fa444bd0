"""Shared-tier services on loopback for benches and tests: a redis-server, and a Mooncake Store
(a ``mooncake_master`` with its built-in HTTP metadata server, and one ``mooncake_client`` that
holds the memory segment). Each can be stopped and started again (an outage); Mooncake's holder
re-registers its segment with the new master by itself."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """Terminate ``proc``, killing it if it has not exited after ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mooncake_binary(name: str) -> str | None:
    """The binary installed beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


class RedisServer:
    """A redis-server on a free loopback port, without persistence (a restart empties it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    close = stop


class MooncakeServer:
    """Mooncake Store's master and one segment holder; `stop` stops the master only."""

    def __init__(self, folder: Path, segment: str = "256MB") -> None:
        self.folder = folder
        self.rpc, self.meta, self.admin, self.holder_port = (free_port() for _ in range(4))
        self.segment = segment
        self.url = (f"mooncake://127.0.0.1:{self.rpc}?metadata=http://127.0.0.1:{self.meta}/metadata"
                    f"&admin=http://127.0.0.1:{self.admin}&host=127.0.0.1&buffer=64MiB")
        self.master: subprocess.Popen | None = None
        self.holder: subprocess.Popen | None = None

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.folder / log, "ab")
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def _admin(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=1) as answer:
                return answer.read().decode()
        except OSError:
            return None

    def _wait(self, ready, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not start; logs in {self.folder}")

    def start(self) -> None:
        """The master, and the segment holder if it is not running."""
        self.master = self._spawn([
            mooncake_binary("mooncake_master") or "mooncake_master", f"--rpc_port={self.rpc}",
            "--rpc_address=127.0.0.1", "--enable_http_metadata_server=true",
            f"--http_metadata_server_port={self.meta}", "--http_metadata_server_host=127.0.0.1",
            "--metrics_host=127.0.0.1", f"--metrics_port={self.admin}", "--default_kv_lease_ttl=100",
        ], "master.log")
        self._wait(lambda: self._admin("/health") is not None, "mooncake_master")
        if self.holder is None:
            self.holder = self._spawn([
                mooncake_binary("mooncake_client") or "mooncake_client", f"--global_segment_size={self.segment}",
                f"--master_server_address=127.0.0.1:{self.rpc}", f"--port={self.holder_port}",
                f"--metadata_server=http://127.0.0.1:{self.meta}/metadata", "--host=127.0.0.1",
            ], "holder.log")
        self._wait(lambda: bool((self._admin("/get_all_segments") or "").strip()), "the segment holder")

    def stop(self) -> None:
        """Stops the master only (an outage); `close` stops both."""
        if self.master is not None:
            self.master.terminate()
            self.master.wait(timeout=10)
            self.master = None

    def close(self) -> None:
        self.stop()
        if self.holder is not None:
            stop_process(self.holder, 10)
            self.holder = None


def start_service(backend: str, folder: Path) -> RedisServer | MooncakeServer:
    """A started redis-server (``redis``) or Mooncake Store (``mooncake``) in ``folder``."""
    server: RedisServer | MooncakeServer = RedisServer(folder) if backend == "redis" else MooncakeServer(folder)
    server.start()
    return server
