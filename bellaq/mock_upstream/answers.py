"""What the mock answers: deterministic text and vectors, token counts, and the OpenAI objects
(chat completions, text completions, their stream chunks) that carry them.

Tokens: a prompt counts as its characters / 4 (rounded up; a prompt given as token ids counts
its ids), as OpenAI estimates it for rate limits; an answer counts its words. A request is
charged its prompt plus its completion budget (``max_completion_tokens`` / ``max_tokens``, or a
default, per answer), and the answer never uses more than that budget.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
ECHO_PREFIX = "echo: "
ECHO_MAX_CHARS = 200
CHARS_PER_TOKEN = 4

_WORD_RE = re.compile(r"\S+\s*")

Prompt = str | list  # text, or a list of token ids


def text_of(content: Any) -> str:
    """The text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return " ".join(parts)
    return ""


def prompts_of(value: Any) -> list[Prompt] | None:
    """A completions ``prompt`` or embeddings ``input`` as a list of prompts; None when malformed."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
        return list(value)
    return None


def prompt_text(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else " ".join(str(t) for t in prompt)


def prompt_tokens(texts: list[str], token_ids: int = 0) -> int:
    """Characters / 4 of ``texts`` (rounded up) plus ``token_ids``; at least 1."""
    return max(1, math.ceil(sum(len(t) for t in texts) / CHARS_PER_TOKEN) + token_ids)


def tokens_of_prompts(prompts: list[Prompt]) -> int:
    texts = [p for p in prompts if isinstance(p, str)]
    return prompt_tokens(texts, sum(len(p) for p in prompts if isinstance(p, list)))


def tokens_of_messages(messages: Any) -> int:
    if not isinstance(messages, list):
        return prompt_tokens([])
    return prompt_tokens([text_of(m.get("content")) for m in messages if isinstance(m, dict)])


def budget(body: dict[str, Any], default: int) -> int:
    """The completion budget of one answer: ``max_completion_tokens`` / ``max_tokens``, else ``default``."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def estimate_tokens(path: str, body: Any, default_max_tokens: int) -> int:
    """The tokens a request is charged before it runs: prompt plus completion budget per answer."""
    if not isinstance(body, dict):
        return 0
    if path == CHAT_PATH:
        return tokens_of_messages(body.get("messages")) + budget(body, default_max_tokens)
    prompts = prompts_of(body.get("prompt" if path == COMPLETIONS_PATH else "input")) or []
    prompt = tokens_of_prompts(prompts) if prompts else 0
    if path == COMPLETIONS_PATH:
        return prompt + budget(body, default_max_tokens) * max(1, len(prompts))
    return prompt


def echo_pieces(text: str, max_tokens: int) -> tuple[list[str], str]:
    """The answer to ``text`` as word tokens (their concatenation is the text), cut at ``max_tokens``."""
    pieces = _WORD_RE.findall(ECHO_PREFIX + text[:ECHO_MAX_CHARS])
    if len(pieces) > max_tokens:
        return pieces[:max_tokens], "length"
    return pieces, "stop"


def usage(prompt: int, completion: int | None = None) -> dict[str, int]:
    """The ``usage`` object (embeddings have no completion tokens)."""
    if completion is None:
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic vector in [-1, 1] derived from the text."""
    data = b""
    counter = 0
    seed = text.encode("utf-8")
    while len(data) < dim * 2:
        data += hashlib.blake2b(seed + counter.to_bytes(4, "little"), digest_size=64).digest()
        counter += 1
    values = struct.unpack(f"<{dim}H", data[: dim * 2])
    return [round(v / 32767.5 - 1.0, 6) for v in values]


# --------------------------------------------------------------------------- completion objects


def _chat_choice(index: int, text: str, finish: str) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": finish,
    }


def _chat_delta(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
    delta = {"content": text} if text is not None else {}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_choice(index: int, text: str | None, finish: str | None) -> dict[str, Any]:
    return {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}


@dataclass(frozen=True)
class Flavour:
    """How one kind of completion spells its objects."""

    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable[[int, str, str], dict[str, Any]]
    delta: Callable[[int, str | None, str | None], dict[str, Any]]
    opening: dict[str, Any] | None  # the first chunk's choice, before any text


CHAT = Flavour("chatcmpl-", "chat.completion", "chat.completion.chunk", _chat_choice, _chat_delta,
               {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
TEXT = Flavour("cmpl-", "text_completion", "text_completion", _text_choice, _text_choice, None)

Answers = list[tuple[list[str], str]]  # per choice: word pieces and finish reason


def completion(flavour: Flavour, cid: str, created: int, model: str, answers: Answers,
               used: dict[str, int]) -> dict[str, Any]:
    """The whole (non-streamed) completion object."""
    return {
        "id": cid,
        "object": flavour.object,
        "created": created,
        "model": model,
        "system_fingerprint": "fp_mock",
        "choices": [flavour.choice(i, "".join(pieces), finish) for i, (pieces, finish) in enumerate(answers)],
        "usage": used,
    }


def chunks(flavour: Flavour, cid: str, created: int, model: str, answers: Answers, used: dict[str, int],
           include_usage: bool) -> Iterator[dict[str, Any]]:
    """The stream chunks of a completion: a word per chunk, then each choice's finish reason, then
    (with ``include_usage``) a chunk with no choices and the usage, as OpenAI streams them."""

    def chunk(choices: list[dict[str, Any]], tail: dict[str, int] | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": cid, "object": flavour.chunk_object, "created": created, "model": model,
                               "system_fingerprint": "fp_mock", "choices": choices}
        if include_usage:
            obj["usage"] = tail
        return obj

    if flavour.opening is not None:
        yield chunk([flavour.opening])
    for index, (pieces, finish) in enumerate(answers):
        for piece in pieces:
            yield chunk([flavour.delta(index, piece, None)])
        yield chunk([flavour.delta(index, None, finish)])
    if include_usage:
        yield chunk([], used)
