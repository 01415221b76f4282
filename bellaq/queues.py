"""Registered queues: registration, lookup, and the default queue of an endpoint and model."""

from __future__ import annotations

import re
from typing import Any

from bellaq.clock import now_ms
from bellaq.errors import BadRequest, NotFound
from bellaq.extensions import db
from bellaq.models import Queue
from bellaq.queue_engine import QUEUE_NAME_RE, STRATEGIES, parse_full_queue
from bellaq.validation import choice_field, field, int_field

ENDPOINT_RE = re.compile(r"^/v1/[A-Za-z0-9_\-/.]{1,240}$")


def check_endpoint(endpoint: str, param: str = "endpoint") -> str:
    if not ENDPOINT_RE.match(endpoint):
        raise BadRequest(
            f"'{endpoint}' is not an endpoint path; use a path such as /v1/chat/completions.", param=param
        )
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


def register(body: dict[str, Any]) -> Queue:
    name = check_queue_name(field(body, "queue", str))
    existing = db.session.get(Queue, name)
    endpoint_default = (existing.endpoint,) if existing else ()
    endpoint = check_endpoint(field(body, "endpoint", str, *endpoint_default))
    builtin = field(body, "builtin", bool, existing.builtin if existing else True)
    strategy = choice_field(body, "strategy", STRATEGIES, existing.strategy if existing else "fifo")
    upstream = field(body, "upstream", dict, None)
    max_in_flight = int_field(body, "max_in_flight", existing.max_in_flight if existing else None, 1, 1_000_000)
    rpm = int_field(body, "rpm", existing.rpm if existing else None, 1, 100_000_000)
    base_url = existing.upstream_base_url if existing else None
    key_env = existing.upstream_api_key_env if existing else None
    if upstream is not None:
        base_url = field(upstream, "base_url", str, None)
        key_env = field(upstream, "api_key_env", str, None)
        if base_url is not None and not re.match(r"^https?://[^\s/]+", base_url):
            raise BadRequest("upstream.base_url must be an http(s) URL such as http://vllm:8000.",
                             param="upstream.base_url")
        if key_env is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", key_env):
            raise BadRequest("upstream.api_key_env must be the name of an environment variable.",
                             param="upstream.api_key_env")
    now = now_ms()
    row = existing or Queue(name=name, created_at=now)
    row.endpoint = endpoint
    row.builtin = builtin
    row.strategy = strategy
    row.upstream_base_url = base_url
    row.upstream_api_key_env = key_env
    row.max_in_flight = max_in_flight
    row.rpm = rpm
    row.updated_at = now
    if existing is None:
        db.session.add(row)
    db.session.commit()
    return row


def get_queue(name: str) -> Queue:
    row = db.session.get(Queue, name)
    if row is None:
        raise NotFound(f"No queue named '{name}' is registered.", param="queue", code="queue_not_found")
    return row


def resolve_queue(endpoint: str, model: Any, explicit: str | None, param: str = "queue") -> Queue:
    """The queue for a request: the named one (which must serve ``endpoint``) or the default one.

    A default queue that does not exist yet is registered as a built-in fifo queue.
    """
    if explicit is not None:
        row = db.session.get(Queue, check_queue_name(explicit, param))
        if row is None:
            raise BadRequest(f"No queue named '{explicit}' is registered; register it first "
                             "(POST /v1/queue/register) or leave the queue out.", param=param,
                             code="queue_not_found")
        if row.endpoint != endpoint:
            raise BadRequest(f"Queue '{explicit}' serves {row.endpoint}, not {endpoint}.", param="endpoint")
        return row
    name = default_queue_name(endpoint, model)
    row = db.session.get(Queue, name)
    if row is not None:
        return row
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
    return row
