"""What a batch accepts: the create parameters (window, metadata) and the input file's lines.

Every input line is parsed by :func:`parse_line` and nothing else, so the JSON rules of a line
are decided in one place.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from bellaq.errors import BadRequest
from bellaq.validation import loads_strict

MAX_ERRORS = 100  # entries of errors.data; one more says how many were left out
MAX_CUSTOM_ID = 512
MAX_MODEL = 255  # the batch's model column
MAX_METADATA = 16
SHOWN = 80  # characters of a bad value quoted in an error message
WINDOW_RE = re.compile(r"^([1-9][0-9]{0,6})([mhd])$")
WINDOW_UNITS = {"m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 30 * 86400

Problem = tuple[str, str, "str | None"]  # (code, message, param)


# ------------------------------------------------------------------------------ create parameters

def parse_window(window: str) -> int:
    """Seconds of a completion window: ``24h``, ``<n>m``, ``<n>h`` or ``<n>d`` (at most 30 days)."""
    match = WINDOW_RE.match(window)
    if match:
        seconds = int(match.group(1)) * WINDOW_UNITS[match.group(2)]
        if seconds <= MAX_WINDOW_S:
            return seconds
    raise BadRequest(f"completion_window '{window[:32]}' is not valid; use 24h, or <n>m, <n>h, <n>d "
                     "(up to 30 days).", param="completion_window", code="invalid_completion_window")


def check_metadata(metadata: dict | None) -> dict | None:
    """OpenAI metadata: up to 16 pairs, keys up to 64 and values up to 512 characters, all strings."""
    if metadata is None:
        return None
    if len(metadata) > MAX_METADATA:
        raise BadRequest(f"metadata may hold at most {MAX_METADATA} pairs; got {len(metadata)}.", param="metadata",
                         code="invalid_metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise BadRequest(f"metadata['{key[:64]}'] is not valid: keys are strings of up to 64 characters, values "
                             "strings of up to 512.", param="metadata", code="invalid_metadata")
    return metadata


# ------------------------------------------------------------------------------------ input lines

def parse_line(raw: bytes) -> Any:
    """One input line as JSON: the single place batch lines are parsed, by the service's one strict
    reader (no NaN, lone surrogates, duplicate keys or nesting beyond its limit). Raises ValueError."""
    return loads_strict(raw)


def read_lines(stream: BinaryIO, max_line: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(1-based line number, line or None when longer than ``max_line``, bytes read) of a stream."""
    number = 0
    while True:
        raw = stream.readline(max_line + 1)
        if not raw:
            return
        number += 1
        size = len(raw)
        if len(raw) > max_line and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # skip the rest of the long line
                raw = stream.readline(1 << 20)
                size += len(raw)
            yield number, None, size
            continue
        yield number, raw, size


def request_of(raw: bytes, number: int) -> tuple[dict | None, Problem | None]:
    """A request line as an object, or (code, message, param) of what is wrong with it."""
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        obj = parse_line(raw)
    except ValueError as err:
        return None, ("invalid_json_line", f"Line {number} is not valid JSON ({str(err)[:200]}); each line must be "
                      "one JSON object.", None)
    if not isinstance(obj, dict):
        return None, ("invalid_json_line", f"Line {number} is not a JSON object.", None)
    return obj, None


def shown(value: Any) -> str:
    """A value quoted in an error message, cut short: a hostile line must not bloat the errors."""
    try:
        text = json.dumps(value[:SHOWN + 1] if isinstance(value, str) else value)
    except (ValueError, RecursionError):
        return "(a value that cannot be shown)"
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


@dataclass
class Validation:
    """What the validation pass found: the request count, the model, and the errors."""

    count: int = 0
    model: Any = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    more_errors: int = 0

    def add(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})
        else:
            self.more_errors += 1

    @property
    def ok(self) -> bool:
        return not self.errors

    def errors_object(self) -> dict[str, Any]:
        data = list(self.errors)
        if self.more_errors:
            data.append({"code": "too_many_errors", "param": None, "line": None,
                         "message": f"{self.more_errors} more errors are not listed; fix the ones above first."})
        return {"object": "list", "data": data}


def validate_input(stream: BinaryIO, endpoint: str, max_lines: int, max_bytes: int, max_line_bytes: int,
                   on_line: Callable[[int], Any] | None = None) -> Validation:
    """Check a whole input file as a stream, without keeping it: every rule of SPEC 2 with its line.

    Rules: JSONL (one object a line, blank lines ignored), ``custom_id`` present, unique and at
    most 512 characters, ``method`` POST, ``url`` equal to ``endpoint``, ``body`` an object, one
    ``model`` (a string of at most 255 characters, or none) for all lines, at most ``max_lines``
    requests and ``max_bytes`` bytes. ``on_line`` is called with each line's number first.
    """
    result = Validation()
    seen: dict[bytes, int] = {}
    read = 0
    model_line = 0
    for number, raw, size in read_lines(stream, max_line_bytes):
        if on_line is not None:
            on_line(number)
        read += size
        if read > max_bytes:
            result.add(number, "file_too_large", f"The file is larger than the limit of {max_bytes} bytes "
                       f"(passed at line {number}).")
            break
        if raw is None:
            result.add(number, "line_too_large", f"Line {number} is longer than {max_line_bytes} bytes.")
            continue
        if not raw.strip():
            continue
        result.count += 1
        if result.count > max_lines:
            result.add(number, "too_many_lines", f"The file has more than {max_lines} requests; split it into "
                       "several batches.")
            break
        obj, problem = request_of(raw, number)
        if problem is None:
            problem = _check_request(obj, number, endpoint, seen)  # type: ignore[arg-type]
        if problem is None:
            model = obj["body"].get("model")  # type: ignore[index]
            if not model_line:
                result.model, model_line = model, number
            elif model != result.model:
                problem = ("mismatched_model", f"Line {number} uses model {shown(model)} but line {model_line} "
                           f"uses {shown(result.model)}; every request of a batch must use one model.", "body.model")
        if problem is not None:
            result.add(number, *problem)
    if result.count == 0 and result.ok:
        result.add(None, "empty_file", "The input file has no requests; send one JSON request per line.")
    return result


def _check_request(obj: dict, number: int, endpoint: str, seen: dict[bytes, int]) -> Problem | None:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_custom_id", f"Line {number} has no custom_id (a non-empty string).", "custom_id"
    if len(custom_id) > MAX_CUSTOM_ID:
        return "invalid_custom_id", f"The custom_id on line {number} is longer than {MAX_CUSTOM_ID} characters.", \
            "custom_id"
    try:
        encoded = custom_id.encode()
    except UnicodeEncodeError:
        return "invalid_custom_id", f"The custom_id on line {number} is not valid Unicode (it holds a lone " \
            "surrogate).", "custom_id"
    first = seen.setdefault(hashlib.blake2b(encoded, digest_size=16).digest(), number)
    if first != number:
        return "duplicate_custom_id", f"The custom_id {shown(custom_id)} on line {number} was already used on " \
            f"line {first}; every custom_id must be unique.", "custom_id"
    if obj.get("method") != "POST":
        return "invalid_method", f"Line {number} has method {shown(obj.get('method'))}; only POST is supported.", \
            "method"
    if obj.get("url") != endpoint:
        return "invalid_url", f"Line {number} has url {shown(obj.get('url'))} but the batch's endpoint is " \
            f"{endpoint}; every line's url must equal it.", "url"
    body = obj.get("body")
    if not isinstance(body, dict):
        return "invalid_body", f"Line {number} has no body object (the request for {endpoint}).", "body"
    model = body.get("model")
    if isinstance(model, str) and len(model) > MAX_MODEL:
        return "invalid_model", f"The model on line {number} is longer than {MAX_MODEL} characters.", "body.model"
    return None
