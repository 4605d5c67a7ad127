"""What the plug-in shows, end to end through real processes: the stages a listener on the row sees,
a peaks URL that serves audiowaveform JSON, and the loudness on the row and in the preview."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import requests

from devstack.stack import LocalStack
from sona.audio.ffmpeg import find_ffmpeg
from sona.audio.loudness import CEILING_DBTP, FILTER, TARGET_LUFS, parse_summary
from tests.support import RELAY_PAUSE_S, sql
from tests.test_stage import HISTORY, history

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_server: str) -> Iterator[LocalStack]:
    with LocalStack(
        tmp_path_factory.mktemp("stack"),
        process_env={"PATH": "/usr/bin:/bin"},
        database_server=pg_server,
        relay_pause_s=RELAY_PAUSE_S,
        reclaim_function=False,  # no test here calls reclaim_jobs
    ) as s:
        sql(s.database_url, HISTORY, role=None)
        yield s


def test_a_completed_job_shows_done_its_peaks_and_a_preview_at_the_target(stack: LocalStack) -> None:
    job_id = stack.insert_job("slow strings", duration=8, quality="low")
    row = stack.wait_for(job_id, timeout_s=60)
    assert row["status"] == "completed", row["error_message"]
    assert history(stack.database_url, job_id) == [
        "queued",
        "claimed",
        "generating",
        "encoding",
        "uploading",
        "done",
    ]
    assert row["stage"] == "done"

    answer = requests.get(row["peaks_url"], timeout=10)
    assert answer.headers["content-type"].startswith("application/json")
    peaks = answer.json()
    assert (peaks["version"], peaks["bits"], peaks["channels"]) == (2, 8, 2)
    assert len(peaks["data"]) == peaks["length"] * peaks["channels"] * 2
    assert row["audio"]["peaks_url"] == row["peaks_url"]

    audio = row["audio"]
    assert isinstance(audio["loudness_lufs"], float) and isinstance(audio["true_peak_dbtp"], float)
    with tempfile.NamedTemporaryFile(suffix=".mp3") as f:
        f.write(requests.get(row["mp3_url"], timeout=10).content)
        f.flush()
        log = subprocess.run(
            [find_ffmpeg(), "-hide_banner", "-nostats", "-i", f.name, "-af", FILTER, "-f", "null", "-"],
            capture_output=True,
            check=True,
        ).stderr
    played = parse_summary(log.decode())
    assert played.integrated_lufs is not None and abs(played.integrated_lufs - TARGET_LUFS) <= 1.0
    assert played.true_peak_dbtp is not None and played.true_peak_dbtp < CEILING_DBTP
