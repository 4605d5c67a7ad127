"""The SQL that installs the INSERT webhook: supabase_functions.http_request with the secret in the
trigger, or (--vault) a trigger function that reads the secret from Supabase Vault at send time."""

from __future__ import annotations

import json
from importlib import resources

from pydantic import SecretStr

from sona.config import JobShape

# Time for the webhook's call in cloud_tasks mode: a cold start plus one task creation.
ENQUEUE_TIMEOUT_MS = 10_000


class WebhookConfig(JobShape):
    """Only what the trigger needs (the settings the functions read too, declared once in JobShape),
    so it can be printed without the function's secrets; the webhook secret is passed on its own."""

    @property
    def timeout_ms(self) -> int:
        """With Cloud Tasks the call only enqueues: short, so one slow answer cannot hold pg_net's
        batch for long (a lost one is reclaimed). In direct mode it must cover the whole job."""
        if self.dispatch == "cloud_tasks":
            return ENQUEUE_TIMEOUT_MS
        return self.function_timeout_s * 1000


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _template(name: str) -> str:
    return resources.files("sona.ops").joinpath(f"sql/{name}").read_text()


def webhook_sql(
    config: WebhookConfig, url: str, *, secret: SecretStr | None = None, vault_secret: str | None = None
) -> str:
    common = {
        "schema": quote_ident(config.jobs_schema),
        "table": quote_ident(config.jobs_table),
        "url": quote_literal(url),
        "timeout_ms": config.timeout_ms,
    }
    if vault_secret:
        return _template("webhook_trigger_vault.sql").format(vault_name=quote_literal(vault_secret), **common)
    if secret is None:
        raise ValueError("WEBHOOK_SECRET is not set (or pass --vault NAME to read it from Vault)")
    headers = json.dumps({"Content-Type": "application/json", "X-Webhook-Secret": secret.get_secret_value()})
    return _template("webhook_trigger.sql").format(headers=quote_literal(headers), **common)
