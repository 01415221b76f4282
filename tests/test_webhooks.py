"""Standard Webhooks signing: round trips, tampering, independent verifiers (OpenAI SDK, standardwebhooks)."""

from __future__ import annotations

import base64
import json
import time

import pytest

from bellaq import webhooks
from bellaq.webhooks import WebhookVerificationError, headers_for, new_secret, sign, verify

BODY = json.dumps({"task_id": "t-1", "status": "succeeded", "result": {"text": "héllo ✓"}}).encode()

# The example published with the Standard Webhooks / Svix documentation.
KNOWN_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KNOWN_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
KNOWN_TS = 1614265330
KNOWN_BODY = b'{"test": 2432232314}'
KNOWN_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.fixture
def secret() -> str:
    return new_secret()


def test_new_secret_shape() -> None:
    s = new_secret()
    assert s.startswith("whsec_")
    assert len(base64.b64decode(s[len("whsec_") :])) == 32
    assert new_secret() != s


def test_known_vector() -> None:
    assert sign(KNOWN_SECRET, KNOWN_ID, KNOWN_TS, KNOWN_BODY) == KNOWN_SIG


def test_headers_shape(secret: str) -> None:
    h = headers_for(secret, BODY)
    assert set(h) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert h["webhook-id"].startswith("msg_")
    assert abs(int(h["webhook-timestamp"]) - time.time()) < 5
    assert h["webhook-signature"].startswith("v1,")
    assert h["content-type"] == "application/json"
    fixed = headers_for(secret, BODY, msg_id="msg_abc", timestamp=1_700_000_000)
    assert fixed["webhook-id"] == "msg_abc"
    assert fixed["webhook-timestamp"] == "1700000000"
    assert fixed["webhook-signature"] == sign(secret, "msg_abc", 1_700_000_000, BODY)


def test_round_trip(secret: str) -> None:
    verify(secret, headers_for(secret, BODY), BODY)


def test_header_names_case_insensitive(secret: str) -> None:
    h = {k.title(): v for k, v in headers_for(secret, BODY).items()}
    verify(secret, h, BODY)


def test_tampered_body_fails(secret: str) -> None:
    h = headers_for(secret, BODY)
    with pytest.raises(WebhookVerificationError):
        verify(secret, h, BODY.replace(b"succeeded", b"failed"))


def test_tampered_id_fails(secret: str) -> None:
    h = headers_for(secret, BODY)
    h["webhook-id"] = "msg_other"
    with pytest.raises(WebhookVerificationError):
        verify(secret, h, BODY)


def test_wrong_secret_fails(secret: str) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(new_secret(), headers_for(secret, BODY), BODY)


@pytest.mark.parametrize("skew", [-301, 301, -3600, 3600])
def test_timestamp_outside_tolerance_fails(secret: str, skew: int) -> None:
    h = headers_for(secret, BODY, timestamp=int(time.time()) + skew)
    with pytest.raises(WebhookVerificationError, match="too (old|new)"):
        verify(secret, h, BODY)


def test_custom_tolerance(secret: str) -> None:
    h = headers_for(secret, BODY, timestamp=int(time.time()) - 1000)
    verify(secret, h, BODY, tolerance=2000)
    with pytest.raises(WebhookVerificationError):
        verify(secret, h, BODY, tolerance=10)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_fails(secret: str, missing: str) -> None:
    h = headers_for(secret, BODY)
    del h[missing]
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify(secret, h, BODY)


def test_bad_timestamp_fails(secret: str) -> None:
    h = headers_for(secret, BODY)
    h["webhook-timestamp"] = "yesterday"
    with pytest.raises(WebhookVerificationError):
        verify(secret, h, BODY)


def test_several_signatures_one_matching(secret: str) -> None:
    old = new_secret()
    h = headers_for(secret, BODY)
    other = sign(old, h["webhook-id"], int(h["webhook-timestamp"]), BODY)
    h["webhook-signature"] = f"v2,abc {other} {h['webhook-signature']}"
    verify(secret, h, BODY)
    h["webhook-signature"] = f"{other} v1,notbase64!!"
    with pytest.raises(WebhookVerificationError):
        verify(secret, h, BODY)


def test_only_v1_accepted(secret: str) -> None:
    h = headers_for(secret, BODY)
    h["webhook-signature"] = "v2," + h["webhook-signature"][3:]
    with pytest.raises(WebhookVerificationError):
        verify(secret, h, BODY)


@pytest.mark.parametrize("bad", ["", "secret", "whsec_", "whsec_***"])
def test_bad_secret_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        sign(bad, "msg_1", 1, b"{}")


def test_unpadded_secret_accepted() -> None:
    key = b"k" * 31  # base64 of 31 bytes has one '=' of padding
    padded = "whsec_" + base64.b64encode(key).decode()
    unpadded = padded.rstrip("=")
    assert sign(padded, "m", 1, b"x") == sign(unpadded, "m", 1, b"x")


# --------------------------------------------------------------- independent verifiers


def test_openai_sdk_verifies_our_signature(secret: str) -> None:
    import openai
    client = openai.OpenAI(api_key="x", webhook_secret=secret)
    h = headers_for(secret, BODY)
    client.webhooks.verify_signature(BODY, h)
    client.webhooks.verify_signature(BODY.decode(), h)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(BODY + b" ", h)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="x", webhook_secret=new_secret()).webhooks.verify_signature(BODY, h)


def test_openai_sdk_accepts_known_vector(monkeypatch: pytest.MonkeyPatch) -> None:
    """The published Standard Webhooks example verifies with the OpenAI SDK and with us."""
    import openai
    import openai.lib._webhooks as sdk_webhooks
    monkeypatch.setattr(sdk_webhooks.time, "time", lambda: KNOWN_TS + 10)
    monkeypatch.setattr(webhooks.time, "time", lambda: KNOWN_TS + 10)
    h = {"webhook-id": KNOWN_ID, "webhook-timestamp": str(KNOWN_TS), "webhook-signature": KNOWN_SIG}
    openai.OpenAI(api_key="x", webhook_secret=KNOWN_SECRET).webhooks.verify_signature(KNOWN_BODY, h)
    verify(KNOWN_SECRET, h, KNOWN_BODY)
    assert headers_for(KNOWN_SECRET, KNOWN_BODY, msg_id=KNOWN_ID, timestamp=KNOWN_TS) == {
        **h,
        "content-type": "application/json",
    }


def test_standardwebhooks_package_agrees(secret: str) -> None:
    import standardwebhooks.webhooks as sw
    wh = sw.Webhook(secret)
    h = headers_for(secret, BODY)
    assert wh.verify(BODY, h) == json.loads(BODY)
    with pytest.raises(sw.WebhookVerificationError):
        wh.verify(BODY + b"\n", h)
    # and the other way round: their signature verifies with ours
    from datetime import datetime, timezone

    ts = int(time.time())
    their_sig = wh.sign("msg_x", datetime.fromtimestamp(ts, tz=timezone.utc), BODY.decode())
    assert their_sig == sign(secret, "msg_x", ts, BODY)
    verify(
        secret, {"webhook-id": "msg_x", "webhook-timestamp": str(ts), "webhook-signature": their_sig}, BODY
    )


def test_module_exports() -> None:
    for name in ("new_secret", "sign", "headers_for", "verify", "WebhookVerificationError"):
        assert hasattr(webhooks, name)


def test_message_id_is_stable_per_subject() -> None:
    from bellaq.webhooks import message_id

    assert message_id("task_1") == message_id("task_1")
    assert message_id("task_1") != message_id("task_2")
    assert message_id("task_1").startswith("msg_") and len(message_id("task_1")) == 4 + 32
