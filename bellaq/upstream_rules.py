"""What a queue may make a built-in worker send upstream: endpoint paths, base URLs, and the
environment variables its key may be read from.

Pure functions that return a problem (a sentence) or None, so the API turns them into 400s and
a worker can re-check a stored value before it uses it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# Endpoints a queue created on first use (by a put or a batch) may serve; any other endpoint
# needs a queue an admin registered.
BUILTIN_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses")

MAX_ENDPOINT = 240
MAX_BASE_URL = 1024
_SEGMENT = re.compile(r"[A-Za-z0-9_.\-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
RESERVED_ENV_PREFIX = "BELLAQ_"


def endpoint_problem(endpoint: str) -> str | None:
    """Why ``endpoint`` is not a normalised absolute path under ``/v1/``, or None.

    Segments are non-empty runs of ``A-Z a-z 0-9 _ . -`` and none is made only of dots, so a
    worker appending it to a base URL reaches exactly that path: no ``.``/``..`` segment, ``//``,
    percent-encoding, backslash, query, fragment, whitespace or control character gets through.
    """
    if not endpoint.startswith("/v1/"):
        return "it must start with /v1/"
    if len(endpoint) > MAX_ENDPOINT:
        return f"it is longer than {MAX_ENDPOINT} characters"
    for segment in endpoint[1:].split("/"):
        if not segment:
            return "it has an empty segment ('//' or a trailing '/')"
        if not _SEGMENT.fullmatch(segment):
            return "a segment holds a character other than A-Z, a-z, 0-9, '_', '.' and '-'"
        if not segment.strip("."):
            return "it has a '.' or '..' segment"
    return None


def base_url_problem(base_url: str) -> str | None:
    """Why ``base_url`` cannot have an endpoint appended to it safely, or None."""
    if len(base_url) > MAX_BASE_URL:
        return f"it is longer than {MAX_BASE_URL} characters"
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F or c == "\\" for c in base_url):
        return "it holds whitespace, a backslash, a control or a non-ASCII character"
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        return "it is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "it must be an http(s) URL with a host"
    if parts.query or parts.fragment or "?" in base_url or "#" in base_url:
        return "it has a query or fragment, which the endpoint appended to it would end up in"
    if "%" in parts.path or any(s and not s.strip(".") for s in parts.path.split("/")):
        return "its path has percent-encoding or a '.'/'..' segment"
    return None


def key_env_problem(name: str, allowed: str) -> str | None:
    """Why a queue may not read its upstream key from the environment variable ``name``, or None.

    ``allowed`` is the operator's comma-separated list (``BELLAQ_UPSTREAM_KEY_ENVS``): exact names,
    or ``*SUFFIX`` patterns. ``BELLAQ_*`` variables (the service's own settings and secrets) are
    never allowed, whatever the list says.
    """
    if not _ENV_NAME.fullmatch(name):
        return "it is not the name of an environment variable"
    if name.upper().startswith(RESERVED_ENV_PREFIX):
        return "BELLAQ_* variables hold the service's own settings and are never allowed"
    for entry in (e.strip() for e in allowed.split(",")):
        if entry and (name == entry or (entry.startswith("*") and name.endswith(entry[1:]))):
            return None
    return f"the operator allows only {allowed or 'no variables'} (BELLAQ_UPSTREAM_KEY_ENVS)"
