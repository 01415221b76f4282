"""``GET /healthz``: is this process able to reach Redis and SQL."""

from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import text

from bellaq.api.openapi import operation
from bellaq.extensions import db
from bellaq.services import services

bp = Blueprint("health", __name__)


@operation("Is this process able to reach Redis and SQL", tag="Pages", dependencies=False,
           responses={200: "Health", 503: "Health"})
@bp.get("/healthz")
def healthz():
    checks: dict[str, str] = {}
    try:
        services().redis.ping()
        checks["redis"] = "ok"
    except Exception as err:  # noqa: BLE001 - any failure is "down"
        checks["redis"] = f"down: {type(err).__name__}"
    try:
        db.session.execute(text("SELECT 1"))
        checks["sql"] = "ok"
    except Exception as err:  # noqa: BLE001
        db.session.rollback()
        checks["sql"] = f"down: {type(err).__name__}"
    healthy = all(v == "ok" for v in checks.values())
    body = {"status": "ok" if healthy else "degraded", "checks": checks, "instance_id": services().instance_id}
    return jsonify(body), 200 if healthy else 503
