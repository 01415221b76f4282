"""Reading request input: every problem becomes a 400 that names the field and what is expected.

JSON is read by one strict reader, :func:`loads_strict`, everywhere bellaq accepts JSON (request
bodies, batch input lines). Beyond RFC 8259 it refuses what different parsers read differently
or what cannot be stored and sent on faithfully:

- bytes that are not UTF-8 (a byte order mark included);
- nesting deeper than ``MAX_JSON_DEPTH`` (128) arrays and objects;
- ``NaN``, ``Infinity``, ``-Infinity``, and numbers too large for a double (``1e400``);
- lone UTF-16 surrogates (``"\\ud800"``), which no UTF-8 text can hold;
- an object with the same key twice: some parsers keep the first value, others the last, so
  the request is ambiguous.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flask import request

from bellaq.errors import BadRequest

_MISSING = object()

MAX_JSON_DEPTH = 128
# Longest value a URL path segment may carry (ids, queue names); longer ones are refused early.
MAX_PATH_VALUE = 256

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


class JSONInputError(ValueError):
    """The text is not JSON that bellaq accepts; the message says why and where."""


def _no_constant(name: str) -> Any:
    raise JSONInputError(f"{name} is not a JSON number; send a finite number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise JSONInputError(f"the number {text[:40]} is too large for a double")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise JSONInputError(f"the key {json.dumps(key[:64])} appears twice in one object, which is "
                                     "ambiguous; send each key once")
            seen.add(key)
    return obj


def _check_value(value: Any, max_depth: int, strings: bool) -> None:
    """Refuse nesting deeper than ``max_depth`` and, if ``strings``, any string (key or value)
    that holds a lone surrogate. Walks one level at a time: no recursion, few calls."""
    level = [value] if isinstance(value, dict | list) else []
    loose = [value] if isinstance(value, str) else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            raise JSONInputError(f"arrays and objects are nested deeper than {max_depth} levels")
        inner = []
        for item in level:
            if isinstance(item, dict):
                if strings:
                    loose.extend(item)
                item = item.values()
            for child in item:
                if isinstance(child, dict | list):
                    inner.append(child)
                elif strings and isinstance(child, str):
                    loose.append(child)
        level = inner
    for text in loose:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise JSONInputError("a string holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                                 "text; send valid Unicode") from None


def loads_strict(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text by the rules in this module's docstring.

    Raises :class:`JSONInputError` (a ``ValueError``) with a message that says what is wrong and
    where, fit to show to the client.
    """
    if isinstance(raw, bytes | bytearray):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise JSONInputError(f"byte {err.start} is not valid UTF-8; send UTF-8 text") from None
    else:
        text = raw
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                           object_pairs_hook=_unique_object)
    except JSONInputError:
        raise
    except json.JSONDecodeError as err:
        raise JSONInputError(f"{err.msg} at line {err.lineno} column {err.colno}") from None
    except ValueError as err:  # an integer with more digits than Python converts
        raise JSONInputError(str(err).split(";")[0]) from None
    except RecursionError:  # far deeper than the limit
        raise JSONInputError(f"arrays and objects are nested deeper than {max_depth} levels") from None
    # Only text with more brackets than the limit can be too deep; only text with a surrogate
    # escape (or a str given directly) can hold a lone surrogate.
    deep = text.count("[") + text.count("{") > max_depth
    strings = bool(_SURROGATE_ESCAPE.search(text)) or not isinstance(raw, bytes | bytearray)
    if deep or strings:
        _check_value(value, max_depth, strings)
    return value


def json_body() -> dict[str, Any]:
    """The request's JSON object, or a 400 that says why it is not one."""
    raw = request.get_data(cache=True)
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.", code="missing_body")
    try:
        body = loads_strict(raw)
    except JSONInputError as err:
        raise BadRequest(f"The request body is not valid JSON: {err}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def check_path_values(_endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Refuse a URL path value (an id, a queue name) longer than any real one, before it reaches
    a lookup or an error message (registered as a URL value preprocessor)."""
    for name, value in (values or {}).items():
        if isinstance(value, str) and len(value) > MAX_PATH_VALUE:
            raise BadRequest(f"The '{name}' in the URL path is {len(value)} characters long; no {name} is longer "
                             f"than {MAX_PATH_VALUE}.", param=name, code="invalid_path")


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
