"""Helpers shared by the Files and Batch API tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import openai

from tests.conftest import wait_for  # noqa: F401  (re-exported for the batch tests)

CHAT = "/v1/chat/completions"


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
