"""API errors, raised anywhere and rendered in one place in the OpenAI error envelope."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Statuses the openai SDK retries by itself; everything else 4xx is permanent.
RETRYABLE = {408, 409, 429}


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """The OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}``: the one builder
    of it, for API errors, task results written by bellaq, and the mock upstream."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error with an HTTP status, rendered as ``{"error": {...}}``."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
            if status >= 500 and type(self).type == ApiError.type:
                self.type = "server_error"  # never "invalid_request_error" on a 5xx
        self.headers = headers or {}

    def to_dict(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


class BadRequest(ApiError):
    status = 400
    code = "invalid_value"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    code = "wrong_role"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "wrong_state"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class TooMany(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class Unavailable(ApiError):
    """503: a dependency is down and nothing was kept, so the same request may simply be retried."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


def error_response(err: ApiError) -> Response:
    response = jsonify(err.to_dict())
    response.status_code = err.status
    for name, value in err.headers.items():
        response.headers[name] = value
    if 400 <= err.status < 500 and err.status not in RETRYABLE:
        response.headers["x-should-retry"] = "false"
    elif err.status == 503:
        response.headers["x-should-retry"] = "true"
    return response


_HTTP_CODES = {
    404: ("not_found", "No route matches {path}. See the README for the routes this service serves."),
    405: ("method_not_allowed", "Method {method} is not allowed on {path}."),
    413: ("too_large", "The request body is larger than this route accepts."),
}


def register_error_handlers(app: Flask) -> None:
    from flask import request

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        code, template = _HTTP_CODES.get(status, ("http_error", err.description or "HTTP error"))
        message = template.format(path=request.path, method=request.method)
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"The request body is larger than the {limit}-byte limit of this route."
        return error_response(ApiError(message, code=code, status=status))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        from kombu.exceptions import OperationalError as BrokerError
        from redis.exceptions import RedisError
        from sqlalchemy.exc import OperationalError

        if isinstance(err, RedisError | OperationalError | BrokerError):
            log.warning("dependency error on %s: %s", request.path, err)
            return error_response(Unavailable("A dependency (Redis or SQL) is unavailable; retry shortly."))
        log.exception("unhandled error on %s", request.path)
        return error_response(
            ApiError("The server failed to handle this request.", code="server_error", status=500)
        )
