"""Bearer-key authentication and role checks for the API blueprints."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, g, request

from bellaq.errors import Forbidden, Unauthorized
from bellaq.keys import Principal, authenticate

F = TypeVar("F", bound=Callable[..., Any])


def current_principal() -> Principal:
    return g.principal


def require(*roles: str) -> Callable[[F], F]:
    """Allow callers whose key has one of ``roles`` (admin is always allowed)."""

    allowed = set(roles) | {"admin"}

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            header = request.headers.get("Authorization", "")
            scheme, _, raw = header.partition(" ")
            if scheme.lower() != "bearer" or not raw.strip():
                raise Unauthorized(
                    "Missing API key: send 'Authorization: Bearer <api key>'.", code="missing_api_key"
                )
            principal = authenticate(raw.strip(), current_app.config["BELLAQ"].admin_key)
            if principal is None:
                raise Unauthorized("Unknown or deleted API key.")
            if principal.role not in allowed:
                need = " or ".join(sorted(allowed))
                raise Forbidden(f"This route needs a key with role {need}; yours has role {principal.role}.")
            g.principal = principal
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator
