"""The mock OpenAI-compatible upstream, over real HTTP (the mock runs in a thread)."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from bellaq.mock_upstream import MockUpstream, create_mock_app, get_mock_state
from bellaq.mock_upstream.limits import duration
from scripts.benchlib import free_port, wait_port

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


# --------------------------------------------------------------------------- provider limits


class ManualClock:
    """The mock's time source, moved by hand so limit arithmetic is exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def chat(mock: MockUpstream, content: str = "hello there, mock", **fields: object) -> requests.Response:
    body = {"model": "mock-model", "messages": [{"role": "user", "content": content}], **fields}
    return post(mock, "/v1/chat/completions", body)


def limit_headers(resp: requests.Response, kind: str) -> tuple[str, str, str]:
    return tuple(resp.headers[f"x-ratelimit-{part}-{kind}"] for part in ("limit", "remaining", "reset"))


def test_duration_format_is_openais() -> None:
    assert [duration(s) for s in (0, 0.0004, 0.02, 0.999, 1, 1.5, 12.34, 60, 360, 3600.5)] == [
        "0s", "1ms", "20ms", "999ms", "1s", "1.5s", "12.34s", "1m0s", "6m0s", "1h0m0.5s"]


def test_rpm_refuses_with_openai_body_and_headers_then_retry_after_lets_through() -> None:
    clock = ManualClock()
    with MockUpstream(rpm=3, clock=clock) as mock:
        answers = [chat(mock) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 200]
        assert [limit_headers(r, "requests") for r in answers] == [
            ("3", "2", "20s"), ("3", "1", "40s"), ("3", "0", "1m0s")]
        refused = chat(mock)
        assert refused.status_code == 429
        assert refused.json() == {"error": {
            "message": "Rate limit reached for mock-model on requests per min (RPM): Limit 3, Used 3, Requested 1. "
                       "Please try again in 20s.",
            "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
        assert refused.headers["Retry-After"] == "20"
        assert refused.headers["retry-after-ms"] == "20000"
        assert limit_headers(refused, "requests") == ("3", "0", "1m0s")
        assert "x-ratelimit-limit-tokens" not in refused.headers  # no tpm set

        clock.advance(19.999)
        assert chat(mock).status_code == 429
        clock.advance(0.001)
        assert chat(mock).status_code == 200
        assert mock.state.served_count == 4
        assert mock.state.rate_limited_count == 2


def test_retry_after_ms_on_the_real_clock_lets_the_next_request_through() -> None:
    with MockUpstream(rpm=120) as mock, requests.Session() as session:
        url = mock.url("/v1/embeddings")
        for _ in range(200):
            refused = session.post(url, json={"model": "m", "input": "x"}, timeout=10)
            if refused.status_code == 429:
                break
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        wait_ms = int(refused.headers["retry-after-ms"])
        assert 0 < wait_ms <= 500  # one request of 120 a minute
        time.sleep(wait_ms / 1000)  # the client does what the header says; that is the behaviour under test
        assert session.post(url, json={"model": "m", "input": "x"}, timeout=10).status_code == 200


def test_tpm_charges_prompt_and_budget_and_settles_to_usage() -> None:
    clock = ManualClock()
    with MockUpstream(tpm=1000, clock=clock) as mock:
        first = chat(mock, "x" * 40, max_tokens=300)  # charged 10 + 300, settled to the answer's usage
        assert first.status_code == 200
        used = first.json()["usage"]
        assert used == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
        assert limit_headers(first, "tokens") == ("1000", "988", "720ms")  # 12 tokens at 1000/60 a second
        assert "x-ratelimit-limit-requests" not in first.headers  # no rpm set

        refused = chat(mock, "x" * 40, max_tokens=990)  # needs 1000, 988 left
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("tokens", "rate_limit_exceeded", None)
        assert "on tokens per min (TPM): Limit 1000, Used 12, Requested 1000" in error["message"]
        assert refused.headers["retry-after-ms"] == "720"
        assert refused.headers["Retry-After"] == "1"

        clock.advance(0.72)
        assert chat(mock, "x" * 40, max_tokens=990).status_code == 200
        assert mock.state.stats()["tokens"] == 12 + 12


def test_a_request_larger_than_the_tpm_is_refused_without_retry_after() -> None:
    with MockUpstream(tpm=100, clock=ManualClock()) as mock:
        resp = chat(mock, max_tokens=200)
        assert resp.status_code == 429
        assert resp.json()["error"]["type"] == "tokens"
        assert resp.json()["error"]["message"].startswith("Request too large for mock-model")
        assert "Retry-After" not in resp.headers
        assert limit_headers(resp, "tokens") == ("100", "100", "0s")  # nothing was charged


def test_default_budget_is_charged_and_caps_the_answer_when_max_tokens_is_absent() -> None:
    with MockUpstream(tpm=1000, default_max_tokens=999, clock=ManualClock()) as mock:
        refused = chat(mock, "x" * 8)  # 2 + 999
        assert refused.status_code == 429
        assert "Requested 1001." in refused.json()["error"]["message"]
        assert chat(mock, "x" * 8, max_tokens=5).status_code == 200
        mock.default_max_tokens = 1
        choice = chat(mock, "x" * 8).json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == ("echo: ", "length")


def test_charged_tokens_equal_the_usage_the_answers_report(mock: MockUpstream) -> None:
    mock.tpm = 100_000
    reported = [
        chat(mock, "twelve chars", max_tokens=3).json()["usage"]["total_tokens"],
        post(mock, "/v1/completions", {"model": "m", "prompt": ["ab", "cdefgh"], "max_tokens": 5}).json(),
        post(mock, "/v1/embeddings", {"model": "m", "input": [[1, 2, 3], "abcde"]}).json(),
    ]
    reported[1:] = [r["usage"]["total_tokens"] for r in reported[1:]]
    stream = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    last = json.loads(sse_payloads(post(mock, "/v1/chat/completions", stream))[-2])
    reported.append(last["usage"]["total_tokens"])
    assert reported == [3 + 3, 2 + 4, 3 + 2, 5 + 4]
    stats = mock.stats()
    assert stats["tokens"] == sum(reported)
    assert stats["max_tokens_in_window"] == sum(reported)
    remaining = int(post(mock, "/v1/embeddings", {"model": "m", "input": "abcd"}).headers[
        "x-ratelimit-remaining-tokens"])
    assert remaining >= 100_000 - sum(reported) - 1


def test_concurrent_requests_never_exceed_the_rpm() -> None:
    with MockUpstream(rpm=20, clock=ManualClock()) as mock:  # the clock stands still: no refill
        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(lambda _: chat(mock).status_code, range(60)))
        assert statuses.count(200) == 20
        assert statuses.count(429) == 40
        assert mock.stats()["statuses"] == {"200": 20, "429": 40}


def test_reset_restores_the_limits_with_full_buckets(mock: MockUpstream) -> None:
    mock.rpm = 1
    assert chat(mock).status_code == 200
    assert chat(mock).status_code == 429
    mock.reset()
    assert mock.rpm is None
    assert all(chat(mock).status_code == 200 for _ in range(3))


# --------------------------------------------------------------------------- outage


def test_outage_answers_its_status_with_retry_after_until_it_ends() -> None:
    clock = ManualClock()
    with MockUpstream(outage_seconds=30, error_status=429, retry_after=2, clock=clock) as mock:
        resp = chat(mock)
        assert resp.status_code == 429
        assert resp.headers["Retry-After"] == "2"
        assert resp.json()["error"]["code"] == "rate_limit_exceeded"
        clock.advance(29.9)
        assert chat(mock).status_code == 429
        clock.advance(0.1)
        assert chat(mock).status_code == 200
        stats = mock.stats()
        assert (stats["outage"], stats["served"], stats["statuses"]) == (2, 1, {"200": 1, "429": 2})


def test_start_outage_defaults_retry_after_to_the_time_left() -> None:
    clock = ManualClock()
    with MockUpstream(clock=clock) as mock:
        mock.start_outage(5.5, status=503)
        resp = chat(mock)
        assert (resp.status_code, resp.headers["Retry-After"]) == (503, "6")
        assert resp.json()["error"]["type"] == "server_error"
        clock.advance(4.2)
        assert chat(mock).headers["Retry-After"] == "2"
        clock.advance(1.3)
        assert chat(mock).status_code == 200


# --------------------------------------------------------------------------- observability


def test_window_maxima_and_stats_route() -> None:
    clock = ManualClock()
    with MockUpstream(clock=clock) as mock:
        for gap in (0, 10, 20, 20, 15, 5, 5):  # arrivals at 0, 10, 30, 50, 65, 70, 75
            clock.advance(gap)
            assert post(mock, "/v1/embeddings", {"model": "m", "input": "abcd"}).status_code == 200
        assert mock.max_requests_in_window(60) == 5  # 30, 50, 65, 70, 75
        assert mock.max_requests_in_window(10) == 2  # 65, 70 (75 - 65 is a whole window)
        assert mock.max_tokens_in_window(60) == 5  # one token each
        stats = requests.get(mock.url("/mock/stats"), timeout=10).json()
        assert stats == {
            "requests": 7, "served": 7, "rate_limited": 0, "outage": 0, "statuses": {"200": 7}, "tokens": 7,
            "rpm": None, "tpm": None, "window_seconds": 60.0, "max_requests_in_window": 5,
            "max_tokens_in_window": 5}
        assert requests.get(mock.url("/mock/stats?window=10"), timeout=10).json()["max_requests_in_window"] == 2
        assert mock.request_count == 7  # the stats route is not a request to the model


@pytest.mark.parametrize("window", ["0", "-5", "abc", "inf", "nan"])
def test_stats_window_must_be_positive(mock: MockUpstream, window: str) -> None:
    resp = requests.get(mock.url("/mock/stats"), params={"window": window}, timeout=10)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "window"


def test_subprocess_mock_takes_the_limit_flags_and_reports_stats(tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "mock.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bellaq.mock_upstream", "--port", str(port), "--rpm", "2",
                                 "--tpm", "5000"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc=proc)
        base = f"http://127.0.0.1:{port}"
        statuses = [requests.post(base + "/v1/chat/completions", json=CHAT, timeout=10).status_code
                    for _ in range(3)]
        assert statuses == [200, 200, 429]
        stats = requests.get(base + "/mock/stats", timeout=10).json()
        assert (stats["served"], stats["rate_limited"], stats["statuses"]) == (2, 1, {"200": 2, "429": 1})
        assert (stats["rpm"], stats["tpm"], stats["max_requests_in_window"]) == (2, 5000, 2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_json_nested_too_deep_is_400(mock: MockUpstream) -> None:
    resp = requests.post(mock.url("/v1/chat/completions"), data=b"[" * 100_000 + b"]" * 100_000, timeout=10)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
