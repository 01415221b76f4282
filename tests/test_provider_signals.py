"""Reading a provider's rate-limit headers, and the token estimate a task is charged."""

from __future__ import annotations

import pytest

from bellaq import token_cost
from bellaq.retries import is_transient
from workers.upstream import duration_seconds, limit_wait_seconds


@pytest.mark.parametrize(("value", "seconds"), [
    ("12ms", 0.012), ("1s", 1.0), ("1.5s", 1.5), ("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("2", 2.0),
    ("", None), (None, None), ("soon", None), ("5x", None), ("-1", None), ("1s junk", None),
])
def test_reset_durations_in_go_format(value, seconds):
    assert duration_seconds(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_an_exhausted_limit_waits_for_one_request_or_the_answer_s_tokens():
    headers = {"x-ratelimit-limit-requests": "1200", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-requests": "1m0s",
               "x-ratelimit-limit-tokens": "120000", "x-ratelimit-remaining-tokens": "5",
               "x-ratelimit-reset-tokens": "30s"}
    assert limit_wait_seconds(headers) == pytest.approx(0.05)  # a minute to refill 1200: 50 ms for one
    headers["x-ratelimit-remaining-tokens"] = "0"
    assert limit_wait_seconds(headers, tokens=12_000) == pytest.approx(3.0)  # the longer wait wins
    assert limit_wait_seconds({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "1s"}) is None
    assert limit_wait_seconds({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}) == 2.0


@pytest.mark.parametrize(("status", "transient"), [
    (200, False), (400, False), (401, False), (404, False), (422, False), (408, True), (409, True),
    (429, True), (500, True), (502, True), (503, True), (504, True),
])
def test_only_408_409_429_and_5xx_are_retried(status, transient):
    assert is_transient(status) is transient


def test_the_estimate_is_prompt_characters_over_four_plus_the_budget():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x" * 40},
                                       {"role": "user", "content": [{"type": "text", "text": "y" * 41}]}]}
    assert token_cost.estimate("/v1/chat/completions", chat) == 21 + token_cost.DEFAULT_MAX_TOKENS
    assert token_cost.estimate("/v1/chat/completions", {**chat, "max_tokens": 10}) == 31
    assert token_cost.estimate("/v1/chat/completions", {**chat, "max_completion_tokens": 7, "n": 3}) == 21 + 21
    assert token_cost.estimate("/v1/chat/completions", chat, default_max_tokens=5) == 26
    assert token_cost.estimate("/v1/embeddings", {"input": ["abcd", "efgh"], "max_tokens": 99}) == 2
    assert token_cost.estimate("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1}) == 4
    assert token_cost.estimate("/v1/custom", {"q": "z" * 30}) == 10  # the whole body: 38 characters


def test_the_correction_is_the_reported_usage():
    assert token_cost.used({"status_code": 200, "body": {"usage": {"total_tokens": 37}}}) == 37
    assert token_cost.used({"status_code": 200, "body": {"choices": []}}) is None  # the estimate stands
    assert token_cost.used({"status_code": 429, "body": {"error": {}}}) == 0
