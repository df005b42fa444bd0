"""The service under concurrent requests: answers batched together equal answers alone, a request
larger than the whole KV budget is a 413, and a full queue is a 429 at once, never a hang."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import torch

from tests.api.conftest import ServiceFactory, running

DOCS = [{"text": "The Rhine flows from the Alps through Basel, Strasbourg and Cologne to the North Sea."},
        {"text": "Cologne is famous for its cathedral, whose towers were finished in 1880."},
        {"text": "Basel lies where Switzerland, France and Germany meet; it has a paper museum."}]
QUESTIONS = ["Describe the river Rhine.", "When were the towers of Cologne cathedral finished?",
             "Tell me about Basel in detail."]


def _until(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _body(question: str, max_tokens: int = 10) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}], "documents": DOCS, "max_tokens": max_tokens}


def test_concurrent_answers_equal_answers_alone_and_limits_are_4xx(make_service: ServiceFactory) -> None:
    # max_queue 3: all three concurrent requests may wait at once; SmolLM2 fp32: about 900 tokens
    service = make_service(max_batch=4, max_queue=3, kv_budget="40MiB")
    with running(service) as url, httpx.Client(base_url=url, timeout=120) as client:
        def ask(body: dict[str, Any]) -> httpx.Response:
            return client.post("/v1/chat/completions", json=body)

        alone = [ask(_body(q)).json()["choices"][0]["message"]["content"] for q in QUESTIONS]
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            replies = list(pool.map(ask, map(_body, QUESTIONS)))
        assert [r.status_code for r in replies] == [200] * len(QUESTIONS), [r.text for r in replies]
        together = [r.json()["choices"][0]["message"]["content"] for r in replies]
        assert together == alone

        too_big = ask(_body(QUESTIONS[0], max_tokens=2000))
        assert too_big.status_code == 413 and "kv_budget" in too_big.json()["error"]["message"]

        gate = threading.Event()
        held = service.run(lambda: gate.wait(60))  # the engine thread is busy: requests queue
        _until(lambda: service.scheduler.busy)
        with ThreadPoolExecutor(3) as pool:
            waiting = [pool.submit(ask, _body(q, 2)) for q in QUESTIONS]
            _until(lambda: service.scheduler.waiting == 3)
            refused = ask(_body(QUESTIONS[0], 2))
            gate.set()
            statuses = [w.result(timeout=120).status_code for w in waiting]
        held.result(timeout=10)
        assert refused.status_code == 429 and "busy" in refused.json()["error"]["message"]
        assert statuses == [200, 200, 200]
    assert service.scheduler.pool is not None and service.scheduler.pool.used == 0


def test_on_the_cpu_new_requests_are_fused_beside_the_decoding_on_shared_cores(make_service: ServiceFactory) -> None:
    before = torch.get_num_threads()
    one_at_a_time = make_service(max_batch=1)
    assert one_at_a_time.scheduler.admitters == 0 and torch.get_num_threads() == before
    one_at_a_time.close()
    between_steps = make_service(max_batch=4, fusion_workers=0)
    assert between_steps.scheduler.admitters == 0 and torch.get_num_threads() == before
    between_steps.close()
    service = make_service(max_batch=4)
    try:
        assert service.scheduler.admitters == 3
        assert torch.get_num_threads() == max(1, before // 4)  # three fusing teams and the decoding one
    finally:
        service.close()
    assert torch.get_num_threads() == before
