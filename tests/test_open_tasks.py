"""BELLAQ_MAX_OPEN_TASKS_PER_OWNER (SPEC 6): a tenant flooding puts or batches gets 429 with
Retry-After beyond the bound and leaves nothing behind; other tenants are not affected. Real
HTTP, real Redis, SQLite and MariaDB."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bellaq import open_tasks
from bellaq.extensions import db
from bellaq.models import Task
from tests.batch_fixtures import QUEUE, chat_line, create_batch, jsonl, until_status, upload

CHAT = "/v1/chat/completions"
BOUND = 3


@pytest.fixture
def base(ext_url, settings):
    settings.max_open_tasks_per_owner = BOUND
    return ext_url


def put(base: str, user: dict, **fields) -> requests.Response:
    return requests.post(f"{base}/v1/queue/put", headers=user, timeout=30, json={
        "endpoint": CHAT, "queue": "ext", "data": {"model": "m", "messages": []},
        "callback_url": "http://127.0.0.1:9/cb", **fields})


def open_rows(app, owner_task_id: str) -> int:
    with app.app_context():
        owner = db.session.get(Task, owner_task_id).owner
        return db.session.execute(db.select(db.func.count()).where(Task.owner == owner)).scalar_one()


def assert_refused(resp: requests.Response) -> None:
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "too_many_open_tasks" and error["type"] == "rate_limit_error"
    assert int(resp.headers["Retry-After"]) > 0 and "retry after" in error["message"]


def test_puts_beyond_the_bound_are_429_and_write_nothing(app, base, make_key):
    user, neighbour = make_key("user"), make_key("user")
    ids = [put(base, user).json()["data"] for _ in range(BOUND)]
    for mode in ("callback", "blocking", "streaming"):
        assert_refused(put(base, user, response_mode=mode))
    assert open_rows(app, ids[0]) == BOUND
    assert put(base, neighbour).status_code == 200  # another owner is not affected
    # An ended task frees its place.
    assert requests.post(f"{base}/v1/queue/{ids[0]}/cancel", headers=user, timeout=10).status_code == 202
    assert put(base, user).status_code == 200
    assert_refused(put(base, user))


def test_a_burst_of_concurrent_puts_gets_exactly_the_bound(app, base, make_key):
    user = make_key("user")
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: put(base, user), range(24)))
    accepted = [r for r in answers if r.status_code == 200]
    assert len(accepted) == BOUND
    for resp in answers:
        if resp.status_code != 200:
            assert_refused(resp)
    assert open_rows(app, accepted[0].json()["data"]) == BOUND


def test_batch_lines_count_and_a_batch_beyond_the_bound_is_429(app, client, user, base, celery_worker):
    batch = create_batch(client, user, jsonl([chat_line(f"l{i}") for i in range(BOUND + 2)]), extra_headers=QUEUE)
    until_status(client, user, batch["id"], "in_progress")
    assert_refused(put(base, user))
    file_id = upload(client, user, jsonl([chat_line("more")]))["id"]
    refused = requests.post(f"{base}/v1/batches", headers={**user, **QUEUE}, timeout=10, json={
        "input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"})
    assert_refused(refused)
    with app.app_context():
        assert db.session.execute(db.select(db.func.count()).select_from(Task)).scalar_one() == BOUND + 2
    # Cancelling the batch ends its lines, and frees their places.
    client.post(f"/v1/batches/{batch['id']}/cancel", headers=user)
    until_status(client, user, batch["id"], "cancelled")
    assert put(base, user).status_code == 200


def test_the_recount_repairs_counts_from_sql(app, base, make_key):
    user = make_key("user")
    task_id = put(base, user).json()["data"]
    with app.app_context():
        owner = db.session.get(Task, task_id).owner
        open_tasks.added(owner, 1000)  # drift: a count no task backs
        open_tasks.added("nobody", 5)
        assert open_tasks.recount() == {owner: 1}
        assert open_tasks.count("nobody") == 0
    assert put(base, user).status_code == 200


def test_puts_written_together_are_admitted_up_to_each_owners_bound(app, base):
    """The put group counts its puts in one round trip: an owner's puts past the bound, and only
    those, are refused and not counted; other owners' puts in the same group are not affected."""
    with app.app_context():
        open_tasks.added("a", BOUND - 2)
        answers = open_tasks.admit_each(["a", "b", "a", "a", "a", "b"])
        assert [refusal is None for refusal in answers] == [True, True, True, False, False, True]
        for refusal in answers[3:5]:
            assert refusal.status == 429 and refusal.code == "too_many_open_tasks"
        assert open_tasks.count("a") == BOUND and open_tasks.count("b") == 2
