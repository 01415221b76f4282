"""The event-bus credential that ``GET /v1/queue/eventbus`` hands to external workers.

Unless the operator sets ``BELLAQ_EVENTBUS_URL``, workers get a Redis URL for an ACL user that
may only ``XADD`` to this deployment's event streams (``<prefix>:events:*``): it cannot read any
key, write elsewhere, run scripts or administer the server.

Every web process on every host must hand out the same password. It is generated once and kept
in Redis under ``<prefix>:eventbus:credential``, a key only the main connection can read (the
event-bus user has no read command at all), so no shared secret has to be configured. Ensuring
the user is idempotent and cheap; it runs at web start-up, at ``bellaq db init`` and on every
``GET /v1/queue/eventbus``, so the user comes back after Redis restarts without its ACL.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis

from bellaq.config import Settings
from bellaq.eventbus import topic

log = logging.getLogger(__name__)


class EventbusUnavailable(Exception):
    """This Redis cannot create the restricted user (no ACL support, or ACL SETUSER refused)."""


def username(prefix: str) -> str:
    """The ACL user of the deployment whose keys start with ``prefix``."""
    if re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", prefix):
        return f"bellaq-eventbus-{prefix}"
    return f"bellaq-eventbus-{hashlib.sha256(prefix.encode()).hexdigest()[:24]}"


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def ensure_user(client: redis.Redis, prefix: str) -> tuple[str, str]:
    """Create or refresh the event-bus user; returns (username, password).

    Raises :class:`EventbusUnavailable` when Redis has no ACL or refuses ``ACL SETUSER``; a
    connection failure propagates as the ``redis.RedisError`` it is.
    """
    key = f"{prefix}:eventbus:credential"
    client.set(key, secrets.token_hex(32), nx=True)
    password = client.get(key)
    if isinstance(password, bytes):
        password = password.decode()
    name = username(prefix)
    try:
        # reset* first, so the user holds exactly these rights whatever an earlier version set.
        client.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", "-@all", "+xadd",
                               f"~{_glob_escape(topic(prefix))}*", "resetchannels")
    except redis.ResponseError as err:
        raise EventbusUnavailable(str(err)) from None
    return name, password


def user_url(redis_url: str, user: str, password: str) -> str:
    """``redis_url`` with its credentials replaced by ``user`` and ``password``."""
    parts = urlsplit(redis_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("username", "password")]
    host = parts.netloc.rpartition("@")[2]
    if parts.scheme == "unix":
        query += [("username", user), ("password", password)]
        return f"unix://{host}{parts.path}?{urlencode(query)}"  # urlunsplit drops the "//" of an empty host
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), ""))


def prepare(settings: Settings, client: redis.Redis) -> str:
    """At start-up: make sure the user exists unless the operator set ``BELLAQ_EVENTBUS_URL``.
    Logs and returns what happened; never raises on a Redis problem, since the route tries again
    (and answers 503 with the reason) when a worker asks."""
    if settings.eventbus_url:
        message = "event bus: workers get BELLAQ_EVENTBUS_URL"
    else:
        try:
            user, _password = ensure_user(client, settings.redis_prefix)
        except (EventbusUnavailable, redis.RedisError) as err:
            message = (f"event bus: cannot create the Redis user for workers ({err}); set BELLAQ_EVENTBUS_URL, "
                       "or GET /v1/queue/eventbus will answer 503")
            log.warning(message)
            return message
        message = f"event bus: workers write events as Redis user {user}"
    log.info(message)
    return message


def worker_url(client: redis.Redis, redis_url: str, prefix: str) -> str:
    """The URL of the event-bus user, created if need be."""
    user, password = ensure_user(client, prefix)
    return user_url(redis_url, user, password)
