"""Standard Webhooks signing and verification (https://www.standardwebhooks.com/).

This is the scheme OpenAI's webhooks use, so a receiver can check our callbacks with
``openai.OpenAI(webhook_secret=...).webhooks.verify_signature(body, headers)``, with the
``standardwebhooks`` package, or with the few lines of :func:`verify`.

A message is signed as ``v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">``
with the key obtained by base64-decoding the part of the ``whsec_...`` secret after ``whsec_``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE = 300


class WebhookVerificationError(Exception):
    """A webhook's headers or signature did not verify."""


def new_secret() -> str:
    """A new signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def _key(secret: str) -> bytes:
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValueError("webhook secret must look like 'whsec_<base64>'; create one with new_secret()")
    raw = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret after 'whsec_' is not valid base64") from None
    if not key:
        raise ValueError("webhook secret is empty; create one with new_secret()")
    return key


def _signature(key: bytes, msg_id: str, timestamp: int | str, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value ``v1,<base64 HMAC-SHA256>`` of one message."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    return "v1," + _signature(_key(secret), msg_id, int(timestamp), body)


def new_msg_id() -> str:
    """A fresh webhook message id, ``msg_<32 hex>``."""
    return "msg_" + secrets.token_hex(16)


def message_id(subject: str) -> str:
    """The webhook id of the one message about ``subject`` (a task id), ``msg_<32 hex>``: the same
    on every attempt and from every process, so receivers can deduplicate retries."""
    return "msg_" + hashlib.sha256(f"bellaq-webhook:{subject}".encode()).hexdigest()[:32]


def headers_for(
    secret: str, body: bytes, msg_id: str | None = None, timestamp: int | None = None
) -> dict[str, str]:
    """Headers to send with ``body``: webhook-id, webhook-timestamp, webhook-signature, content-type.

    Keep the same ``msg_id`` across retries of one delivery so receivers can deduplicate.
    """
    msg_id = msg_id or new_msg_id()
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, msg_id, ts, body),
        "content-type": "application/json",
    }


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance: int = DEFAULT_TOLERANCE) -> None:
    """Check a received webhook; raise WebhookVerificationError if it is not authentic.

    Header names are matched case-insensitively. The ``webhook-signature`` header may hold several
    space-separated ``v1,<sig>`` entries (key rotation); one match is enough. The timestamp must be
    within ``tolerance`` seconds of now, in either direction.
    """
    lowered = {str(k).lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    timestamp = lowered.get("webhook-timestamp")
    signature_header = lowered.get("webhook-signature")
    if not (msg_id and timestamp and signature_header):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        ts = int(timestamp)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer number of seconds") from None
    now = int(time.time())
    if now - ts > tolerance:
        raise WebhookVerificationError("webhook timestamp is too old")
    if ts - now > tolerance:
        raise WebhookVerificationError("webhook timestamp is too new")
    if isinstance(body, str):
        body = body.encode("utf-8")
    expected = _signature(_key(secret), msg_id, timestamp, body).encode("ascii")
    for entry in signature_header.split():
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(expected, sig.encode("ascii", "replace")):
            return
    raise WebhookVerificationError("no matching webhook signature")
