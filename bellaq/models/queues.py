"""Registered queues and how they are served."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from bellaq.extensions import db


class Queue(db.Model):
    __tablename__ = "queues"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(256))
    builtin: Mapped[bool] = mapped_column(Boolean, default=True)
    strategy: Mapped[str] = mapped_column(String(32), default="fifo")
    upstream_base_url: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    upstream_api_key_env: Mapped[str | None] = mapped_column(String(128), nullable=True)
    max_in_flight: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    default_max_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)

    def to_dict(self) -> dict:
        upstream = None
        if self.upstream_base_url or self.upstream_api_key_env:
            upstream = {"base_url": self.upstream_base_url, "api_key_env": self.upstream_api_key_env}
        return {
            "queue": self.name,
            "endpoint": self.endpoint,
            "builtin": self.builtin,
            "strategy": self.strategy,
            "upstream": upstream,
            "max_in_flight": self.max_in_flight,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "default_max_tokens": self.default_max_tokens,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
