"""Registered queues: registration, lookup, what each role sees of one, and the default queue of
an endpoint and model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from bellaq.clock import now_ms
from bellaq.errors import BadRequest, NotFound, Unavailable
from bellaq.extensions import db
from bellaq.keys import Principal
from bellaq.models import Queue, Task
from bellaq.models.tasks import TaskStatus
from bellaq.queue_engine import QUEUE_NAME_RE, STRATEGIES, parse_full_queue
from bellaq.registry_cache import bump_quietly, registry_cache
from bellaq.services import services
from bellaq.upstream_rules import BUILTIN_ENDPOINTS, base_url_problem, endpoint_problem, key_env_problem
from bellaq.validation import choice_field, field, int_field


def check_endpoint(endpoint: str, param: str = "endpoint") -> str:
    problem = endpoint_problem(endpoint)
    if problem is not None:
        raise BadRequest(f"'{endpoint[:80]}' is not an endpoint path: {problem}. Use a normalised path such as "
                         "/v1/chat/completions.", param=param, code="invalid_endpoint")
    return endpoint


def check_queue_name(name: str, param: str = "queue") -> str:
    if not QUEUE_NAME_RE.match(name):
        raise BadRequest(
            f"Queue name '{name[:80]}' is invalid: use 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'.",
            param=param,
            code="invalid_queue_name",
        )
    return name


def full_queue(name: str, param: str = "queues") -> tuple[str, int]:
    """Parse ``name:level`` into (name, level), as a 400 when malformed."""
    try:
        return parse_full_queue(name)
    except ValueError as err:
        raise BadRequest(f"{err} Write a queue as name:level, e.g. chat:0.", param=param,
                         code="invalid_queue_name") from None


def default_queue_name(endpoint: str, model: Any) -> str:
    """The queue a request goes to when none is named: endpoint path plus model, sanitised."""
    path = endpoint.removeprefix("/v1/").strip("/").replace("/", "_")
    name = path
    if isinstance(model, str) and model:
        name = f"{path}-{model}"
    name = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return name[:64] or "default"


def _limit(body: dict[str, Any], name: str, existing: Queue | None, maximum: int) -> int | None:
    """A limit field of a registration: left out keeps the current value, null lifts it."""
    if name in body and body[name] is None:
        return None
    return int_field(body, name, getattr(existing, name) if existing else None, 1, maximum)


def register(body: dict[str, Any]) -> Queue:
    name = check_queue_name(field(body, "queue", str))
    existing = db.session.get(Queue, name)
    endpoint_default = (existing.endpoint,) if existing else ()
    endpoint = check_endpoint(field(body, "endpoint", str, *endpoint_default))
    builtin = field(body, "builtin", bool, existing.builtin if existing else True)
    strategy = choice_field(body, "strategy", STRATEGIES, existing.strategy if existing else "fifo")
    upstream = field(body, "upstream", dict, None)
    max_in_flight = _limit(body, "max_in_flight", existing, 1_000_000)
    rpm = _limit(body, "rpm", existing, 100_000_000)
    tpm = _limit(body, "tpm", existing, 1_000_000_000)
    default_max_tokens = _limit(body, "default_max_tokens", existing, 10_000_000)
    base_url = existing.upstream_base_url if existing else None
    key_env = existing.upstream_api_key_env if existing else None
    if upstream is not None:
        base_url = field(upstream, "base_url", str, None)
        key_env = field(upstream, "api_key_env", str, None)
        problem = base_url_problem(base_url) if base_url is not None else None
        if problem is not None:
            raise BadRequest(f"upstream.base_url is refused: {problem}. Use an http(s) URL such as "
                             "http://vllm:8000 or https://gateway/openai.", param="upstream.base_url",
                             code="invalid_upstream")
        problem = key_env_problem(key_env, services().settings.upstream_key_envs) if key_env is not None else None
        if problem is not None:
            raise BadRequest(f"upstream.api_key_env '{key_env[:128]}' is refused: {problem}.",
                             param="upstream.api_key_env", code="key_env_not_allowed")
    now = now_ms()
    row = existing or Queue(name=name, created_at=now)
    row.endpoint = endpoint
    row.builtin = builtin
    row.strategy = strategy
    row.upstream_base_url = base_url
    row.upstream_api_key_env = key_env
    row.max_in_flight = max_in_flight
    row.rpm = rpm
    row.tpm = tpm
    row.default_max_tokens = default_max_tokens
    row.updated_at = now
    if existing is None:
        db.session.add(row)
    try:
        push_limits(row)  # before the commit: a queue is never kept without its limits in force
    except RedisError:
        db.session.rollback()
        raise Unavailable(f"The queue engine (Redis) is unavailable, so queue '{name}' and its limits were "
                          "not saved; register it again.") from None
    db.session.commit()
    bump_quietly()
    return row


def push_limits(row: Queue) -> None:
    """Put the queue's ``rpm``, ``tpm`` and ``max_in_flight`` in force for every taker."""
    services().engine.set_limits(row.name, rpm=row.rpm, tpm=row.tpm, max_in_flight=row.max_in_flight)


def push_all_limits() -> int:
    """:func:`push_limits` for every queue that has a limit (after Redis lost its data); returns how many."""
    rows = db.session.execute(db.select(Queue).where(
        (Queue.rpm.is_not(None)) | (Queue.tpm.is_not(None)) | (Queue.max_in_flight.is_not(None)))).scalars().all()
    for row in rows:
        push_limits(row)
    return len(rows)


def public_view(row: Queue, principal: Principal) -> dict[str, Any]:
    """The queue as ``principal`` may see it: admins see everything; users and workers see no
    upstream (its URL and the name of its key variable are the operator's business)."""
    out = row.to_dict()
    if principal.role != "admin":
        out.pop("upstream", None)
    return out


def get_queue(name: str) -> Queue:
    row = db.session.get(Queue, name)
    if row is None:
        raise NotFound(f"No queue named '{name}' is registered.", param="queue", code="queue_not_found")
    return row


@dataclass(frozen=True)
class QueueRef:
    """What a put needs of a registered queue."""

    name: str
    endpoint: str
    builtin: bool
    default_max_tokens: int | None = None  # a task's completion budget when it names none (tpm)


def _queue_ref(name: str) -> QueueRef | None:
    """The registered queue ``name``, cached per process until a registration changes it."""

    def load() -> QueueRef | None:
        row = db.session.execute(
            db.select(Queue.name, Queue.endpoint, Queue.builtin, Queue.default_max_tokens).where(Queue.name == name)
        ).first()
        return QueueRef(row.name, row.endpoint, bool(row.builtin), row.default_max_tokens) if row is not None else None

    return registry_cache().get(("queue", name), load)


def resolve_queue(endpoint: str, model: Any, explicit: str | None, param: str = "queue") -> QueueRef:
    """The queue for a request: the named one (which must serve ``endpoint``) or the default one.

    The default is the queue named after the endpoint and model; a default queue that does not exist
    yet is registered as a built-in fifo queue for the built-in endpoints, and any other endpoint
    goes to the (oldest) registered queue that serves it.
    """
    if explicit is not None:
        ref = _queue_ref(check_queue_name(explicit, param))
        if ref is None:
            raise BadRequest(f"No queue named '{explicit}' is registered; register it first "
                             "(POST /v1/queue/register) or leave the queue out.", param=param,
                             code="queue_not_found")
        if ref.endpoint != endpoint:
            raise BadRequest(f"Queue '{explicit}' serves {ref.endpoint}, not {endpoint}.", param="endpoint")
        return ref
    name = default_queue_name(endpoint, model)
    ref = _queue_ref(name)
    if ref is not None:
        if ref.endpoint != endpoint:
            # Names are sanitised, so another endpoint can map onto a queue serving a different one.
            raise BadRequest(f"The default queue of {endpoint} and this model ('{name}') serves {ref.endpoint}; "
                             "name a queue that serves your endpoint in 'queue'.", param=param,
                             code="queue_not_registered")
        return ref
    if endpoint not in BUILTIN_ENDPOINTS:
        served = db.session.execute(db.select(Queue).where(Queue.endpoint == endpoint)
                                    .order_by(Queue.created_at, Queue.name).limit(1)).scalar_one_or_none()
        if served is not None:
            # the registered queue that serves it
            return QueueRef(served.name, served.endpoint, served.builtin, served.default_max_tokens)
        raise BadRequest(f"No queue serves {endpoint} here. A queue is created on first use only for "
                         f"{', '.join(BUILTIN_ENDPOINTS)}; ask an admin to register a queue for {endpoint} "
                         "(POST /v1/queue/register) and name it in 'queue'.", param=param,
                         code="queue_not_registered")
    now = now_ms()
    row = Queue(name=name, endpoint=endpoint, builtin=True, strategy="fifo", created_at=now, updated_at=now)
    db.session.add(row)
    try:
        db.session.commit()
    except Exception:
        # Another request registered it at the same moment.
        db.session.rollback()
        row = db.session.get(Queue, name)
        if row is None:
            raise
    ref = QueueRef(row.name, row.endpoint, row.builtin, row.default_max_tokens)
    bump_quietly()
    return ref


def clear_waiting(queue: str, level: int) -> int:
    """Cancel every waiting task of ``queue:level`` (running ones go on)."""
    from bellaq.tasks import write_end_state

    ids = services().engine.clear(queue, level)
    for start in range(0, len(ids), 1000):
        tasks = db.session.execute(db.select(Task).where(Task.id.in_(ids[start:start + 1000]))).scalars().all()
        write_end_state(tasks, TaskStatus.CANCELLED)
    return len(ids)
