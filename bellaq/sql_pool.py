"""How SQL connections are pooled: the engine options and the pool's events.

Every checkout used to cost a round trip before its work (``pool_pre_ping``) and every checkin
one after it (the pool's ``ROLLBACK`` on return, sent even when the transaction had just been
committed). Instead:

- a connection is pinged at checkout only when it sat in the pool longer than
  :data:`IDLE_PING_S` (a busy process reuses its connections within milliseconds; the pool is
  LIFO, so the connections it keeps using stay fresh and the others age out); a failed ping
  makes the pool discard the connection and take another one;
- MySQL/MariaDB connections are recycled after :data:`RECYCLE_S`, and each sets its session's
  ``wait_timeout`` to :data:`WAIT_TIMEOUT_S` when it connects, so the server never closes a
  pooled connection first, whatever its global setting;
- a connection is rolled back on return only when a transaction may still be open on it: a
  committed or rolled-back transaction (the normal end of every session and ``engine.begin()``
  block) needs nothing more. What SQLAlchemy cannot vouch for is rolled back as before: a
  connection dropped without being closed (its owner was killed mid-transaction), one whose
  statement or COMMIT failed, one used as a raw DBAPI connection. SQLite's driver knows
  exactly (``in_transaction``) and is asked.

A put group's INSERT is one statement whose commit needs nothing else. On MySQL/MariaDB it runs
on an autocommit twin of the engine (:func:`autocommit_twin`, a small pool of its own), so it
costs one round trip where ``INSERT`` then ``COMMIT`` cost two.

A connection that dies anyway (the server restarted, a ``KILL``) fails the statement it was
running: SQLAlchemy recognises the disconnect and invalidates it and every connection of the
pool older than it, so the next checkout connects afresh.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import create_engine, event, exc
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState

IDLE_PING_S = 5.0
RECYCLE_S = 3600
WAIT_TIMEOUT_S = 8 * 3600  # MariaDB's default; above RECYCLE_S
_IDLE_SINCE = "bellaq_idle_since"
_OPEN = "bellaq_txn_open"  # a transaction began on this connection and has not ended


def engine_options(url: str) -> dict[str, Any]:
    """``SQLALCHEMY_ENGINE_OPTIONS`` for ``url``; :func:`install` adds the events."""
    import bellaq.db  # noqa: F401  (SQLite pragmas)

    common = {"pool_reset_on_return": None, "pool_use_lifo": True}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30, "check_same_thread": False}, **common}
    return {"pool_recycle": RECYCLE_S, "pool_size": 20, "max_overflow": 40,
            "connect_args": {"init_command": f"SET SESSION wait_timeout = {WAIT_TIMEOUT_S}"}, **common}


def install(engine: Engine) -> None:
    """Attach the checkout ping and the reset on return to ``engine`` (made with
    :func:`engine_options`)."""
    event.listen(engine, "begin", _began)
    event.listen(engine, "commit", _ended)
    event.listen(engine, "rollback", _ended)
    event.listen(engine, "handle_error", _failed)
    event.listen(engine.pool, "checkin", _checkin)
    event.listen(engine.pool, "checkout", _checkout)
    event.listen(engine.pool, "reset", _reset)


def autocommit_twin(engine: Engine) -> Engine:
    """An engine on ``engine``'s database whose connections commit each statement themselves, for
    single-statement writes; ``engine`` itself on SQLite (its commit is no round trip). Its
    ``commit()`` and ``rollback()`` send nothing: in autocommit mode there is never a transaction
    for them to end, and the driver would still send each as a statement."""
    if engine.dialect.name == "sqlite":
        return engine
    options = {**engine_options(engine.url.drivername), "pool_size": 2, "max_overflow": 8,
               "isolation_level": "AUTOCOMMIT"}
    twin = create_engine(engine.url, **options)
    twin.dialect.do_commit = twin.dialect.do_rollback = _nothing  # type: ignore[method-assign]
    event.listen(twin.pool, "checkin", _checkin)
    event.listen(twin.pool, "checkout", _checkout)
    return twin


def _nothing(_dbapi_connection: Any) -> None:
    return None


def _mark(conn: Connection, is_open: bool) -> None:
    if not conn.invalidated:  # an invalidated connection is discarded, never reset
        conn.info[_OPEN] = is_open


def _began(conn: Connection) -> None:
    _mark(conn, True)


def _ended(conn: Connection) -> None:
    _mark(conn, False)


def _failed(context: ExceptionContext) -> None:
    # A statement or a COMMIT failed: whatever the transaction's state now, roll back on return.
    if context.connection is not None and not context.is_disconnect:
        _mark(context.connection, True)


def _checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info[_IDLE_SINCE] = time.monotonic()


def _checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
    # Open until a commit or rollback through SQLAlchemy says otherwise: a connection used
    # without SQLAlchemy's transactions (raw DBAPI) is always rolled back on return.
    record.info[_OPEN] = True
    since = record.info.get(_IDLE_SINCE)
    ping = getattr(dbapi_connection, "ping", None)  # PyMySQL's COM_PING; SQLite has no server
    if ping is None or since is None or time.monotonic() - since < IDLE_PING_S:
        return
    try:
        ping(False)
    except Exception as err:
        # The pool invalidates this connection and checks out another (a new one if need be).
        raise exc.DisconnectionError(f"connection lost while idle: {err}") from err


def _reset(dbapi_connection: Any, record: ConnectionPoolEntry | None, state: PoolResetState) -> None:
    if not state.asyncio_safe or state.transaction_was_reset:
        return
    info = record.info if record is not None else None
    in_transaction = getattr(dbapi_connection, "in_transaction", None)  # exact on sqlite3
    if in_transaction is None:
        in_transaction = info is None or info.get(_OPEN, True)
    if in_transaction:
        dbapi_connection.rollback()
    if info is not None:
        info[_OPEN] = False
