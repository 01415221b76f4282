"""What tenants can see and cause (SPEC 6): allowed key variables, what users and workers see of a
queue, and the bounds the operator sets."""

from __future__ import annotations

import pytest

from tests.conftest import auth, running_app

CHAT = "/v1/chat/completions"
SECRET_URL = "http://inference.internal:8000"


def register(client, admin, key_env: str, queue: str = "vllm"):
    return client.post("/v1/queue/register", headers=admin, json={
        "queue": queue, "endpoint": CHAT, "upstream": {"base_url": SECRET_URL, "api_key_env": key_env}})


@pytest.mark.parametrize("key_env", ["BELLAQ_ADMIN_KEY", "BELLAQ_DATABASE_URL", "BELLAQ_API_KEY", "HOME",
                                     "AWS_SECRET_ACCESS_KEY", "PATH", "bellaq_admin_key"])
def test_a_queue_cannot_read_its_key_from_a_variable_the_operator_did_not_allow(client, admin, key_env):
    resp = register(client, admin, key_env)
    assert resp.status_code == 400, resp.json
    assert resp.json["error"]["param"] == "upstream.api_key_env"
    assert resp.json["error"]["code"] == "key_env_not_allowed"
    assert client.get("/v1/queue/vllm/metadata", headers=admin).status_code == 404  # nothing kept


def test_by_default_names_ending_in_api_key_are_allowed(client, admin):
    assert register(client, admin, "VLLM_API_KEY").status_code == 200


def test_the_operator_chooses_the_allowed_names(settings):
    with running_app(settings.replace(upstream_key_envs="GATEWAY_TOKEN, *_SECRET")) as app:
        client, admin = app.test_client(), auth(settings.admin_key)
        assert register(client, admin, "GATEWAY_TOKEN").status_code == 200
        assert register(client, admin, "VLLM_SECRET").status_code == 200
        assert register(client, admin, "OPENAI_API_KEY").status_code == 400
        assert register(client, admin, "BELLAQ_SECRET").status_code == 400  # never, whatever the list says


def test_users_and_workers_see_no_upstream_admins_see_it(client, admin, user, worker):
    assert register(client, admin, "VLLM_API_KEY").status_code == 200
    for who in (user, worker):
        for path in ("/v1/queue/vllm/metadata", "/v1/queue/vllm:0/stats"):
            resp = client.get(path, headers=who)
            assert resp.status_code == 200
            text = resp.get_data(as_text=True)
            assert SECRET_URL not in text and "VLLM_API_KEY" not in text and "upstream" not in resp.json
    meta = client.get("/v1/queue/vllm/metadata", headers=user).json
    assert (meta["queue"], meta["endpoint"], meta["strategy"]) == ("vllm", CHAT, "fifo")
    full = client.get("/v1/queue/vllm/metadata", headers=admin).json
    assert full["upstream"] == {"base_url": SECRET_URL, "api_key_env": "VLLM_API_KEY"}


PUT = {"endpoint": CHAT, "data": {"model": "m"}, "callback_url": "http://127.0.0.1:9/cb"}


def test_the_operator_caps_a_puts_timeout(settings):
    from bellaq.keys import create_key

    with running_app(settings.replace(max_task_timeout=60, default_task_timeout=300)) as app:
        with app.app_context():
            user = auth(create_key("u", "user")[1])
        client = app.test_client()
        over = client.post("/v1/queue/put", json={**PUT, "timeout": 61}, headers=user)
        assert over.status_code == 400 and over.json["error"]["param"] == "timeout"
        assert "60" in over.json["error"]["message"]
        assert client.post("/v1/queue/put", json={**PUT, "timeout": 60}, headers=user).status_code == 200
        # A default above the cap is held to the cap.
        task_id = client.post("/v1/queue/put", json=PUT, headers=user).json["data"]
        task = client.get(f"/v1/queue/{task_id}", headers=user).json
        assert task["expire_time"] - task["start_time"] == 60_000


def test_the_default_cap_is_a_day(client, user):
    assert client.post("/v1/queue/put", json={**PUT, "timeout": 86400}, headers=user).status_code == 200
    over = client.post("/v1/queue/put", json={**PUT, "timeout": 86401}, headers=user)
    assert over.status_code == 400 and "86400" in over.json["error"]["message"]


def test_a_put_creates_a_queue_only_for_a_builtin_endpoint(client, admin, user):
    custom = {**PUT, "endpoint": "/v1/rerank"}
    resp = client.post("/v1/queue/put", json=custom, headers=user)
    assert resp.status_code == 400 and resp.json["error"]["code"] == "queue_not_registered"
    assert "register" in resp.json["error"]["message"]
    assert client.get("/v1/console/queue/stats", headers=admin).json["data"] == []  # no queue was made
    for endpoint in ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses"):
        assert client.post("/v1/queue/put", json={**PUT, "endpoint": endpoint}, headers=user).status_code == 200
    client.post("/v1/queue/register", json={"queue": "rerank", "endpoint": "/v1/rerank"}, headers=admin)
    assert client.post("/v1/queue/put", json={**custom, "queue": "rerank"}, headers=user).status_code == 200
