"""Reading request input: every problem becomes a 400 that names the field and what is expected."""

from __future__ import annotations

from typing import Any

from flask import request

from bellaq.errors import BadRequest

_MISSING = object()


def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 that says why it is not one."""
    raw = request.get_data(cache=True)
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.", code="missing_body")
    try:
        import json

        body = json.loads(raw)
    except ValueError as err:
        raise BadRequest(f"The request body is not valid JSON ({err}); send a JSON object.",
                         code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", list: "an array"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """``body[name]`` checked against ``kind``; required unless a default is given (None allowed)."""
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise BadRequest(f"Missing required field '{name}' ({_type_name(kind)}).", param=name,
                             code="missing_field")
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; JSON true is not a number.
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        raise BadRequest(f"Field '{name}' must be {_type_name(kind)}, not {type(value).__name__}.",
                         param=name, code="invalid_type")
    return value


def int_field(body: dict[str, Any], name: str, default: Any = _MISSING, lo: int | None = None,
              hi: int | None = None) -> Any:
    value = field(body, name, int, default)
    if value is None or value is default:
        return value
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise BadRequest(f"Field '{name}' must be {bounds}; got {value}.", param=name, code="out_of_range")
    return value


def choice_field(body: dict[str, Any], name: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
    value = field(body, name, str, default)
    if value is not default and value not in choices:
        raise BadRequest(f"Field '{name}' must be one of {', '.join(choices)}; got '{value}'.", param=name,
                         code="invalid_value")
    return value


def int_arg(name: str, default: int, lo: int, hi: int) -> int:
    """A query-string integer within bounds."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"Query parameter '{name}' must be an integer; got '{raw}'.", param=name,
                         code="invalid_type") from None
    if not lo <= value <= hi:
        raise BadRequest(f"Query parameter '{name}' must be between {lo} and {hi}; got {value}.", param=name,
                         code="out_of_range")
    return value
