"""What a task costs under a ``tpm`` limit: estimated when it is queued, corrected by its answer.

The estimate is what OpenAI charges a request against its token limit before it runs: the prompt
(its characters / 4, rounded up) plus the completion budget (``max_completion_tokens``,
``max_tokens`` or ``max_output_tokens``; else the queue's ``default_max_tokens``, else
:data:`DEFAULT_MAX_TOKENS`), times ``n`` answers. Only chat completions, completions and
responses have a default budget; embeddings never have one, other endpoints only when the body
sets one. When the answer comes, its ``usage.total_tokens`` replaces the estimate in the queue's
token bucket.
"""

from __future__ import annotations

import json
import math
from typing import Any

CHARS_PER_TOKEN = 4
DEFAULT_MAX_TOKENS = 256
_BUDGET_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_PROMPT_FIELDS = ("messages", "prompt", "input", "instructions")
_GENERATING = ("/chat/completions", "/completions", "/responses")


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _text_chars(value: Any) -> int:
    """Characters of the text in a prompt-like value (strings, message lists, content parts);
    token id lists count one token's worth of characters per id."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return CHARS_PER_TOKEN
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_chars(value.get(key)) for key in ("content", "text", "input", "prompt"))
    return 0


def prompt_tokens(data: dict[str, Any]) -> int:
    """The prompt's estimated tokens: its characters / 4, rounded up (the whole body's, when it has
    none of the usual prompt fields)."""
    if any(key in data for key in _PROMPT_FIELDS):
        chars = sum(_text_chars(data.get(key)) for key in _PROMPT_FIELDS)
    else:
        chars = len(json.dumps(data, separators=(",", ":")))
    return max(1, math.ceil(chars / CHARS_PER_TOKEN))


def estimate(endpoint: str, data: dict[str, Any], default_max_tokens: int | None = None) -> int:
    """The tokens a request is charged when it is taken (see the module docstring)."""
    prompt = prompt_tokens(data)
    if endpoint.endswith("/embeddings"):
        return prompt
    budget = next((v for v in (_positive_int(data.get(k)) for k in _BUDGET_FIELDS) if v), None)
    if budget is None and not endpoint.endswith(_GENERATING):
        return prompt  # an endpoint that writes no completion, unless the body sets a budget
    answers = _positive_int(data.get("n")) or 1
    return prompt + (budget or default_max_tokens or DEFAULT_MAX_TOKENS) * answers


def used(result: dict[str, Any] | None) -> int | None:
    """``usage.total_tokens`` of an answer; 0 for an answer refused before it ran (429, 5xx with
    no usage); None when a 2xx answer reports no usage (the estimate then stands)."""
    if not isinstance(result, dict):
        return None
    body = result.get("body")
    usage = body.get("usage") if isinstance(body, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    status = result.get("status_code")
    if isinstance(status, int) and not 200 <= status < 300:
        return 0
    return None
