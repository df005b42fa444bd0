"""A real uvicorn server on a loopback port around a `RagService` built on the session's SmolLM2."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from chunkcache.api import RagService, create_app
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.model import LoadedModel
from tests.conftest import free_port


@contextmanager
def running(service: RagService) -> Iterator[str]:
    """Serve ``service`` with uvicorn in a thread; yields the base URL; stops it after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


ServiceFactory = Callable[..., RagService]


@pytest.fixture()
def make_service(smollm2: LoadedModel, tmp_path: Path) -> Iterator[ServiceFactory]:
    """Services on the session's model; each is closed after the test (a service on the CPU
    shares torch's threads out while it runs: the next test gets them back)."""
    made: list[RagService] = []

    def make(index=None, **settings) -> RagService:  # type: ignore[no-untyped-def]
        s = Settings.load(env={}, store_path=tmp_path / "store", **settings)
        made.append(RagService(s, engine=ChunkCacheEngine(s, model=smollm2), index=index))
        return made[-1]

    yield make
    for service in reversed(made):
        service.close()
