"""The Batch API (OpenAI compatible, plus queue routing, live events and resubmit): ``/v1/batches``."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from bellaq.api.files import list_envelope
from bellaq.api.openapi import event_stream, operation
from bellaq.auth import current_principal, require
from bellaq.batches import events, resubmit, service
from bellaq.batches.service import QUEUE_HEADER
from bellaq.idempotency import fingerprint, idempotent
from bellaq.services import services
from bellaq.validation import int_arg, json_body

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")


@operation("Create a batch", tag="Batches", roles=("user",), body="BatchCreate",
           parameters=("IdempotencyKey", "QueueHeader"), responses={200: "Batch"},
           description="Answers at once with status validating; the file is validated and run in the background.",
           errors={404: "No file with this input_file_id among the caller's.",
                   409: "A request with this Idempotency-Key is still running.",
                   429: "The owner has too many open tasks."})
@bp.post("")
@require("user")
def create():
    principal = current_principal()
    body = json_body()

    def make() -> tuple[dict, int]:
        batch = service.create(principal, body, request.headers.get(QUEUE_HEADER))
        return service.batch_object(batch), 200

    return idempotent("batches.create", principal.owner, services().settings.idempotency_ttl, make,
                      fingerprint([body, request.headers.get(QUEUE_HEADER)]))


@operation("List batches, newest first", tag="Batches", roles=("user",), parameters=("Limit", "After"),
           responses={200: "BatchList"})
@bp.get("")
@require("user")
def list_batches():
    rows, has_more = service.list_batches(current_principal(), int_arg("limit", 20, 1, 100),
                                          request.args.get("after") or None)
    return jsonify(list_envelope([service.batch_object(b) for b in rows], has_more))


@operation("Read a batch", tag="Batches", roles=("user",), responses={200: "Batch"},
           errors={404: "No batch with this id among the caller's."})
@bp.get("/<batch_id>")
@require("user")
def retrieve(batch_id: str):
    return jsonify(service.batch_object(service.owned(current_principal(), batch_id)))


@operation("Cancel a batch: cancelling, then cancelled; finished results stay downloadable", tag="Batches",
           roles=("user",), responses={200: "Batch"}, errors={
               400: "The batch already ended.", 404: "No batch with this id among the caller's."})
@bp.post("/<batch_id>/cancel")
@require("user")
def cancel(batch_id: str):
    return jsonify(service.batch_object(service.cancel(current_principal(), batch_id)))


@operation("Run again what did not succeed, as a new batch", tag="Batches", roles=("user",),
           body={"required": False, "content": {"application/json": {"schema": "BatchResubmit"}}},
           parameters=("IdempotencyKey", "QueueHeader"), responses={200: "Batch"},
           description="The new batch has the same endpoint, queue and window, and metadata.resubmit_of naming the "
                       "original.",
           errors={400: "The batch has not ended, or has no such lines.",
                   404: "No batch with this id among the caller's.",
                   409: "A request with this Idempotency-Key is still running."})
@bp.post("/<batch_id>/resubmit")
@require("user")
def resubmit_batch(batch_id: str):
    principal = current_principal()
    body: dict[str, Any] = json_body() if request.get_data(cache=True) else {}

    def make() -> tuple[dict, int]:
        batch = resubmit.resubmit(principal, batch_id, body, request.headers.get(QUEUE_HEADER))
        return service.batch_object(batch), 200

    # The original's id is part of the key's scope: one key cannot resubmit two batches.
    return idempotent(f"batches.resubmit:{batch_id[:40]}", principal.owner, services().settings.idempotency_ttl,
                      make)


@operation("Follow a batch live", tag="Batches", roles=("user",), responses={200: event_stream(
    "One `data:` JSON object per change, the first at once; the last is the whole Batch in its final status, then the "
    "stream closes.", {"contentMediaType": "application/json", "contentSchema": {"anyOf": [
        {"$ref": "#/components/schemas/BatchProgress"}, {"$ref": "#/components/schemas/Batch"}]}})},
           errors={404: "No batch with this id among the caller's."})
@bp.get("/<batch_id>/events")
@require("user")
def batch_events(batch_id: str):
    batch = service.owned(current_principal(), batch_id)
    return Response(events.stream(current_app._get_current_object(), batch.id), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
