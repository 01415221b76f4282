"""The task service: put, get, cancel, take, complete, lease reaping and recovery.

SQL is the source of truth; the queue engine (Redis) decides who runs what. Every end state
is claimed in the engine first (one atomic script), so a task ends exactly once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, case, inspect, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm.attributes import set_committed_value

from bellaq import metrics, token_cost
from bellaq.clock import now_ms
from bellaq.errors import BadRequest, Conflict, NotFound, error_body
from bellaq.extensions import db
from bellaq.faults import fault_point
from bellaq.ids import new_id
from bellaq.keys import Principal
from bellaq.lease_tokens import BUILTIN_HOLDER, holder_of
from bellaq.models import Queue, Task
from bellaq.models.tasks import END_STATUSES, OPEN_STATUSES, RESPONSE_MODES, TaskStatus
from bellaq.put_group import PendingPut, put_group
from bellaq.queue_engine import STRATEGIES, Completion, TakenTask
from bellaq.queues import QueueRef, check_endpoint, full_queue, push_all_limits, resolve_queue
from bellaq.services import services
from bellaq.sql_retry import retrying
from bellaq.urlguard import UnsafeURL, check_callback_url
from bellaq.validation import choice_field, field, int_field

MAX_LEVEL = 9
MAX_TAKE = 1000
MAX_CALLBACK_URL = 2048


def new_task_id() -> str:
    return new_id("task_")


def task_payload(task: Task) -> str:
    """What the engine hands to a taker: the task without its mutable fields."""
    return json.dumps({
        "task_id": task.id,
        "batch_id": task.batch_id or "",
        "endpoint": task.endpoint,
        "queue": task.queue,
        "level": task.level,
        "data": json.loads(task.data),
        "response_mode": task.response_mode,
        "callback_url": task.callback_url or "",
        "instance_id": task.instance_id or "",
        "timeout": task.timeout,
        "start_time": task.start_time,
        "expire_time": task.expire_time,
    })


def queue_cost(queue: Queue | QueueRef | None, endpoint: str, data: dict[str, Any]) -> int:
    """The tokens a task of ``queue`` is charged at take under a ``tpm`` limit (see token_cost)."""
    return token_cost.estimate(endpoint, data, queue.default_max_tokens if queue else None)


def error_result(status_code: int, message: str, code: str, kind: str = "invalid_request_error") -> dict:
    return {
        "status_code": status_code,
        "request_id": "",
        "body": error_body(message, kind, code=code),
    }


# ---------------------------------------------------------------------------------------------- put

def put(principal: Principal, body: dict[str, Any], task_id: str | None = None) -> Task:
    """Validate a put, write the task to SQL and make it takeable; all or nothing.

    Returns the task as a transient object (not in the session): reading it costs no query."""
    svc = services()
    settings = svc.settings
    endpoint = check_endpoint(field(body, "endpoint", str))
    data = field(body, "data", dict)
    queue_name = field(body, "queue", str, None)
    level = int_field(body, "level", 0, 0, MAX_LEVEL)
    mode = choice_field(body, "response_mode", RESPONSE_MODES, "callback")
    callback_url = field(body, "callback_url", str, None)
    cap = settings.max_task_timeout
    timeout = int_field(body, "timeout", min(settings.default_task_timeout, cap), 1, cap)
    if callback_url is not None and len(callback_url) > MAX_CALLBACK_URL:
        raise BadRequest(f"callback_url is longer than {MAX_CALLBACK_URL} characters.", param="callback_url",
                         code="invalid_callback_url")
    if mode == "callback":
        if not callback_url:
            raise BadRequest("response_mode 'callback' needs a callback_url to POST the finished task to.",
                             param="callback_url", code="missing_field")
        try:
            check_callback_url(callback_url, settings.callback_allow_private, settings.callback_allowlist)
        except UnsafeURL as err:
            raise BadRequest(str(err), param="callback_url", code="unsafe_callback_url") from None
    queue = resolve_queue(endpoint, data.get("model"), queue_name)
    queue_name, builtin = queue.name, queue.builtin
    start = now_ms()
    row = {
        "id": task_id or new_task_id(),
        "owner": principal.owner,
        "batch_id": "",
        "endpoint": endpoint,
        "queue": queue_name,
        "level": level,
        "data": json.dumps(data),
        "status": TaskStatus.WAITING,
        "response_mode": mode,
        "callback_url": callback_url or "",
        "timeout": timeout,
        "instance_id": svc.instance_id if mode != "callback" else "",
        "start_time": start,
        "expire_time": start + timeout * 1000,
        "attempts": 0,
    }
    # Core, not the unit of work: the row is inserted with others waiting in this process (one
    # transaction, one engine round trip per queue level), and nothing is reloaded afterwards.
    task = Task(**row)
    put_group().submit(PendingPut(row, task_payload(task), builtin, queue_cost(queue, endpoint, data)))
    metrics.tasks_put(queue_name, level)
    return task


# ---------------------------------------------------------------------------------------------- read

def owned_task(principal: Principal, task_id: str) -> Task:
    """The task if the caller may see it; another owner's task is simply not found."""
    task = db.session.get(Task, task_id)
    if task is None or (principal.role == "user" and task.owner != principal.owner):
        raise NotFound(f"No task with id '{task_id}'.", param="task_id", code="task_not_found")
    return task


def recorded_end(task_id: str, queue: str) -> tuple[TaskStatus, dict[str, Any]] | None:
    """The end status and result the engine recorded for a task whose SQL row is still open
    (its completer is between the engine and SQL, see :func:`complete_many`); None if none."""
    text = services().engine.recorded_results(queue, [task_id]).get(task_id)
    if text is None:
        return None
    result = json.loads(text)
    ok = 200 <= int(result.get("status_code", 0)) < 300
    return (TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED), result


def task_object(task: Task) -> dict[str, Any]:
    """The task as the API shows it: an open online task the engine has already completed shows
    that end (its held request may have it already; SQL gets the same one a moment later)."""
    if task.status not in OPEN_STATUSES or not task.instance_id or task.response_mode == "callback":
        return task.to_dict()
    recorded = recorded_end(task.id, task.queue)
    if recorded is None:
        # The completer may have written SQL and dropped the engine's copy since the row was
        # read: read it again (a new transaction, so a new snapshot).
        db.session.rollback()
        db.session.refresh(task)
        return task.to_dict()
    out = task.to_dict()
    ended = services().engine.done_since(task.queue, task.level, [task.id]).get(task.id)
    out.update(status=recorded[0].value, result=recorded[1], completed_time=ended or now_ms())
    return out


def find_task(task_id: str) -> Task:
    task = db.session.get(Task, task_id)
    if task is None:
        raise NotFound(f"No task with id '{task_id}'.", param="task_id", code="task_not_found")
    return task


# ---------------------------------------------------------------------------------------------- end

CLAIM_CHUNK = 500  # ids per claiming statement (each costs up to five bound parameters)


def _claim(tasks: Sequence[Task], statuses: dict[str, str], now: int, texts: dict[str, str | None]
           ) -> list[tuple[Task, str | None]]:
    """Write the end state of each task still open, in the current transaction; returns those
    that changed, with their result text. ``statuses`` and ``texts`` map a task id to its end
    status and result text. The rows are claimed ``WHERE status IN (open)``, so of two enders
    only one wins; a whole group costs one statement (SQLite: ``UPDATE ... RETURNING``) or two
    (MySQL/MariaDB: the open rows locked with ``SELECT ... FOR UPDATE``, then one ``UPDATE``),
    not one round trip per task."""
    conn = db.session.connection()
    by_id = {task.id: task for task in tasks}
    ids = sorted(by_id)  # rows locked in id order, as mark_taken does
    won: set[str] = set()
    for start in range(0, len(ids), CLAIM_CHUNK):
        won.update(_claim_rows(conn, ids[start:start + CLAIM_CHUNK], statuses, now, texts))
    return [(by_id[tid], texts[tid]) for tid in by_id if tid in won]


def _by_id(ids: Sequence[str], values: dict[str, Any], column: Any) -> Any:
    """One value for every id, or ``CASE id WHEN ... THEN ... END``."""
    distinct = {values[i] for i in ids}
    if len(distinct) == 1:
        return distinct.pop()
    return case({i: values[i] for i in ids}, value=column)


# The statements of the hot paths, built once: building an expression (an IN list above all) cost
# more CPU than running it. ``ids`` expands to the id list.
_TABLE = Task.__table__
_OPEN_ROWS = _TABLE.c.status.in_(OPEN_STATUSES)
_OF_IDS = _TABLE.c.id.in_(bindparam("ids", expanding=True))
# One end status and one result for every row: a single task, or a group that ended alike.
_CLAIM_ALIKE = update(_TABLE).where(_OF_IDS, _OPEN_ROWS).values(
    status=bindparam("end_status"), completed_time=bindparam("end_time"), result=bindparam("end_result"))
_CLAIM_ALIKE_RETURNING = _CLAIM_ALIKE.returning(_TABLE.c.id)
_MARK_TAKEN = update(_TABLE).where(_OF_IDS, _OPEN_ROWS).values(
    status=TaskStatus.QUEUED.value, attempts=bindparam("taken_attempts"), running_time=bindparam("taken_at"))


def _claim_rows(conn: Connection, ids: list[str], statuses: dict[str, str], now: int,
                texts: dict[str, str | None]) -> Sequence[str]:
    table = _TABLE
    open_rows = _OPEN_ROWS
    returning = conn.dialect.update_returning

    def claim(rows: list[str]) -> Any:
        end_statuses, end_texts = {statuses[i] for i in rows}, {texts[i] for i in rows}
        if len(end_statuses) == 1 and len(end_texts) == 1:
            params = {"ids": rows, "end_status": end_statuses.pop(), "end_time": now, "end_result": end_texts.pop()}
            return conn.execute(_CLAIM_ALIKE_RETURNING if returning else _CLAIM_ALIKE, params)
        statement = (update(table).where(table.c.id.in_(rows), open_rows)
                     .values(status=_by_id(rows, statuses, table.c.id), completed_time=now,
                             result=_by_id(rows, texts, table.c.id)))
        return conn.execute(statement.returning(table.c.id) if returning else statement)

    if returning:
        return claim(ids).scalars().all()
    if len(ids) == 1:
        return ids if claim(ids).rowcount == 1 else ()
    # A locking read of the rows still open (the latest committed versions): nobody else can end
    # them before this transaction does, so every one of them is claimed by the UPDATE.
    ids = list(conn.execute(select(table.c.id).where(table.c.id.in_(ids), open_rows)
                            .order_by(table.c.id).with_for_update()).scalars())
    if ids:
        claim(ids)
    return ids


def _detach(tasks: Sequence[Task]) -> None:
    """Detached, the objects keep their values through the commit: listeners read them without
    one query per task. Transient ones (read with Core) are not in the session at all."""
    for task in tasks:
        if task in db.session:
            if inspect(task).expired_attributes:
                db.session.refresh(task)
            db.session.expunge(task)


def _ended(changed: Sequence[tuple[Task, str | None]], statuses: dict[str, str], now: int) -> list[Task]:
    for task, text in changed:
        set_committed_value(task, "status", statuses[task.id])
        set_committed_value(task, "completed_time", now)
        set_committed_value(task, "result", text)
    return [task for task, _ in changed]


def write_end_state(tasks: Sequence[Task], status: str, result: dict | None = None,
                    results: dict[str, dict] | None = None) -> list[Task]:
    """Write the end state of tasks the engine has already released; returns those that changed.

    Each row is claimed ``WHERE status IN (open)``, so of two enders only one wins. ``result`` is
    the same for every task; ``results`` maps a task id to its own result.
    """
    return write_end_states(tasks, dict.fromkeys((t.id for t in tasks), status), result, results)


def write_end_states(tasks: Sequence[Task], statuses: dict[str, str], result: dict | None = None,
                     results: dict[str, dict] | None = None) -> list[Task]:
    """:func:`write_end_state` with an end status per task (``statuses``: task id -> status): one
    transaction, one claim, and the task-end listeners called once with every task that changed."""
    if not tasks:
        return []
    now = now_ms()
    shared = json.dumps(result) if result is not None else None
    texts: dict[str, str | None] = {}
    for task in tasks:
        if results:
            value = results.get(task.id)
            texts[task.id] = json.dumps(value) if value is not None else None
        else:
            texts[task.id] = shared
    plain = {tid: str(status) for tid, status in statuses.items()}  # TaskStatus binds as its value
    changed = retrying(lambda: _claim(tasks, plain, now, texts))
    _detach(tasks)
    db.session.commit()
    ended = _ended(changed, statuses, now)
    if ended:
        services().task_ended(ended)
    return ended


def completed_in_engine(task: Task) -> bool:
    """True when a completer has claimed the task in the engine and its result is recorded there
    but not yet in SQL: that result is the task's end (its held request may already have it), so
    a cancel or timeout must not write another one."""
    return bool(services().engine.recorded_results(task.queue, [task.id]))


def cancel(principal: Principal, task_id: str) -> Task:
    task = owned_task(principal, task_id)
    if task.status in END_STATUSES:
        raise Conflict(f"Task '{task_id}' already ended as {task.status}; there is nothing to cancel.",
                       param="task_id", code="task_already_ended")
    if services().engine.cancel(task.queue, task.level, task.id) == "absent" and completed_in_engine(task):
        raise Conflict(f"Task '{task_id}' already finished; its result is being recorded. There is nothing to cancel.",
                       param="task_id", code="task_already_ended")
    changed = write_end_state([task], TaskStatus.CANCELLED, None)
    if not changed:
        db.session.refresh(task)
        raise Conflict(f"Task '{task_id}' already ended as {task.status}; there is nothing to cancel.",
                       param="task_id", code="task_already_ended")
    return task


def end_as_timeout(task: Task) -> bool:
    """End a task that ran out of time (a held request gave up on it). False if it already ended."""
    outcome = services().engine.cancel(task.queue, task.level, task.id)
    if outcome == "absent":
        db.session.refresh(task)
        if task.status in END_STATUSES or completed_in_engine(task):
            return False
    result = error_result(408, f"The task did not finish within its timeout of {task.timeout} s.", "timeout")
    return bool(write_end_state([task], TaskStatus.TIMEOUT, result))


def complete(task_id: str, body: dict[str, Any], holder: str | None = None) -> dict[str, Any]:
    """Record a worker's answer. Idempotent; refused (409) when nobody holds the task's lease, or
    ``holder`` (when given) does not."""
    status_code = int_field(body, "status_code", None, 100, 599)
    if status_code is None:
        raise BadRequest("Missing required field 'status_code' (an integer).", param="status_code",
                         code="missing_field")
    request_id = field(body, "request_id", str, "")
    result = {"status_code": status_code, "request_id": request_id, "body": body.get("body")}
    task = find_task(task_id)
    return complete_task(task, result, holder)


def complete_task(task: Task, result: dict[str, Any], holder: str | None = None) -> dict[str, Any]:
    """Complete one task; ``holder`` (when given) must be its lease's holder."""
    ok = 200 <= result["status_code"] < 300
    engine = services().engine
    outcome = engine.complete(task.queue, task.level, task.id, failed=not ok, holder=holder,
                              result=json.dumps(result), tokens=token_cost.used(result))
    if outcome == "completed":
        write_end_state([task], TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED, result)
        engine.forget_results(task.queue, [task.id])
        return {"task_id": task.id, "completed": True, "status": task.status}
    if outcome == "wrong_holder":
        raise Conflict(f"Task '{task.id}' is leased to a worker of another owner; it was left untouched.",
                       param="task_id", code="leased_by_another_owner")
    db.session.refresh(task)
    if outcome == "already":
        return {"task_id": task.id, "completed": False, "status": task.status,
                "message": "The task was already completed; this complete changed nothing."}
    raise Conflict(
        f"Task '{task.id}' is not leased to anyone (status: {task.status}); its result was dropped.",
        param="task_id", code="not_leased",
    )


def complete_many(results: dict[str, dict[str, Any]], taken: Mapping[str, Mapping[str, Any]] | None = None,
                  write_aside: Callable[[Callable[[], int]], object] | None = None) -> int:
    """Complete tasks leased by built-in workers: claimed in the engine in one round trip, then
    written in one SQL transaction (one claim for every end status). Tasks nobody holds any more
    (cancelled, timed out) are dropped.

    ``taken`` (the task objects the take gave, by id) saves reading the tasks before the engine's
    claim. Held requests of the claimed online tasks are answered as soon as the engine has
    recorded their results, before the SQL write: a completer killed between the two leaves the
    same result for the lost-completion reaper to write, and cancels and timeouts of a task the
    engine completed change nothing (:func:`completed_in_engine`).

    ``write_aside`` (given ``taken``) is handed the SQL write as a function to run elsewhere, in
    an app context of its own: the caller goes on as soon as the engine has the results (their
    held requests answered); the count returned is then the engine's."""
    if not results:
        return 0
    rows: Sequence[Task | _TakenRef]
    if taken is not None and all(tid in taken for tid in results):
        rows = [_TakenRef(tid, taken[tid]["queue"], int(taken[tid]["level"]), taken[tid].get("instance_id") or "",
                          taken[tid].get("response_mode", "callback")) for tid in results]
    else:
        rows = db.session.execute(db.select(Task).where(Task.id.in_(list(results)))).scalars().all()
    oks = [200 <= results[t.id]["status_code"] < 300 for t in rows]
    items = [Completion(t.queue, t.level, t.id, not ok, json.dumps(results[t.id]),
                        tokens=token_cost.used(results[t.id]))
             for t, ok in zip(rows, oks, strict=True)]
    outcomes = services().engine.complete_many(items)
    fault_point("after_engine_complete")
    status_of = {t.id: TaskStatus.SUCCEEDED if ok else TaskStatus.FAILED
                 for t, ok, outcome in zip(rows, oks, outcomes, strict=True) if outcome == "completed"}
    from bellaq.online import ANSWERED_EARLY, answer_held  # online builds on this module

    answered = answer_held([(t.id, t.instance_id, t.response_mode, results[t.id], status_of[t.id])
                            for t in rows if t.id in status_of])

    def write() -> int:
        ended_rows = rows
        if ended_rows and not isinstance(ended_rows[0], Task):
            ended_rows = db.session.execute(
                db.select(Task).where(Task.id.in_(sorted(status_of)))).scalars().all() if status_of else []
        won: list[Task] = []
        for task in ended_rows:
            assert isinstance(task, Task)
            if task.id in status_of:
                if task.id in answered:
                    setattr(task, ANSWERED_EARLY, True)
                won.append(task)
        ended = len(write_end_states(won, status_of, results=results))
        _forget_recorded(won)
        return ended

    if write_aside is None or not status_of or isinstance(rows[0], Task):
        return write()
    write_aside(write)
    return len(status_of)


@dataclass(frozen=True)
class _TakenRef:
    """What completing needs of a task the take gave, without reading it from SQL."""

    id: str
    queue: str
    level: int
    instance_id: str
    response_mode: str


def _forget_recorded(tasks: Sequence[Task]) -> None:
    """Drop the engine's copy of results that are now in SQL."""
    by_queue: dict[str, list[str]] = defaultdict(list)
    for task in tasks:
        by_queue[task.queue].append(task.id)
    for queue, ids in by_queue.items():
        services().engine.forget_results(queue, ids)


def parse_extend(body: dict[str, Any]) -> int:
    """The ``lease`` (seconds) of an extend request."""
    return int_field(body, "lease", services().settings.default_process_timeout, 1, 7 * 86400)


def lease_holder(principal: Principal) -> str | None:
    """The holder an HTTP worker's leases are taken, completed and extended as: its owner (an
    admin key skips the check)."""
    return None if principal.role == "admin" else holder_of(principal.owner)


def extend(task_id: str, lease_s: float, holder: str | None) -> dict[str, Any]:
    """Renew a task's lease for ``lease_s`` seconds (never past its process_timeout); 409 when
    nobody or another owner's worker holds it."""
    task = find_task(task_id)
    got = services().engine.extend(task.queue, task.level, [task.id], round(lease_s * 1000), holder)
    if task.id in got.renewed:
        return {"task_id": task.id, "lease_expires_at": got.renewed[task.id]}
    if got.wrong_holder:
        raise Conflict(f"Task '{task.id}' is leased to a worker of another owner; it was left untouched.",
                       param="task_id", code="leased_by_another_owner")
    raise Conflict(f"Task '{task.id}' is not leased to anyone (status: {task.status}); its lease cannot be "
                   "extended.", param="task_id", code="not_leased")


# ---------------------------------------------------------------------------------------------- take

def parse_take(body: dict[str, Any]) -> dict[str, Any]:
    settings = services().settings
    names = field(body, "queues", list)
    if not names or len(names) > 100:
        raise BadRequest("Field 'queues' must list 1 to 100 queues written name:level.", param="queues")
    queues = []
    for name in names:
        if not isinstance(name, str):
            raise BadRequest("Every entry of 'queues' must be a string name:level.", param="queues")
        queues.append(full_queue(name))
    return {
        "queues": queues,
        "size": int_field(body, "size", 1, 1, MAX_TAKE),
        "strategy": choice_field(body, "strategy", STRATEGIES, "fifo"),
        "process_timeout": int_field(body, "process_timeout", settings.default_process_timeout, 1, 7 * 86400),
        "max_retries": int_field(body, "process_max_retries", settings.default_max_retries, -1, 1000),
        "lease": int_field(body, "lease", None, 1, 7 * 86400),
    }


def take(queues: Sequence[tuple[str, int]], size: int, strategy: str = "fifo", process_timeout: float = 300,
         max_retries: int = 3, lease: float | None = None, holder: str = BUILTIN_HOLDER) -> list[dict[str, Any]]:
    """Lease up to ``size`` tasks by ``strategy`` to ``holder`` (built-in workers unless named)
    and mark them queued; returns task objects. Each lease lasts ``lease`` seconds (default:
    ``process_timeout``), renewable by its ``holder`` up to ``process_timeout`` after the take."""
    return take_within_limits(queues, size, strategy, process_timeout, max_retries, lease, holder).tasks


@dataclass(frozen=True)
class Taken:
    """What :func:`take_within_limits` leased, and when to ask again if a limit held work back."""

    tasks: list[dict[str, Any]]
    retry_s: float | None  # a rate limit or pause may let work through then; None: no such hint
    limited: tuple[str, ...]  # 'paused', 'in_flight', 'rpm', 'tpm': the limits that stopped the take


def take_within_limits(queues: Sequence[tuple[str, int]], size: int, strategy: str = "fifo",
                       process_timeout: float = 300, max_retries: int = 3, lease: float | None = None,
                       holder: str = BUILTIN_HOLDER, start: Callable[[list[dict[str, Any]]], object] | None = None
                       ) -> Taken:
    """:func:`take`, also saying whether the queue's limits held work back and until when.
    ``start`` is :func:`mark_taken`'s."""
    lease_ms = None if lease is None else max(1, round(min(lease, process_timeout) * 1000))
    hinted = services().engine.take_with_hint(queues, size, strategy, process_timeout, max_retries,
                                              lease_ms=lease_ms, holder=holder)
    retry_s = None if hinted.retry_ms is None else hinted.retry_ms / 1000
    return Taken(mark_taken(hinted.tasks, start), retry_s, hinted.limited)


def claim_comeback(queue: str, level: int, after_s: float) -> bool:
    """True for the one built-in taker that is to come back to ``queue:level`` after a wait (a
    limit, a delayed task's due time); False while another one already will."""
    svc = services()
    key = svc.key("comeback", queue, str(level))
    return bool(svc.redis.set(key, 1, px=max(1, round(after_s * 1000)), nx=True))


def next_due_s(queue: str, level: int) -> float | None:
    """Seconds until the first delayed task of ``queue:level`` is due; None when none is delayed."""
    due_ms = services().engine.stats(queue, level).next_due_in_ms
    return None if due_ms is None else due_ms / 1000


def mark_taken(taken: Iterable[TakenTask], start: Callable[[list[dict[str, Any]]], object] | None = None
               ) -> list[dict[str, Any]]:
    """Write the taken tasks as ``queued`` (attempts, running time) and return them as task
    objects; overdue ones end as ``timeout`` instead. Only rows still open change: a task ended
    meanwhile (a cancel between the take and this write) is not reopened.

    ``start`` (a built-in worker's) is given the task objects before the SQL write, so their
    requests run while it is made; the caller completes them only after this returns, so a
    task's end is always written after its mark."""
    taken = list(taken)
    metrics.tasks_taken(taken)
    now = now_ms()
    out: list[dict[str, Any]] = []
    overdue: list[TakenTask] = []
    for item in taken:
        task = json.loads(item.payload)
        if task.get("expire_time") and not task.get("batch_id") and task["expire_time"] < now:
            overdue.append(item)
            continue
        task.update(status=TaskStatus.QUEUED, attempts=item.attempts, running_time=now, result=None,
                    completed_time=None)
        out.append(task)
    if out and start is not None:
        start(out)
    if out:
        # One UPDATE per attempts value (nearly always one): one statement, not one per task,
        # which is a round trip each on MySQL.
        by_attempts: dict[int, list[str]] = defaultdict(list)
        for t in out:
            by_attempts[t["attempts"]].append(t["task_id"])

        def write() -> None:
            conn = db.session.connection()
            for attempts, ids in sorted(by_attempts.items()):
                conn.execute(_MARK_TAKEN, {"ids": sorted(ids), "taken_attempts": attempts, "taken_at": now})
            db.session.commit()

        retrying(write)
    if overdue:
        _end_overdue(overdue)
    return out


def _end_overdue(items: Sequence[TakenTask]) -> None:
    engine = services().engine
    for item in items:
        engine.complete(item.queue, item.level, item.task_id, failed=True)
    tasks = db.session.execute(db.select(Task).where(Task.id.in_([i.task_id for i in items]))).scalars().all()
    results = {task.id: error_result(408, f"The task waited longer than its timeout of {task.timeout} s.", "timeout")
               for task in tasks}
    write_end_state(tasks, TaskStatus.TIMEOUT, results=results)


# ------------------------------------------------------------------------------------------ reaping

def reap(now: int | None = None) -> dict[str, int]:
    """Put expired leases back (or fail them after their retries) and time out overdue waiting tasks."""
    svc = services()
    requeued = failed = timed_out = 0
    builtin = {q.name for q in db.session.execute(db.select(Queue).where(Queue.builtin.is_(True))).scalars()}
    for (queue, level), res in svc.engine.requeue_all_expired(now).items():
        if res.requeued:
            db.session.execute(
                update(Task).where(Task.id.in_(res.requeued), Task.status == TaskStatus.QUEUED)
                .values(status=TaskStatus.WAITING)
            )
            _recheck_batches(res.requeued)
            db.session.commit()
            requeued += len(res.requeued)
            if queue in builtin:
                svc.work_ready(queue, level, len(res.requeued), lost=True)
        if res.promoted and queue in builtin:
            svc.work_ready(queue, level, len(res.promoted))
        if res.failed:
            tasks = db.session.execute(db.select(Task).where(Task.id.in_(res.failed))).scalars().all()
            for task in tasks:
                message = (f"The task's lease of process_timeout ran out {task.attempts} times without a "
                           "complete; it will not be retried.")
                lost = error_result(408, message, "lease_expired", "timeout")
                failed += len(write_end_state([task], TaskStatus.FAILED, lost))
    cutoff = now if now is not None else now_ms()
    overdue = db.session.execute(
        db.select(Task)
        .where(Task.status == TaskStatus.WAITING, Task.batch_id == "", Task.expire_time < cutoff).limit(1000)
    ).scalars().all()
    for task in overdue:
        outcome = svc.engine.cancel(task.queue, task.level, task.id)
        if outcome != "leased" and not (outcome == "absent" and completed_in_engine(task)):
            message = f"The task waited longer than its timeout of {task.timeout} s."
            timed_out += len(write_end_state([task], TaskStatus.TIMEOUT, error_result(408, message, "timeout")))
    from bellaq.lost_completions import end_lost_completions  # it writes end states through this module

    lost = end_lost_completions()
    return {"requeued": requeued, "failed": failed, "timed_out": timed_out, "lost": lost}


def _recheck_batches(task_ids: Sequence[str]) -> None:
    """The batches of tasks put back after a lease ran out: their holder may have died with end
    states written but not counted, so their last end must ask SQL (see batches.progress)."""
    from bellaq.batches import progress  # batches build on this module

    progress.recheck(db.session.execute(
        select(Task.batch_id).where(Task.id.in_(task_ids), Task.batch_id != "").distinct()).scalars())


def recover(chunk: int = 2000) -> int:
    """Re-seed the engine from SQL: every open task becomes takeable again, none twice."""
    svc = services()
    added = 0
    ready: dict[tuple[str, int], int] = defaultdict(int)
    push_all_limits()
    queues = {q.name: q for q in db.session.execute(db.select(Queue)).scalars()}
    builtin = {name for name, q in queues.items() if q.builtin}
    last = ("", 0)
    while True:
        rows = db.session.execute(
            db.select(Task).where(Task.status.in_(OPEN_STATUSES))
            .where((Task.start_time > last[1]) | ((Task.start_time == last[1]) & (Task.id > last[0])))
            .order_by(Task.start_time, Task.id).limit(chunk)
        ).scalars().all()
        if not rows:
            break
        groups: dict[tuple[str, int], list[Task]] = defaultdict(list)
        for task in rows:
            groups[(task.queue, task.level)].append(task)
        for (queue, level), tasks in groups.items():
            n = svc.engine.enqueue_many(
                queue, level, [(t.id, task_payload(t), t.start_time * 1000) for t in tasks],
                attempts={t.id: t.attempts for t in tasks},
                costs={t.id: queue_cost(queues.get(queue), t.endpoint, json.loads(t.data)) for t in tasks},
            )
            added += n
            if n and queue in builtin:
                ready[(queue, level)] += n
        last = (rows[-1].id, rows[-1].start_time)
        db.session.expunge_all()
    for (queue, level), n in ready.items():
        svc.work_ready(queue, level, n)
    return added
