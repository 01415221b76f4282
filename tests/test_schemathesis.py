"""Schemathesis against the live app: every documented operation, with bodies, parameters and
headers generated from ``/v1/openapi.json`` (valid ones and invalid ones), sent over real HTTP to
a real server with a real Celery worker. No answer may be a 5xx, and every answer must be one the
document describes: its status code, its content type and its body's schema.

Keys of the roles an operation lists are given through Schemathesis' auth hook, so requests
reach past 401; some generated ids and names are swapped for real ones (a file, a finished
batch, a task, a registered queue), so they reach past 404 too.

CI runs a bounded number of examples per operation, derandomized: every run sends the same
requests. To search longer and anew:

    BELLAQ_SCHEMATHESIS_EXAMPLES=200 BELLAQ_SCHEMATHESIS_RANDOM=1 .venv/bin/python -m pytest tests/test_schemathesis.py
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bellaq.keys import create_key
from tests.batch_fixtures import CHAT, chat_line, create_batch, jsonl, until_status, upload
from tests.conftest import ADMIN_KEY, auth, make_settings

EXAMPLES = int(os.environ.get("BELLAQ_SCHEMATHESIS_EXAMPLES", "12"))
RANDOM = os.environ.get("BELLAQ_SCHEMATHESIS_RANDOM") == "1"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, ignored_auth]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    # SQLite keeps CI's run short; what the routes write is tested on both databases elsewhere.
    return f"sqlite:///{tmp_path / 'bellaq.db'}"


@pytest.fixture
def settings(tmp_path: Path, redis_prefix: str, database_url: str):
    # Held requests end within 2 s, and a callback that cannot be delivered is not retried.
    return make_settings(tmp_path, redis_prefix, database_url, max_task_timeout=2, default_task_timeout=2,
                         callback_max_attempts=1)


# A header the role hook draws and the auth hook replaces with a key of that role: Hypothesis picks
# the role like any other input, so every run picks the same ones.
ROLE = "X-Test-Role"


def roles_of(operation: Any) -> list[str]:
    """The roles the operation allows, admin last: Hypothesis favours the first, and an admin key
    does not own the user's files and batches."""
    security = operation.definition.raw.get("security")
    return sorted(security[0]["bearer"], key=lambda role: role == "admin") if security else []


def known(values: dict[str, list[Any]], generated: Any) -> st.SearchStrategy[Any]:
    """The generated values, each swapped or not for a real one of its name (real ones first, which
    Hypothesis favours)."""
    if not isinstance(generated, dict):
        return st.just(generated)
    swaps = {name: st.sampled_from([*values[name], value]) for name, value in generated.items() if name in values}
    return st.fixed_dictionaries(swaps).map(lambda chosen: {**generated, **chosen})


@dataclass
class World:
    """Keys of every role, and real values for generated ids, names and body fields."""

    keys: dict[str, str]
    paths: dict[str, list[Any]]  # path parameters, by name
    cancellable: dict[str, list[Any]]  # ... of the cancel routes: something still running first
    leased: dict[str, list[Any]]  # ... of progress and extend: a task the worker key holds, which nothing else ends
    deletable: dict[str, list[Any]]  # ... of the DELETE routes: their own, so the others keep theirs
    bodies: dict[str, list[Any]]  # body fields, by name

    def path_values(self, operation: Any) -> dict[str, list[Any]]:
        if operation.method == "delete":
            return self.deletable
        if operation.path.endswith(("/extend", "/progress")):
            return self.leased
        return self.cancellable if operation.path.endswith("/cancel") else self.paths


@pytest.fixture
def world(app, admin, make_key, celery_worker, mock_upstream) -> World:
    """A little of everything, made through the API: a finished batch and task, and a running
    batch and a waiting task on a queue only external workers serve."""
    client = app.test_client()
    keys = {"admin": ADMIN_KEY, "user": make_key("user")["Authorization"][7:],
            "worker": make_key("worker")["Authorization"][7:]}
    user = auth(keys["user"])
    for queue, builtin in (("chat", True), ("ext", False)):
        resp = client.post("/v1/queue/register", headers=admin, json={"queue": queue, "endpoint": CHAT,
                                                                      "builtin": builtin})
        assert resp.status_code == 200
    lines = [chat_line("ok"), chat_line("refused")]
    lines[1]["body"]["mock_status"] = 400  # so the batch has a line to resubmit
    done = until_status(client, user, create_batch(client, user, jsonl(lines))["id"], "completed")
    on_ext = create_batch(client, user, jsonl(lines), extra_headers={"X-BELLA-QUEUE-NAME": "ext"})
    running = until_status(client, user, on_ext["id"], "in_progress")
    input_id, spare_file = (upload(client, user, jsonl([chat_line("more")]))["id"] for _ in range(2))
    bodies = {
        "endpoint": [CHAT], "queue": ["chat"], "queues": [["chat:0", "chat:1"]], "input_file_id": [input_id],
        "data": [{"model": "mock-model", "messages": [{"role": "user", "content": "hello"}]}],
        "callback_url": ["http://127.0.0.1:9/hook"], "timeout": [1],
    }
    put = {"endpoint": CHAT, "data": bodies["data"][0], "callback_url": bodies["callback_url"][0]}
    answered = client.post("/v1/queue/put", headers=user, json={**put, "queue": "chat", "response_mode": "blocking"})
    assert answered.status_code == 200, answered.json
    waiting = client.post("/v1/queue/put", headers=user, json={**put, "queue": "ext"}).json["data"]
    client.post("/v1/queue/put", headers=user, json={**put, "queue": "ext", "level": 2})
    [held] = client.post("/v1/queue/take", headers=auth(keys["worker"]), json={"queues": ["ext:2"]}).json["ext:2"]
    with app.app_context():
        spare_key = create_key("spare", "user")[0].id
    return World(
        keys=keys,
        paths={"task_id": [answered.headers["X-Bella-Task-Id"]], "batch_id": [done["id"]],
               "file_id": [input_id, done["output_file_id"], done["error_file_id"]],
               "name": ["chat", "chat:0", "chat:12"], "filename": ["docs.js", "dashboard.js"]},
        cancellable={"task_id": [waiting, answered.headers["X-Bella-Task-Id"]],
                     "batch_id": [running["id"], done["id"]]},
        leased={"task_id": [held["task_id"]]},
        deletable={"file_id": [spare_file], "key_id": [spare_key]},
        bodies=bodies,
    )


@pytest.mark.slow
def test_every_answer_is_documented_and_none_is_a_server_error(live_server, world: World):
    schema = schemathesis.openapi.from_url(f"{live_server.url}/v1/openapi.json")

    @schema.hook
    def flatmap_headers(ctx, headers):
        roles = roles_of(ctx.operation)
        if not roles:
            return st.just(headers)
        return st.sampled_from(roles).map(lambda role: {**(headers or {}), ROLE: role})

    @schema.auth(refresh_interval=None)
    class BearerKeys:
        def get(self, case, ctx):
            role = (case.headers or {}).get(ROLE)
            return world.keys[role] if role else None

        def set(self, case, data, ctx):
            case.headers = {name: value for name, value in case.headers.items() if name != ROLE}
            case.headers["Authorization"] = f"Bearer {data}"

    @schema.hook
    def flatmap_path_parameters(ctx, path_parameters):
        return known(world.path_values(ctx.operation), path_parameters)

    @schema.hook
    def flatmap_body(ctx, body):
        return known(world.bodies, body)

    answered: dict[str, set[int]] = {}

    @schema.hook
    def after_call(ctx, case, response):
        answered.setdefault(ctx.operation.label, set()).add(response.status_code)

    session = requests.Session()
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        strategy = st.one_of(*(operation.as_strategy(mode) for mode in GenerationMode))

        @hypothesis.settings(max_examples=EXAMPLES, derandomize=not RANDOM, database=None, deadline=None,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def call(case) -> None:
            case.call_and_validate(base_url=live_server.url, session=session, checks=CHECKS, timeout=30)

        call()
    assert set(answered) == set(labels) and len(labels) >= 30
    # The keys and the real values took every operation past 401 and 404 to a success at least once.
    failing = {label: sorted(statuses) for label, statuses in answered.items() if all(s >= 300 for s in statuses)}
    assert failing == {}
