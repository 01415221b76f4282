"""Queue registration, metadata, stats and console: ``/v1/queue/...`` and ``/v1/console/...``."""

from __future__ import annotations

from flask import Blueprint, jsonify

from bellaq import stats as queue_stats
from bellaq.api.openapi import operation
from bellaq.auth import current_principal, require
from bellaq.queues import check_queue_name, clear_waiting, full_queue, get_queue, public_view, register
from bellaq.validation import json_body

bp = Blueprint("queues", __name__)


@operation("Register or update a queue", tag="Queues", roles=("admin",), body="Register", responses={200: "Queue"},
           description="Registering an existing name updates it; fields left out keep their values, and a limit "
                       "(rpm, tpm, max_in_flight, default_max_tokens) given as null is lifted.")
@bp.post("/v1/queue/register")
@require("admin")
def register_queue():
    row = register(json_body())
    return jsonify(row.to_dict())


@operation("Read a queue's settings (without its upstream unless admin)", tag="Queues", roles=("user", "worker"),
           responses={200: "Queue"}, errors={404: "No queue registered with this name."})
@bp.get("/v1/queue/<name>/metadata")
@require("user", "worker")
def metadata(name: str):
    return jsonify(public_view(get_queue(check_queue_name(name)), current_principal()))


@operation("Counts of one queue level", tag="Queues", roles=("user", "worker"), responses={200: "QueueStats"})
@bp.get("/v1/queue/<name>/stats")
@require("user", "worker")
def stats(name: str):
    queue, level = full_queue(name, param="queue")
    return jsonify(queue_stats.level_counts(queue, level))


@operation("Counts of every queue level", tag="Queues", roles=("admin",), responses={200: "QueueStatsList"})
@bp.get("/v1/console/queue/stats")
@require("admin")
def console_stats():
    data = queue_stats.all_level_counts()
    return jsonify({"object": "list", "data": data})


@operation("Cancel every waiting task of a queue level (running ones go on)", tag="Queues", roles=("admin",),
           responses={200: "Cleared"})
@bp.post("/v1/console/<name>/clear")
@require("admin")
def clear(name: str):
    queue, level = full_queue(name, param="queue")
    cleared = clear_waiting(queue, level)
    return jsonify({"queue": f"{queue}:{level}", "cleared": cleared})
