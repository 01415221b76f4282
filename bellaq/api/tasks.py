"""The Task API: put, get, cancel, and the worker side (take, complete, progress, eventbus)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from bellaq import online, tasks
from bellaq.auth import current_principal, require
from bellaq.errors import Unavailable
from bellaq.eventbus import progress_event, topic
from bellaq.eventbus_access import EventbusUnavailable, worker_url
from bellaq.idempotency import idempotent
from bellaq.services import services
from bellaq.validation import choice_field, field, json_body

bp = Blueprint("tasks", __name__, url_prefix="/v1/queue")


@bp.post("/put")
@require("user")
def put():
    principal = current_principal()
    body = json_body()
    mode = choice_field(body, "response_mode", ("callback", "blocking", "streaming"), "callback")
    if mode == "blocking":
        return online.blocking(principal, body)
    if mode == "streaming":
        return online.streaming(principal, body)

    def create() -> tuple[dict, int]:
        task = tasks.put(principal, body)
        return {"code": 200, "data": task.id}, 200

    return idempotent("queue.put", principal.owner, services().settings.idempotency_ttl, create)


@bp.get("/<task_id>")
@require("user")
def get(task_id: str):
    return jsonify(tasks.owned_task(current_principal(), task_id).to_dict())


@bp.post("/<task_id>/cancel")
@require("user")
def cancel(task_id: str):
    task = tasks.cancel(current_principal(), task_id)
    return jsonify({"code": 202, "data": task.id}), 202


@bp.post("/take")
@require("worker")
def take():
    args = tasks.parse_take(json_body())
    taken = tasks.take(**args)
    out: dict[str, list] = {f"{q}:{lvl}": [] for q, lvl in args["queues"]}
    for task in taken:
        out[f"{task['queue']}:{task['level']}"].append(task)
    return jsonify(out)


@bp.post("/<task_id>/complete")
@require("worker")
def complete(task_id: str):
    return jsonify(tasks.complete(task_id, json_body()))


@bp.post("/<task_id>/progress")
@require("worker")
def progress(task_id: str):
    body = json_body()
    event_id = field(body, "event_id", (str, int), "")
    event_name = field(body, "event_name", str, "progress")
    task = tasks.find_task(task_id)
    if "event_data" not in body:
        from bellaq.errors import BadRequest

        raise BadRequest("Missing required field 'event_data'.", param="event_data", code="missing_field")
    if task.instance_id:
        online.bus().publish(task.instance_id, [progress_event(task.id, str(event_id), event_name,
                                                               body["event_data"])])
    return jsonify({"task_id": task.id, "delivered": bool(task.instance_id)})


@bp.get("/eventbus")
@require("worker")
def eventbus():
    svc = services()
    settings = svc.settings
    url = settings.eventbus_url
    if not url:
        try:
            url = worker_url(svc.redis, settings.redis_url, settings.redis_prefix)
        except EventbusUnavailable as err:
            raise Unavailable(f"This Redis cannot create the restricted user that workers write events with "
                              f"({err}). The operator must set BELLAQ_EVENTBUS_URL to a Redis URL whose user may "
                              f"XADD to {topic(settings.redis_prefix)}*.", code="eventbus_unavailable") from None
    return jsonify({"url": url, "topic": topic(settings.redis_prefix)})
