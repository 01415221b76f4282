"""The Batch API (OpenAI compatible, plus queue routing): ``/v1/batches``."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from redis.exceptions import RedisError

from bellaq import batches
from bellaq.api.files import list_envelope
from bellaq.auth import current_principal, require
from bellaq.errors import Unavailable
from bellaq.idempotency import idempotent
from bellaq.services import services
from bellaq.validation import int_arg, json_body

bp = Blueprint("batches", __name__, url_prefix="/v1/batches")

QUEUE_HEADER = "X-BELLA-QUEUE-NAME"


@bp.post("")
@require("user")
def create():
    principal = current_principal()
    body = json_body()

    def make() -> tuple[dict, int]:
        batch = batches.create(principal, body, request.headers.get(QUEUE_HEADER))
        try:
            services().batch_created(batch.id)
        except (RedisError, OSError) as err:
            batches.discard(batch.id)
            raise Unavailable("The task broker (Redis) is unavailable; the batch was not created.") from err
        return batches.public(batch), 200

    return idempotent("batches.create", principal.owner, services().settings.idempotency_ttl, make)


@bp.get("")
@require("user")
def list_batches():
    rows, has_more = batches.list_batches(current_principal(), int_arg("limit", 20, 1, 100),
                                          request.args.get("after") or None)
    return jsonify(list_envelope([batches.public(b) for b in rows], has_more))


@bp.get("/<batch_id>")
@require("user")
def retrieve(batch_id: str):
    return jsonify(batches.public(batches.owned(current_principal(), batch_id)))


@bp.post("/<batch_id>/cancel")
@require("user")
def cancel(batch_id: str):
    batch = batches.cancel(current_principal(), batch_id)
    services().batch_ending(batch.id)
    return jsonify(batches.public(batch))
