"""The OpenAI-compatible endpoints on a real uvicorn server, called with the official `openai`
client: the answer is the engine's answer for the same inputs, streamed or not."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import ServiceFactory, running
from tests.test_cli import answer_json

QUESTION = "Where was the mill built?"
DOCS = [
    {"id": "mill", "text": "The old mill was built in Tarnow in 1820 on the river Vela."},
    {"id": "bridge", "text": "The stone bridge of Tarnow was finished in 1846."},
]
EXTRA = {"documents": DOCS, "cache": {"strategy": "cacheblend", "recompute_ratio": 0.3}}


def test_chat_completions_match_the_engine_streamed_or_not(make_service: ServiceFactory) -> None:
    service = make_service()
    expected = service.engine.answer(QUESTION, [d["text"] for d in DOCS], strategy="cacheblend",
                                     max_new_tokens=12, recompute_ratio=0.3)
    with running(service) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        out = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, extra_body=EXTRA,
        )
        assert out.choices[0].message.content == expected.text
        assert out.choices[0].finish_reason == expected.finish_reason
        assert out.usage.completion_tokens == len(expected.token_ids)
        assert out.usage.prompt_tokens == expected.prompt_tokens
        assert out.usage.prompt_tokens_details.cached_tokens == expected.reused_tokens > 0
        info = out.model_extra["chunkcache"]
        assert [r["doc_id"] for r in info["references"]] == ["mill", "bridge"]
        assert info["cache"]["hit_chunks"] == 2  # stored while computing `expected`

        stream = client.chat.completions.create(  # the same strategy as one spec: the same answer
            model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
            extra_body={"documents": DOCS, "cache": {"strategy": "cacheblend:0.3"}}, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected.text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        assert [r["doc_id"] for r in final.model_extra["chunkcache"]["references"]] == ["mill", "bridge"]

        done = client.completions.create(model="smollm2-135m", prompt=QUESTION, max_tokens=12, extra_body=EXTRA)
        assert done.choices[0].text == expected.text
        pieces = client.completions.create(model="smollm2-135m", prompt=QUESTION, max_tokens=12,
                                           extra_body=EXTRA, stream=True)
        assert "".join(c.choices[0].text for c in pieces if c.choices) == expected.text

        assert [m.id for m in client.models.list().data] == ["smollm2-135m"]


def test_stop_sequences_and_system_messages(make_service: ServiceFactory) -> None:
    service = make_service()
    plain = service.engine.answer(QUESTION, [d["text"] for d in DOCS], max_new_tokens=16)
    cut_at = plain.text[2:4]
    with running(service) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        out = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}],
                                             max_tokens=16, stop=[cut_at], extra_body={"documents": DOCS})
        assert out.choices[0].message.content == plain.text[: plain.text.find(cut_at)]
        assert out.choices[0].finish_reason == "stop"
        streamed = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, stop=cut_at,
            extra_body={"documents": DOCS}, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == out.choices[0].message.content
        system = client.chat.completions.create(
            model="smollm2-135m", max_tokens=8, extra_body={"documents": DOCS},
            messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": QUESTION}])
        expected = service.engine.answer(f"Answer in French.\n\n{QUESTION}", [d["text"] for d in DOCS], max_new_tokens=8)
        assert system.choices[0].message.content == expected.text


def test_client_errors_are_4xx_with_a_message(make_service: ServiceFactory) -> None:
    with running(make_service(max_documents=2)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        user = [{"role": "user", "content": QUESTION}]
        with pytest.raises(openai.NotFoundError, match="not served"):
            client.chat.completions.create(model="gpt-4o", messages=user, extra_body={"documents": DOCS})
        with pytest.raises(openai.BadRequestError, match="no index"):  # no documents, no index
            client.chat.completions.create(model="smollm2-135m", messages=user)
        with pytest.raises(openai.BadRequestError, match="n"):
            client.chat.completions.create(model="smollm2-135m", messages=user, n=2, extra_body={"documents": DOCS})
        with pytest.raises(openai.BadRequestError, match="messages"):  # no user message with text
            client.chat.completions.create(model="smollm2-135m", extra_body={"documents": DOCS},
                                           messages=[{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}])
        with pytest.raises(openai.BadRequestError, match="strategy"):
            client.chat.completions.create(model="smollm2-135m", messages=user,
                                           extra_body={"documents": DOCS, "cache": {"strategy": "warp"}})
        with pytest.raises(openai.APIStatusError, match="at most 2") as too_many:
            client.chat.completions.create(model="smollm2-135m", messages=user, extra_body={"documents": DOCS * 2})
        assert too_many.value.status_code == 413
        with pytest.raises(openai.BadRequestError, match="limit"):
            client.chat.completions.create(model="smollm2-135m", messages=user, max_tokens=100_000,
                                           extra_body={"documents": DOCS})
        raw = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert raw.status_code == 400 and raw.json()["error"]["message"]
        surrogate = httpx.post(f"{url}/v1/chat/completions", headers={"content-type": "application/json"},
                               content=b'{"messages": [{"role": "user", "content": "\\ud800"}], "documents": [{"text": "a"}]}')
        assert surrogate.status_code == 400 and "surrogate" in surrogate.json()["error"]["message"]
        for extra, words in (({"seed": True}, "seed"), ({"logprobs": True}, "logprobs"),
                             ({"doc_ids": ["a"]}, "one of"), ({"stop": ["a"] * 5}, "at most 4")):
            with pytest.raises(openai.BadRequestError, match=words):
                client.chat.completions.create(model="smollm2-135m", messages=user,
                                               extra_body={"documents": DOCS, **extra})
        tiny = client.chat.completions.create(model="smollm2-135m", messages=user, temperature=1e-38, max_tokens=2,
                                              seed=2**64 + 5, extra_body={"documents": DOCS})  # any integer seed
        assert tiny.choices[0].message.content  # treated as greedy, not a 500
        streamed = httpx.post(f"{url}/v1/chat/completions", json={"messages": user, "stream": True})
        assert streamed.status_code == 400 and "no index" in streamed.json()["error"]["message"]


def test_one_strategy_spec_on_the_command_line_in_yaml_and_over_http(make_service: ServiceFactory, tmp_path: Path) -> None:
    """`answer --strategy SPEC`, `strategy: SPEC` in a YAML file and the HTTP API's strategy field
    give the same answer (the CLI in its own process, as a user runs it)."""
    spec = "cacheblend:0.15:spread_v=0.5"
    request = tmp_path / "in.json"
    request.write_text(json.dumps({"question": QUESTION, "chunks": [d["text"] for d in DOCS]}))
    service = make_service()
    template = f"question_template: {json.dumps(service.engine.model.template.question_template)}\n"
    plain, config = tmp_path / "plain.yaml", tmp_path / "settings.yaml"
    plain.write_text(template)  # the session model's prompt (tests/conftest.py), for the CLI as well
    config.write_text(template + f'strategy: "{spec}"\n')
    store = tmp_path / "cli-store"
    by_flag = answer_json("smollm2-135m", request, store, "--config", str(plain), "--strategy", spec)
    by_yaml = answer_json("smollm2-135m", request, store, "--config", str(config))
    assert by_yaml["params"]["spread_v"] == 0.5 and by_yaml["params"]["recompute_ratio"] == 0.15
    assert by_yaml["cache_hits"] == len(DOCS) and by_yaml["reused_tokens"] > 0  # stored by the first run
    assert by_yaml["token_ids"] == by_flag["token_ids"] and by_flag["text"]
    with running(service) as url:
        out = httpx.post(f"{url}/v1/rag/answer", timeout=120, json={
            "query": QUESTION, "documents": DOCS, "strategy": spec, "max_tokens": 24}).json()
    assert out["answer"] == by_flag["text"] and out["usage"]["completion_tokens"] == len(by_flag["token_ids"])
