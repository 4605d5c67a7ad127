"""The SQL that installs the INSERT webhook: supabase_functions.http_request with the secret in the
trigger, or (--vault) a trigger function that reads the secret from Supabase Vault at send time."""

from __future__ import annotations

import json
from importlib import resources
from typing import Literal

from pydantic import Field, SecretStr

from sona.config import function_timeout_s
from sona.environment import EnvironmentSettings

# Time for the webhook's call in cloud_tasks mode: a cold start plus one task creation.
ENQUEUE_TIMEOUT_MS = 10_000


class WebhookConfig(EnvironmentSettings):
    """Only what the trigger needs, so it can be printed without the function's other secrets."""

    webhook_secret: SecretStr | None = None
    job_timeout_ms: int = Field(default=300_000, ge=10_000)
    jobs_schema: str = "public"
    jobs_table: str = "jobs"
    dispatch: Literal["cloud_tasks", "direct"] = "cloud_tasks"

    @property
    def timeout_ms(self) -> int:
        """With Cloud Tasks the call only enqueues: short, so one slow answer cannot hold pg_net's
        batch for long (a lost one is reclaimed). In direct mode it must cover the whole job."""
        if self.dispatch == "cloud_tasks":
            return ENQUEUE_TIMEOUT_MS
        return function_timeout_s(self.job_timeout_ms) * 1000


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _template(name: str) -> str:
    return resources.files("sona.ops").joinpath(f"sql/{name}").read_text()


def webhook_sql(config: WebhookConfig, url: str, *, vault_secret: str | None = None) -> str:
    common = {
        "schema": quote_ident(config.jobs_schema),
        "table": quote_ident(config.jobs_table),
        "url": quote_literal(url),
        "timeout_ms": config.timeout_ms,
    }
    if vault_secret:
        return _template("webhook_trigger_vault.sql").format(vault_name=quote_literal(vault_secret), **common)
    if config.webhook_secret is None:
        raise ValueError("WEBHOOK_SECRET is not set (or pass --vault NAME to read it from Vault)")
    headers = json.dumps(
        {
            "Content-Type": "application/json",
            "X-Webhook-Secret": config.webhook_secret.get_secret_value(),
        }
    )
    return _template("webhook_trigger.sql").format(headers=quote_literal(headers), **common)
