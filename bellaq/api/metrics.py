"""``GET /metrics``: Prometheus text format; an admin key is needed unless ``BELLAQ_METRICS_PUBLIC``."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from bellaq import metrics
from bellaq.api.openapi import operation
from bellaq.auth import require

bp = Blueprint("metrics", __name__)


def _exposition() -> Response:
    return Response(metrics.scrape(), content_type=metrics.CONTENT_TYPE, headers={"Cache-Control": "no-store"})


_for_admins = require("admin")(_exposition)


@operation("Prometheus metrics of this host's processes", tag="Pages", roles=("admin",),
           description="No key is needed when BELLAQ_METRICS_PUBLIC=true.", responses={200: {
               "description": "The Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
@bp.get("/metrics")
def scrape() -> Response:
    if current_app.config["BELLAQ"].metrics_public:
        return _exposition()
    return _for_admins()
