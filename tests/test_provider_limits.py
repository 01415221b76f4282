"""Provider limits (issue: a batch soaks up a model server's rate limits): registration, token
cost, limits shared by HTTP takers, and transient answers retried as delayed tasks."""

from __future__ import annotations

import pytest

from tests.batch_fixtures import CHAT, chat_line, create_batch, jsonl
from tests.conftest import ended, task_of, wait_for

pytestmark = pytest.mark.usefixtures("database_url")


def register(client, admin, **fields):
    resp = client.post("/v1/queue/register", headers=admin, json={"queue": "lim", "endpoint": CHAT, **fields})
    assert resp.status_code == 200, resp.json
    return resp.json


def put(client, headers, queue="lim", content="hi there", **data):
    body = {"endpoint": CHAT, "queue": queue, "callback_url": "http://127.0.0.1:9/cb",
            "data": {"model": "mock-1", "messages": [{"role": "user", "content": content}], **data}}
    resp = client.post("/v1/queue/put", json=body, headers=headers)
    assert resp.status_code == 200, resp.json
    return resp.json["data"]




def take(client, worker, size, queue="lim:0"):
    resp = client.post("/v1/queue/take", headers=worker, json={"queues": [queue], "size": size})
    assert resp.status_code == 200, resp.json
    return resp.json[queue]


def test_registration_sets_the_limits_in_force_and_metadata_shows_them(app, client, admin, user):
    register(client, admin, rpm=600, tpm=90_000, max_in_flight=5, default_max_tokens=50)
    meta = client.get("/v1/queue/lim/metadata", headers=user).json
    assert (meta["rpm"], meta["tpm"], meta["max_in_flight"], meta["default_max_tokens"]) == (600, 90_000, 5, 50)
    with app.app_context():
        from bellaq.services import services

        limits = services().engine.limit_stats("lim")
        assert (limits.rpm, limits.tpm, limits.max_in_flight) == (600, 90_000, 5)
    register(client, admin, tpm=None)  # fields left out keep their values; null lifts a limit
    meta = client.get("/v1/queue/lim/metadata", headers=user).json
    assert (meta["rpm"], meta["tpm"], meta["max_in_flight"]) == (600, None, 5)
    with app.app_context():
        assert services().engine.limit_stats("lim").tpm is None
    stats = client.get("/v1/queue/lim:0/stats", headers=user).json
    assert stats["limits"]["rpm"] == 600 and stats["limits"]["tpm"] is None
    assert stats["limits"]["in_flight"] == 0 and stats["delayed"] == 0


@pytest.mark.parametrize("bad", [0, -1, "many", 1.5, True, 2_000_000_000])
def test_a_bad_tpm_is_refused_and_changes_nothing(client, admin, bad):
    register(client, admin, tpm=1000)
    resp = client.post("/v1/queue/register", headers=admin, json={"queue": "lim", "tpm": bad})
    assert resp.status_code == 400 and resp.json["error"]["param"] == "tpm"
    assert client.get("/v1/queue/lim/metadata", headers=admin).json["tpm"] == 1000


def test_a_take_is_charged_the_estimate_and_a_complete_corrects_it_to_usage(client, admin, user, worker):
    register(client, admin, builtin=False, tpm=100_000)
    put(client, user, content="x" * 400, max_tokens=100)  # 400 chars / 4 + 100
    [task] = take(client, worker, 5)
    use = client.get("/v1/queue/lim:0/stats", headers=user).json["limits"]
    assert (use["window_requests"], use["window_tokens"], use["in_flight"]) == (1, 200, 1)
    resp = client.post(f"/v1/queue/{task['task_id']}/complete", headers=worker, json={
        "status_code": 200, "body": {"usage": {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}}})
    assert resp.status_code == 200
    use = client.get("/v1/queue/lim:0/stats", headers=user).json["limits"]
    assert (use["window_tokens"], use["in_flight"]) == (37, 0)


def test_the_queue_default_budget_is_charged_when_a_request_sets_none(client, admin, user, worker):
    register(client, admin, builtin=False, tpm=100_000, default_max_tokens=40)
    put(client, user, content="y" * 80)
    take(client, worker, 1)
    assert client.get("/v1/queue/lim:0/stats", headers=user).json["limits"]["window_tokens"] == 20 + 40


def test_http_takers_share_the_rate_and_token_limits(client, admin, user, worker, make_key):
    register(client, admin, builtin=False, rpm=60)  # a bucket of one request, one more a second
    other = make_key("worker")
    for _ in range(4):
        put(client, user)
    assert len(take(client, worker, 4)) == 1
    assert take(client, other, 4) == []  # another taker draws on the same bucket
    register(client, admin, rpm=None, tpm=6_000)  # 100 tokens a second, a bucket of 100
    [first] = take(client, other, 4)  # each costs 2 + 256 tokens: one passes, leaving a debt
    assert take(client, worker, 4) == []
    assert first["task_id"]


def test_a_429_delays_the_task_pauses_the_queue_and_the_retry_succeeds(app, client, admin, user, celery_worker,
                                                                       mock_upstream):
    register(client, admin)
    mock_upstream.script([429], retry_after=3)
    task_id = put(client, user)
    waiting = wait_for(lambda: (t := task_of(client, user, task_id))["last_status_code"] == 429 and t,
                       message="the first attempt to be answered 429")
    assert waiting["status"] in ("waiting", "queued") and waiting["attempts"] == 1
    with app.app_context():
        from bellaq.services import services

        assert services().engine.limit_stats("lim").paused_until > 0  # every taker waits out Retry-After
    task = wait_for(lambda: ended(client, user, task_id), message="the retry")
    assert task["status"] == "succeeded" and task["attempts"] == 2 and task["last_status_code"] == 429
    assert mock_upstream.request_count == 2


def test_a_queue_without_rates_follows_the_upstream_s_announced_limit_and_pauses_when_it_runs_out(
        app, client, admin, user, celery_worker, mock_upstream):
    register(client, admin)
    mock_upstream.rpm = 2  # a bucket of two requests, refilled in a minute
    first = [put(client, user) for _ in range(2)]
    for task_id in first:
        assert wait_for(lambda t=task_id: ended(client, user, t))["status"] == "succeeded"
    with app.app_context():
        from bellaq.services import services

        limits = services().engine.limit_stats("lim")
    assert limits.rpm == 2  # x-ratelimit-limit-requests, while the registration sets none
    assert limits.paused_until > 0  # the second answer said x-ratelimit-remaining-requests: 0
    assert client.get("/v1/queue/lim/metadata", headers=admin).json["rpm"] is None
    third = put(client, user)
    assert task_of(client, user, third)["status"] == "waiting"
    assert mock_upstream.request_count == 2


def test_an_online_task_whose_timeout_allows_no_retry_ends_with_the_last_answer(client, admin, user, celery_worker,
                                                                                mock_upstream):
    register(client, admin)
    mock_upstream.script([503], retry_after=30)
    resp = client.post("/v1/queue/put", headers=user, json={
        "endpoint": CHAT, "queue": "lim", "callback_url": "http://127.0.0.1:9/cb", "timeout": 5,
        "data": {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}})
    task = wait_for(lambda: ended(client, user, resp.json["data"]))
    assert task["status"] == "failed" and task["result"]["status_code"] == 503 and task["attempts"] == 1
    assert mock_upstream.request_count == 1


def test_a_400_line_fails_after_one_attempt_and_a_line_still_refused_at_the_window_end_expires(
        app, client, admin, user, celery_worker, mock_upstream):
    from bellaq.batches import ending
    from tests.batch_fixtures import content, expire_now, until_status

    mock_upstream.retry_after = 1
    lines = [chat_line("bad"), chat_line("busy")]
    lines[0]["body"]["mock_status"] = 400
    lines[1]["body"]["mock_status"] = 429
    batch = create_batch(client, user, jsonl(lines))

    def busy_attempts():
        return sum(1 for r in mock_upstream.requests if r.body["messages"][0]["content"] == "say busy")

    wait_for(lambda: busy_attempts() >= 3, message="the busy line to be retried", timeout=30)
    assert sum(1 for r in mock_upstream.requests if r.body["messages"][0]["content"] == "say bad") == 1
    expire_now(app, batch["id"])
    with app.app_context():
        from workers.batches import end_batch

        for batch_id in ending.claim_expired():
            end_batch(batch_id)
    done = until_status(client, user, batch["id"], "expired")
    assert done["request_counts"] == {"total": 2, "completed": 0, "failed": 2}
    errors = {line["custom_id"]: line for line in content(client, user, done["error_file_id"])}
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["busy"]["response"] is None and errors["busy"]["error"]["code"] == "batch_expired"
    assert done["output_file_id"] is None


@pytest.mark.slow
def test_a_batch_against_an_upstream_refusing_at_first_completes_every_line(client, user, celery_worker,
                                                                             mock_upstream):
    from tests.batch_fixtures import content, until_status

    mock_upstream.start_outage(8, status=429, retry_after=2)
    batch = create_batch(client, user, jsonl([chat_line(f"r{i}") for i in range(40)]))
    done = until_status(client, user, batch["id"], "completed", timeout=60)
    assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    assert done["error_file_id"] is None
    assert {line["custom_id"] for line in content(client, user, done["output_file_id"])} == {f"r{i}" for i in range(40)}
    assert mock_upstream.request_count > 40  # the refusals were retried


@pytest.mark.slow
def test_tasks_waiting_out_a_retry_after_hold_no_worker(app, client, admin, user, celery_worker, mock_upstream):
    register(client, admin)
    client.post("/v1/queue/register", headers=admin, json={"queue": "other", "endpoint": CHAT})
    mock_upstream.retry_after = 60
    for _ in range(1000):
        put(client, user, mock_status=429)

    def all_set_aside():
        s = client.get("/v1/queue/lim:0/stats", headers=user).json
        return s["running"] == 0 and s["delayed"] >= 1 and s["waiting"] + s["delayed"] == 1000 and s

    wait_for(all_set_aside, timeout=60, message="the refused tasks to wait out Retry-After")
    task_id = put(client, user, queue="other")
    # answered long before the 60 s Retry-After ends: no worker slot is held by the waiting tasks
    task = wait_for(lambda: ended(client, user, task_id), timeout=15)
    assert task["status"] == "succeeded" and task["attempts"] == 1
    stats = client.get("/v1/queue/lim:0/stats", headers=user).json
    assert stats["waiting"] + stats["delayed"] == 1000 and stats["done"] == 0


@pytest.mark.slow
def test_tpm_holds_the_tokens_per_window_and_is_corrected_to_the_reported_usage(client, admin, user, celery_worker,
                                                                                mock_upstream):
    register(client, admin, tpm=6_000)  # 100 tokens a second, a bucket of 100
    prompt = "a " * 20  # 10 prompt tokens; the mock answers 21 words: usage 31, estimate 10 + 40
    ids = [put(client, user, content=prompt, max_tokens=40) for _ in range(30)]
    tasks = [wait_for(lambda t=task_id: ended(client, user, t), timeout=60) for task_id in ids]
    assert {t["status"] for t in tasks} == {"succeeded"} and mock_upstream.request_count == 30
    used = sum(t["result"]["body"]["usage"]["total_tokens"] for t in tasks)
    assert used == 30 * 31
    limits = client.get("/v1/queue/lim:0/stats", headers=user).json["limits"]
    assert (limits["window_requests"], limits["window_tokens"]) == (30, used)  # the estimates were corrected
    # what the upstream counted in any 5 s: 5 s of refill, the bucket, one request's jitter
    assert mock_upstream.max_tokens_in_window(5.0) <= 500 + 100 + 50


@pytest.mark.slow
def test_two_worker_processes_and_an_http_taker_share_one_rpm(tmp_path, redis_prefix, database_url, mock_upstream):


    from tests.conftest import ADMIN_KEY, auth
    from tests.stack import Stack

    admin = auth(ADMIN_KEY)
    stack = Stack(tmp_path, redis_prefix, database_url, mock_upstream.base_url)
    try:
        _share_one_rpm(stack, admin, mock_upstream)
    finally:
        stack.stop()


def _share_one_rpm(stack, admin, mock_upstream):
    import threading

    import requests

    from tests.conftest import auth

    stack.start_web(workers=1)
    stack.start_worker(concurrency=4)
    stack.start_worker(concurrency=4)

    def key(role):
        return auth(requests.post(f"{stack.url}/v1/keys", headers=admin, json={"role": role}, timeout=10)
                    .json()["key"])

    user, worker = key("user"), key("worker")
    resp = requests.post(f"{stack.url}/v1/queue/register", headers=admin, timeout=10,
                         json={"queue": "lim", "endpoint": CHAT, "rpm": 240})  # 4 a second, a bucket of 4
    assert resp.status_code == 200
    total = 110
    for i in range(total):
        requests.post(f"{stack.url}/v1/queue/put", headers=user, timeout=10, json={
            "endpoint": CHAT, "queue": "lim", "callback_url": "http://127.0.0.1:9/cb",
            "data": {"model": "mock-1", "messages": [{"role": "user", "content": f"n{i}"}]}}).raise_for_status()
    external = []
    stop = threading.Event()

    def http_taker():
        session = requests.Session()
        while not stop.is_set():
            got = session.post(f"{stack.url}/v1/queue/take", headers=worker, timeout=10,
                               json={"queues": ["lim:0"], "size": 2}).json()["lim:0"]
            for task in got:
                answer = session.post(mock_upstream.url(CHAT), json=task["data"], timeout=10)
                session.post(f"{stack.url}/v1/queue/{task['task_id']}/complete", headers=worker, timeout=10,
                             json={"status_code": answer.status_code, "body": answer.json()}).raise_for_status()
                external.append(task["task_id"])
            stop.wait(0.05)

    thread = threading.Thread(target=http_taker, daemon=True)
    thread.start()
    try:
        wait_for(lambda: mock_upstream.request_count >= total, timeout=90, interval=0.5,
                 message=f"all {total} requests to reach the upstream\n{stack.logs()}")
    finally:
        stop.set()
        thread.join(15)
    assert external, "the HTTP taker took nothing"
    assert mock_upstream.request_count == total
    # any 20 s: 20 s at 4 a second, plus the bucket of 4, plus one request of network jitter
    assert mock_upstream.max_requests_in_window(20.0) <= 80 + 4 + 1
