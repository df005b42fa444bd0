"""The remote tier on Mooncake Store (``mooncake://MASTER:PORT?...``): the KV store that vLLM's
and SGLang's connectors, LMCache and Dynamo share caches through.

A ``mooncake_master`` keeps the index of objects; clients contribute memory segments that hold
them and move bytes over TCP (or RDMA). This process joins as a client; by default it
contributes no memory (``segment=0``), so that the caches outlive any one server: run
``mooncake_client --global_segment_size=8GB`` beside the master (or give each server a segment).

Each entry is two objects: ``NS:e:KEY``, the checksummed, self-describing codec bytes, and
``NS:m:KEY``, a small JSON record (bytes, tokens, time) for `cache stats`; each is written whole
(Mooncake publishes an object only once all of it is in place). Listing reads the master's
admin endpoint. An outage (the master or a segment holder unreachable) is a miss with one
warning and a retry after ``retry_s`` (`ServiceGuard`); a call that gets no answer within
``timeout_s`` is an outage too; capacity and eviction are the master's
(its memory watermark).

URL options (all optional): ``metadata`` (transfer metadata server, default the master's
built-in one, ``http://MASTER:8080/metadata``), ``admin`` (``http://MASTER:9003``), ``segment``
and ``buffer`` (bytes this process contributes / uses for transfers, ``512MiB``), ``protocol``
(``tcp`` or ``rdma``), ``device`` (RDMA devices), ``host`` (this machine's address as the others
reach it; default the one it reaches the master from), ``replicas``."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from urllib.parse import parse_qs, urlsplit

from chunkcache.codec import KVCodec
from chunkcache.codec.base import peek_tokens
from chunkcache.errors import InvalidInputError
from chunkcache.store.policy import LRU, EntryInfo, TierStats, parse_bytes
from chunkcache.store.remote import MOONCAKE_SCHEME, RemoteTier, ServiceDown, ServiceGuard, ServiceRefused

log = logging.getLogger(__name__)
T = TypeVar("T")

# Mooncake's error codes (mooncake-store/include/types.h) that this tier tells apart
OBJECT_NOT_FOUND = -704
# the master or the segment holding an object cannot be reached: an outage, not a refusal
OUTAGE_CODES = {-900: "RPC to the master failed", -800: "transfer from a segment failed",
                -101: "segment not found", -103: "client not found"}
# refusals worth a hint
REFUSAL_HINTS = {-200: "no free space in any segment: give the store more memory (mooncake_client "
                       "--global_segment_size, or segment= on the servers); the master evicts past its watermark"}
_OPTIONS = ("metadata", "admin", "segment", "buffer", "protocol", "device", "host", "replicas")


class _NoAnswer(ServiceDown):
    """A call given up after ``timeout_s`` (not retried: it would wait as long again)."""


@dataclass(frozen=True)
class MooncakeURL:
    """What a ``mooncake://`` URL says (module docstring)."""

    master: str
    metadata: str
    admin: str
    segment: int
    buffer: int
    protocol: str
    device: str
    host: str
    replicas: int

    @classmethod
    def parse(cls, url: str) -> MooncakeURL:
        if not url.startswith(MOONCAKE_SCHEME):
            raise InvalidInputError(f"a Mooncake remote_url starts with {MOONCAKE_SCHEME}, got {url!r}")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise InvalidInputError(f"a Mooncake remote_url names the master as mooncake://HOST:PORT, got {url!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = sorted(set(query) - set(_OPTIONS))
        if unknown:
            raise InvalidInputError(f"unknown Mooncake remote_url option(s) {', '.join(unknown)}; "
                                    f"known: {', '.join(_OPTIONS)}")
        host = parts.hostname
        protocol = query.get("protocol", "tcp")
        if protocol not in ("tcp", "rdma"):
            raise InvalidInputError(f"Mooncake protocol must be tcp or rdma, got {protocol!r}")
        try:
            replicas = int(query.get("replicas", "1"))
        except ValueError:
            replicas = 0
        if replicas < 1:
            raise InvalidInputError(f"Mooncake replicas must be a whole number >= 1, got {query['replicas']!r}")
        return cls(
            master=f"{host}:{port}",
            metadata=query.get("metadata", f"http://{host}:8080/metadata"),
            admin=query.get("admin", f"http://{host}:9003").rstrip("/"),
            segment=parse_bytes(query.get("segment", "0")) or 0,
            buffer=parse_bytes(query.get("buffer", "512MiB")) or 0,
            protocol=protocol,
            device=query.get("device", ""),
            host=query.get("host", "") or _local_address(host, port),
            replicas=replicas,
        )


def _local_address(master_host: str, port: int) -> str:
    """The address this machine reaches the master from (what the other clients dial back)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_host, port))  # UDP: picks the route, sends nothing
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class MooncakeStore(RemoteTier):
    """The `remote` tier on Mooncake Store (module docstring)."""

    def __init__(self, url: str, codec: KVCodec, namespace: str = "chunkcache", timeout_s: float = 2.0,
                 retry_s: float = 5.0) -> None:
        self.config = MooncakeURL.parse(url)
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as exc:
            raise InvalidInputError(
                "the Mooncake remote tier needs Mooncake's client: pip install 'chunkcache[mooncake]' "
                "(mooncake-transfer-engine-non-cuda; mooncake-transfer-engine with CUDA) and the system's "
                f"libibverbs1 (apt-get install libibverbs1); import failed: {exc}"
            ) from None
        self._factory = MooncakeDistributedStore
        self._replicate = ReplicateConfig()
        self._replicate.replica_num = self.config.replicas
        self.url = url
        self.codec = codec
        self.budget: int | None = None  # capacity is the segments'; the master evicts past its watermark
        self.policy = LRU()
        self.stats = TierStats()
        self._ns = namespace
        self.guard = ServiceGuard(url, self.stats, retry_s)
        self._client: Any = None
        self._setup_lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mooncake")
        self._timeout_s = timeout_s

    def _connected(self) -> Any:
        """The Mooncake client, set up on first use. Mooncake's setup holds the interpreter's lock
        while it retries an unreachable master (a minute or more), so the master's port is tried
        first, within ``timeout_s``: a master down at start is an outage like any other."""
        if self._client is not None:
            return self._client
        with self._setup_lock:
            if self._client is None:
                c = self.config
                host, port = c.master.rsplit(":", 1)
                try:
                    socket.create_connection((host, int(port)), timeout=self._timeout_s).close()
                except OSError as exc:
                    raise ServiceDown(f"master {c.master} unreachable: {exc}") from None
                client = self._factory()
                code = client.setup(c.host, c.metadata, c.segment, c.buffer, c.protocol, c.device, c.master)
                if code != 0:
                    raise ServiceDown(f"setup against master {c.master} failed (code {code})")
                self._client = client
        return self._client

    def _call(self, what: str, fn: Callable[[Any], T], default: T) -> T:
        """``fn(client)`` through the outage rule. Mooncake's calls wait without limit on a master
        that stopped answering (they do release the interpreter), so each runs on an I/O thread
        and is given up as an outage after ``timeout_s``."""
        def bounded() -> T:
            client = self._connected()

            def once() -> T:
                try:
                    return self._io.submit(fn, client).result(timeout=self._timeout_s)
                except FutureTimeout:
                    raise _NoAnswer(f"no answer within {self._timeout_s:.1f} s") from None

            # a restarted master refuses a client's first calls while it reconnects: three quick
            # retries (0.1, 0.2, 0.4 s apart) before the call counts as an outage
            for pause in (0.1, 0.2, 0.4):
                try:
                    return once()
                except _NoAnswer:
                    raise
                except ServiceDown:
                    time.sleep(pause)
            return once()

        return self.guard.call(what, bounded, default)

    @staticmethod
    def _check(code: int, what: str) -> int:
        """``code`` when it is a result (>= 0); an outage or refusal otherwise."""
        if code >= 0:
            return code
        if code in OUTAGE_CODES:
            raise ServiceDown(f"{OUTAGE_CODES[code]} (code {code})")
        hint = REFUSAL_HINTS.get(code)
        raise ServiceRefused(f"{what} failed with Mooncake error {code}" + (f" ({hint})" if hint else ""))

    # --- reads ---------------------------------------------------------------------------
    def get_bytes(self, key: str) -> bytes | None:
        def read(client: Any) -> bytes | None:
            data = client.get(self._entry(key))
            if data:
                return bytes(data)
            # an empty answer is a miss or a failure: the size query tells them apart
            code = client.get_size(self._entry(key))
            if code == OBJECT_NOT_FOUND:
                return None
            self._check(code, "get")
            raise ServiceRefused(f"get of an object of {code} bytes returned nothing")

        return self._read(key, self._call("get", read, None))

    def contains(self, key: str) -> bool:
        return bool(self._call("exists", lambda c: self._check(c.is_exist(self._entry(key)), "exists"), 0))

    # --- writes --------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, tokens: int | None = None) -> None:
        start = time.perf_counter()
        meta = json.dumps({"bytes": len(data), "tokens": peek_tokens(data) if tokens is None else tokens,
                           "time": time.time()}).encode()

        stored = self._sealed(key, data)

        def write(client: Any) -> bool:
            self._check(client.upsert(self._entry(key), stored, self._replicate), "put")
            self._check(client.upsert(self._meta(key), meta, self._replicate), "put")
            return True

        if self._call("put", write, False):
            self._written(start, len(data))

    def delete(self, key: str) -> None:
        def remove(client: Any) -> None:
            for name in (self._entry(key), self._meta(key)):
                # force: a reader's lease must not keep a corrupt or evicted entry alive
                code = client.remove(name, True)
                if code != OBJECT_NOT_FOUND:
                    self._check(code, "delete")

        self._call("delete", remove, None)

    # --- listing -------------------------------------------------------------------------
    def keys(self) -> Iterator[str]:
        prefix = f"{self._ns}:e:"

        def scan(_: Any) -> list[str]:
            try:
                with urllib.request.urlopen(f"{self.config.admin}/get_all_keys", timeout=10) as answer:
                    text = answer.read().decode()
            except (urllib.error.URLError, OSError) as exc:
                raise ServiceDown(f"admin endpoint {self.config.admin}: {exc}") from exc
            return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]

        return iter(self._call("scan", scan, []))

    def infos(self) -> list[EntryInfo]:
        keys = list(self.keys())
        if not keys:
            return []
        found = self._call("infos", lambda c: c.get_batch([self._meta(k) for k in keys]), [b""] * len(keys))
        out = []
        for key, raw in zip(keys, found):
            try:
                meta = json.loads(bytes(raw)) if raw else {}
            except ValueError:
                meta = {}
            out.append(self._info(key, meta))
        return out

    def close(self) -> None:
        self._io.shutdown(wait=False)
        if self._client is not None:
            client, self._client = self._client, None
            client.close()
