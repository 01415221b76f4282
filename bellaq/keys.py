"""API keys: creation (shown once), hashed storage, lookup, and owners' signing secrets."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from redis.exceptions import RedisError

from bellaq.clock import now_ms
from bellaq.errors import NotFound, Unavailable
from bellaq.extensions import db
from bellaq.ids import new_id
from bellaq.models import ApiKey, Owner
from bellaq.models.keys import ROLES
from bellaq.registry_cache import bump_quietly, registry_cache
from bellaq.webhooks import new_secret

ENV_ADMIN_OWNER = "admin"



@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, role and owner (tenant)."""

    key_id: str
    role: str
    owner: str


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def owner_secret(owner: str) -> str:
    """The owner's ``whsec_`` signing secret, created on first use."""
    row = db.session.get(Owner, owner)
    if row is None:
        row = Owner(owner=owner, webhook_secret=new_secret(), created_at=now_ms())
        db.session.add(row)
        db.session.flush()
    return row.webhook_secret


def create_key(name: str, role: str, owner: str | None = None) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the raw key, which is never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    raw = "bq-" + secrets.token_urlsafe(32)
    key_id = new_id("key_")
    row = ApiKey(
        id=key_id,
        name=name,
        role=role,
        owner=owner or key_id,
        key_hash=hash_key(raw),
        key_hint=raw[:7] + "..." + raw[-4:],
        created_at=now_ms(),
    )
    db.session.add(row)
    owner_secret(row.owner)
    db.session.commit()
    bump_quietly()
    return row, raw


def delete_key(key_id: str) -> None:
    """Delete a key; every process refuses it from its next request on.

    The cache version is bumped before the commit (Redis unreachable: 503, nothing changed) and
    again after it, so a lookup between the two cannot keep the key alive.
    """
    row = db.session.get(ApiKey, key_id)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"No key with id '{key_id}'.", param="id", code="key_not_found")
    try:
        registry_cache().bump()
    except RedisError:
        db.session.rollback()
        raise Unavailable("Redis is unavailable; the key was not deleted.") from None
    row.deleted_at = now_ms()
    db.session.commit()
    bump_quietly()


def authenticate(raw: str, admin_key: str = "") -> Principal | None:
    """The principal for a raw key, or None when it is unknown or deleted."""
    if admin_key and hmac.compare_digest(raw, admin_key):
        return Principal(key_id="env-admin", role="admin", owner=ENV_ADMIN_OWNER)
    key_hash = hash_key(raw)
    return registry_cache().get(("key", key_hash), lambda: _lookup(key_hash))


def _lookup(key_hash: str) -> Principal | None:
    row = db.session.execute(
        db.select(ApiKey.id, ApiKey.role, ApiKey.owner).where(ApiKey.key_hash == key_hash,
                                                              ApiKey.deleted_at.is_(None))
    ).first()
    if row is None:
        return None
    return Principal(key_id=row.id, role=row.role, owner=row.owner)
