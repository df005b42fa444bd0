"""The service's door: bodies over ``max_body`` refused before they are read, whether they say
their length or are sent chunked; a 500 tells the client an error id, never the exception."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import ServiceFactory, running

QUESTION = {"query": "When was the mill built?", "documents": [{"id": "mill", "text": "The mill was built in 1820."}],
            "max_tokens": 2}


def _status_line(url: str, head: bytes, body: bytes = b"") -> bytes:
    address = httpx.URL(url)
    with socket.create_connection((address.host, address.port), timeout=30) as client:
        client.sendall(head + body)
        return client.recv(65536).split(b"\r\n", 1)[0]


def test_a_body_over_the_limit_is_refused_before_it_is_read(make_service: ServiceFactory) -> None:
    with running(make_service(max_body="4KiB")) as url:
        assert httpx.post(f"{url}/v1/rag/answer", json=QUESTION, timeout=120).status_code == 200
        padded = QUESTION | {"documents": [{"id": "big", "text": "x" * 5000}]}
        refused = httpx.post(f"{url}/v1/rag/answer", json=padded, timeout=30)
        assert refused.status_code == 413 and "max_body" in refused.json()["error"]["message"]
        # A client that announces 1 GiB and sends nothing more gets its answer at once: nothing is waited for.
        start = time.monotonic()
        line = _status_line(url, b"POST /v1/rag/answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 1073741824\r\n\r\n")
        assert line.endswith(b"413 Request Entity Too Large") or b" 413 " in line, line
        assert time.monotonic() - start < 10

        def chunks() -> Iterator[bytes]:
            yield b'{"query": "a", "documents": [{"text": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}]}'

        chunked = httpx.post(f"{url}/v1/rag/answer", content=chunks(), headers={"content-type": "application/json"},
                             timeout=30)
        assert chunked.status_code == 413
        small = httpx.post(f"{url}/v1/rag/answer", content=iter([json.dumps(QUESTION).encode()]),
                           headers={"content-type": "application/json"}, timeout=120)
        assert small.status_code == 200, small.text  # a chunked body under the limit is answered


def test_a_server_error_names_an_id_not_the_exception(make_service: ServiceFactory, caplog: pytest.LogCaptureFixture) -> None:
    service = make_service()

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("secret detail /srv/private/path")

    service.retrieve = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR), running(service) as url:
        failed = httpx.post(f"{url}/v1/retrieve", json={"query": "mill"}, timeout=30)
        metrics = httpx.get(f"{url}/metrics").text
    assert failed.status_code == 500
    message = failed.json()["error"]["message"]
    assert "secret" not in failed.text and "RuntimeError" not in failed.text
    ref = message.split("id ")[1].split(",")[0]
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)  # the log has the rest
    assert 'chunkcache_requests_total{endpoint="/v1/retrieve",status="500"} 1.0' in metrics


def test_the_schema_states_the_limits_and_the_server_keeps_to_its_types(make_service: ServiceFactory) -> None:
    service = make_service(max_tokens_limit=64, max_documents=3, max_document_chars=500)
    user = [{"role": "user", "content": "When?"}]
    docs = QUESTION["documents"]
    with running(service) as url:
        schema = httpx.get(f"{url}/openapi.json").json()["components"]["schemas"]
        chat = schema["ChatCompletionRequest"]
        assert {"maximum": 64} .items() <= next(b for b in chat["properties"]["max_tokens"]["anyOf"]
                                               if b.get("type") == "integer").items()
        assert next(b for b in chat["properties"]["documents"]["anyOf"] if b.get("type") == "array")["maxItems"] == 3
        assert schema["DocumentIn"]["properties"]["text"]["maxLength"] == 500
        assert {"required": ["documents", "doc_ids"]} in chat["not"]["anyOf"]
        for bad in ({"max_tokens": True}, {"stream": "yes"}, {"temperature": "0.5"}, {"documents": None, "doc_ids": ["a"]},
                    {"logprobs": True}, {"stop": ["a"] * 5}):
            body = {"messages": user, "documents": docs} | bad
            refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
            assert refused.status_code == 400, (bad, refused.text)
        ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": user, "documents": docs, "max_tokens": 2,
                                                             "temperature": 0, "logprobs": False}, timeout=120)
        assert ok.status_code == 200, ok.text  # an int where a float is asked, features in their "off" form


def test_a_request_over_the_token_budget_is_refused_whatever_its_source(make_service: ServiceFactory) -> None:
    long_doc = {"id": "long", "text": "The mill turned the wheel of the old town. " * 40}  # ~400 tokens
    with running(make_service(max_request_tokens=200)) as url:
        assert httpx.post(f"{url}/v1/rag/answer", json=QUESTION, timeout=120).status_code == 200
        answer = httpx.post(f"{url}/v1/rag/answer", json=QUESTION | {"documents": [long_doc]}, timeout=120)
        assert answer.status_code == 413 and "max_request_tokens" in answer.json()["error"]["message"]
        question = httpx.post(f"{url}/v1/rag/answer", json=QUESTION | {"query": "Why? " * 300}, timeout=120)
        assert question.status_code == 413
        documents = httpx.post(f"{url}/v1/documents", json={"documents": [long_doc]}, timeout=30)
        assert documents.status_code == 413
