"""The Files API (OpenAI compatible): ``/v1/files``."""

from __future__ import annotations

import re

from flask import Blueprint, Response, jsonify, request, stream_with_context

from bellaq import files
from bellaq.api.openapi import BYTES, operation
from bellaq.auth import current_principal, require
from bellaq.errors import BadRequest
from bellaq.idempotency import idempotent
from bellaq.services import services
from bellaq.validation import int_arg

bp = Blueprint("files", __name__, url_prefix="/v1/files")

MAX_LIST = 10_000


@bp.before_request
def _allow_large_uploads() -> None:
    # The app-wide limit is the JSON one; an upload may be as large as a file may be.
    if request.method == "POST":
        request.max_content_length = services().settings.file_max_bytes + 64 * 1024


def list_envelope(data: list[dict], has_more: bool) -> dict:
    """The OpenAI list object."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


@operation("Upload a file", tag="Files", roles=("user",), parameters=("IdempotencyKey",), responses={200: "File"},
           body={"required": True, "content": {"multipart/form-data": {"schema": "FileUpload"}}},
           description="The upload is streamed to storage; at most BELLAQ_FILE_MAX_BYTES (413 above).",
           errors={409: "A request with this Idempotency-Key is still running."})
@bp.post("")
@require("user")
def create():
    principal = current_principal()

    def make() -> tuple[dict, int]:
        row = files.upload(principal, lambda: request.stream, request.content_type, request.content_length)
        return row.to_dict(), 200

    return idempotent("files.create", principal.owner, services().settings.idempotency_ttl, make)


@operation("List files", tag="Files", roles=("user",), parameters=("Purpose", "Limit", "After", "Order"),
           responses={200: "FileList"})
@bp.get("")
@require("user")
def list_files():
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest(f"Query parameter 'order' must be asc or desc; got '{order[:20]}'.", param="order")
    rows, has_more = files.list_files(
        current_principal(),
        request.args.get("purpose") or None,
        int_arg("limit", MAX_LIST, 1, MAX_LIST),
        request.args.get("after") or None,
        order,
    )
    return jsonify(list_envelope([r.to_dict() for r in rows], has_more))


@operation("Read a file's object", tag="Files", roles=("user",), responses={200: "File"},
           errors={404: "No file with this id among the caller's."})
@bp.get("/<file_id>")
@require("user")
def retrieve(file_id: str):
    return jsonify(files.get(current_principal(), file_id).to_dict())


@operation("Download a file's bytes", tag="Files", roles=("user",), responses={200: BYTES},
           errors={404: "No file with this id among the caller's."})
@bp.get("/<file_id>/content")
@require("user")
def content(file_id: str):
    row = files.get(current_principal(), file_id)
    chunks = files.iter_content(row)
    response = Response(stream_with_context(chunks), mimetype="application/octet-stream")
    response.headers["Content-Length"] = str(row.bytes)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", row.filename) or "file"
    response.headers["Content-Disposition"] = f'attachment; filename="{safe}"'
    return response


@operation("Delete a file", tag="Files", roles=("user",), responses={200: "FileDeleted"},
           errors={404: "No file with this id among the caller's."})
@bp.delete("/<file_id>")
@require("user")
def delete(file_id: str):
    row = files.delete(current_principal(), file_id)
    return jsonify({"id": row.id, "object": "file", "deleted": True})
