"""The SQL that installs the INSERT webhook calling supabase_functions.http_request."""

from __future__ import annotations

import json
from importlib import resources

from sona.config import Settings


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def quote_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def webhook_sql(settings: Settings, url: str) -> str:
    """The trigger, with the secret header and a timeout that outlasts the job."""
    headers = json.dumps(
        {
            "Content-Type": "application/json",
            "X-Webhook-Secret": settings.webhook_secret.get_secret_value(),
        }
    )
    template = resources.files("sona").joinpath("sql/webhook_trigger.sql").read_text()
    return template.format(
        schema=quote_ident(settings.jobs_schema),
        table=quote_ident(settings.jobs_table),
        url=quote_literal(url),
        headers=quote_literal(headers),
        timeout_ms=settings.webhook_timeout_ms,
    )
