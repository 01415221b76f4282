"""``Idempotency-Key``: the same key from the same owner within the TTL returns the first answer.

The key is reserved before the object is created, so two concurrent retries cannot both create.
"""

from __future__ import annotations

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


def idempotent(route: str, owner: str, ttl_s: int, create: Callable[[], tuple[Any, int]]) -> Response:
    """Run ``create`` once per (owner, route, Idempotency-Key); replay its answer afterwards."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        payload, status = create()
        return _json_response(json.dumps(payload), status)
    if not key or len(key) > 255:
        raise BadRequest("Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key")
    horizon = now_ms() - ttl_s * 1000
    db.session.execute(
        db.delete(IdempotencyRecord).where(
            IdempotencyRecord.owner == owner, IdempotencyRecord.route == route,
            IdempotencyRecord.key == key, IdempotencyRecord.created_at < horizon,
        )
    )
    record = IdempotencyRecord(owner=owner, route=route, key=key, response=PENDING, created_at=now_ms())
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
        if first.response == PENDING:
            raise Conflict("A request with this Idempotency-Key is still being processed; retry shortly.",
                           param="Idempotency-Key", code="idempotency_in_progress") from None
        return _json_response(first.response, first.status_code)
    record_id = record.id
    try:
        payload, status = create()
    except Exception:
        # Nothing was created: free the key so a corrected retry can use it.
        db.session.rollback()
        db.session.execute(db.delete(IdempotencyRecord).where(IdempotencyRecord.id == record_id))
        db.session.commit()
        raise
    text = json.dumps(payload)
    db.session.execute(
        db.update(IdempotencyRecord).where(IdempotencyRecord.id == record_id).values(response=text,
                                                                                        status_code=status)
    )
    db.session.commit()
    return _json_response(text, status)
