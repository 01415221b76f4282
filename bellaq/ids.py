"""Identifiers: a prefix and random hex, sortable enough for humans, unguessable for others."""

from __future__ import annotations

import secrets


def new_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}{secrets.token_hex(nbytes)}"
