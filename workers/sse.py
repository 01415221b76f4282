"""Server-sent events of an OpenAI-compatible upstream: reading them as they arrive, and building
the non-streaming object from their chunks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

from urllib3.response import BaseHTTPResponse

__all__ = ["aggregate_chunks", "raw_blocks", "sse_chunks", "sse_data"]

READ_BLOCK = 65536


def raw_blocks(resp: BaseHTTPResponse) -> Iterator[bytes]:
    """Bytes of the (decoded) body as soon as they arrive: a chunk of a chunked answer, else
    whatever one read of the socket gives (never waiting for a full buffer)."""
    if resp.chunked:
        yield from resp.read_chunked(decode_content=True)
        return
    while True:
        block = resp.read1(READ_BLOCK)
        if not block:
            return
        yield block


def sse_data(blocks: Iterable[bytes]) -> Iterator[str]:
    """The ``data`` payload of each server-sent event (multi-line data joined by newlines)."""
    buffer = b""
    data_lines: list[str] = []
    for block in blocks:
        buffer += block
        while True:
            nl = buffer.find(b"\n")
            if nl < 0:
                break
            line = buffer[:nl].rstrip(b"\r").decode("utf-8", errors="replace")
            buffer = buffer[nl + 1 :]
            if not line:
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                data_lines.append(value)
    tail = buffer.rstrip(b"\r").decode("utf-8", errors="replace")
    if tail.startswith("data:"):
        value = tail[5:]
        data_lines.append(value[1:] if value.startswith(" ") else value)
    if data_lines:
        yield "\n".join(data_lines)


def sse_chunks(content: bytes) -> list[dict[str, Any]]:
    """The JSON objects of a whole SSE body up to ``[DONE]`` (other payloads skipped)."""
    chunks = []
    for payload in sse_data([content]):
        if payload.strip() == "[DONE]":
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if isinstance(chunk, dict):
            chunks.append(chunk)
    return chunks


def _merge_tool_calls(target: list[dict[str, Any]], deltas: list[Any]) -> None:
    for delta in deltas:
        if not isinstance(delta, dict):
            continue
        index = delta.get("index", len(target))
        while len(target) <= index:
            target.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        call = target[index]
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        fn = delta.get("function")
        if isinstance(fn, dict):
            if fn.get("name"):
                call["function"]["name"] += fn["name"]
            if fn.get("arguments"):
                call["function"]["arguments"] += fn["arguments"]


def aggregate_chunks(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Build the non-streaming object from streamed chunks.

    ``chat.completion.chunk`` chunks give a ``chat.completion`` (content, refusal, tool calls and
    logprobs concatenated per choice, last ``finish_reason``, ``usage`` if sent); ``text_completion``
    chunks give a ``text_completion``.
    """
    first = chunks[0] if chunks else {}
    is_text = first.get("object") == "text_completion"
    result: dict[str, Any] = {
        "id": first.get("id"),
        "object": "text_completion" if is_text else "chat.completion",
        "created": first.get("created", int(time.time())),
        "model": first.get("model"),
    }
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    fingerprint = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("system_fingerprint"):
            fingerprint = chunk["system_fingerprint"]
        for c in chunk.get("choices") or []:
            if not isinstance(c, dict):
                continue
            index = c.get("index", 0)
            choice = choices.get(index)
            if choice is None:
                if is_text:
                    choice = {"text": "", "index": index, "logprobs": None, "finish_reason": None}
                else:
                    choice = {
                        "index": index,
                        "message": {"role": "assistant", "content": None},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                choices[index] = choice
            if c.get("finish_reason") is not None:
                choice["finish_reason"] = c["finish_reason"]
            if is_text:
                choice["text"] += c.get("text") or ""
                continue
            delta = c.get("delta") or {}
            message = choice["message"]
            if delta.get("role"):
                message["role"] = delta["role"]
            if delta.get("content") is not None:
                message["content"] = (message["content"] or "") + delta["content"]
            if delta.get("refusal") is not None:
                message["refusal"] = (message.get("refusal") or "") + delta["refusal"]
            if delta.get("tool_calls"):
                _merge_tool_calls(message.setdefault("tool_calls", []), delta["tool_calls"])
            logprobs = c.get("logprobs")
            if isinstance(logprobs, dict):
                target = choice["logprobs"] or {"content": None, "refusal": None}
                for key in ("content", "refusal"):
                    if logprobs.get(key):
                        target[key] = (target.get(key) or []) + list(logprobs[key])
                choice["logprobs"] = target
    if fingerprint is not None:
        result["system_fingerprint"] = fingerprint
    result["choices"] = [choices[i] for i in sorted(choices)]
    if usage is not None:
        result["usage"] = usage
    return result
