"""Bad input on every route: always a 4xx in the envelope, never a 5xx, and the service stays healthy."""

from __future__ import annotations

import io

import pytest

from tests.conftest import auth, running_app

CHAT = "/v1/chat/completions"
GOOD_PUT = {"endpoint": CHAT, "queue": "chat", "data": {"model": "m"}, "callback_url": "http://127.0.0.1:9/cb"}


def with_(base: dict, **changes) -> dict:
    out = dict(base)
    for name, value in changes.items():
        if value is ...:
            out.pop(name, None)
        else:
            out[name] = value
    return out


CASES = [
    # (role, method, path, body, status, param)
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint=...), 400, "endpoint"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint=5), 400, "endpoint"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint="chat"), 400, "endpoint"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, data=...), 400, "data"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, data="text"), 400, "data"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, level=-1), 400, "level"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, level="1"), 400, "level"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, level=True), 400, "level"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, queue="a b"), 400, "queue"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, queue="x" * 65), 400, "queue"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, queue="unregistered"), 400, "queue"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint="/v1/embeddings"), 400, "endpoint"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, response_mode="email"), 400, "response_mode"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, callback_url=...), 400, "callback_url"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, callback_url="ftp://x/y"), 400, "callback_url"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, timeout=0), 400, "timeout"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, timeout=1.5), 400, "timeout"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, timeout=86401), 400, "timeout"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, callback_url="http://127.0.0.1/" + "x" * 2100), 400,
     "callback_url"),
    ("user", "post", "/v1/queue/put", with_(GOOD_PUT, endpoint="/v1/custom/path", queue=...), 400, "queue"),
    ("worker", "post", "/v1/queue/take", {}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": "chat:0"}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": []}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": [5]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["a b:0"]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["x" * 65 + ":0"]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:-1"]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:x"]}, 400, "queues"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "size": 0}, 400, "size"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "size": 10**6}, 400, "size"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "strategy": "lifo"}, 400, "strategy"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "process_timeout": 0}, 400, "process_timeout"),
    ("worker", "post", "/v1/queue/take", {"queues": ["chat:0"], "process_max_retries": -2}, 400,
     "process_max_retries"),
    ("worker", "post", "/v1/queue/task_nope/complete", {"status_code": 200}, 404, "task_id"),
    ("worker", "post", "/v1/queue/{task}/complete", {}, 400, "status_code"),
    ("worker", "post", "/v1/queue/{task}/complete", {"status_code": "200"}, 400, "status_code"),
    ("worker", "post", "/v1/queue/{task}/complete", {"status_code": 99}, 400, "status_code"),
    ("worker", "post", "/v1/queue/{task}/progress", {"event_id": "1"}, 400, "event_data"),
    ("worker", "post", "/v1/queue/task_nope/progress", {"event_data": {}}, 404, "task_id"),
    ("user", "get", "/v1/queue/task_nope", None, 404, "task_id"),
    ("user", "post", "/v1/queue/task_nope/cancel", None, 404, "task_id"),
    ("admin", "post", "/v1/queue/register", {"endpoint": CHAT}, 400, "queue"),
    ("admin", "post", "/v1/queue/register", {"queue": "a b", "endpoint": CHAT}, 400, "queue"),
    ("admin", "post", "/v1/queue/register", {"queue": "x" * 65, "endpoint": CHAT}, 400, "queue"),
    ("admin", "post", "/v1/queue/register", {"queue": "new"}, 400, "endpoint"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "strategy": "x"}, 400, "strategy"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "builtin": "yes"}, 400, "builtin"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "rpm": 0}, 400, "rpm"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "max_in_flight": -1}, 400,
     "max_in_flight"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT, "upstream": {"base_url": "x"}},
     400, "upstream.base_url"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT,
                                             "upstream": {"base_url": "http://x/" + "a" * 1100}}, 400,
     "upstream.base_url"),
    ("admin", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT,
                                             "upstream": {"base_url": "http://x/api?v="}}, 400, "upstream.base_url"),
    ("user", "get", "/v1/queue/a%20b/metadata", None, 400, "queue"),
    ("user", "get", "/v1/queue/missing/metadata", None, 404, "queue"),
    ("user", "get", "/v1/queue/chat:-1/stats", None, 400, "queue"),
    ("admin", "post", "/v1/console/a%20b:0/clear", None, 400, "queue"),
    ("admin", "post", "/v1/keys", {"role": "root"}, 400, "role"),
    ("admin", "post", "/v1/keys", {}, 400, "role"),
    ("admin", "post", "/v1/keys", {"role": "user", "owner": ""}, 400, "owner"),
    ("admin", "delete", "/v1/keys/key_nope", None, 404, "id"),
]


@pytest.fixture
def setup(client, admin, make_key):
    client.post("/v1/queue/register", json={"queue": "chat", "endpoint": CHAT, "builtin": False}, headers=admin)
    headers = {"admin": admin, "user": make_key("user"), "worker": make_key("worker")}
    task = client.post("/v1/queue/put", json=GOOD_PUT, headers=headers["user"]).json["data"]
    return headers, task


@pytest.mark.parametrize(("role", "method", "path", "body", "status", "param"), CASES)
def test_bad_input_is_a_4xx_in_the_envelope(client, setup, role, method, path, body, status, param):
    headers, task = setup
    resp = getattr(client, method)(path.format(task=task), json=body, headers=headers[role])
    assert resp.status_code == status, resp.json
    error = resp.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert resp.headers.get("x-should-retry") == "false"
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", b"", b"\xff\xfe", b"null"])
@pytest.mark.parametrize("path", ["/v1/queue/put", "/v1/queue/take", "/v1/queue/register", "/v1/keys"])
def test_non_json_bodies_are_400(client, setup, path, payload):
    headers, _task = setup
    resp = client.post(path, data=payload, headers=dict(headers["admin"], **{"Content-Type": "application/json"}))
    assert resp.status_code == 400 and resp.json["error"]["code"] in {"invalid_json", "missing_body"}


def test_oversized_body_is_413(client, setup, settings):
    headers, _task = setup
    big = b'{"endpoint": "' + b"x" * (settings.max_json_bytes + 10) + b'"}'
    resp = client.post("/v1/queue/put", data=big, headers=dict(headers["user"], **{"Content-Type": "application/json"}))
    assert resp.status_code == 413 and resp.json["error"]["code"] == "too_large"
    assert client.get("/healthz").status_code == 200


def test_unknown_route_is_404_in_the_envelope(client):
    resp = client.get("/v1/nothing/here")
    assert resp.status_code == 404 and resp.json["error"]["code"] == "not_found"


def test_wrong_method_is_405_in_the_envelope(client, setup):
    headers, _task = setup
    resp = client.get("/v1/queue/put", headers=headers["user"])
    assert resp.status_code in (404, 405) and "error" in resp.json


def test_nothing_half_written_when_redis_is_down(app, client, setup, monkeypatch):
    from redis.exceptions import ConnectionError

    from bellaq.extensions import db
    from bellaq.models import Task

    headers, _task = setup
    engine = app.extensions["bellaq"].engine

    def down(*_a, **_k):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(engine, "enqueue", down)
    monkeypatch.setattr(engine, "enqueue_many", down)
    with app.app_context():
        before = db.session.query(Task).count()
    resp = client.post("/v1/queue/put", json=GOOD_PUT, headers=headers["user"])
    assert resp.status_code == 503 and resp.json["error"]["type"] == "server_error"
    assert resp.headers["x-should-retry"] == "true"  # nothing was kept: a retry is safe
    with app.app_context():
        assert db.session.query(Task).count() == before


def test_an_unexpected_failure_is_a_500_server_error_without_details(client, setup, monkeypatch):
    from bellaq import tasks

    headers, task = setup

    def broken(*_a, **_k):
        raise RuntimeError("secret internals /etc/passwd")

    monkeypatch.setattr(tasks, "owned_task", broken)
    resp = client.get(f"/v1/queue/{task}", headers=headers["user"])
    assert resp.status_code == 500
    assert resp.json["error"]["type"] == "server_error" and resp.json["error"]["code"] == "server_error"
    assert "secret" not in resp.get_data(as_text=True)


# ------------------------------------------------------------------------------------ strict JSON

BAD_JSON = [
    b"[" * 129 + b"]" * 129,
    b'{"endpoint": "/v1/chat/completions", "data": ' + b'{"a": ' * 140 + b"1" + b"}" * 140 + b"}",
    b"[" * 100_000,
    b'{"endpoint": "/v1/chat/completions", "data": {"temperature": NaN}}',
    b'{"data": {"x": Infinity}}',
    b'{"data": {"x": -Infinity}}',
    b'{"size": 1e999}',
    b'{"endpoint": "/v1/chat/completions", "data": {"content": "\\ud800"}}',
    b'{"\\udfff": 1}',
    b'{"name": "\xc3\x28"}',
    b'{"role": "user", "role": "admin"}',
    b"\xef\xbb\xbf{}",
]
JSON_ROUTES = [
    ("user", "/v1/queue/put"), ("user", "/v1/batches"), ("worker", "/v1/queue/take"),
    ("worker", "/v1/queue/{task}/complete"), ("worker", "/v1/queue/{task}/progress"),
    ("admin", "/v1/queue/register"), ("admin", "/v1/keys"),
]


@pytest.fixture(params=["admin key set", "admin key unset"])
def keyed(request, settings):
    """(client, headers by role, a task id) on an app with or without BELLAQ_ADMIN_KEY."""
    from bellaq.keys import create_key

    admin_key = "bq-operator-admin" if request.param == "admin key set" else ""
    with running_app(settings.replace(admin_key=admin_key)) as app:
        with app.app_context():
            headers = {role: auth(create_key(role, role)[1]) for role in ("admin", "user", "worker")}
        client = app.test_client()
        client.post("/v1/queue/register", json={"queue": "chat", "endpoint": CHAT, "builtin": False},
                    headers=headers["admin"])
        task = client.post("/v1/queue/put", json=GOOD_PUT, headers=headers["user"]).json["data"]
        yield client, headers, task


def test_malformed_json_is_400_on_every_json_route(keyed):
    client, headers, task = keyed
    for role, path in JSON_ROUTES:
        for payload in BAD_JSON:
            resp = client.post(path.format(task=task), data=payload,
                               headers={**headers[role], "Content-Type": "application/json"})
            assert resp.status_code == 400, (path, payload[:60], resp.json)
            error = resp.json["error"]
            assert error["code"] == "invalid_json" and error["type"] == "invalid_request_error", error
    assert client.get(f"/v1/queue/{task}", headers=headers["user"]).json["status"] == "waiting"


def test_the_error_says_what_is_wrong(client, setup):
    headers, _task = setup
    said = {
        b"[" * 129 + b"]" * 129: "nested deeper than 128 levels",
        b'{"a": NaN}': "NaN is not a JSON number",
        b'{"a": "\\ud800"}': "lone UTF-16 surrogate",
        b'{"a": "\xff"}': "not valid UTF-8",
        b'{"a": 1, "a": 2}': 'the key "a" appears twice',
    }
    for payload, text in said.items():
        resp = client.post("/v1/queue/put", data=payload,
                           headers={**headers["user"], "Content-Type": "application/json"})
        assert text in resp.json["error"]["message"]


def test_json_nested_exactly_to_the_limit_is_accepted(client, setup):
    headers, _task = setup
    # the body is level 1, data level 2: 126 more levels make 128
    data = {"model": "m"}
    inner: dict = data
    for _ in range(126):
        inner["x"] = {}
        inner = inner["x"]
    resp = client.post("/v1/queue/put", json=with_(GOOD_PUT, data=data), headers=headers["user"])
    assert resp.status_code == 200, resp.json
    inner["x"] = {}
    resp = client.post("/v1/queue/put", json=with_(GOOD_PUT, data=data), headers=headers["user"])
    assert resp.status_code == 400 and "128" in resp.json["error"]["message"]


# ------------------------------------------------------------------------------------ endpoints

BAD_ENDPOINTS = ["/v1/../admin", "/v1/chat/../../admin", "/v1/./chat", "/v1//chat", "/v1/chat/",
                 "/v1/%2e%2e/admin", "/v1/chat%2fcompletions", "/v1/chat\\..\\x", "/v1/chat?x=1", "/v1/chat#x",
                 "/v1/chat\x00", "/v1/chat\r\nHost: evil", "/v1/...", "/v2/chat", "v1/chat", "/v1/ch\u00e4t",
                 "http://evil/v1/chat"]


def test_an_endpoint_that_is_not_a_normalised_path_is_400(client, setup):
    headers, _task = setup
    for endpoint in BAD_ENDPOINTS:
        attempts = [
            ("user", "/v1/queue/put", with_(GOOD_PUT, endpoint=endpoint, queue=...)),
            ("admin", "/v1/queue/register", {"queue": "other", "endpoint": endpoint}),
            ("user", "/v1/batches", {"input_file_id": "file-x", "endpoint": endpoint, "completion_window": "24h"}),
        ]
        for role, path, body in attempts:
            resp = client.post(path, json=body, headers=headers[role])
            assert resp.status_code == 400, (endpoint, path, resp.json)
            error = resp.json["error"]
            assert (error["code"], error["param"]) == ("invalid_endpoint", "endpoint"), (endpoint, path)


def test_a_default_queue_never_serves_another_endpoint(client, setup):
    """Queue names are sanitised: /v1/chat_completions + model m maps onto the name of
    /v1/chat/completions + m. The put must not land on that queue with its own endpoint."""
    headers, _task = setup
    first = client.post("/v1/queue/put", json=with_(GOOD_PUT, queue=...), headers=headers["user"])
    assert first.status_code == 200
    resp = client.post("/v1/queue/put", json=with_(GOOD_PUT, queue=..., endpoint="/v1/chat_completions"),
                       headers=headers["user"])
    assert resp.status_code == 400 and resp.json["error"]["param"] == "queue"


# ------------------------------------------------------------------------------ paths and queries

ID_ROUTES = [
    ("user", "get", "/v1/queue/{id}"), ("user", "post", "/v1/queue/{id}/cancel"),
    ("worker", "post", "/v1/queue/{id}/complete"), ("user", "get", "/v1/queue/{id}/metadata"),
    ("user", "get", "/v1/queue/{id}:0/stats"), ("user", "get", "/v1/files/{id}"),
    ("user", "get", "/v1/files/{id}/content"), ("user", "delete", "/v1/files/{id}"),
    ("user", "get", "/v1/batches/{id}"), ("user", "post", "/v1/batches/{id}/cancel"),
    ("admin", "delete", "/v1/keys/{id}"), ("admin", "post", "/v1/console/{id}:0/clear"),
]


def test_an_oversized_id_in_the_path_is_400(client, setup):
    headers, _task = setup
    for role, method, path in ID_ROUTES:
        resp = getattr(client, method)(path.format(id="t" * 300), json={}, headers=headers[role])
        assert resp.status_code == 400 and resp.json["error"]["code"] == "invalid_path", path
        assert len(resp.json["error"]["message"]) < 300
        fits = getattr(client, method)(path.format(id="t" * 250), json={}, headers=headers[role])
        assert 400 <= fits.status_code < 500 and fits.json["error"]["code"] != "invalid_path", path


ODD_QUERIES = [
    "limit=abc", "limit=-1", "limit=0", "limit=99999999999999999999999999", "limit=1e3", "limit=%00",
    "limit=1&limit=x", "order=sideways", "order=%ff%fe", "after=%00%01", "after=" + "z" * 5000,
    "purpose=%ed%a0%80", "limit", "=&&=", "%zz=1", "after=file-%27%20OR%201=1--",
]


def test_odd_query_strings_never_fail(client, setup):
    headers, _task = setup
    for path in ("/v1/files", "/v1/batches"):
        for query in ODD_QUERIES:
            resp = client.get(f"{path}?{query}", headers=headers["user"])
            assert resp.status_code in (200, 400), (path, query, resp.data)
            if resp.status_code == 400:
                assert set(resp.json["error"]) == {"message", "type", "param", "code"}
            else:
                assert resp.json["object"] == "list"


# ---------------------------------------------------------------------------------------- uploads

def form(parts: list[tuple[str, str | None, bytes]], boundary: str = "B0und") -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post_form(client, headers, body: bytes, content_type: str = "multipart/form-data; boundary=B0und"):
    return client.post("/v1/files", data=body, headers={**headers, "Content-Type": content_type})


def test_too_many_parts_is_400_naming_the_problem(app, client, setup):
    from bellaq.files import MAX_PARTS

    headers, _task = setup
    parts = [("purpose", None, b"batch")] + [(f"x{i}", None, b"1") for i in range(MAX_PARTS)]
    resp = post_form(client, headers["user"], form([*parts, ("file", "a.jsonl", b"{}\n")]))
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["code"] == "too_many_parts" and str(MAX_PARTS) in resp.json["error"]["message"]
    ok = post_form(client, headers["user"], form([*parts[:MAX_PARTS - 1], ("file", "a.jsonl", b"{}\n")]))
    assert ok.status_code == 200, ok.json
    with app.app_context():
        from bellaq.extensions import db
        from bellaq.models import File

        assert db.session.query(File).count() == 1


@pytest.mark.parametrize(("body", "content_type", "code"), [
    (form([("purpose", None, b"batch"), ("", "a", b"x")]), None, "invalid_multipart"),
    (b'--B0und\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B0und--\r\n', None, "invalid_multipart"),
    (b"x" * 200_000 + form([("purpose", None, b"batch")]), None, "invalid_multipart"),
    (b'--B0und\r\nX-Filler: ' + b"h" * 200_000 + b"\r\n\r\n", None, "invalid_multipart"),
    (b'--B0und\r\nContent-Disposition: form-data; name="\xff\xfe"\r\n\r\nx\r\n--B0und--\r\n', None,
     "invalid_multipart"),
    (form([("purpose", None, b"batch")]), "multipart/form-data; boundary*=utf-8''%E2%82%AC", "invalid_content_type"),
    (form([("purpose", None, b"batch")]), "multipart/form-data; boundary=" + "b" * 300, "invalid_content_type"),
    (form([("purpose", None, b"batch")]), "text/plain", "invalid_content_type"),
])
def test_malformed_multipart_is_400(client, setup, body, content_type, code):
    headers, _task = setup
    resp = post_form(client, headers["user"], body, *(content_type,) if content_type else ())
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["code"] == code


def test_upload_field_values_are_bounded(client, setup):
    headers, _task = setup
    resp = client.post("/v1/files", headers=headers["user"], content_type="multipart/form-data",
                       data={"purpose": "b" * 5000, "file": (io.BytesIO(b"x"), "a.jsonl")})
    assert resp.status_code == 400 and resp.json["error"]["code"] == "field_too_large"
