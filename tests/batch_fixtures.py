"""Helpers shared by the Files and Batch API tests, and two fixtures (import them to use them)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import openai
import pytest

from tests.conftest import wait_for  # noqa: F401  (re-exported for the batch tests)

CHAT = "/v1/chat/completions"
QUEUE = {"X-BELLA-QUEUE-NAME": "ext"}


@pytest.fixture(name="ext")
def ext_queue(client, admin) -> str:
    """A queue served only by external workers: nothing runs unless the test takes it."""
    resp = client.post("/v1/queue/register", json={"queue": "ext", "endpoint": CHAT, "builtin": False}, headers=admin)
    assert resp.status_code == 200
    return "ext"


@pytest.fixture(name="bound")
def bound_app(app):
    """Celery messages of this test go to its own Redis prefix (no worker consumes them here)."""
    from workers.celery_app import bind

    bind(app)
    return app


def take(client, worker, n: int, queue: str = "ext:1") -> list[dict]:
    resp = client.post("/v1/queue/take", json={"queues": [queue], "size": n, "process_timeout": 600},
                       headers=worker)
    assert resp.status_code == 200, resp.json
    return resp.json[queue]


def complete(client, worker, task: dict, status: int = 200, body: dict | None = None):
    body = body if body is not None else {"id": "chatcmpl-1", "object": "chat.completion", "echo": task["data"]}
    return client.post(f"/v1/queue/{task['task_id']}/complete", headers=worker,
                       json={"status_code": status, "request_id": f"req-{task['task_id'][-6:]}", "body": body})


def sdk(base_url: str, headers: dict[str, str], **extra: Any) -> openai.OpenAI:
    """The official client in strict mode, without retries, for a key's headers."""
    key = headers["Authorization"].split(" ", 1)[1]
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, _strict_response_validation=True,
                         max_retries=0, **extra)


def chat_line(custom_id: str, model: str = "mock-model", url: str = CHAT, **fields: Any) -> dict:
    line = {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": f"say {custom_id}"}]}}
    line.update(fields)
    return line


def jsonl(lines: Iterable[dict | str]) -> bytes:
    return b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in lines)


def upload(client, headers: dict[str, str], data: bytes, filename: str = "in.jsonl", purpose: str = "batch") -> dict:
    import io

    resp = client.post("/v1/files", headers=headers, content_type="multipart/form-data",
                       data={"purpose": purpose, "file": (io.BytesIO(data), filename)})
    assert resp.status_code == 200, resp.json
    return resp.json


def read_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def create_batch(client, headers: dict[str, str], data: bytes, endpoint: str = CHAT, window: str = "24h",
                 extra_headers: dict[str, str] | None = None, **fields: Any) -> dict:
    """Upload ``data`` and create a batch over it through the test client; returns the Batch object."""
    file_id = upload(client, headers, data)["id"]
    body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": window, **fields}
    resp = client.post("/v1/batches", json=body, headers={**headers, **(extra_headers or {})})
    assert resp.status_code == 200, resp.json
    return resp.json
