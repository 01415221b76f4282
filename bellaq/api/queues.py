"""Queue registration, metadata, stats and console: ``/v1/queue/...`` and ``/v1/console/...``."""

from __future__ import annotations

from flask import Blueprint, jsonify

from bellaq import stats as queue_stats
from bellaq.auth import current_principal, require
from bellaq.queues import check_queue_name, full_queue, get_queue, public_view, register
from bellaq.validation import json_body

bp = Blueprint("queues", __name__)


@bp.post("/v1/queue/register")
@require("admin")
def register_queue():
    row = register(json_body())
    return jsonify(row.to_dict())


@bp.get("/v1/queue/<name>/metadata")
@require("user", "worker")
def metadata(name: str):
    return jsonify(public_view(get_queue(check_queue_name(name)), current_principal()))


@bp.get("/v1/queue/<name>/stats")
@require("user", "worker")
def stats(name: str):
    queue, level = full_queue(name, param="queue")
    return jsonify(queue_stats.one(queue, level))


@bp.get("/v1/console/queue/stats")
@require("admin")
def console_stats():
    data = queue_stats.every()
    return jsonify({"object": "list", "data": data})


@bp.post("/v1/console/<name>/clear")
@require("admin")
def clear(name: str):
    queue, level = full_queue(name, param="queue")
    cleared = queue_stats.clear(queue, level)
    return jsonify({"queue": f"{queue}:{level}", "cleared": cleared})
