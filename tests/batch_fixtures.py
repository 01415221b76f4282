"""Helpers shared by the Files and Batch API tests, and two fixtures (import them to use them)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import openai
import pytest

from bellaq.extensions import db
from bellaq.models import Batch
from tests.conftest import wait_for

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


# --------------------------------------------------------------------------- reading batches

BATCH_FIELDS = {
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata",
    "usage",
}


def get(client, user, batch_id: str) -> dict:
    resp = client.get(f"/v1/batches/{batch_id}", headers=user)
    assert resp.status_code == 200, resp.json
    assert set(resp.json) == BATCH_FIELDS
    return resp.json


def until_status(client, user, batch_id: str, *statuses: str, timeout: float = 30) -> dict:
    return wait_for(lambda: (b := get(client, user, batch_id))["status"] in statuses and b, timeout=timeout)


def content(client, user, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    resp = client.get(f"/v1/files/{file_id}/content", headers=user)
    assert resp.status_code == 200
    return read_jsonl(resp.data)


def expire_now(app, batch_id: str) -> None:
    with app.app_context():
        db.session.execute(db.update(Batch).where(Batch.id == batch_id).values(expires_at=int(time.time()) - 1))
        db.session.commit()


FINAL = ("completed", "failed", "expired", "cancelled")


def finished(api, batch_id: str, timeout: float = 60):
    return wait_for(lambda: (b := api.batches.retrieve(batch_id)).status in FINAL and b, timeout=timeout,
                    interval=0.1)


def results(api, batch) -> tuple[list[dict], list[dict]]:
    out = read_jsonl(api.files.content(batch.output_file_id).content) if batch.output_file_id else []
    err = read_jsonl(api.files.content(batch.error_file_id).content) if batch.error_file_id else []
    return out, err


def assert_each_custom_id_once(out: list[dict], err: list[dict], expected: set[str]) -> None:
    seen = Counter(line["custom_id"] for line in out + err)
    assert set(seen) == expected and set(seen.values()) == {1}, [c for c, n in seen.items() if n > 1][:5]
