"""Keys, roles and tenancy (SPEC 0 and 4)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ADMIN_KEY as ADMIN
from tests.conftest import auth

CHAT = "/v1/chat/completions"
PUT = {"endpoint": CHAT, "data": {"model": "m"}, "callback_url": "http://127.0.0.1:9/cb"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer "}])
def test_missing_or_unknown_key_is_401_in_the_envelope(client, headers):
    resp = client.post("/v1/queue/put", json=PUT, headers=headers)
    assert resp.status_code == 401
    assert resp.json["error"]["type"] == "authentication_error"
    assert set(resp.json["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("role", "method", "path", "body"), [
    ("user", "post", "/v1/queue/take", {"queues": ["q:0"]}),
    ("user", "post", "/v1/queue/task_x/complete", {"status_code": 200}),
    ("user", "get", "/v1/queue/eventbus", None),
    ("user", "post", "/v1/queue/register", {"queue": "q", "endpoint": CHAT}),
    ("user", "post", "/v1/keys", {"role": "user"}),
    ("worker", "post", "/v1/queue/put", PUT),
    ("worker", "post", "/v1/console/q:0/clear", None),
    ("worker", "get", "/v1/console/queue/stats", None),
    ("worker", "get", "/v1/keys", None),
])
def test_wrong_role_is_403(client, make_key, role, method, path, body):
    resp = getattr(client, method)(path, json=body, headers=make_key(role))
    assert resp.status_code == 403
    assert resp.json["error"]["type"] == "permission_error"


def test_admin_creates_lists_and_deletes_keys(client, admin):
    made = client.post("/v1/keys", json={"name": "alice", "role": "user"}, headers=admin)
    assert made.status_code == 201
    key = made.json
    assert key["key"].startswith("bq-") and key["webhook_secret"].startswith("whsec_")
    assert key["owner"] == key["id"]
    listed = client.get("/v1/keys", headers=admin).json["data"]
    assert any(k["id"] == key["id"] for k in listed) and all("key" not in k for k in listed)
    assert client.post("/v1/queue/put", json=PUT, headers=auth(key["key"])).status_code == 200
    assert client.delete(f"/v1/keys/{key['id']}", headers=admin).json["deleted"] is True
    assert client.post("/v1/queue/put", json=PUT, headers=auth(key["key"])).status_code == 401


def test_keys_of_one_owner_share_the_signing_secret(client, admin):
    a = client.post("/v1/keys", json={"role": "user", "owner": "acme"}, headers=admin).json
    b = client.post("/v1/keys", json={"role": "user", "owner": "acme"}, headers=admin).json
    c = client.post("/v1/keys", json={"role": "user"}, headers=admin).json
    assert a["webhook_secret"] == b["webhook_secret"] != c["webhook_secret"]


def test_another_tenants_task_is_404(client, make_key):
    alice, bob = make_key("user"), make_key("user")
    task_id = client.post("/v1/queue/put", json=PUT, headers=alice).json["data"]
    assert client.get(f"/v1/queue/{task_id}", headers=bob).status_code == 404
    assert client.post(f"/v1/queue/{task_id}/cancel", headers=bob).status_code == 404
    assert client.get(f"/v1/queue/{task_id}", headers=alice).status_code == 200


def test_same_owner_sees_the_task(client, make_key):
    a, b = make_key("user", owner="acme"), make_key("user", owner="acme")
    task_id = client.post("/v1/queue/put", json=PUT, headers=a).json["data"]
    assert client.get(f"/v1/queue/{task_id}", headers=b).status_code == 200


def test_keys_cli_prints_a_working_key(settings, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from bellaq.cli import main

    for name, value in {"BELLAQ_DATABASE_URL": settings.database_url, "BELLAQ_REDIS_URL": settings.redis_url,
                        "BELLAQ_REDIS_PREFIX": settings.redis_prefix, "BELLAQ_INSTANCE_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    assert runner.invoke(main, ["db", "init"]).exit_code == 0
    assert runner.invoke(main, ["db", "init"]).exit_code == 0  # idempotent
    out = runner.invoke(main, ["keys", "create", "--role", "user", "--name", "alice"])
    assert out.exit_code == 0, out.output
    raw = out.output.strip()
    from bellaq import create_app
    from bellaq.keys import authenticate

    app = create_app(settings)
    with app.app_context():
        principal = authenticate(raw)
        assert principal is not None and principal.role == "user"
        from bellaq.extensions import db
        from bellaq.models import ApiKey

        stored = db.session.execute(db.select(ApiKey.key_hash)).scalars().all()
        assert raw not in stored  # only the hash is kept


# --------------------------------------------------------------------------- malformed keys

MALFORMED = ["Bearer caf\u00e9", "Bearer \u00ff\u00fe", "Bearer bq-\x01key", "Bearer bq\x7fkey",
             "Bearer bq-test-admin-key\x00", "Bearer a b", "Bearer " + "k" * 600]


@pytest.fixture(params=["admin key set", "admin key unset"])
def any_app(request, settings):
    from tests.conftest import running_app

    with running_app(settings.replace(admin_key="bq-test-admin-key" if request.param == "admin key set" else "")) as a:
        yield a


@pytest.mark.parametrize("value", MALFORMED)
def test_a_malformed_key_is_401_whether_or_not_an_admin_key_is_set(any_app, value):
    resp = any_app.test_client().post("/v1/queue/put", json=PUT, headers={"Authorization": value})
    assert resp.status_code == 401, resp.data
    assert resp.json["error"]["type"] == "authentication_error"
    assert set(resp.json["error"]) == {"message", "type", "param", "code"}


def test_raw_non_ascii_header_bytes_over_real_http_are_401(any_app):
    """What a hostile client really sends: UTF-8 or control bytes in the header, through a server."""
    import http.client

    from tests.conftest import LiveServer

    with LiveServer(any_app) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for raw in (b"Bearer \xc3\xa9\xe2\x82\xac", b"Bearer bq-\xff\xfe", b"Bearer bq-test-admin-key\x01",
                    b"Bearer \x80"):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.putrequest("GET", "/v1/keys")
            conn.putheader("Authorization", raw)
            conn.endheaders()
            resp = conn.getresponse()
            body = json.loads(resp.read())
            conn.close()
            assert resp.status == 401, (raw, body)
            assert body["error"]["type"] == "authentication_error"


def test_the_admin_key_still_works_beside_the_checks(any_app):
    resp = any_app.test_client().get("/v1/keys", headers=auth("bq-test-admin-key"))
    assert resp.status_code == (200 if any_app.config["BELLAQ"].admin_key else 401)


def _sql_statements(app):
    """A list that collects every SQL statement ``app`` runs from now on."""
    from sqlalchemy import event

    from bellaq.extensions import db

    seen: list[str] = []
    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", lambda _c, _cur, stmt, *_a: seen.append(stmt))
    return seen


def test_a_key_deleted_through_one_app_is_refused_at_once_by_another(app, settings, make_key):
    from tests.conftest import running_app

    headers = make_key("user")
    with running_app(settings) as other:
        other_client = other.test_client()
        for _ in range(2):  # the second answer comes from the other app's cache
            assert other_client.get("/v1/queue/task_none", headers=headers).status_code == 404
        key_id = app.test_client().get("/v1/keys", headers=auth(ADMIN)).json["data"][0]["id"]
        assert app.test_client().delete(f"/v1/keys/{key_id}", headers=auth(ADMIN)).status_code == 200
        resp = other_client.get("/v1/queue/task_none", headers=headers)
        assert resp.status_code == 401
        assert resp.json["error"]["type"] == "authentication_error"
        assert app.test_client().get("/v1/queue/task_none", headers=headers).status_code == 401


def test_a_valid_key_costs_no_sql_once_cached(app, make_key):
    from bellaq.keys import authenticate

    raw = make_key("worker")["Authorization"].removeprefix("Bearer ")
    statements = _sql_statements(app)
    with app.test_request_context():
        first = authenticate(raw)
    assert statements, "the first lookup reads SQL"
    statements.clear()
    with app.test_request_context():
        assert authenticate(raw) == first
    assert statements == []


def test_a_lost_cache_version_does_not_revive_a_deleted_key(app, make_key):
    """Redis lost the version (a restart): the next version never matches an older cached one."""
    from bellaq.services import Services

    headers = make_key("user")
    client = app.test_client()
    assert client.get("/v1/queue/task_none", headers=headers).status_code == 404
    svc: Services = app.extensions["bellaq"]
    svc.redis.delete(svc.key("keys", "version"))
    key_id = client.get("/v1/keys", headers=auth(ADMIN)).json["data"][0]["id"]
    assert client.delete(f"/v1/keys/{key_id}", headers=auth(ADMIN)).status_code == 200
    assert client.get("/v1/queue/task_none", headers=headers).status_code == 401
