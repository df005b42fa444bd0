"""Native endpoints on a real server: documents ingested as a job, retrieval, /v1/rag/answer with
references, cache report and timings; the API key; metrics; a disconnect stops generation."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from chunkcache.retriever import ChunkIndex
from tests.api.conftest import ServiceFactory, running

DOCS = [
    {"id": "mill", "text": "The old mill was built in Tarnow in 1820 on the river Vela."},
    {"id": "bridge", "text": "The stone bridge of Tarnow was finished in 1846 by the engineer Ilse Marr."},
    {"id": "school", "text": "Tarnow's first school opened in 1871 next to the church."},
]


def _wait_job(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_documents_retrieve_and_answer(make_service: ServiceFactory, tmp_path: Path, embedder) -> None:  # type: ignore[no-untyped-def]
    index = ChunkIndex.build(tmp_path / "index", embedder)
    service = make_service(index=index)
    with running(service) as url, httpx.Client(base_url=url, timeout=120) as client:
        empty = client.post("/v1/rag/answer", json={"query": "Who built the bridge?"})
        assert empty.status_code == 409 and "no chunks yet" in empty.json()["error"]["message"]
        accepted = client.post("/v1/documents", json={"documents": DOCS})
        assert accepted.status_code == 202 and accepted.json()["status"] in ("queued", "running", "done")
        job = _wait_job(client, accepted.json()["id"])
        assert job["status"] == "done", job
        assert job["result"]["added"] == 3 and job["result"]["chunks_precomputed"] == 3
        assert client.get("/v1/jobs/job-nope").status_code == 404
        assert client.post("/v1/jobs/job-nope/cancel").status_code == 404
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json() == job  # finished: left as it is

        found = client.post("/v1/retrieve", json={"query": "Who built the bridge?", "top_k": 2}).json()["results"]
        assert found[0]["doc_id"] == "bridge" and len(found) == 2 and found[0]["score"] >= found[1]["score"]
        assert set(found[0]["retrievers"]) == {"dense", "lexical"}  # hybrid, the default: both found it
        for mode in ("dense", "lexical"):
            got = client.post("/v1/retrieve", json={"query": "Who built the stone bridge?", "top_k": 2,
                                                    "retrieval": mode})
            assert got.json()["results"][0]["doc_id"] == "bridge"
            assert set(got.json()["results"][0]["retrievers"]) == {mode}
        assert client.post("/v1/retrieve", json={"query": "x", "retrieval": "sparse"}).status_code == 400
        chat = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Who built the bridge?"}], "max_tokens": 1,
            "retrieval": {"top_k": 1, "mode": "lexical"}}).json()
        assert chat["chunkcache"]["references"][0]["retrievers"] == {"lexical": 1}

        body = client.post("/v1/rag/answer", json={"query": "Who built the bridge?", "top_k": 2, "max_tokens": 8})
        assert body.status_code == 200, body.text
        out = body.json()
        assert out["references"][0]["doc_id"] == "bridge"
        assert out["cache"]["hit_chunks"] == 2 and out["cache"]["miss_chunks"] == 0  # precomputed by the job
        assert out["cache"]["reused_tokens"] > 0 and sum(out["cache"]["tier_hits"].values()) >= 2
        assert set(out["timings"]) == {"retrieve_s", "load_s", "blend_s", "ttft_s", "total_s"}
        assert out["timings"]["ttft_s"] >= out["timings"]["retrieve_s"] > 0
        expected = service.engine.answer("Who built the bridge?", [r["text"] for r in out["references"]],
                                         max_new_tokens=8)
        assert out["answer"] == expected.text and out["usage"]["completion_tokens"] == len(expected.token_ids)

        with client.stream("POST", "/v1/rag/answer", json={"query": "Who built the bridge?", "top_k": 2,
                                                            "max_tokens": 8, "stream": True}) as events:
            data = [line[6:] for line in events.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        final = json.loads(data[-2])
        assert "".join(json.loads(d)["text"] for d in data[:-2]) == final["answer"] == expected.text

        openai_style = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Who built the bridge?"}], "doc_ids": ["bridge"], "max_tokens": 8})
        assert openai_style.json()["chunkcache"]["references"][0]["doc_id"] == "bridge"
        unknown = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "doc_ids": ["nope"]})
        assert unknown.status_code == 404 and "not in the index" in unknown.json()["error"]["message"]
        assert client.post("/v1/rag/answer", json={"query": "x", "bogus": 1}).status_code == 400


def test_api_key_metrics_and_health(make_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CHUNKCACHE_KEY", "s3cret")
    with running(make_service(api_key_env="TEST_CHUNKCACHE_KEY")) as url:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"  # open without a key
        for path in ("/v1/models", "/metrics", "/openapi.json"):
            denied = httpx.get(f"{url}{path}")
            assert denied.status_code == 401 and "API key" in denied.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "s3cret"}).status_code == 401
        assert httpx.get(f"{url}/v1/jobs/job-x").status_code == 401  # counted under its route's template
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200  # any case
        auth = {"Authorization": "Bearer s3cret"}
        answered = httpx.post(f"{url}/v1/rag/answer", headers=auth, timeout=120,
                              json={"query": "When was the mill built?", "documents": DOCS[:2], "max_tokens": 4})
        assert answered.status_code == 200, answered.text
        metrics = httpx.get(f"{url}/metrics", headers=auth).text
        for name in ("chunkcache_requests_total{endpoint=\"/v1/rag/answer\",status=\"200\"} 1.0",
                     "chunkcache_time_to_first_token_seconds_count 1.0",
                     "chunkcache_stage_duration_seconds_bucket", "chunkcache_recomputed_tokens_total",
                     "chunkcache_store_lookups_total", "chunkcache_store_bytes", "chunkcache_queue_requests",
                     "chunkcache_answer_chunks_total{result=\"miss\"} 2.0"):
            assert name in metrics, name
        counted = "\n".join(line for line in metrics.splitlines() if "requests_total{" in line)
        assert 'endpoint="/v1/models",status="401"' in counted and 'endpoint="/v1/jobs/{job_id}",status="401"' in counted, \
            counted


def test_a_client_that_disconnects_stops_its_generation(make_service: ServiceFactory) -> None:
    service = make_service(max_tokens_limit=4000)
    body = {"messages": [{"role": "user", "content": "Tell me everything about Tarnow."}], "documents": DOCS,
            "max_tokens": 1500, "temperature": 2.0, "seed": 1, "stream": True}  # random tokens: no early EOS
    with running(service) as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as events:
                for line in events.iter_lines():
                    if '"content":"' in line and '"content":""' not in line:
                        break  # the first generated text: now hang up
        deadline = time.monotonic() + 60
        while service.scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not service.scheduler.busy
        generated = httpx.get(f"{url}/metrics").text
        count = next(float(line.split()[-1]) for line in generated.splitlines()
                     if line.startswith("chunkcache_generated_tokens_total"))
        assert 0 < count < 300  # far fewer than the 1500 asked for


def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(make_service: ServiceFactory) -> None:
    service = make_service(max_tokens_limit=4000)
    body = json.dumps({"messages": [{"role": "user", "content": "Tell me everything about Tarnow."}],
                       "documents": DOCS, "max_tokens": 4000, "temperature": 2.0, "seed": 1}).encode()
    with running(service) as url:
        address = httpx.URL(url)
        with socket.create_connection((address.host, address.port)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 120
            while not service.scheduler.running and time.monotonic() < deadline:
                time.sleep(0.05)
            assert service.scheduler.running  # generating: now the client gives up and hangs up
        left = time.monotonic()
        while service.scheduler.busy and time.monotonic() < left + 30:
            time.sleep(0.1)
        assert not service.scheduler.busy  # 4,000 random tokens would hold the engine for minutes
        answer = httpx.post(f"{url}/v1/rag/answer", json={"query": "Where?", "documents": DOCS, "max_tokens": 2},
                            timeout=120)
        assert answer.status_code == 200
