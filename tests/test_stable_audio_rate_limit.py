"""The Stable Audio double's rate limit: Stability's 150 requests per 10 s, then 60 s refused, scaled."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from devstack.doubles.stable_audio_double import RateLimit, StableAudioDouble
from tests.support import ManualClock

KEY = "sk-sentinel-stability-rate"


@pytest.fixture
def clock() -> ManualClock:
    """The double's window and lockout pass on this clock: the tests move it, never wait."""
    return ManualClock()


@pytest.fixture
def limited(clock: ManualClock) -> Iterator[StableAudioDouble]:
    limit = RateLimit(requests=3, window_s=10.0, lockout_s=60.0, clock=clock)  # Stability's, 3 not 150
    double = StableAudioDouble(KEY, rate_limit=limit)
    double.start()
    yield double
    double.stop()


def post(double: StableAudioDouble) -> requests.Response:
    return requests.post(
        f"{double.url}/text-to-audio",
        headers={"authorization": f"Bearer {KEY}", "accept": "audio/*"},
        files={"prompt": (None, "soft rain"), "duration": (None, "1"), "output_format": (None, "wav")},
        timeout=30,
    )


def test_the_request_past_the_limit_gets_stabilitys_429_and_starts_the_lockout(
    limited: StableAudioDouble,
) -> None:
    statuses = [post(limited).status_code for _ in range(3)]
    refused = post(limited)

    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    body = refused.json()
    assert body["name"] == "rate_limit_exceeded"
    assert body["id"]
    assert "150 requests within a 10 second period" in body["errors"][0]
    assert limited.rate_limited == 1


def test_every_request_is_refused_while_the_lockout_lasts(limited: StableAudioDouble) -> None:
    for _ in range(4):
        post(limited)
    refused = [post(limited).status_code for _ in range(3)]

    assert refused == [429, 429, 429]
    assert limited.rate_limited == 4
    assert limited.paid_generations == 3


def test_requests_succeed_again_once_the_lockout_ends(limited: StableAudioDouble, clock: ManualClock) -> None:
    for _ in range(4):
        post(limited)
    clock.advance(60.0 - 0.001)
    assert post(limited).status_code == 429  # the last moment of the lockout
    clock.advance(0.001)

    assert post(limited).status_code == 200


def test_without_a_rate_limit_nothing_is_refused() -> None:
    double = StableAudioDouble(KEY)
    double.start()
    try:
        statuses = {post(double).status_code for _ in range(5)}
    finally:
        double.stop()

    assert statuses == {200}
    assert double.rate_limited == 0
