"""The mock OpenAI-compatible upstream, over real HTTP (the mock runs in a thread)."""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Iterator

import pytest
import requests
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from bellaq.mock_upstream import MockUpstream, create_mock_app, get_mock_state

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hello there, mock"}]}


@pytest.fixture(scope="module")
def server() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def mock(server: MockUpstream) -> Iterator[MockUpstream]:
    server.reset()
    yield server
    server.reset()


def post(mock: MockUpstream, path: str, body: object, **kwargs: object) -> requests.Response:
    return requests.post(mock.url(path), json=body, timeout=10, **kwargs)  # type: ignore[arg-type]


def sse_payloads(resp: requests.Response) -> list[str]:
    return [line[len("data: ") :] for line in resp.text.split("\n\n") if line.startswith("data: ")]


def test_base_url_has_no_v1(mock: MockUpstream) -> None:
    assert mock.base_url == f"http://127.0.0.1:{mock.port}"


def test_chat_completion_shape(mock: MockUpstream) -> None:
    resp = post(mock, "/v1/chat/completions", CHAT)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-request-id"].startswith("req_")
    completion = ChatCompletion.model_validate(resp.json())
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "mock-model"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "echo: hello there, mock"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert mock.request_count == 1
    assert mock.requests[0].path == "/v1/chat/completions"
    assert mock.requests[0].body == CHAT


def test_chat_uses_last_user_message_and_truncates(mock: MockUpstream) -> None:
    long_text = "x" * 500
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": long_text}]},
        ],
    }
    content = post(mock, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert content == "echo: " + "x" * 200


def test_chat_is_deterministic(mock: MockUpstream) -> None:
    first = post(mock, "/v1/chat/completions", CHAT).json()
    second = post(mock, "/v1/chat/completions", CHAT).json()
    assert first["choices"] == second["choices"]
    assert first["id"] == second["id"]
    other = post(mock, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "other"}]})
    assert other.json()["choices"][0]["message"]["content"] == "echo: other"


def test_chat_max_tokens_gives_length(mock: MockUpstream) -> None:
    body = {**CHAT, "max_tokens": 2}
    choice = post(mock, "/v1/chat/completions", body).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "echo: hello "


def test_chat_streaming_chunks(mock: MockUpstream) -> None:
    body = {**CHAT, "stream": True}
    resp = post(mock, "/v1/chat/completions", body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(resp)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert len(chunks) >= 4
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == post(mock, "/v1/chat/completions", CHAT).json()["choices"][0]["message"]["content"]
    assert sum(1 for c in chunks if c.choices[0].delta.content) >= 3  # split into words


def test_chat_streaming_include_usage(mock: MockUpstream) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    payloads = sse_payloads(post(mock, "/v1/chat/completions", body))
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_chat_streaming_chunk_delay(mock: MockUpstream) -> None:
    mock.stream_chunk_delay = 0.1
    started = time.monotonic()
    arrivals = []
    with requests.post(mock.url("/v1/chat/completions"), json={**CHAT, "stream": True}, stream=True) as resp:
        for line in resp.iter_lines(chunk_size=None):
            if line:
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) >= 5
    assert arrivals[0] < arrivals[-1] - 0.3  # chunks spread out in time, not one block


def test_embeddings(mock: MockUpstream) -> None:
    resp = post(mock, "/v1/embeddings", {"model": "emb", "input": ["alpha", "beta"]})
    assert resp.status_code == 200
    parsed = CreateEmbeddingResponse.model_validate(resp.json())
    assert parsed.model == "emb"
    assert [d.index for d in parsed.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in parsed.data)
    assert all(-1.0 <= v <= 1.0 for d in parsed.data for v in d.embedding)
    assert parsed.data[0].embedding != parsed.data[1].embedding
    single = post(mock, "/v1/embeddings", {"model": "emb", "input": "alpha"}).json()
    assert single["data"][0]["embedding"] == parsed.data[0].embedding  # deterministic


def test_embeddings_base64_and_dimensions(mock: MockUpstream) -> None:
    plain = post(mock, "/v1/embeddings", {"model": "e", "input": "alpha", "dimensions": 16}).json()
    encoded = post(
        mock,
        "/v1/embeddings",
        {"model": "e", "input": "alpha", "dimensions": 16, "encoding_format": "base64"},
    ).json()
    vector = plain["data"][0]["embedding"]
    assert len(vector) == 16
    decoded = struct.unpack("<16f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, abs=1e-6)


def test_completions(mock: MockUpstream) -> None:
    resp = post(mock, "/v1/completions", {"model": "m", "prompt": "say something"})
    completion = Completion.model_validate(resp.json())
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "echo: say something"
    assert completion.choices[0].finish_reason == "stop"
    many = post(mock, "/v1/completions", {"model": "m", "prompt": ["a", "b"]}).json()
    assert [c["text"] for c in many["choices"]] == ["echo: a", "echo: b"]


def test_completions_streaming(mock: MockUpstream) -> None:
    payloads = sse_payloads(post(mock, "/v1/completions", {"model": "m", "prompt": "one two", "stream": True}))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "echo: one two"
    # like OpenAI, only the last chunk has a finish_reason (the SDK's model does not allow null)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    assert Completion.model_validate(chunks[-1]).choices[0].finish_reason == "stop"


def test_unknown_path_is_404_envelope(mock: MockUpstream) -> None:
    resp = post(mock, "/v1/nothing-here", CHAT)
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "/v1/nothing-here" in error["message"]


def test_get_on_endpoint_is_405(mock: MockUpstream) -> None:
    resp = requests.get(mock.url("/v1/chat/completions"), timeout=10)
    assert resp.status_code == 405
    assert "error" in resp.json()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
        ("/v1/embeddings", {"model": "m"}, "input"),
        ("/v1/completions", {"model": "m"}, "prompt"),
    ],
)
def test_missing_fields_are_400(mock: MockUpstream, path: str, body: dict, param: str) -> None:
    resp = post(mock, path, body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_bad_json_is_400(mock: MockUpstream) -> None:
    resp = requests.post(
        mock.url("/v1/chat/completions"),
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = post(mock, "/v1/chat/completions", ["a", "list"])
    assert resp.status_code == 400


def test_mock_status_hook(mock: MockUpstream) -> None:
    resp = post(mock, "/v1/chat/completions", {**CHAT, "mock_status": 400})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "mock error"
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert post(mock, "/v1/chat/completions", {**CHAT, "mock_status": 503}).status_code == 503


def test_error_rate_with_retry_after() -> None:
    with MockUpstream(error_rate=1.0, error_status=429, retry_after=1) as mock:
        for _ in range(3):
            resp = post(mock, "/v1/chat/completions", CHAT)
            assert resp.status_code == 429
            assert resp.headers["Retry-After"] == "1"
            assert resp.json()["error"]["code"] == "rate_limit_exceeded"


def test_error_rate_is_seeded_and_partial() -> None:
    def outcomes() -> list[int]:
        with MockUpstream(error_rate=0.5, seed=7) as mock:
            return [post(mock, "/v1/embeddings", {"model": "m", "input": "x"}).status_code for _ in range(20)]

    first = outcomes()
    assert first == outcomes()
    assert set(first) == {200, 500}


def test_script_then_normal(mock: MockUpstream) -> None:
    mock.script([500, 429, 200, 503], retry_after=0.5)
    statuses = [post(mock, "/v1/chat/completions", CHAT) for _ in range(5)]
    assert [r.status_code for r in statuses] == [500, 429, 200, 503, 200]
    assert statuses[1].headers["Retry-After"] == "0.5"
    assert statuses[2].json()["object"] == "chat.completion"


def test_latency_knob_and_header(mock: MockUpstream) -> None:
    mock.latency = 0.5
    started = time.monotonic()
    assert post(mock, "/v1/embeddings", {"model": "m", "input": "x"}).status_code == 200
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    resp = post(mock, "/v1/embeddings", {"model": "m", "input": "x"}, headers={"X-Mock-Latency": "0"})
    assert resp.status_code == 200
    assert time.monotonic() - started < 0.5


def test_create_mock_app_with_test_client() -> None:
    app = create_mock_app(seed=1)
    client = app.test_client()
    resp = client.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    assert resp.get_json()["choices"][0]["message"]["content"] == "echo: hello there, mock"
    get_mock_state(app).script([502])
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 502
