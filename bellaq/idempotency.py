"""``Idempotency-Key``: the same key from the same owner within the TTL returns the first answer.

The key is reserved before the object is created, so two concurrent retries cannot both create.
A request may carry a fingerprint of its body: the same key sent with another body is refused
(400 ``idempotency_key_reused``) rather than answered with the first request's result.
Expired records are purged by beat (:func:`purge_expired`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from flask import Response, request
from sqlalchemy.exc import IntegrityError

from bellaq.clock import now_ms
from bellaq.errors import BadRequest, Conflict
from bellaq.extensions import db
from bellaq.models import IdempotencyRecord

PENDING = ""


def _json_response(payload: str, status: int) -> Response:
    return Response(payload, status=status, mimetype="application/json")


def fingerprint(body: Any) -> str:
    """A hash of a JSON body that ignores key order and spacing."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def header_key() -> str | None:
    """The request's ``Idempotency-Key``, checked; None without one."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and (not key or len(key) > 255):
        raise BadRequest("Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key")
    return key


def in_progress() -> Conflict:
    return Conflict("A request with this Idempotency-Key is still being processed; retry shortly.",
                    param="Idempotency-Key", code="idempotency_in_progress")


def reserve(route: str, owner: str, key: str, ttl_s: int, body_hash: str | None,
            response: str = PENDING, status: int = 200) -> tuple[int, IdempotencyRecord | None]:
    """Reserve (owner, route, key) with ``response``: ``(record id, None)`` if this request is the
    first, ``(0, first record)`` if an earlier one holds it with the same body (400 if not)."""
    horizon = now_ms() - ttl_s * 1000
    db.session.execute(
        db.delete(IdempotencyRecord).where(
            IdempotencyRecord.owner == owner, IdempotencyRecord.route == route,
            IdempotencyRecord.key == key, IdempotencyRecord.created_at < horizon,
        )
    )
    record = IdempotencyRecord(owner=owner, route=route, key=key, response=response, status_code=status,
                               request_hash=body_hash, created_at=now_ms())
    db.session.add(record)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        first = db.session.execute(
            db.select(IdempotencyRecord).where(
                IdempotencyRecord.owner == owner, IdempotencyRecord.route == route, IdempotencyRecord.key == key
            )
        ).scalar_one()
        if first.request_hash and body_hash and first.request_hash != body_hash:
            raise BadRequest("This Idempotency-Key was already used with a different request body; use a new key "
                             "for a new request.", param="Idempotency-Key", code="idempotency_key_reused") from None
        return 0, first
    return record.id, None


def release(record_id: int) -> None:
    """Nothing was created: free the key so a corrected retry can use it."""
    db.session.rollback()
    db.session.execute(db.delete(IdempotencyRecord).where(IdempotencyRecord.id == record_id))
    db.session.commit()


def idempotent(route: str, owner: str, ttl_s: int, create: Callable[[], tuple[Any, int]],
               body_hash: str | None = None) -> Response:
    """Run ``create`` once per (owner, route, Idempotency-Key); replay its answer afterwards."""
    key = header_key()
    if key is None:
        payload, status = create()
        return _json_response(json.dumps(payload), status)
    record_id, first = reserve(route, owner, key, ttl_s, body_hash)
    if first is not None:
        if first.response == PENDING:
            raise in_progress()
        return _json_response(first.response, first.status_code)
    try:
        payload, status = create()
    except Exception:
        release(record_id)
        raise
    text = json.dumps(payload)
    db.session.execute(
        db.update(IdempotencyRecord).where(IdempotencyRecord.id == record_id).values(response=text,
                                                                                        status_code=status)
    )
    db.session.commit()
    return _json_response(text, status)


def purge_expired(ttl_s: int, limit: int = 10_000) -> int:
    """Delete records older than the TTL (beat); returns how many."""
    horizon = now_ms() - ttl_s * 1000
    ids = db.session.execute(
        db.select(IdempotencyRecord.id).where(IdempotencyRecord.created_at < horizon).limit(limit)
    ).scalars().all()
    if ids:
        db.session.execute(db.delete(IdempotencyRecord).where(IdempotencyRecord.id.in_(ids)))
    db.session.commit()
    return len(ids)
