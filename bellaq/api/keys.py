"""Admin key management: ``/v1/keys``."""

from __future__ import annotations

from flask import Blueprint, jsonify

from bellaq.api.openapi import operation
from bellaq.auth import require
from bellaq.errors import BadRequest
from bellaq.extensions import db
from bellaq.keys import create_key, delete_key, owner_secret
from bellaq.models import ApiKey
from bellaq.models.keys import ROLES
from bellaq.validation import choice_field, field, json_body

bp = Blueprint("keys", __name__, url_prefix="/v1/keys")


@operation("Create a key (shown once)", tag="Keys", roles=("admin",), body="KeyCreate", responses={201: "KeyCreated"})
@bp.post("")
@require("admin")
def create():
    body = json_body()
    name = field(body, "name", str, "")
    role = choice_field(body, "role", ROLES)
    owner = field(body, "owner", str, None)
    if len(name) > 128:
        raise BadRequest("Field 'name' must be at most 128 characters.", param="name")
    if owner is not None and not 1 <= len(owner) <= 64:
        raise BadRequest("Field 'owner' must be 1 to 64 characters.", param="owner")
    row, raw = create_key(name, role, owner)
    out = row.to_dict()
    out.update(key=raw, webhook_secret=owner_secret(row.owner))
    return jsonify(out), 201


@operation("List the keys", tag="Keys", roles=("admin",), responses={200: "KeyList"})
@bp.get("")
@require("admin")
def list_keys():
    rows = db.session.execute(
        db.select(ApiKey).where(ApiKey.deleted_at.is_(None)).order_by(ApiKey.created_at.desc())
    ).scalars()
    data = [r.to_dict() for r in rows]
    return jsonify({"object": "list", "data": data})


@operation("Delete a key: it answers 401 at once", tag="Keys", roles=("admin",), responses={200: "KeyDeleted"},
           errors={404: "No key with this id."})
@bp.delete("/<key_id>")
@require("admin")
def delete(key_id: str):
    delete_key(key_id)
    return jsonify({"id": key_id, "object": "api_key", "deleted": True})
