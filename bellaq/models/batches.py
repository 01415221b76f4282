"""Batches (OpenAI Batch API): one input file, many tasks, two result files."""

from __future__ import annotations

import json
from enum import Enum

from sqlalchemy import BigInteger, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from bellaq.extensions import db
from bellaq.models.types import LongText


class BatchStatus(str, Enum):
    """The status of a batch (OpenAI's values): a ``str``, so it compares and serialises as one."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


FINAL_STATUSES = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})
# The column stamped when a batch reaches each final status.
FINAL_STAMPS = {BatchStatus.COMPLETED: "completed_at", BatchStatus.FAILED: "failed_at",
                BatchStatus.EXPIRED: "expired_at", BatchStatus.CANCELLED: "cancelled_at"}

TIMESTAMP_FIELDS = (
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
    "failed_at", "expired_at", "cancelling_at", "cancelled_at",
)


class Batch(db.Model):
    """A batch. Ids are time-ordered (``batch_<ms hex><random hex>``): newest first is id desc.

    Life cycle columns besides ``status``: ``ending`` is set once when a cancel, the expiry, or a
    failure after some lines became tasks begins (``cancelled`` / ``expired`` / ``failed``);
    ``ingested_at`` when every line is a task row; ``final_status`` when finalisation is claimed
    (the chord runs once per batch). The request counts are stored on finalisation; before that
    they are counted from the tasks.
    """

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(256))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.VALIDATING, index=True)
    queue: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    errors: Mapped[str | None] = mapped_column(LongText, nullable=True)
    metadata_json: Mapped[str | None] = mapped_column("metadata", LongText, nullable=True)
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    ending: Mapped[str | None] = mapped_column(String(16), nullable=True)
    ingested_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms
    # A target status set once finalisation has been claimed: the chord runs once per batch.
    final_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    claimed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # ms
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)  # Unix seconds, like the rest below
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    completed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    failed_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    expired_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    def to_dict(self, counts: dict[str, int] | None = None) -> dict:
        """The OpenAI Batch object; every field present, null where unset."""
        counts = counts or {"total": self.total, "completed": self.completed, "failed": self.failed}
        out = {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": json.loads(self.errors) if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
        }
        for name in TIMESTAMP_FIELDS:
            out[name] = getattr(self, name)
        out["request_counts"] = counts
        out["metadata"] = json.loads(self.metadata_json) if self.metadata_json else None
        out["usage"] = None
        return out
