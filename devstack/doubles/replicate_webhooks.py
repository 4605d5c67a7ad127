"""Replicate's webhook signatures as a receiver checks them, for the tests of the double's webhooks
(the function itself waits by polling and receives none). Signed the standard-webhooks way:
HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{raw body}` with the base64 key after `whsec_`,
sent as space-separated `v1,<base64>` entries in `webhook-signature`; a receiver refuses timestamps
far from its clock (replay). Replicate's docs: "Verify webhooks"."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

# How far a webhook's timestamp may be from our clock (the standard-webhooks libraries' default).
WEBHOOK_TOLERANCE_S = 300


class WebhookRefused(Exception):
    """A request at the webhook door that is not Replicate's, or not now: answer 401, enqueue nothing.
    `reason` is safe to log (no secret, no body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

def verify_webhook(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: float = WEBHOOK_TOLERANCE_S,
) -> str:
    """The delivery's webhook-id when Replicate signed exactly this body within the tolerance;
    WebhookRefused otherwise. No I/O: the raw body, the request's headers and the secret decide."""
    lower = {k.lower(): v for k, v in headers.items()}
    webhook_id, stamp, signatures = (lower.get(f"webhook-{n}") for n in ("id", "timestamp", "signature"))
    if not webhook_id or not stamp or not signatures:
        raise WebhookRefused("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        sent_at = int(stamp)
    except ValueError:
        raise WebhookRefused("webhook-timestamp is not whole seconds") from None
    clock = time.time() if now is None else now
    if abs(clock - sent_at) > tolerance_s:
        raise WebhookRefused(f"webhook-timestamp is {clock - sent_at:.0f} s from our clock")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (ValueError, binascii.Error):
        raise WebhookRefused("the webhook secret is not a whsec_ key") from None
    signed = f"{webhook_id}.{stamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for entry in signatures.split():
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return webhook_id
    raise WebhookRefused("no signature matches the body")
