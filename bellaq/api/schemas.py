"""The component schemas, parameters and error responses of the OpenAPI document, declared once.

Operations name these by their keys (``"Task"``, ``"Limit"``); :mod:`bellaq.api.openapi` turns the
names into ``$ref``s. Objects bellaq answers with are closed (``additionalProperties: false``) and
list every field as required, as the ``openai`` SDK's strict mode expects: a field added to a
``to_dict`` must be added here too, or the Schemathesis test fails.
"""

from __future__ import annotations

from typing import Any

from bellaq.models.batches import BatchStatus
from bellaq.models.files import UPLOAD_PURPOSES
from bellaq.models.keys import ROLES
from bellaq.models.tasks import END_STATUSES, OPEN_STATUSES, RESPONSE_MODES
from bellaq.queue_engine import STRATEGIES
from bellaq.tasks import MAX_CALLBACK_URL, MAX_LEVEL, MAX_TAKE
from bellaq.upstream_rules import MAX_ENDPOINT

Schema = dict[str, Any]


def closed(description: str, properties: dict[str, Schema], optional: tuple[str, ...] = ()) -> Schema:
    """An object with exactly these properties, all required but ``optional``."""
    return {"type": "object", "description": description, "additionalProperties": False,
            "required": [name for name in properties if name not in optional], "properties": properties}


def nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


def const(value: Any) -> Schema:
    return {"type": type_name(value), "const": value}


def type_name(value: Any) -> str:
    return {str: "string", bool: "boolean", int: "integer"}[type(value)]


STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
BOOLEAN: Schema = {"type": "boolean"}
SECONDS: Schema = {"type": "integer", "description": "Unix seconds"}
MILLIS: Schema = {"type": "integer", "description": "Unix milliseconds"}
ANY: Schema = {"description": "Any JSON value"}
ENDPOINT: Schema = {
    "type": "string", "maxLength": MAX_ENDPOINT, "pattern": r"^/v1(/[A-Za-z0-9_.\-]+)+$",
    "description": "A normalised path under /v1/: no '.' or '..' segments, '//', percent-escapes, query or "
                   "fragment.",
    "examples": ["/v1/chat/completions"],
}
QUEUE_NAME: Schema = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$", "examples": ["chat"]}
FULL_QUEUE_NAME: Schema = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}:[0-9]+$",
                           "description": "A queue and one of its levels, written name:level.",
                           "examples": ["chat:0"]}

ERROR = closed("The OpenAI error envelope.", {
    "error": closed("What was wrong and what would be right.", {
        "message": STRING,
        "type": {"type": "string", "examples": ["invalid_request_error", "authentication_error"]},
        "param": nullable({"type": "string", "description": "The field at fault"}),
        "code": nullable({"type": "string", "description": "A short machine-readable code"}),
    }),
})

RESULT = closed("What the upstream answered (or why there is no answer).", {
    "status_code": INTEGER,
    "request_id": STRING,
    "body": ANY,
})

_TASK_FIELDS: dict[str, Schema] = {
    "task_id": STRING,
    "batch_id": {"type": "string", "description": "The batch the task is a line of, or \"\""},
    "endpoint": STRING,
    "queue": STRING,
    "level": {"type": "integer", "minimum": 0, "maximum": MAX_LEVEL},
    "data": {"type": "object", "description": "The request body sent to the endpoint"},
    "result": {"oneOf": [{"$ref": "#/components/schemas/TaskResult"}, {"type": "null"}]},
    "status": {"type": "string", "enum": [*OPEN_STATUSES, *END_STATUSES]},
    "response_mode": {"type": "string", "enum": list(RESPONSE_MODES)},
    "callback_url": STRING,
    "callback_status": {"type": ["string", "null"], "enum": ["delivered", "retrying", "failed", None],
                        "description": "How delivery of the callback went (null: not yet attempted)"},
    "callback_attempts": INTEGER,
    "callback_http_status": nullable({"type": "integer"}),
    "instance_id": STRING,
    "timeout": {"type": "integer", "description": "Seconds"},
    "start_time": MILLIS,
    "expire_time": nullable(MILLIS),
    "completed_time": nullable(MILLIS),
    "running_time": nullable(MILLIS),
    "attempts": {"type": "integer", "description": "Times the task was taken (retries included)"},
    "last_status_code": nullable({"type": "integer", "description": "Status of the upstream's last answer "
                                  "(504: none came); set when an attempt is retried later"}),
}

_BATCH_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                "expired_at", "cancelling_at", "cancelled_at")

_FILE = closed("An OpenAI File object.", {
    "id": {"type": "string", "examples": ["file-abc123"]},
    "object": const("file"),
    "bytes": INTEGER,
    "created_at": SECONDS,
    "filename": STRING,
    "purpose": {"type": "string", "examples": ["batch", "batch_output"]},
    "status": const("processed"),
    "status_details": {"type": "null"},
    "expires_at": nullable(SECONDS),
})


def list_of(item: str, description: str) -> Schema:
    """The OpenAI list envelope of ``item`` objects."""
    return closed(description, {
        "object": const("list"),
        "data": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
        "first_id": nullable(STRING),
        "last_id": nullable(STRING),
        "has_more": BOOLEAN,
    })


def deleted(kind: str) -> Schema:
    return closed(f"The {kind} is deleted.", {"id": STRING, "object": const(kind), "deleted": const(True)})


_QUEUE_FIELDS: dict[str, Schema] = {
    "queue": QUEUE_NAME,
    "endpoint": ENDPOINT,
    "builtin": {"type": "boolean", "description": "Served by bellaq's Celery workers (else only external ones)"},
    "strategy": {"type": "string", "enum": list(STRATEGIES)},
    "upstream": {"oneOf": [{"$ref": "#/components/schemas/Upstream"}, {"type": "null"}],
                 "description": "Shown to admin keys only"},
    "max_in_flight": nullable({"type": "integer", "minimum": 1, "maximum": 1_000_000}),
    "rpm": nullable({"type": "integer", "minimum": 1, "maximum": 100_000_000,
                     "description": "Requests per minute"}),
    "tpm": nullable({"type": "integer", "minimum": 1, "maximum": 1_000_000_000,
                     "description": "Tokens per minute (estimated at take, corrected to the answer's usage)"}),
    "default_max_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 10_000_000,
                                    "description": "Completion budget charged to tpm for a request that sets "
                                                   "no max_tokens (default 256)"}),
}

_KEY_FIELDS: dict[str, Schema] = {
    "id": {"type": "string", "examples": ["key_abc123"]},
    "object": const("api_key"),
    "name": STRING,
    "role": {"type": "string", "enum": list(ROLES)},
    "owner": {"type": "string", "description": "Keys with the same owner share files, batches and tasks"},
    "key_hint": {"type": "string", "examples": ["bq-AbCd...wxyz"]},
    "created_at": SECONDS,
}

SCHEMAS: dict[str, Schema] = {
    "Error": ERROR,
    # ------------------------------------------------------------------------------------ files
    "File": _FILE,
    "FileList": list_of("File", "Files, newest first unless order=asc."),
    "FileDeleted": deleted("file"),
    "FileUpload": {
        "type": "object", "required": ["file", "purpose"],
        "properties": {
            "file": {"type": "string", "contentMediaType": "application/octet-stream",
                     "description": "The file's bytes, with a filename (JSONL for a batch)"},
            "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
        },
    },
    # ---------------------------------------------------------------------------------- batches
    "BatchCreate": {
        "type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
        "examples": [{"input_file_id": "file-abc123", "endpoint": "/v1/chat/completions", "completion_window": "24h"}],
        "properties": {
            "input_file_id": {"type": "string", "description": "A file uploaded with purpose batch"},
            "endpoint": ENDPOINT,
            "completion_window": {"type": "string", "pattern": "^[1-9][0-9]{0,6}[mhd]$", "examples": ["24h"],
                                  "description": "24h, or <n>m, <n>h, <n>d, up to 30 days"},
            "metadata": nullable({"type": "object", "maxProperties": 16,
                                  "additionalProperties": {"type": "string", "maxLength": 512},
                                  "propertyNames": {"maxLength": 64}}),
        },
    },
    "BatchResubmit": {
        "type": "object",
        "properties": {"lines": {"type": "string", "enum": ["failed", "expired", "cancelled"], "default": "failed",
                                 "description": "failed: every line of the error file; expired, cancelled: the "
                                                "lines that ended so"}},
    },
    "Batch": closed("An OpenAI Batch object: every field present, null where unset.", {
        "id": {"type": "string", "examples": ["batch_abc123"]},
        "object": const("batch"),
        "endpoint": STRING,
        "model": nullable({"type": "string", "description": "The model of the input's lines"}),
        "errors": {"oneOf": [{"$ref": "#/components/schemas/BatchErrors"}, {"type": "null"}]},
        "input_file_id": STRING,
        "completion_window": STRING,
        "status": {"type": "string", "enum": [s.value for s in BatchStatus]},
        "output_file_id": nullable(STRING),
        "error_file_id": nullable(STRING),
        **{name: (SECONDS if name == "created_at" else nullable(SECONDS)) for name in _BATCH_TIMES},
        "request_counts": {"$ref": "#/components/schemas/RequestCounts"},
        "metadata": nullable({"type": "object", "additionalProperties": STRING}),
        "usage": {"type": "null"},
    }),
    "BatchErrors": closed("Why the input file was refused, line by line.", {
        "object": const("list"),
        "data": {"type": "array", "items": closed("One problem.", {
            "code": STRING, "message": STRING, "param": nullable(STRING), "line": nullable(INTEGER)})},
    }),
    "BatchList": list_of("Batch", "Batches, newest first."),
    "BatchProgress": closed("A change of a running batch.", {
        "id": STRING, "status": {"type": "string", "enum": [s.value for s in BatchStatus]},
        "request_counts": {"$ref": "#/components/schemas/RequestCounts"}}),
    "RequestCounts": closed("Lines in the batch, and how many ended so far.", {
        "total": INTEGER, "completed": INTEGER, "failed": INTEGER}),
    # ------------------------------------------------------------------------------------ tasks
    "Put": {
        "type": "object", "required": ["endpoint", "data"],
        "examples": [{"endpoint": "/v1/chat/completions", "response_mode": "blocking", "data": {
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}}],
        "properties": {
            "endpoint": ENDPOINT,
            "data": {"type": "object", "description": "The request body for the endpoint",
                     "examples": [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}]},
            "queue": nullable({**QUEUE_NAME, "description": "A registered queue; default from endpoint and "
                                                           "data.model"}),
            "level": {"type": "integer", "minimum": 0, "maximum": MAX_LEVEL, "default": 0,
                      "description": "0 is online; smaller runs first"},
            "response_mode": {"type": "string", "enum": list(RESPONSE_MODES), "default": "callback"},
            "callback_url": nullable({"type": "string", "maxLength": MAX_CALLBACK_URL,
                                      "description": "Required for callback: a public http(s) URL the ended "
                                                     "task is POSTed to, signed as Standard Webhooks do"}),
            "timeout": {"type": "integer", "minimum": 1, "default": 300,
                        "description": "Seconds, at most BELLAQ_MAX_TASK_TIMEOUT"},
        },
    },
    "PutAccepted": closed("A callback task was accepted.", {"code": const(200), "data": {
        "type": "string", "description": "The task id"}}),
    "TaskResult": RESULT,
    "Task": closed("A task.", _TASK_FIELDS),
    "TaskCancelled": closed("The task is cancelled.", {"code": const(202), "data": {
        "type": "string", "description": "The task id"}}),
    # ---------------------------------------------------------------------------------- workers
    "Take": {
        "type": "object", "required": ["queues"],
        "examples": [{"queues": ["chat:0", "chat:1"], "size": 10, "strategy": "fifo", "process_timeout": 60}],
        "properties": {
            "queues": {"type": "array", "minItems": 1, "maxItems": 100, "items": FULL_QUEUE_NAME},
            "size": {"type": "integer", "minimum": 1, "maximum": MAX_TAKE, "default": 1},
            "strategy": {"type": "string", "enum": list(STRATEGIES), "default": "fifo"},
            "process_timeout": {"type": "integer", "minimum": 1, "maximum": 7 * 86400,
                                "description": "Seconds the lease lasts"},
            "process_max_retries": {"type": "integer", "minimum": -1, "maximum": 1000,
                                    "description": "Leases that may run out before the task fails; -1: no limit"},
            "lease": {"type": "integer", "minimum": 1, "maximum": 7 * 86400,
                      "description": "Seconds each lease lasts unless extended (default and most: "
                                     "process_timeout)"},
        },
    },
    "Extend": {
        "type": "object", "examples": [{"lease": 30}],
        "properties": {"lease": {"type": "integer", "minimum": 1, "maximum": 7 * 86400,
                                 "description": "Seconds from now the lease runs out (default: "
                                                "BELLAQ_PROCESS_TIMEOUT); never past process_timeout "
                                                "after the take"}},
    },
    "Extended": closed("The lease now in force.", {
        "task_id": STRING,
        "lease_expires_at": {"type": "integer", "description": "When the lease runs out, ms since the epoch"},
    }),
    "Taken": {"type": "object", "description": "The tasks taken, by full queue name (every listed queue appears).",
              "additionalProperties": {"type": "array", "items": {"$ref": "#/components/schemas/TakenTask"}}},
    "TakenTask": closed("A task leased to the taker.", {
        **{k: v for k, v in _TASK_FIELDS.items() if not k.startswith("callback_") or k == "callback_url"},
        "lease_token": {"type": "string", "description": "Proves this lease in events written to the event bus "
                                                         "(payload.leaseToken)"}}),
    "Complete": {
        "type": "object", "required": ["status_code"],
        "examples": [{"status_code": 200, "request_id": "req_123", "body": {"object": "chat.completion"}}],
        "properties": {"status_code": {"type": "integer", "minimum": 100, "maximum": 599},
                       "request_id": STRING, "body": ANY},
    },
    "Completed": closed("What the complete did.", {
        "task_id": STRING,
        "completed": {"type": "boolean", "description": "false: it was already completed, nothing changed"},
        "status": STRING,
        "message": STRING,
    }, optional=("message",)),
    "Progress": {
        "type": "object", "required": ["event_data"],
        "properties": {"event_id": {"type": ["string", "integer"]}, "event_name": {"type": "string",
                                                                                "default": "progress"},
                       "event_data": {**ANY, "description": "For chat completions: an OpenAI chunk object"}},
    },
    "ProgressSent": closed("Whether a held streaming request was told.", {"task_id": STRING, "delivered": BOOLEAN}),
    "Eventbus": closed("Where workers write progress and completion events.", {
        "url": {"type": "string", "description": "A Redis URL whose user may only XADD to the event streams"},
        "topic": {"type": "string", "description": "Stream name prefix: events go to <topic><instance_id>"},
    }),
    # ----------------------------------------------------------------------------------- queues
    "Register": {
        "type": "object", "required": ["queue"],
        "examples": [{"queue": "chat", "endpoint": "/v1/chat/completions", "strategy": "fifo", "rpm": 600}],
        "properties": {
            **_QUEUE_FIELDS,
            "endpoint": {**ENDPOINT, "description": "Required when the queue is new"},
            "builtin": {**BOOLEAN, "default": True},
            "strategy": {"type": "string", "enum": list(STRATEGIES), "default": "fifo"},
            "upstream": {"oneOf": [{"$ref": "#/components/schemas/Upstream"}, {"type": "null"}],
                         "description": "Default: the configured upstream"},
        },
    },
    "Upstream": closed("Where built-in workers send the queue's requests.", {
        "base_url": nullable({"type": "string", "examples": ["http://vllm:8000"]}),
        "api_key_env": nullable({"type": "string", "examples": ["OPENAI_API_KEY"],
                                 "description": "The variable holding the key; allowed by "
                                                "BELLAQ_UPSTREAM_KEY_ENVS, never BELLAQ_*"}),
    }),
    "Queue": closed("A registered queue.", {**_QUEUE_FIELDS, "created_at": MILLIS, "updated_at": MILLIS},
                    optional=("upstream",)),
    "QueueStats": closed("Counts of one queue level.", {
        "queue": FULL_QUEUE_NAME, "waiting": INTEGER, "running": INTEGER, "done": INTEGER, "failed": INTEGER,
        "cancelled": INTEGER, "oldest_age_ms": {"type": "integer", "description": "0 when nothing waits"},
        "delayed": {"type": "integer", "description": "Waiting for a retry after an upstream 429, 5xx or no answer"},
        "limits": {"$ref": "#/components/schemas/LimitUse"}}),
    "LimitUse": closed("The queue's limits (all levels together) and how much of each is in use.", {
        "rpm": nullable(INTEGER), "tpm": nullable(INTEGER), "max_in_flight": nullable(INTEGER),
        "in_flight": {"type": "integer", "description": "Leased tasks of the queue, every level"},
        "window_start": nullable({**MILLIS, "description": "Start of the one-minute window counted below"}),
        "window_requests": {"type": "integer", "description": "Requests taken in the window"},
        "window_tokens": {"type": "integer", "description": "Tokens charged in the window (corrected by usage)"},
        "paused_until": nullable({**MILLIS, "description": "Takes wait until then: the upstream asked to slow down"}),
        "rate_factor": {"type": "number", "description": "Share of rpm/tpm in force (below 1 after 429s)"}}),
    "QueueStatsList": closed("Every queue level.", {
        "object": const("list"), "data": {"type": "array", "items": {"$ref": "#/components/schemas/QueueStats"}}}),
    "Cleared": closed("Waiting tasks of the level were cancelled.", {"queue": FULL_QUEUE_NAME, "cleared": INTEGER}),
    # ------------------------------------------------------------------------------------- keys
    "KeyCreate": {
        "type": "object", "required": ["role"],
        "properties": {"name": {"type": "string", "maxLength": 128, "default": ""},
                       "role": {"type": "string", "enum": list(ROLES)},
                       "owner": nullable({"type": "string", "minLength": 1, "maxLength": 64,
                                          "description": "Default: the key's own id"})},
    },
    "Key": closed("An API key (never the key itself).", _KEY_FIELDS),
    "KeyCreated": closed("A new key: the only time the key is shown.", {
        **_KEY_FIELDS,
        "key": {"type": "string", "examples": ["bq-..."]},
        "webhook_secret": {"type": "string", "description": "The owner's whsec_ callback signing secret"},
    }),
    "KeyList": closed("Every key that is not deleted, newest first.", {
        "object": const("list"), "data": {"type": "array", "items": {"$ref": "#/components/schemas/Key"}}}),
    "KeyDeleted": deleted("api_key"),
    # ------------------------------------------------------------------------------- operations
    "Health": closed("Whether this process reaches Redis and SQL.", {
        "status": {"type": "string", "enum": ["ok", "degraded"]},
        "checks": closed("ok, or down: <error>", {"redis": STRING, "sql": STRING}),
        "instance_id": STRING,
    }),
}

PARAMETERS: dict[str, Schema] = {
    "Limit": {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1},
              "description": "How many to list (files: up to 10000, batches: up to 100)"},
    "After": {"name": "after", "in": "query", "schema": STRING, "description": "List those after this id"},
    "Order": {"name": "order", "in": "query", "schema": {"type": "string", "enum": ["asc", "desc"],
                                                         "default": "desc"}},
    "Purpose": {"name": "purpose", "in": "query", "schema": STRING, "description": "Only files of this purpose"},
    "IdempotencyKey": {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "minLength": 1,
                                                                             "maxLength": 255},
                       "description": "The same key from the same owner within 24 h returns the first answer"},
    "QueueHeader": {"name": "X-BELLA-QUEUE-NAME", "in": "header", "schema": QUEUE_NAME,
                    "description": "Run on this registered queue"},
}

# Every ``<name>`` a route's URL rule holds; a new one must be described here.
PATH_PARAMETERS: dict[str, tuple[str, Schema]] = {
    "task_id": ("A task id", STRING),
    "batch_id": ("A batch id", STRING),
    "file_id": ("A file id", STRING),
    "key_id": ("A key id", STRING),
    "name": ("A queue name; for stats and clear, name:level (level 0 if left out)",
             {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}(:[0-9]+)?$", "examples": ["chat:0"]}),
    "filename": ("An asset of the page", STRING),
}

# The error responses; an operation names them by status.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "Bad input: the message names the field and what is expected."),
    401: ("Unauthorized", "No key, a malformed key, or an unknown or deleted key."),
    403: ("Forbidden", "The key's role may not use this route."),
    404: ("NotFound", "Not found, or not the caller's."),
    408: ("Timeout", "The task did not end within its timeout."),
    409: ("Conflict", "Wrong state."),
    413: ("TooLarge", "The body is larger than this route accepts."),
    429: ("TooMany", "Over a limit; Retry-After says when to try again."),
    503: ("Unavailable", "Redis, SQL or the broker is unavailable; nothing was kept, retry shortly."),
}

SHOULD_RETRY: Schema = {"description": "false on a permanent error, true on a 503", "schema": {
    "type": "string", "enum": ["true", "false"]}}
