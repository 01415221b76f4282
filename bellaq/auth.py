"""Bearer-key authentication and role checks for the API blueprints."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, g, request

from bellaq.errors import Forbidden, Unauthorized
from bellaq.keys import Principal, authenticate

F = TypeVar("F", bound=Callable[..., Any])

# Keys are visible ASCII (bellaq's own are ``bq-`` + URL-safe base64); anything else in the
# header is refused before any comparison, which would raise on non-ASCII text.
_KEY_RE = re.compile(r"[\x21-\x7e]{1,512}")


def bearer_key() -> str:
    """The raw key of the ``Authorization: Bearer <key>`` header, or a 401 that says what is wrong."""
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.strip(" \t").partition(" ")
    raw = raw.strip(" \t")
    if scheme.lower() != "bearer" or not raw:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <api key>'.", code="missing_api_key")
    if not _KEY_RE.fullmatch(raw):
        raise Unauthorized("The API key is malformed: a key is 1 to 512 visible ASCII characters, with no spaces "
                           "or control characters. Send the key exactly as it was issued.")
    return raw


def current_principal() -> Principal:
    return g.principal


def require(*roles: str) -> Callable[[F], F]:
    """Allow callers whose key has one of ``roles`` (admin is always allowed)."""

    allowed = set(roles) | {"admin"}

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = authenticate(bearer_key(), current_app.config["BELLAQ"].admin_key)
            if principal is None:
                raise Unauthorized("Unknown or deleted API key.")
            if principal.role not in allowed:
                need = " or ".join(sorted(allowed))
                raise Forbidden(f"This route needs a key with role {need}; yours has role {principal.role}.")
            g.principal = principal
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator
