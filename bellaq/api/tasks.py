"""The Task API: put, get, cancel, and the worker side (take, complete, progress, eventbus)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from bellaq import online, tasks
from bellaq.api.openapi import PUT_ANSWER, operation
from bellaq.auth import current_principal, require
from bellaq.errors import BadRequest, Conflict, Unavailable
from bellaq.eventbus import progress_event, topic
from bellaq.eventbus_access import EventbusUnavailable, worker_url
from bellaq.idempotency import fingerprint, idempotent
from bellaq.lease_tokens import holder_of
from bellaq.services import services
from bellaq.validation import choice_field, field, json_body

bp = Blueprint("tasks", __name__, url_prefix="/v1/queue")


@operation("Put a task", tag="Tasks", roles=("user",), body="Put", parameters=("IdempotencyKey",),
           description="callback answers at once and POSTs the ended task to callback_url; blocking holds the "
                       "request and answers with the upstream's status and body; streaming answers "
                       "text/event-stream.",
           responses={200: PUT_ANSWER}, errors={
               408: "blocking: the task did not end within its timeout; it ends as timeout.",
               409: "blocking: the task was cancelled; or a request with this Idempotency-Key is still running.",
               429: "The owner has too many open tasks.",
               503: "Redis or SQL is down; or (blocking, streaming) this web process already holds "
                    "BELLAQ_MAX_HELD_REQUESTS requests: code overloaded, with Retry-After. Nothing was kept."})
@bp.post("/put")
@require("user")
def put():
    principal = current_principal()
    body = json_body()
    mode = choice_field(body, "response_mode", ("callback", "blocking", "streaming"), "callback")
    if mode != "callback":
        return online.respond(principal, body, mode)

    def create() -> tuple[dict, int]:
        task = tasks.put(principal, body)
        return {"code": 200, "data": task.id}, 200

    return idempotent(online.PUT_ROUTE, principal.owner, services().settings.idempotency_ttl, create,
                      fingerprint(body))


@operation("Read a task", tag="Tasks", roles=("user",), responses={200: "Task"},
           errors={404: "No task with this id among the caller's."})
@bp.get("/<task_id>")
@require("user")
def get(task_id: str):
    return jsonify(tasks.task_object(tasks.owned_task(current_principal(), task_id)))


@operation("Cancel a task: a waiting one never runs, a running one's late result is dropped", tag="Tasks",
           roles=("user",), responses={202: "TaskCancelled"},
           errors={404: "No task with this id among the caller's.", 409: "The task already ended."})
@bp.post("/<task_id>/cancel")
@require("user")
def cancel(task_id: str):
    task = tasks.cancel(current_principal(), task_id)
    return jsonify({"code": 202, "data": task.id}), 202


@operation("Take tasks: each is leased to the taker for `lease` seconds (default process_timeout), "
           "renewable with extend up to process_timeout", tag="Workers",
           roles=("worker",), body="Take", responses={200: "Taken"})
@bp.post("/take")
@require("worker")
def take():
    args = tasks.parse_take(json_body())
    taken = tasks.take(**args, holder=holder_of(current_principal().owner))
    secret = online.bus().secret
    out: dict[str, list] = {f"{q}:{lvl}": [] for q, lvl in args["queues"]}
    for task in taken:
        task["lease_token"] = secret.lease_token(task["task_id"], task["attempts"])
        out[f"{task['queue']}:{task['level']}"].append(task)
    return jsonify(out)


@operation("Complete a task with the upstream's answer (idempotent)", tag="Workers", roles=("worker",),
           body="Complete", responses={200: "Completed"}, errors={
               404: "No task with this id.",
               409: "Nobody holds the task's lease (cancelled, timed out), or another owner's worker does."})
@bp.post("/<task_id>/complete")
@require("worker")
def complete(task_id: str):
    return jsonify(tasks.complete(task_id, json_body(), tasks.lease_holder(current_principal())))


@operation("Extend a task's lease: it now runs out `lease` seconds from now (never past process_timeout "
           "after the take)", tag="Workers", roles=("worker",), body="Extend", responses={200: "Extended"},
           description="A worker that took with a short `lease` calls this while it works on the task (e.g. every "
                       "third of the lease); a lease not extended runs out and the task goes back to the queue.",
           errors={404: "No task with this id.",
                   409: "Nobody holds the task's lease (completed, cancelled, reaped), or another owner's worker "
                        "does."})
@bp.post("/<task_id>/extend")
@require("worker")
def extend(task_id: str):
    lease = tasks.parse_extend(json_body())
    return jsonify(tasks.extend(task_id, lease, tasks.lease_holder(current_principal())))


@operation("Send a progress event to the request holding a streaming task", tag="Workers", roles=("worker",),
           body="Progress", responses={200: "ProgressSent"}, errors={
               404: "No task with this id.",
               409: "Nobody holds the task's lease, or another owner's worker does."})
@bp.post("/<task_id>/progress")
@require("worker")
def progress(task_id: str):
    body = json_body()
    event_id = field(body, "event_id", (str, int), "")
    event_name = field(body, "event_name", str, "progress")
    task = tasks.find_task(task_id)
    if "event_data" not in body:
        raise BadRequest("Missing required field 'event_data'.", param="event_data", code="missing_field")
    holder = services().engine.lease_holder(task.queue, task.id)
    if holder is None:
        raise Conflict(f"Task '{task.id}' is not leased to anyone (status: {task.status}); nothing was sent.",
                       param="task_id", code="not_leased")
    if holder != holder_of(current_principal().owner):
        raise Conflict(f"Task '{task.id}' is leased to a worker of another owner; nothing was sent.",
                       param="task_id", code="leased_by_another_owner")
    if task.instance_id:
        online.bus().publish(task.instance_id, [progress_event(task.id, str(event_id), event_name,
                                                               body["event_data"])])
    return jsonify({"task_id": task.id, "delivered": bool(task.instance_id)})


@operation("Where to write progress and completion events", tag="Workers", roles=("worker",),
           responses={200: "Eventbus"})
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
