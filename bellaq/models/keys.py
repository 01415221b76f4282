"""API keys (stored hashed) and the owners (tenants) they belong to."""

from __future__ import annotations

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from bellaq.extensions import db

ROLES = ("admin", "worker", "user")


class ApiKey(db.Model):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    role: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(64), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_hint: Mapped[str] = mapped_column(String(32), default="")
    created_at: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "role": self.role,
            "owner": self.owner,
            "key_hint": self.key_hint,
            "created_at": self.created_at // 1000,
        }


class Owner(db.Model):
    """A tenant: keys with the same owner share files, batches, tasks and the signing secret."""

    __tablename__ = "owners"

    owner: Mapped[str] = mapped_column(String(64), primary_key=True)
    webhook_secret: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[int] = mapped_column(BigInteger)
