"""Settings, read once from the environment (``BELLAQ_*``, plus ``PORT`` and ``WEB_CONCURRENCY``).

Every setting has a default that runs on one laptop; the README lists them all in one table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def default_instance_dir() -> Path:
    return Path(_env("BELLAQ_INSTANCE_DIR", os.path.join(os.getcwd(), "instance")))


@dataclass
class Settings:
    """All configuration of a bellaq process. Build with :meth:`from_env`."""

    instance_dir: Path = field(default_factory=default_instance_dir)
    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "bq"
    broker_url: str = ""
    admin_key: str = ""
    max_json_bytes: int = 10 * 1024 * 1024
    files_dir: str = ""
    files_s3_url: str = ""
    file_max_bytes: int = 200 * 1024 * 1024
    batch_max_lines: int = 50_000
    batch_max_bytes: int = 200 * 1024 * 1024
    batch_chunk_size: int = 1000
    upstream_base_url: str = ""
    upstream_api_key_env: str = "OPENAI_API_KEY"
    upstream_key_envs: str = "*_API_KEY"
    upstream_timeout: float = 600.0
    callback_allow_private: bool = False
    callback_allowlist: str = ""
    callback_max_attempts: int = 8
    callback_backoff_base: float = 1.0
    callback_concurrency: int = 100
    callback_sweep_after: float = 60.0
    default_task_timeout: int = 300
    max_task_timeout: int = 24 * 3600
    default_process_timeout: int = 300
    default_max_retries: int = 3
    worker_take_size: int = 32
    worker_concurrency: int = 0
    worker_lease: float = 30.0
    worker_lease_renew: float = 10.0
    worker_linger: float = 1.0
    lost_completion_grace: float = 10.0
    idempotency_ttl: int = 24 * 3600
    max_open_tasks_per_owner: int = 100_000
    max_held_requests: int = 10_000
    eventbus_url: str = ""
    metrics_public: bool = False
    port: int = 8080
    web_concurrency: int = 2

    @classmethod
    def from_env(cls) -> Settings:
        instance = default_instance_dir()
        redis_url = _env("BELLAQ_REDIS_URL", "redis://127.0.0.1:6379/0")
        return cls(
            instance_dir=instance,
            database_url=_env("BELLAQ_DATABASE_URL", f"sqlite:///{instance / 'bellaq.db'}"),
            redis_url=redis_url,
            redis_prefix=_env("BELLAQ_REDIS_PREFIX", "bq"),
            broker_url=_env("BELLAQ_BROKER_URL", redis_url),
            admin_key=_env("BELLAQ_ADMIN_KEY", ""),
            max_json_bytes=_int("BELLAQ_MAX_JSON_BYTES", 10 * 1024 * 1024),
            files_dir=_env("BELLAQ_FILES_DIR", str(instance / "files")),
            files_s3_url=_env("BELLAQ_FILES_S3_URL", ""),
            file_max_bytes=_int("BELLAQ_FILE_MAX_BYTES", 200 * 1024 * 1024),
            batch_max_lines=_int("BELLAQ_BATCH_MAX_LINES", 50_000),
            batch_max_bytes=_int("BELLAQ_BATCH_MAX_BYTES", 200 * 1024 * 1024),
            batch_chunk_size=_int("BELLAQ_BATCH_CHUNK_SIZE", 1000),
            upstream_base_url=_env("BELLAQ_UPSTREAM_BASE_URL", ""),
            upstream_api_key_env=_env("BELLAQ_UPSTREAM_API_KEY_ENV", "OPENAI_API_KEY"),
            upstream_key_envs=_env("BELLAQ_UPSTREAM_KEY_ENVS", "*_API_KEY"),
            upstream_timeout=_float("BELLAQ_UPSTREAM_TIMEOUT", 600.0),
            callback_allow_private=_bool("BELLAQ_CALLBACK_ALLOW_PRIVATE", False),
            callback_allowlist=_env("BELLAQ_CALLBACK_ALLOWLIST", ""),
            callback_max_attempts=_int("BELLAQ_CALLBACK_MAX_ATTEMPTS", 8),
            callback_backoff_base=_float("BELLAQ_CALLBACK_BACKOFF_BASE", 1.0),
            callback_concurrency=_int("BELLAQ_CALLBACK_CONCURRENCY", 100),
            callback_sweep_after=_float("BELLAQ_CALLBACK_SWEEP_AFTER", 60.0),
            default_task_timeout=_int("BELLAQ_TASK_TIMEOUT", 300),
            max_task_timeout=_int("BELLAQ_MAX_TASK_TIMEOUT", 24 * 3600),
            default_process_timeout=_int("BELLAQ_PROCESS_TIMEOUT", 300),
            default_max_retries=_int("BELLAQ_PROCESS_MAX_RETRIES", 3),
            worker_take_size=_int("BELLAQ_WORKER_TAKE_SIZE", 32),
            worker_concurrency=_int("BELLAQ_WORKER_CONCURRENCY", 0),
            worker_lease=_float("BELLAQ_WORKER_LEASE", 30.0),
            worker_lease_renew=_float("BELLAQ_WORKER_LEASE_RENEW", 10.0),
            worker_linger=_float("BELLAQ_WORKER_LINGER", 1.0),
            lost_completion_grace=_float("BELLAQ_LOST_COMPLETION_GRACE", 10.0),
            idempotency_ttl=_int("BELLAQ_IDEMPOTENCY_TTL", 24 * 3600),
            max_open_tasks_per_owner=_int("BELLAQ_MAX_OPEN_TASKS_PER_OWNER", 100_000),
            max_held_requests=_int("BELLAQ_MAX_HELD_REQUESTS", 10_000),
            eventbus_url=_env("BELLAQ_EVENTBUS_URL", ""),
            metrics_public=_bool("BELLAQ_METRICS_PUBLIC", False),
            port=_int("PORT", 8080),
            web_concurrency=_int("WEB_CONCURRENCY", 2),
        )

    def replace(self, **changes: object) -> Settings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return Settings(**values)  # type: ignore[arg-type]
