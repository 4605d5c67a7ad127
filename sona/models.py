"""Typed shapes at the boundaries: a job's statuses and stages, the bodies the doors are sent (the
database webhook's, a Cloud Tasks task's), and the provider's audio. The job's row and what its
columns hold are sona/rows.py: a door's first answer reads none of them, and defining their models
cost each cold start about 5 ms (PERFORMANCE.md, cold start; tests/test_cold_start.py).

Each model is built (its validator made) on its first use, not at import (defer_build): building
them all cost a cold function about 10 ms before its first answer, which reads one or two of them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


CLAIMABLE = frozenset({JobStatus.PENDING, JobStatus.QUEUED})


class JobStage(StrEnum):
    """Where a job is, for the plug-in's progress (derived from the status by the database; the
    three stages inside an attempt are written by advance_stage)."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    GENERATING = "generating"
    ENCODING = "encoding"
    UPLOADING = "uploading"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Quality(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class WebhookRecord(BaseModel):
    model_config = ConfigDict(extra="allow", defer_build=True)

    id: uuid.UUID
    status: str | None = None
    attempts: int = 0


class TaskPayload(BaseModel):
    """What a Cloud Tasks task POSTs to run a job."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    job_id: uuid.UUID


class WebhookPayload(BaseModel):
    """What a Supabase database webhook POSTs (and what reclaim_jobs re-sends)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, defer_build=True)

    type: Literal["INSERT", "UPDATE"]
    table: str
    schema_: str = Field(alias="schema")
    record: WebhookRecord
    old_record: dict[str, Any] | None = None


# The header that carries the webhook's shared secret, on the webhook and on reclaim's direct dispatch.
SECRET_HEADER = "X-Webhook-Secret"  # noqa: S105  a header name, not a secret


def webhook_payload(
    job_id: object,
    *,
    kind: Literal["INSERT", "UPDATE"] = "INSERT",
    schema: str = "public",
    table: str = "jobs",
) -> dict[str, Any]:
    """The body a Supabase database webhook sends (record trimmed to what process_job reads)."""
    return {
        "type": kind,
        "table": table,
        "schema": schema,
        "record": {"id": str(job_id), "status": "pending"},
        "old_record": None,
    }


@dataclass(frozen=True)
class GeneratedAudio:
    """The provider's answer: raw audio bytes and what it said about them. A dataclass, not a
    model: validating 10 MB of audio would copy it."""

    data: bytes | bytearray
    content_type: str
    model: str
    seed: int | None = None
    finish_reason: str | None = None
