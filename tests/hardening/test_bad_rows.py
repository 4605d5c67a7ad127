"""Bad job rows inserted with the service role (bypassing the Edge Function's checks): the table
refuses what it cannot hold; everything it accepts ends completed, or failed with a plain message,
with no crash, no retry loop, and no provider call for input that was already invalid."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from devstack.doubles.stable_audio_double import StableAudioDouble
from devstack.stack import LocalStack
from tests.hardening.conftest import Ledger, settle
from tests.support import connect, new_user, sql

# (name, columns, the SQLSTATE the table answers)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("duration 0", {"duration": 0}, "23514"),
    # This project's own table takes stable-audio-3's 380 s (the plug-in's own check stays at 180).
    ("duration 381", {"duration": 381}, "23514"),
    ("duration -5", {"duration": -5}, "23514"),
    ("duration null", {"duration": None}, "23502"),
    ("quality ultra", {"quality": "ultra"}, "23514"),
    ("quality null", {"quality": None}, "23502"),
    ("prompt null", {"prompt": None}, "23502"),
    ("status archived", {"status": "archived"}, "23514"),
    ("unknown user", {"user_id": uuid.UUID(int=1)}, "23503"),
    # The provider's own limit, held by the table: an oversized prompt never reaches the webhook.
    ("10,001-character prompt", {"prompt": "a" * 10_001}, "23514"),
    # Audio-to-audio needs its input (any other mode is taken and decided by the function).
    ("audio-to-audio without an input", {"mode": "audio-to-audio"}, "23514"),
    ("strength 1.5", {"mode": "audio-to-audio", "input_path": "x/in.wav", "strength": 1.5}, "23514"),
]

# (name, columns, final status, error_message fragment, provider calls)
PROCESSED: list[tuple[str, dict[str, Any], str, str | None, int]] = [
    ("empty prompt", {"prompt": ""}, "failed", "The prompt is empty", 0),
    ("whitespace prompt", {"prompt": "   \t  "}, "failed", "The prompt is empty", 0),
    ("control characters only", {"prompt": "\x01\x02\x1b"}, "failed", "The prompt is empty", 0),
    ("10,000-character prompt", {"prompt": "b" * 10_000}, "completed", None, 1),
    ("control characters and text", {"prompt": "rain\x07 on\x1b glass"}, "completed", None, 1),
    ("emoji", {"prompt": "🌲🌅 forest at dawn 🐦"}, "completed", None, 1),
    ("accents and CJK", {"prompt": "forêt à l'aube, 森の夜明け"}, "completed", None, 1),
    (
        "audio-to-audio from another user's folder",
        {"mode": "audio-to-audio", "input_path": f"{uuid.UUID(int=7)}/take.wav", "strength": 0.5},
        "failed",
        "another user's folder",
        0,
    ),
    (
        "audio-to-audio outside the inputs bucket",
        {"mode": "audio-to-audio", "input_path": "elsewhere/take.wav", "strength": 0.5},
        "failed",
        "outside the inputs bucket",
        0,
    ),
    ("mode text-to-audio", {"mode": "text-to-audio"}, "completed", None, 1),
    # The plug-in has charged its tokens before it inserts: an unknown mode is never refused by the
    # table, its job fails with a message instead (docs/plugin-client.md).
    ("mode inpaint", {"mode": "inpaint"}, "failed", "'inpaint' mode is not supported", 0),
    ("mode empty", {"mode": ""}, "failed", "mode is not supported", 0),
    ("mode in capitals", {"mode": "TEXT-TO-AUDIO"}, "failed", "mode is not supported", 0),
    ("mode designer", {"mode": "designer", "status": "queued"}, "completed", None, 1),
    ("quality standard (the plug-in's default)", {"quality": "standard"}, "completed", None, 1),
    # Past the earlier worker's 60 s (the plug-in's creator goes to 180 s; a 120 s creator job runs end
    # to end in tests/plugin/test_plugin_end_to_end.py: this suite's 6 s budget is for faults).
    ("duration 61 (creator)", {"mode": "creator", "duration": 61}, "completed", None, 1),
    # Past 180 s only a mode served by stable-audio-3 (designer, in this suite) makes the audio.
    ("duration 181 on stable-audio-2.5", {"duration": 181}, "failed", "must be 1 to 180 seconds", 0),
    ("duration 1", {"duration": 1}, "completed", None, 1),
    ("duration 60", {"duration": 60}, "completed", None, 1),
    ("quality low", {"quality": "low"}, "completed", None, 1),
    ("quality high", {"quality": "high"}, "completed", None, 1),
    ("inserted as queued", {"status": "queued"}, "completed", None, 1),
    # Processing with no lease is how the plug-in's old worker holds a job: never run again, failed
    # once legacy_processing_timeout_seconds (0 in this test) has passed.
    ("inserted as processing", {"status": "processing"}, "failed", "did not finish", 0),
    ("inserted as failed", {"status": "failed", "error_message": "by hand"}, "failed", "by hand", 0),
    ("inserted with no attempts left", {"attempts": 3}, "failed", "finished after 3 attempts", 0),
]


def insert(stack: LocalStack, columns: dict[str, Any]) -> uuid.UUID:
    """The case's columns on a row of 2 s, as the suite's other jobs (conftest's run_job): only the cases
    named for a duration are about it, and the table's default of 10 s would make each completed case
    encode five times the audio."""
    user, prompt = new_user(stack.database_url), f"row {uuid.uuid4().hex[:8]}"
    values = {"user_id": user, "prompt": prompt, "duration": 2, **columns}
    with connect(stack.database_url, "service_role") as conn:
        row = conn.execute(
            f"insert into jobs ({', '.join(values)}) values ({', '.join(['%s'] * len(values))})"  # type: ignore[arg-type]
            " returning id",
            list(values.values()),
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row["id"]))


@pytest.mark.parametrize(("name", "columns", "sqlstate"), REFUSED, ids=[c[0] for c in REFUSED])
def test_the_table_refuses_a_row_it_cannot_hold(
    stack: LocalStack,
    double: StableAudioDouble,
    ledger: Ledger,
    name: str,
    columns: dict[str, Any],
    sqlstate: str,
) -> None:
    hooks = "select count(*) as n from supabase_functions.hooks"  # a row per webhook call
    queued = sql(stack.database_url, hooks, role=None)
    with pytest.raises(psycopg.Error) as refused:
        insert(stack, columns)
    ledger.bad_inputs.append((f"row {name}", f"refused by the table ({refused.value.sqlstate})"))
    assert refused.value.sqlstate == sqlstate
    assert sql(stack.database_url, hooks, role=None) == queued
    assert double.call_count == 0


def test_a_nul_character_never_reaches_the_table(stack: LocalStack, ledger: Ledger) -> None:
    with pytest.raises(psycopg.DataError):
        insert(stack, {"prompt": "before\x00after"})
    ledger.bad_inputs.append(("row prompt with a NUL character", "refused by the driver"))


@pytest.mark.parametrize(
    ("name", "columns", "status", "message", "calls"), PROCESSED, ids=[c[0] for c in PROCESSED]
)
def test_an_accepted_row_ends_completed_or_failed_with_a_plain_message(
    stack: LocalStack,
    double: StableAudioDouble,
    ledger: Ledger,
    name: str,
    columns: dict[str, Any],
    status: str,
    message: str | None,
    calls: int,
) -> None:
    sql(
        stack.database_url,
        "insert into sona_settings values ('legacy_processing_timeout_seconds', 0)"
        " on conflict (key) do update set value = 0",
        role=None,
    )
    job_id = insert(stack, columns)
    row = settle(stack, job_id, prompt=None)
    ledger.bad_inputs.append((f"row {name}", row["status"]))
    ledger.paid[job_id] += double.paid_generations
    assert row["status"] == status, row["error_message"]
    if message:
        assert message in row["error_message"]
    assert double.call_count == calls
    assert row["attempts"] <= 1 or columns.get("attempts") == 3
    if status == "completed":
        assert row["mp3_url"] and row["wav_url"]
