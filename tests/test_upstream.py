"""The built-in workers' upstream client against the mock upstream over real HTTP."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from bellaq.mock_upstream import MockUpstream
from workers.upstream import (
    StreamEvent,
    UpstreamClient,
    aggregate_chunks,
    retry_after_seconds,
)

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "one two three four five"}]}
CHAT_PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server() -> Iterator[MockUpstream]:
    with MockUpstream() as mock:
        yield mock


@pytest.fixture
def mock(server: MockUpstream) -> Iterator[MockUpstream]:
    server.reset()
    yield server
    server.reset()


def read_request(conn: socket.socket) -> bytes:
    """Read one whole HTTP request: closing with unread bytes would reset the connection."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += conn.recv(65536)
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return body


def client_for(mock: MockUpstream, **kwargs: float) -> UpstreamClient:
    options: dict = {"backoff_base": 0.01, "backoff_max": 5.0, "timeout": 10.0}
    options.update(kwargs)
    return UpstreamClient(mock.base_url, api_key="sk-test", **options)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- retry_after_seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("3", 3.0),
        (" 0.25 ", 0.25),
        ("-4", 0.0),
        ("nan", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
    ],
)
def test_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after_seconds(value) == expected


def test_retry_after_seconds_http_date_in_future() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    seconds = retry_after_seconds(format_datetime(when, usegmt=True))
    assert seconds is not None and 28.0 <= seconds <= 30.0


# --------------------------------------------------------------------------- call


def test_call_success(mock: MockUpstream) -> None:
    result = client_for(mock).call(CHAT_PATH, CHAT)
    assert result.status_code == 200
    assert result.attempts == 1
    assert result.body["choices"][0]["message"]["content"] == "echo: one two three four five"
    assert result.request_id.startswith("req_")
    [request] = mock.requests
    assert request.path == CHAT_PATH
    assert request.body == CHAT
    assert request.headers["Authorization"] == "Bearer sk-test"


def test_base_url_trailing_slash(mock: MockUpstream) -> None:
    client = UpstreamClient(mock.base_url + "/", backoff_base=0.01)
    assert client.call("/v1/embeddings", {"model": "e", "input": "x"}).status_code == 200
    assert mock.requests[0].path == "/v1/embeddings"


def test_429_with_retry_after_then_success(mock: MockUpstream) -> None:
    mock.script([429], retry_after=0.2)
    started = time.monotonic()
    result = client_for(mock).call(CHAT_PATH, CHAT)
    elapsed = time.monotonic() - started
    assert result.status_code == 200
    assert result.attempts == 2
    assert elapsed >= 0.2
    assert mock.request_count == 2


def test_500_twice_then_success(mock: MockUpstream) -> None:
    mock.script([500, 500])
    result = client_for(mock).call(CHAT_PATH, CHAT)
    assert result.status_code == 200
    assert result.attempts == 3
    assert result.body["object"] == "chat.completion"


def test_400_is_final(mock: MockUpstream) -> None:
    result = client_for(mock).call(CHAT_PATH, {**CHAT, "mock_status": 400})
    assert result.status_code == 400
    assert result.attempts == 1
    assert result.body["error"]["message"] == "mock error"
    assert result.body["error"]["type"] == "invalid_request_error"
    assert mock.request_count == 1


def test_404_is_final(mock: MockUpstream) -> None:
    result = client_for(mock).call("/v1/nowhere", CHAT)
    assert (result.status_code, result.attempts) == (404, 1)
    assert "error" in result.body


def test_retries_exhausted_returns_last_answer(mock: MockUpstream) -> None:
    mock.script([503, 503, 503, 503])
    result = client_for(mock, max_attempts=3).call(CHAT_PATH, CHAT)
    assert result.status_code == 503
    assert result.attempts == 3
    assert result.body["error"]["type"] == "server_error"
    assert mock.request_count == 3


def test_connection_refused_gives_504() -> None:
    client = UpstreamClient(f"http://127.0.0.1:{closed_port()}", max_attempts=3, backoff_base=0.01)
    started = time.monotonic()
    result = client.call(CHAT_PATH, CHAT, deadline=time.monotonic() + 5)
    assert time.monotonic() - started < 5
    assert result.status_code == 504
    assert result.attempts == 3
    assert result.body["error"]["type"] == "upstream_error"
    assert result.body["error"]["message"].startswith("upstream did not answer: ")
    assert result.request_id.startswith("req_")


def test_connection_refused_bounded_by_deadline() -> None:
    client = UpstreamClient(f"http://127.0.0.1:{closed_port()}", max_attempts=1000, backoff_base=0.05)
    started = time.monotonic()
    result = client.call(CHAT_PATH, CHAT, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - started < 1.0
    assert result.status_code == 504
    assert 1 < result.attempts < 1000


def test_deadline_shorter_than_retry_after(mock: MockUpstream) -> None:
    mock.script([429, 200], retry_after=5)
    started = time.monotonic()
    result = client_for(mock, backoff_max=30.0).call(CHAT_PATH, CHAT, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - started < 1.5
    assert result.status_code == 429
    assert result.attempts == 1
    assert result.body["error"]["code"] == "rate_limit_exceeded"


def test_retry_after_capped_by_backoff_max(mock: MockUpstream) -> None:
    mock.script([429], retry_after=30)
    started = time.monotonic()
    result = client_for(mock, backoff_max=0.1).call(CHAT_PATH, CHAT)
    assert time.monotonic() - started < 2.0
    assert (result.status_code, result.attempts) == (200, 2)


def test_deadline_already_passed(mock: MockUpstream) -> None:
    result = client_for(mock).call(CHAT_PATH, CHAT, deadline=time.monotonic() - 1)
    assert result.status_code == 504
    assert mock.request_count == 0


def test_read_timeout_is_retried(mock: MockUpstream) -> None:
    mock.latency = 0.5
    result = client_for(mock, timeout=0.1, max_attempts=2).call(CHAT_PATH, CHAT)
    assert result.status_code == 504
    assert result.attempts == 2
    assert "Timeout" in result.body["error"]["message"]


def test_non_json_answer_is_wrapped() -> None:
    """A proxy answering an HTML 502 page: retried, and finally wrapped in an error envelope."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]

    def answer() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                page = b"<html>bad gateway</html>"
                conn.sendall(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nConnection: close\r\n"
                    b"Content-Length: " + str(len(page)).encode() + b"\r\n\r\n" + page
                )

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        result = UpstreamClient(f"http://127.0.0.1:{port}", max_attempts=2, backoff_base=0.01).call(CHAT_PATH, CHAT)
    finally:
        thread.join(timeout=5)
        listener.close()
    assert result.status_code == 502
    assert result.attempts == 2
    assert result.body == {
        "error": {
            "message": "<html>bad gateway</html>",
            "type": "upstream_error",
            "param": None,
            "code": None,
        }
    }


def test_call_with_stream_true_aggregates(mock: MockUpstream) -> None:
    result = client_for(mock).call(CHAT_PATH, {**CHAT, "stream": True})
    assert result.status_code == 200
    assert result.body["object"] == "chat.completion"
    assert result.body["choices"][0]["message"]["content"] == "echo: one two three four five"


def test_2xx_non_json_is_502() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            read_request(conn)
            page = b"<html>please log in</html>"
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(page)).encode() + b"\r\n\r\n" + page
            )

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        result = UpstreamClient(f"http://127.0.0.1:{port}").call(CHAT_PATH, CHAT)
    finally:
        thread.join(timeout=5)
        listener.close()
    assert (result.status_code, result.attempts) == (502, 1)
    assert result.body["error"]["type"] == "upstream_error"
    assert "please log in" in result.body["error"]["message"]


# --------------------------------------------------------------------------- stream


def collect(events: Iterator[StreamEvent]) -> tuple[list[tuple[float, dict]], StreamEvent, float]:
    started = time.monotonic()
    chunks: list[tuple[float, dict]] = []
    done: StreamEvent | None = None
    for event in events:
        if event.kind == "chunk":
            assert done is None
            assert event.data is not None
            chunks.append((time.monotonic() - started, event.data))
        else:
            assert event.kind == "done"
            assert done is None
            done = event
    assert done is not None and done.result is not None
    return chunks, done, time.monotonic() - started


def test_stream_chunks_arrive_as_sent(mock: MockUpstream) -> None:
    expected = client_for(mock).call(CHAT_PATH, CHAT).body["choices"][0]["message"]["content"]
    mock.stream_chunk_delay = 0.2
    chunks, done, total = collect(client_for(mock).stream(CHAT_PATH, {**CHAT, "stream": True}))
    assert len(chunks) >= 7  # role chunk, 6 words, final chunk
    first_at = chunks[0][0]
    assert first_at < total - 1.0  # the first chunk came well before the stream ended
    times = [t for t, _ in chunks]
    assert times == sorted(times)
    assert times[-1] - times[0] >= 0.2 * (len(chunks) - 2)  # spread out: not buffered then flushed
    text = "".join((c["choices"][0]["delta"].get("content") or "") for _, c in chunks)
    assert text == expected
    result = done.result
    assert result is not None
    assert result.status_code == 200
    assert result.attempts == 1
    assert result.body["object"] == "chat.completion"
    assert result.body["choices"][0]["message"]["content"] == expected
    assert result.body["choices"][0]["message"]["role"] == "assistant"
    assert result.body["choices"][0]["finish_reason"] == "stop"
    assert result.body["id"] == chunks[0][1]["id"]


def test_stream_usage_is_aggregated(mock: MockUpstream) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    _, done, _ = collect(client_for(mock).stream(CHAT_PATH, body))
    assert done.result is not None
    usage = done.result.body["usage"]
    assert usage == client_for(mock).call(CHAT_PATH, CHAT).body["usage"]


def test_stream_retries_before_first_chunk(mock: MockUpstream) -> None:
    mock.script([429, 500], retry_after=0.05)
    chunks, done, _ = collect(client_for(mock).stream(CHAT_PATH, {**CHAT, "stream": True}))
    assert chunks
    assert done.result is not None
    assert (done.result.status_code, done.result.attempts) == (200, 3)


def test_stream_error_gives_single_done(mock: MockUpstream) -> None:
    chunks, done, _ = collect(client_for(mock).stream(CHAT_PATH, {**CHAT, "stream": True, "mock_status": 400}))
    assert chunks == []
    assert done.result is not None
    assert (done.result.status_code, done.result.attempts) == (400, 1)
    assert done.result.body["error"]["type"] == "invalid_request_error"


def test_stream_connection_refused() -> None:
    client = UpstreamClient(f"http://127.0.0.1:{closed_port()}", max_attempts=2, backoff_base=0.01)
    chunks, done, _ = collect(client.stream(CHAT_PATH, {**CHAT, "stream": True}))
    assert chunks == []
    assert done.result is not None
    assert (done.result.status_code, done.result.attempts) == (504, 2)


def test_stream_deadline_while_streaming(mock: MockUpstream) -> None:
    mock.stream_chunk_delay = 0.3
    client = client_for(mock)
    chunks, done, total = collect(client.stream(CHAT_PATH, {**CHAT, "stream": True}, deadline=time.monotonic() + 0.5))
    assert 1 <= len(chunks) <= 3
    assert total < 1.5
    assert done.result is not None
    assert done.result.status_code == 504
    assert done.result.body["error"]["code"] == "deadline_exceeded"


def test_stream_completions(mock: MockUpstream) -> None:
    body = {"model": "m", "prompt": "hello streaming world", "stream": True}
    chunks, done, _ = collect(client_for(mock).stream("/v1/completions", body))
    assert len(chunks) >= 3
    assert done.result is not None
    assert done.result.body["object"] == "text_completion"
    assert done.result.body["choices"][0]["text"] == "echo: hello streaming world"


def test_stream_from_http10_server_without_chunking() -> None:
    """An SSE answer with neither Content-Length nor chunking (ends when the socket closes)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    release = threading.Event()
    base = '{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            read_request(conn)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
            conn.sendall(("data: " + base + '"delta":{"role":"assistant","content":"hi"}}]}\r\n\r\n').encode())
            release.wait(5)  # held until the client saw the first chunk
            conn.sendall(("data: " + base + '"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n').encode())

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        events = UpstreamClient(f"http://127.0.0.1:{port}").stream(CHAT_PATH, {**CHAT, "stream": True})
        first = next(events)
        assert first.kind == "chunk" and first.data is not None
        assert first.data["choices"][0]["delta"]["content"] == "hi"
        release.set()
        rest = list(events)
    finally:
        release.set()
        thread.join(timeout=5)
        listener.close()
    assert [e.kind for e in rest] == ["chunk", "done"]
    assert rest[-1].result is not None
    assert rest[-1].result.body["choices"][0]["message"]["content"] == "hi"


def test_aggregate_tool_calls() -> None:
    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {
            "id": "x",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    body = aggregate_chunks(
        [
            chunk({"role": "assistant", "content": None}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
            chunk({}, "tool_calls"),
        ]
    )
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
