"""The upstream client's connection pools: reuse, one per process, TLS verification, proxies,
header case, compressed answers, bad URLs, and greenlets sharing a pool."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from bellaq.mock_upstream import MockUpstream, create_mock_app
from tests.receivers import self_signed, tls_context
from workers.upstream import UpstreamClient, get_pool

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "one two three"}]}
CHAT_PATH = "/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[1]


class Canned:
    """An HTTP/1.1 keep-alive server answering every POST with ``status``, ``headers`` and
    ``body``; it counts the connections it accepted and records each request's head."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None,
                 body: bytes = b'{"object": "chat.completion", "choices": []}') -> None:
        self.connections = 0
        self.heads: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.heads.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                for name, value in (headers or {"Content-Type": "application/json"}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def process_request(self, request: socket.socket, client_address: object) -> None:
                owner.connections += 1
                super().process_request(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def __enter__(self) -> Canned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


def test_sequential_calls_share_one_connection() -> None:
    with Canned() as server:
        client = UpstreamClient(server.url, max_attempts=1)
        for _ in range(5):
            assert client.call(CHAT_PATH, CHAT).status_code == 200
        assert UpstreamClient(server.url + "/", max_attempts=1).call(CHAT_PATH, CHAT).status_code == 200
        assert server.connections == 1
        assert get_pool(server.url + CHAT_PATH) is get_pool(server.url + "/other")


def test_an_error_answer_of_a_stream_leaves_its_connection_reusable() -> None:
    with Canned(status=400, body=b'{"error": {"message": "no"}}') as server:
        client = UpstreamClient(server.url, max_attempts=1)
        for _ in range(3):
            [done] = list(client.stream(CHAT_PATH, {**CHAT, "stream": True}))
            assert done.result is not None and done.result.status_code == 400
        assert client.call(CHAT_PATH, CHAT).status_code == 400
        assert server.connections == 1


def test_headers_are_read_whatever_their_case() -> None:
    answer = {"X-REQUEST-ID": "req_upper", "Content-TYPE": "application/json",
              "X-RateLimit-Limit-Requests": "60", "X-RATELIMIT-LIMIT-TOKENS": "1000",
              "X-Ratelimit-Remaining-Requests": "0", "X-Ratelimit-Reset-Requests": "6s", "RETRY-AFTER": "7"}
    with Canned(headers=answer) as server:
        result = UpstreamClient(server.url, max_attempts=1).call(CHAT_PATH, CHAT)
    assert result.request_id == "req_upper"
    assert (result.announced_rpm, result.announced_tpm) == (60, 1000)
    assert result.limit_wait == pytest.approx(0.1)
    assert result.retry_after == 7.0


def test_requests_carry_json_the_key_and_accept_compressed_answers() -> None:
    body = gzip.compress(json.dumps({"object": "chat.completion", "choices": [{"index": 0}]}).encode())
    with Canned(headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}, body=body) as server:
        result = UpstreamClient(server.url, api_key="sk-x", max_attempts=1).call(CHAT_PATH, CHAT)
        [head] = server.heads
    assert result.status_code == 200 and result.body["choices"] == [{"index": 0}]
    assert head["authorization"] == "Bearer sk-x"
    assert head["content-type"] == "application/json"
    assert "gzip" in head["accept-encoding"]


@pytest.mark.parametrize("base_url", ["ftp://example.com", "example.com:8080", "http://example.com:99999",
                                      "http://exa mple.com", "http://"])
def test_a_url_no_request_can_go_to_gives_504_at_once(base_url: str) -> None:
    result = UpstreamClient(base_url, max_attempts=5, backoff_base=5).call(CHAT_PATH, CHAT)
    assert (result.status_code, result.attempts) == (504, 1)
    assert "invalid upstream URL" in result.body["error"]["message"]
    [done] = list(UpstreamClient(base_url, max_attempts=5, backoff_base=5).stream(CHAT_PATH, CHAT))
    assert done.result is not None and done.result.status_code == 504


def test_a_forked_process_gets_its_own_pool(mock: MockUpstream) -> None:
    client = UpstreamClient(mock.base_url, max_attempts=1)
    assert client.call(CHAT_PATH, CHAT).status_code == 200
    parent_pool = get_pool(mock.base_url)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's clean-up
        code = 1
        try:
            status = client.call(CHAT_PATH, CHAT).status_code
            os.write(write, json.dumps([status, get_pool(mock.base_url) is parent_pool]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert json.loads(answer) == [200, False]
    assert get_pool(mock.base_url) is parent_pool


@pytest.fixture
def tls_upstream(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    cert, key = self_signed(tmp_path, "localhost")
    server = make_server("127.0.0.1", 0, create_mock_app(), threaded=True, ssl_context=tls_context(cert, key))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_port}", cert
    finally:
        server.shutdown()
        server.server_close()


def test_https_verifies_the_certificate(tls_upstream: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, cert = tls_upstream
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    refused = UpstreamClient(url, max_attempts=1).call(CHAT_PATH, CHAT)
    assert refused.status_code == 504
    assert "SSLError" in refused.body["error"]["message"]


def test_https_trusts_the_bundle_the_environment_names(tls_upstream: tuple[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, cert = tls_upstream
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    result = UpstreamClient(url, max_attempts=1).call(CHAT_PATH, CHAT)
    assert result.status_code == 200 and result.body["object"] == "chat.completion"
    assert get_pool(url).scheme == "https"


def test_the_environment_proxy_is_used_unless_no_proxy_names_the_host(mock: MockUpstream,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    mock.reset()
    for name in ("HTTP_PROXY", "http_proxy"):  # urllib prefers the lower-case one
        monkeypatch.setenv(name, mock.base_url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    proxied = UpstreamClient("http://upstream.proxied.invalid", max_attempts=1).call(CHAT_PATH, CHAT)
    assert proxied.status_code == 200
    [request] = mock.requests
    assert request.path == CHAT_PATH
    assert request.headers["Host"] == "upstream.proxied.invalid"
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,bypassed.invalid")
    bypassed = UpstreamClient("http://bypassed.invalid", max_attempts=1).call(CHAT_PATH, CHAT)
    assert bypassed.status_code == 504 and mock.request_count == 1  # no such host: not sent to the proxy


GREENLETS = """
from gevent import monkey
monkey.patch_all()
import json, sys
import gevent
from bellaq.mock_upstream import MockUpstream
from workers.upstream import UpstreamClient, get_pool

with MockUpstream(latency=0.05) as mock:
    client = UpstreamClient(mock.base_url, max_attempts=1)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    calls = [gevent.spawn(client.call, "/v1/chat/completions", chat) for _ in range(40)]
    gevent.joinall(calls, timeout=30)
    streams = [gevent.spawn(lambda: list(client.stream("/v1/chat/completions", dict(chat, stream=True))))
               for _ in range(10)]
    gevent.joinall(streams, timeout=30)
    pool = get_pool(mock.base_url)
    json.dump({"statuses": sorted({c.value.status_code for c in calls}),
               "streams": sorted({s.value[-1].result.status_code for s in streams}),
               "maxsize": pool.pool.maxsize, "idle": pool.pool.qsize(), "opened": pool.num_connections,
               "received": mock.request_count}, sys.stdout)
"""


def test_greenlets_share_a_pool_bounded_by_the_setting() -> None:
    env = {**os.environ, "BELLAQ_UPSTREAM_POOL_MAXSIZE": "8"}
    out = subprocess.run([sys.executable, "-c", GREENLETS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    got = json.loads(out)
    assert got["statuses"] == [200] and got["streams"] == [200]
    assert got["received"] == 50
    assert got["maxsize"] == 8
    assert got["idle"] <= 8
    assert got["opened"] > 8  # 40 calls at once: none waited for a pooled connection
