"""Whole-file validation of batch input (SPEC 2): each rule names the offending line; a rejected
file gives a ``failed`` batch with no tasks."""

from __future__ import annotations

import io
import json

import pytest

from bellaq.batches import ingest as batch_ingest
from bellaq.batches import service, validation
from bellaq.models import Batch, Task
from tests.batch_fixtures import CHAT, bound_app, chat_line, create_batch, jsonl  # noqa: F401  (a fixture)


def check(data: bytes, endpoint: str = CHAT, max_lines: int = 50_000, max_bytes: int = 200 * 2**20,
          max_line: int = 2**20) -> validation.Validation:
    return validation.validate_input(io.BytesIO(data), endpoint, max_lines, max_bytes, max_line)


def codes(result: validation.Validation) -> list[tuple[str, int | None]]:
    return [(e["code"], e["line"]) for e in result.errors]


def test_a_valid_file_counts_its_requests_and_model():
    data = b"\xef\xbb\xbf" + jsonl([chat_line("a"), chat_line("b")]) + b"\n  \n" + jsonl([chat_line("c")])
    result = check(data)
    assert result.ok and result.count == 3 and result.model == "mock-model"


@pytest.mark.parametrize(("lines", "expected"), [
    ([chat_line("a"), "{not json", chat_line("c")], [("invalid_json_line", 2)]),
    ([chat_line("a"), "[1, 2]"], [("invalid_json_line", 2)]),
    ([chat_line("a"), {"method": "POST", "url": CHAT, "body": {}}], [("missing_custom_id", 2)]),
    ([chat_line("a"), chat_line(""), chat_line("x" * 513)], [("missing_custom_id", 2), ("invalid_custom_id", 3)]),
    ([chat_line("a"), chat_line("b"), chat_line("a"), chat_line("b")],
     [("duplicate_custom_id", 3), ("duplicate_custom_id", 4)]),
    ([chat_line("a", method="GET"), chat_line("b", method="post")], [("invalid_method", 1), ("invalid_method", 2)]),
    ([chat_line("a"), chat_line("b", url="/v1/embeddings")], [("invalid_url", 2)]),
    ([chat_line("a", body="text")], [("invalid_body", 1)]),
    ([chat_line("a"), chat_line("b"), chat_line("c", model="other")], [("mismatched_model", 3)]),
])
def test_each_rule_names_the_line(lines, expected):
    result = check(jsonl(lines))
    assert codes(result) == expected
    for error in result.errors:
        assert str(error["line"]) in error["message"] or error["code"] == "mismatched_model"


def test_the_duplicate_message_names_both_lines():
    result = check(jsonl([chat_line("dup"), chat_line("x"), chat_line("dup")]))
    assert "line 3" in result.errors[0]["message"] and "line 1" in result.errors[0]["message"]
    assert result.errors[0]["param"] == "custom_id"


def test_too_many_lines_and_too_many_bytes():
    data = jsonl([chat_line(f"r{i}") for i in range(6)])
    assert codes(check(data, max_lines=5)) == [("too_many_lines", 6)]
    assert check(data, max_lines=6).ok
    line_size = len(data) // 6
    assert codes(check(data, max_bytes=line_size * 3 + 1)) == [("file_too_large", 4)]
    assert codes(check(data, max_line=20)) == [("line_too_large", n) for n in range(1, 7)]


def test_an_empty_file_is_rejected():
    assert codes(check(b"\n\n")) == [("empty_file", None)]


def test_errors_are_capped_with_a_summary():
    data = jsonl(["nope"] * (validation.MAX_ERRORS + 7))
    result = check(data)
    listed = result.errors_object()["data"]
    assert len(listed) == validation.MAX_ERRORS + 1
    assert listed[-1]["code"] == "too_many_errors" and "7 more" in listed[-1]["message"]


# ------------------------------------------------------------------------- through the service

def ingest(app, batch_id: str) -> dict:
    with app.app_context():
        assert batch_ingest.run(batch_id) in ("failed", "ingested")
        from bellaq.extensions import db

        batch = db.session.get(Batch, batch_id)
        tasks = db.session.execute(db.select(Task).where(Task.batch_id == batch_id)).scalars().all()
        return {"batch": service.batch_object(batch), "tasks": len(tasks)}


REJECTIONS = {
    "duplicate custom_id": ([chat_line("a"), chat_line("a")], "duplicate_custom_id", 2),
    "url mismatch": ([chat_line("a"), chat_line("b", url="/v1/completions")], "invalid_url", 2),
    "bad JSON line": ([chat_line("a"), chat_line("b"), '{"custom_id": "c",'], "invalid_json_line", 3),
    "method": ([chat_line("a", method="PUT")], "invalid_method", 1),
    "mixed models": ([chat_line("a", model="m1"), chat_line("b", model="m2")], "mismatched_model", 2),
    "too many lines": ([chat_line(f"r{i}") for i in range(4)], "too_many_lines", 4),
    "too large": ([chat_line(f"r{i}", pad="x" * 800) for i in range(3)], "file_too_large", 3),
}


@pytest.mark.parametrize("rule", list(REJECTIONS))
def test_each_rejection_fails_the_batch_with_the_line_and_no_tasks(bound, client, user, settings, rule):
    settings.batch_max_lines = 3
    settings.batch_max_bytes = 2000
    lines, code, line = REJECTIONS[rule]
    created = create_batch(client, user, jsonl(lines))
    assert created["status"] == "validating"
    out = ingest(bound, created["id"])
    batch = out["batch"]
    assert batch["status"] == "failed" and isinstance(batch["failed_at"], int)
    assert out["tasks"] == 0
    assert batch["errors"]["object"] == "list"
    error = batch["errors"]["data"][0]
    assert error["code"] == code and set(error) == {"code", "message", "param", "line"}
    assert error["line"] == line
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert batch["in_progress_at"] is None
    again = client.get(f"/v1/batches/{created['id']}", headers=user).json
    assert again == batch


def test_a_deleted_input_file_fails_the_batch(bound, client, user):
    created = create_batch(client, user, jsonl([chat_line("a")]))
    assert client.delete(f"/v1/files/{created['input_file_id']}", headers=user).status_code == 200
    batch = ingest(bound, created["id"])["batch"]
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["code"] == "file_not_found"


def test_a_valid_file_becomes_waiting_tasks_at_level_1(bound, client, user, settings):
    settings.batch_chunk_size = 4
    lines = [chat_line(f"id-{i}") for i in range(10)]
    created = create_batch(client, user, jsonl(lines), metadata={"k": "v"})
    out = ingest(bound, created["id"])
    batch = out["batch"]
    assert out["tasks"] == 10
    assert batch["status"] == "in_progress" and isinstance(batch["in_progress_at"], int)
    assert batch["request_counts"] == {"total": 10, "completed": 0, "failed": 0}
    assert batch["metadata"] == {"k": "v"} and batch["model"] == "mock-model"
    with bound.app_context():
        from bellaq.extensions import db
        from bellaq.services import services

        tasks = db.session.execute(db.select(Task).where(Task.batch_id == created["id"]).order_by(Task.id)).scalars()
        tasks = list(tasks)
        assert [t.custom_id for t in tasks] == [f"id-{i}" for i in range(10)]
        assert {(t.level, t.status, t.queue, t.response_mode, t.callback_url) for t in tasks} == {
            (1, "waiting", "chat_completions-mock-model", "callback", "")}
        assert json.loads(tasks[3].data) == lines[3]["body"]
        assert services().engine.stats("chat_completions-mock-model", 1).waiting == 10
        # Running it again changes nothing (ingest is idempotent).
        assert batch_ingest.run(created["id"]) == "skipped"
        assert services().engine.stats("chat_completions-mock-model", 1).waiting == 10


class Killed(BaseException):
    """The worker process dies here: nothing of it runs on (not even an except Exception)."""


def test_an_interrupted_ingest_resumes_without_duplicates(bound, client, user, settings, monkeypatch):
    settings.batch_chunk_size = 3
    created = create_batch(client, user, jsonl([chat_line(f"r{i}") for i in range(10)]))
    calls = {"n": 0}
    real_flush = batch_ingest._flush

    def die_after_two_chunks(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real_flush(*args, **kwargs)

    monkeypatch.setattr(batch_ingest, "_flush", die_after_two_chunks)
    with bound.app_context():
        with pytest.raises(Killed):
            batch_ingest.run(created["id"])
    monkeypatch.setattr(batch_ingest, "_flush", real_flush)
    out = ingest(bound, created["id"])
    assert out["tasks"] == 10 and out["batch"]["request_counts"]["total"] == 10
    with bound.app_context():
        from bellaq.services import services

        assert services().engine.stats("chat_completions-mock-model", 1).waiting == 10


def test_a_second_ingest_at_the_same_time_is_refused(bound, client, user):
    created = create_batch(client, user, jsonl([chat_line("a")]))
    with bound.app_context():
        from bellaq.services import services

        services().redis.set(batch_ingest.lease_key(created["id"]), "someone", ex=30)
        assert batch_ingest.run(created["id"]) == "busy"
        assert client.get(f"/v1/batches/{created['id']}", headers=user).json["status"] == "validating"
