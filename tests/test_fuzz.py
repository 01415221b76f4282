"""Fuzzing every route of the Flask URL map with generated malformed bodies, headers, ids and
query strings (SPEC 6: no input produces a 5xx; every error is in the OpenAI envelope).

CI runs a bounded number of examples per route, derandomized, so every run tries the same
inputs. To search longer, and with new inputs each run:

    BELLAQ_FUZZ_EXAMPLES=2000 BELLAQ_FUZZ_RANDOM=1 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import auth, running_app

EXAMPLES = int(os.environ.get("BELLAQ_FUZZ_EXAMPLES", "25"))
RANDOM = os.environ.get("BELLAQ_FUZZ_RANDOM") == "1"
CHAT = "/v1/chat/completions"

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
HEADER_TEXT = st.text(st.characters(max_codepoint=0xFF, exclude_characters="\r\n"), max_size=80)

JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**18),
                      st.floats(allow_nan=False, allow_infinity=False), TEXT)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)
# Values with a meaning to some route, to get past the first check more often.
MEANINGFUL = st.sampled_from([
    CHAT, "/v1/embeddings", "/v1/rerank", "/v1/../admin", "chat", "chat:0", "chat:1", ["chat:0"], ["x:0", 5],
    "callback", "blocking", "streaming", "fifo", "round_robin", "sequential", "active_passive", "user", "worker",
    "admin", "24h", "1m", "99999d", "http://127.0.0.1:9/cb", "file://etc/passwd", 0, 1, -1, 2**63, 200, 599,
    {"model": "m"}, {"base_url": "http://x", "api_key_env": "BELLAQ_ADMIN_KEY"}, "", None, [], {},
])
FIELDS = ["endpoint", "data", "queue", "level", "response_mode", "callback_url", "timeout", "queues", "size",
          "strategy", "process_timeout", "process_max_retries", "status_code", "request_id", "body", "event_id",
          "event_name", "event_data", "builtin", "upstream", "max_in_flight", "rpm", "name", "role", "owner",
          "input_file_id", "completion_window", "metadata"]

HOSTILE = st.sampled_from([
    b"[" * 129 + b"]" * 129, b"[" * 50_000, b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b"[1e999]",
    b'{"endpoint": "\\ud800"}', b'{"\\udc00": 1}', b'{"a": "\xff\xfe"}', b"\xef\xbb\xbf{}", b'{"a": 1, "a": 2}',
    b"9" * 5000, b"\x00", b"null", b"[]", b'"text"',
])


def multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f"form-data; name={json.dumps(name)}" + (f"; filename={json.dumps(filename)}" if filename else "")
        out += b"--B\r\nContent-Disposition: " + disposition.encode("utf-8", "replace") + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--B--\r\n"


def bodies(templates: list[dict[str, Any]]) -> st.SearchStrategy[bytes | None]:
    mutated = st.builds(
        lambda base, changes, drops: {k: v for k, v in {**base, **changes}.items() if k not in drops},
        st.sampled_from(templates),
        st.dictionaries(st.sampled_from(FIELDS), st.one_of(MEANINGFUL, JSON_VALUE), max_size=3),
        st.sets(st.sampled_from(FIELDS), max_size=2),
    )
    parts = st.lists(st.tuples(st.sampled_from(["file", "purpose", "x"]) | TEXT, st.none() | TEXT,
                               st.sampled_from([b"batch", b"{}\n"]) | st.binary(max_size=60)), max_size=20)
    return st.one_of(
        st.none(),
        st.binary(max_size=300),
        JSON_VALUE.map(lambda v: json.dumps(v).encode()),
        mutated.map(lambda v: json.dumps(v).encode()),
        mutated.map(lambda v: json.dumps(v).encode()),
        HOSTILE,
        parts.map(multipart),
    )


def path_values(real: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(real),
        st.sampled_from(real),
        TEXT.map(lambda t: quote(t, safe="")),
        st.binary(max_size=40).map(lambda b: quote(b, safe="")),
        st.integers(250, 2000).map(lambda n: "i" * n),
        st.sampled_from(["..", ".", "%2e%2e", "%00", "%2F", "a:b:c", "chat:-1", "chat:99999999999999999999",
                         "chat:", ":0", "chat:1.5"]),
    )


def queries() -> st.SearchStrategy[str]:
    pairs = st.lists(st.tuples(st.sampled_from(["limit", "after", "order", "purpose"]) | TEXT,
                               TEXT | st.binary(max_size=20) | st.sampled_from(["1", "asc", "desc", "batch"])),
                     max_size=4)
    return pairs.map(lambda ps: "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in ps))


def headers(keys: list[str]) -> st.SearchStrategy[dict[str, str]]:
    valid = st.sampled_from([f"Bearer {k}" for k in keys])
    authorization = st.one_of(valid, valid, valid, st.none(), HEADER_TEXT.map("Bearer ".__add__), HEADER_TEXT)
    content_type = st.none() | st.sampled_from([
        "application/json", "multipart/form-data; boundary=B", "multipart/form-data", "text/plain",
        "application/x-www-form-urlencoded", "multipart/form-data; boundary*=utf-8''%E2%82%AC",
    ]) | HEADER_TEXT
    optional = st.none() | HEADER_TEXT | st.just("k" * 300)
    return st.builds(
        lambda a, c, i, q: {name: value for name, value in (("Authorization", a), ("Content-Type", c),
                                                            ("Idempotency-Key", i), ("X-BELLA-QUEUE-NAME", q))
                            if value is not None},
        authorization, content_type, optional, optional,
    )


@pytest.fixture
def target(settings):
    """An app with a little of everything, and held requests capped at one second."""
    from bellaq.keys import create_key

    with running_app(settings.replace(max_task_timeout=1, default_task_timeout=1)) as app:
        with app.app_context():
            keys = {role: create_key(role, role)[1] for role in ("admin", "user", "worker")}
            victim = create_key("victim", "user")[0].id
        client = app.test_client()
        user = auth(keys["user"])
        client.post("/v1/queue/register", json={"queue": "chat", "endpoint": CHAT, "builtin": False},
                    headers=auth(keys["admin"]))
        task = client.post("/v1/queue/put", headers=user, json={
            "endpoint": CHAT, "queue": "chat", "data": {"model": "m"}, "callback_url": "http://127.0.0.1:9/cb",
            "timeout": 1}).json["data"]
        file_id = client.post("/v1/files", headers=user, content_type="multipart/form-data", data={
            "purpose": "batch", "file": (io.BytesIO(b"{}\n"), "a.jsonl")}).json["id"]
        batch = client.post("/v1/batches", headers=user, json={
            "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}).json["id"]
        ids = {"task_id": [task, "task_nope"], "file_id": [file_id, "file-nope"], "batch_id": [batch, "batch_nope"],
               "key_id": [victim, "key_nope"], "name": ["chat", "chat:0", "chat:1", "nope"]}
        templates = [
            {"endpoint": CHAT, "queue": "chat", "data": {"model": "m"}, "callback_url": "http://127.0.0.1:9/cb"},
            {"queues": ["chat:0"], "size": 2, "strategy": "fifo", "process_timeout": 5},
            {"status_code": 200, "request_id": "r", "body": {"ok": True}},
            {"event_id": "1", "event_name": "progress", "event_data": {"delta": "x"}},
            {"queue": "fz", "endpoint": CHAT, "strategy": "fifo", "max_in_flight": 3, "rpm": 60},
            {"name": "n", "role": "user", "owner": "o"},
            {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", "metadata": {"k": "v"}},
        ]
        yield app, list(keys.values()), ids, templates


def rule_path(rule: str, values: dict[str, str]) -> str:
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: values[m.group(1)], rule)


def check(method: str, resp) -> None:  # type: ignore[no-untyped-def]
    data = resp.get_data()  # reads a stream to its end
    assert resp.status_code < 500, data[:500]
    if resp.status_code >= 400 and method != "HEAD":
        body = json.loads(data)
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"] and "Traceback" not in body["error"]["message"]


def test_no_input_makes_any_route_fail(target):
    app, keys, ids, templates = target
    client = app.test_client()
    # Strategies are built once: building them per example costs more than the requests.
    header_values, body_values, query_values = headers(keys), bodies(templates), queries()
    fuzzed = set()

    for rule in app.url_map.iter_rules():
        args = {arg: path_values(ids.get(arg, ["x"])) for arg in rule.arguments}
        methods = st.sampled_from(sorted(rule.methods or ()) + ["GET", "POST", "DELETE", "PATCH"])

        @settings(max_examples=EXAMPLES, derandomize=not RANDOM, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def fuzz(data: st.DataObject) -> None:
            values = {arg: data.draw(strategy, label=arg) for arg, strategy in args.items()}  # noqa: B023
            path = rule_path(rule.rule, values)  # noqa: B023
            query = data.draw(query_values, label="query")
            method = data.draw(methods, label="method")  # noqa: B023
            sent = data.draw(header_values, label="headers")
            body = data.draw(body_values, label="body")
            resp = client.open(f"{path}?{query}" if query else path, method=method, headers=sent, data=body)
            check(method, resp)

        fuzz()
        fuzzed.add(rule.rule)
    assert fuzzed == {r.rule for r in app.url_map.iter_rules()}
    assert len(fuzzed) >= 20
