"""The strict JSON reader and the upstream rules, alone (SPEC 6: malformed input, endpoints, key
variables); and proof that a built-in worker calls exactly the endpoint path that was accepted."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bellaq.upstream_rules import base_url_problem, endpoint_problem, key_env_problem
from bellaq.validation import MAX_JSON_DEPTH, JSONInputError, loads_strict


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(("raw", "says"), [
    (nested(MAX_JSON_DEPTH + 1), "deeper than 128"),
    (b'{"a":' * 200 + b"1" + b"}" * 200, "deeper than 128"),
    (nested(200_000), "deeper than 128"),
    (b'{"x": NaN}', "NaN"),
    (b"[Infinity]", "Infinity"),
    (b'{"x": -Infinity}', "-Infinity"),
    (b"[1e400]", "too large"),
    (b'"\\ud800"', "surrogate"),
    (b'{"k": ["ok", {"\\udfff": 1}]}', "surrogate"),
    (b'{"a": "\\ude00\\ud83d"}', "surrogate"),
    (b'{"a": "\xff"}', "UTF-8"),
    (b'{"a": "\xed\xa0\x80"}', "UTF-8"),  # a surrogate encoded as UTF-8 bytes
    (b"\xef\xbb\xbf{}", "BOM"),
    (b'{"model": "a", "model": "b"}', 'key "model" appears twice'),
    (b'{"a": "\x01"}', "control character"),
    (b"{", "Expecting"),
    (b"1" * 5000, "4300 digits"),
])
def test_refused_with_a_clear_reason(raw, says):
    with pytest.raises(JSONInputError, match=None) as err:
        loads_strict(raw)
    assert says in str(err.value)
    assert isinstance(err.value, ValueError)  # callers may catch ValueError


@pytest.mark.parametrize("raw", [
    nested(MAX_JSON_DEPTH),
    b'"\\ud83d\\ude00 and \\\\ud800 (an escaped backslash, not a surrogate)"',
    b'{"a": {"a": 1}, "b": {"a": 2}}',  # the same key in different objects
    b'{"content": "' + b"[" * 1000 + b'"}',  # brackets inside a string are not nesting
    b"[1.5e308, -0.0, 12345678901234567890]",
    "{\"caf\u00e9\": \"\u2603\"}".encode(),
])
def test_valid_json_is_read_as_json_reads_it(raw):
    assert loads_strict(raw) == json.loads(raw)


def test_a_str_with_a_raw_lone_surrogate_is_refused():
    with pytest.raises(JSONInputError, match="surrogate"):
        loads_strict('["\ud800"]')


@pytest.mark.parametrize("endpoint", [
    "/v1/chat/completions", "/v1/embeddings", "/v1/x.y-z_1/v2", "/v1/a...b", "/v1/.well-known",
])
def test_normalised_endpoints_are_accepted(endpoint):
    assert endpoint_problem(endpoint) is None


@pytest.mark.parametrize("endpoint", [
    "", "/", "v1/chat", "/v2/chat", "/V1/chat", "/v1/", "/v1", "/v1/chat/", "/v1//chat", "/v1/./chat",
    "/v1/../admin", "/v1/chat/..", "/v1/...", "/v1/%2e%2e/admin", "/v1/chat%2Fcompletions", "/v1/%41",
    "/v1/chat\\..\\admin", "/v1/chat?x=1", "/v1/chat#frag", "/v1/chat\x00", "/v1/ch at", "/v1/chat\n",
    "/v1/ch\u00e4t", "/v1/" + "a" * 240, "/v1/chat;x", "/v1/chat:80", "/v1/@evil", "/v1/~user",
])
def test_endpoints_that_are_not_normalised_are_refused(endpoint):
    assert endpoint_problem(endpoint) is not None


@pytest.mark.parametrize(("base_url", "ok"), [
    ("http://vllm:8000", True), ("https://gw.example.com/openai/", True), ("http://[::1]:8000", True),
    ("ftp://x", False), ("http://", False), ("http://x?a=1", False), ("http://x/#f", False),
    ("http://x/a/../b", False), ("http://x/%2e", False), ("http://x\\@y", False), ("http://x y", False),
    ("http://x:99999", False), ("http://x/" + "a" * 1100, False), ("vllm:8000", False),
])
def test_base_urls(base_url, ok):
    assert (base_url_problem(base_url) is None) is ok


@pytest.mark.parametrize(("name", "allowed", "ok"), [
    ("OPENAI_API_KEY", "*_API_KEY", True),
    ("VLLM_API_KEY", "*_API_KEY", True),
    ("HOME", "*_API_KEY", False),
    ("AWS_SECRET_ACCESS_KEY", "*_API_KEY", False),
    ("BELLAQ_ADMIN_KEY", "*_API_KEY", False),
    ("BELLAQ_API_KEY", "*_API_KEY", False),  # matches the pattern, yet BELLAQ_* is never allowed
    ("BELLAQ_DATABASE_URL", "*", False),
    ("bellaq_admin_key", "*", False),
    ("MY_TOKEN", "MY_TOKEN, *_API_KEY", True),
    ("OTHER_TOKEN", "MY_TOKEN,*_API_KEY", False),
    ("ANYTHING", "*", True),
    ("OPENAI_API_KEY", "", False),
    ("1BAD", "*", False),
    ("A-B", "*", False),
])
def test_key_variables(name, allowed, ok):
    assert (key_env_problem(name, allowed) is None) is ok


# ------------------------------------------------------------------------------------------ worker

# Mostly paths the rules accept (dot-heavy segments), some that they refuse.
PATH_TEXT = st.one_of(
    st.lists(st.text(alphabet="._-a9", min_size=1, max_size=5), min_size=1, max_size=4).map("/".join),
    st.text(alphabet="/._-%?#\\ab9 \x00", max_size=24),
)


@settings(max_examples=150, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(tail=PATH_TEXT)
def test_a_worker_calls_exactly_the_accepted_endpoint(mock_upstream, tail):
    """Whatever endpoint the rules accept, the built-in worker's HTTP client requests exactly that
    path under the queue's base URL: nothing is normalised away or re-read as query or host."""
    from workers.upstream import UpstreamClient

    endpoint = "/v1/" + tail
    if endpoint_problem(endpoint) is not None:
        return
    mock_upstream.state.clear()
    UpstreamClient(mock_upstream.base_url + "/gw", max_attempts=1, timeout=10).call(endpoint, {"model": "m"})
    assert [r.path for r in mock_upstream.state.requests] == ["/gw" + endpoint]


def test_the_client_would_normalise_a_dot_segment_so_the_rules_refuse_it(mock_upstream):
    from workers.upstream import UpstreamClient

    UpstreamClient(mock_upstream.base_url, max_attempts=1, timeout=10).call("/v1/../admin", {})
    assert [r.path for r in mock_upstream.state.requests] == ["/admin"]
    assert endpoint_problem("/v1/../admin") is not None
