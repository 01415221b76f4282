"""The OpenAPI 3.1 document of every route, built with ``apispec`` from the Flask URL map.

Each view declares its operation with :func:`operation`, right above its route::

    @operation("Read a task", tag="Tasks", roles=("user",), responses={200: "Task"},
               errors={404: "No task with this id among the caller's."})
    @bp.get("/<task_id>")
    @require("user")
    def get(task_id: str): ...

Names (``"Task"``, ``"Limit"``) refer to :mod:`bellaq.api.schemas`. What follows from the app's
own rules is added here, once, rather than repeated on every route:

- a path parameter for each ``<name>`` of the rule (at most 256 characters, else 400);
- ``security`` with the roles allowed (admin keys always are), and then 401, and 403 unless
  every role may call it;
- 400 when the operation reads a body, query or path values; 413 when it reads a body;
- 503 unless ``dependencies=False`` (a page that needs neither Redis nor SQL);
- a ``GET`` of each blueprint's static folder (``/dashboard/assets/{filename}``).

A route without a declaration is left out of the document, which ``tests/test_openapi.py``
refuses: every rule of the URL map is documented, and nothing else is.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from apispec import APISpec
from flask import Flask
from werkzeug.routing import Rule

from bellaq import __version__
from bellaq.api import schemas
from bellaq.models.keys import ROLES
from bellaq.validation import MAX_PATH_VALUE

V = TypeVar("V", bound=Callable[..., Any])

ATTRIBUTE = "openapi_operation"
SECURITY_SCHEME = "bearer"
IGNORED_METHODS = {"HEAD", "OPTIONS"}  # Flask adds them to every rule
_RULE_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

DESCRIPTION = """\
An AI task-queue engine: OpenAI-compatible files and batches, single tasks answered by webhook,
held request or event stream, named queues with priority levels, and the routes workers use.

Every route but the pages and this document needs `Authorization: Bearer <api key>`. A key has a
role: `admin` (everything), `user` (files, batches, put and read its tasks) or `worker` (take,
complete, progress, eventbus); each operation lists the roles it allows. A user sees only what
keys of its owner created: anything else answers 404. Errors use the OpenAI envelope
`{"error": {"message", "type", "param", "code"}}`.
"""

TAGS = [
    {"name": "Files", "description": "OpenAI Files API: batch input files, and the output and error files of batches"},
    {"name": "Batches", "description": "OpenAI Batch API, plus queue routing, live progress and resubmit"},
    {"name": "Tasks", "description": "Single tasks: put (callback, blocking or streaming), read, cancel"},
    {"name": "Workers", "description": "What external workers call: take, complete, progress, eventbus"},
    {"name": "Queues", "description": "Registered queues, their stats, and the console"},
    {"name": "Keys", "description": "API keys and their roles"},
    {"name": "Pages", "description": "Health, the dashboard, and this documentation"},
]


@dataclass(frozen=True)
class Operation:
    """What a view declares about itself; see :func:`operation`."""

    summary: str
    tag: str
    responses: Mapping[int, str | dict]
    roles: tuple[str, ...] = ()
    body: str | dict | None = None
    parameters: tuple[str, ...] = ()
    errors: Mapping[int, str] = field(default_factory=dict)
    description: str = ""
    dependencies: bool = True


def operation(summary: str, *, tag: str, responses: Mapping[int, str | dict], roles: Sequence[str] = (),
              body: str | dict | None = None, parameters: Sequence[str] = (), errors: Mapping[int, str] | None = None,
              description: str = "", dependencies: bool = True) -> Callable[[V], V]:
    """Declare the OpenAPI operation of the view below it (put it above the route decorator).

    ``responses`` maps a status to a schema name (a JSON answer) or a whole response object;
    ``roles`` are those of the route's ``@require`` (admin is always allowed; none: no key
    needed); ``body`` is a schema name (a required JSON body) or a whole request body object;
    ``parameters`` name query and header parameters; ``errors`` are the statuses particular to
    this route, with what they mean; ``dependencies=False`` for a route that needs neither Redis
    nor SQL (so never answers 503).
    """
    declared = Operation(summary, tag, dict(responses), tuple(roles), body, tuple(parameters), dict(errors or {}),
                         description, dependencies)

    def attach(view: V) -> V:
        setattr(view, ATTRIBUTE, declared)
        return view

    return attach


def sse_event(data: dict) -> dict:
    """One server-sent event (the schema of ``text/event-stream`` describes each event, as Schemathesis
    and OpenAPI 3.2's ``itemSchema`` read it); ``data`` describes its ``data:`` text."""
    return {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"type": "string", **data}}}


def event_stream(description: str, data: dict) -> dict:
    return {"description": description, "content": {"text/event-stream": {"schema": sse_event(data)}}}


def json_content(schema: str | dict) -> dict:
    return {"application/json": {"schema": schema}}


# Responses several routes share.
PAGE = {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}
BYTES = {"description": "The bytes, streamed", "content": {
    "application/octet-stream": {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}}}
ASSET = {"description": "The file", "content": {
    "text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}},
    "image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}}}}
# What a put answers with 200, by response_mode.
PUT_ANSWER = {
    "description": "callback: the task id. blocking: the upstream's answer (with its status code, so also 4xx "
                   "and 5xx the upstream gave) and the header X-Bella-Task-Id. streaming: an event stream of the "
                   "task's progress, then `data: [DONE]`.",
    "headers": {"X-Bella-Task-Id": {"description": "blocking and streaming: the task's id",
                                    "schema": {"type": "string"}}},
    "content": {
        "application/json": {"schema": {"anyOf": [{"$ref": "#/components/schemas/PutAccepted"},
                                                  {"description": "blocking: the upstream's body"}]}},
        "text/event-stream": {"schema": sse_event({"description": "A progress event's data (for chat completions "
                                                                 "an OpenAI chunk object), an error envelope if the "
                                                                 "task failed, then [DONE]"})},
    },
}


def openapi_path(rule: str) -> str:
    """``/v1/files/<file_id>`` -> ``/v1/files/{file_id}`` (converters such as ``path:`` dropped)."""
    return _RULE_ARGUMENT.sub(r"{\1}", rule)


def rule_methods(rule: Rule) -> list[str]:
    return sorted(set(rule.methods or ()) - IGNORED_METHODS)


def build(app: Flask) -> dict:
    """The document of ``app``'s URL map; its ``servers`` say ``/``, which a request may replace."""
    spec = APISpec(title="bellaq", version=__version__, openapi_version="3.1.0", tags=TAGS,
                   servers=[{"url": "/"}], info={"description": DESCRIPTION,
                                                  "license": {"name": "MIT", "identifier": "MIT"}})
    _register_components(spec)
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        declared = _declaration(app, rule)
        if declared is None:
            continue
        operations = {method.lower(): _operation(declared, rule, method) for method in rule_methods(rule)}
        spec.path(path=openapi_path(rule.rule), operations=operations,
                  parameters=[_path_parameter(name) for name in _arguments(rule)])
    built = spec.to_dict()
    return {key: built[key] for key in ("openapi", "info", "servers", "tags", "paths", "components")}


def _declaration(app: Flask, rule: Rule) -> Operation | None:
    view = app.view_functions[rule.endpoint]
    declared = getattr(view, ATTRIBUTE, None)
    if declared is None and rule.endpoint.endswith(".static"):
        return _static_files(rule.endpoint)
    return declared


def _static_files(endpoint: str) -> Operation:
    page = endpoint.rsplit(".", 1)[0]
    return Operation(f"A file of the {page} page (script, style sheet, image)", tag="Pages", responses={200: ASSET},
                     errors={404: "No such file."}, dependencies=False)


def _arguments(rule: Rule) -> list[str]:
    return _RULE_ARGUMENT.findall(rule.rule)


def _path_parameter(name: str) -> dict:
    description, schema = schemas.PATH_PARAMETERS[name]
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {**schema, "maxLength": MAX_PATH_VALUE}}


def _operation(declared: Operation, rule: Rule, method: str) -> dict:
    """The operation object; a deep copy, since apispec rewrites names into ``$ref``s in place."""
    declared = copy.deepcopy(declared)
    methods = rule_methods(rule)
    out: dict[str, Any] = {
        "operationId": rule.endpoint.replace(".", "_") + ("" if len(methods) == 1 else f"_{method}"),
        "summary": declared.summary,
        "tags": [declared.tag],
        "security": [{SECURITY_SCHEME: [r for r in ROLES if r in declared.roles or r == "admin"]}]
        if declared.roles else [],
        "responses": {str(status): _response(response) for status, response in declared.responses.items()},
    }
    if declared.description:
        out["description"] = declared.description
    if declared.parameters:
        out["parameters"] = list(declared.parameters)
    if isinstance(declared.body, str):
        out["requestBody"] = {"required": True, "content": json_content(declared.body)}
    elif declared.body is not None:
        out["requestBody"] = declared.body
    errors: dict[int, str | None] = {**dict.fromkeys(_implied_errors(declared, rule)), **declared.errors}
    for status in sorted(errors):
        text = errors[status]
        out["responses"][str(status)] = schemas.ERRORS[status][0] if text is None else _error_response(text)
    return out


def _implied_errors(declared: Operation, rule: Rule) -> list[int]:
    statuses = []
    if declared.body is not None or declared.parameters or _arguments(rule):
        statuses.append(400)
    if declared.roles:
        statuses.append(401)
        if set(ROLES) - {"admin"} - set(declared.roles):  # a role that gets 403
            statuses.append(403)
    if declared.body is not None:
        statuses.append(413)
    if declared.dependencies:
        statuses.append(503)
    return statuses


def _response(response: str | dict) -> dict:
    if isinstance(response, dict):
        return response
    return {"description": schemas.SCHEMAS[response].get("description", response), "content": json_content(response)}


def _error_response(description: str) -> dict:
    return {"description": description, "headers": {"x-should-retry": schemas.SHOULD_RETRY},
            "content": json_content("Error")}


def _register_components(spec: APISpec) -> None:
    spec.components.security_scheme(SECURITY_SCHEME, {
        "type": "http", "scheme": "bearer",
        "description": "An API key. The roles an operation lists are those allowed (admin always is)."})
    for name, schema in schemas.SCHEMAS.items():
        spec.components.schema(name, schema)
    for name, parameter in schemas.PARAMETERS.items():
        spec.components.parameter(name, parameter["in"], parameter)
    for _status, (name, description) in schemas.ERRORS.items():
        spec.components.response(name, _error_response(description))
