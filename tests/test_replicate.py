"""The TangoFlux client against the Replicate double over real loopback HTTP: the request it sends,
waiting and fetching, what every failure means for the job, the deadline, webhook signatures, and
the token kept out of every log line."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.doubles.replicate_double import Answer, Outcome, ReplicateDouble
from devstack.doubles.replicate_webhooks import WebhookRefused, verify_webhook
from sona.config import ConfigError, Settings
from sona.deadline import Deadline
from sona.engines.base import GenerationRequest
from sona.engines.replicate import (
    GUIDANCE_SCALE,
    MODEL_NAME,
    VERSION,
    CreateUnanswered,
    Prediction,
    PredictionGone,
    ReplicateClient,
    TangoFluxEngine,
    TangoFluxInput,
    readable,
)
from sona.errors import DeadlineExceeded, PermanentError, ServiceOutage, TransientError
from sona.job.modes import plan_job
from sona.rows import Job
from tests.support import make_settings, wait_until

TOKEN = "r8_sentinel-replicate-token-9a8b"
TANGO = TangoFluxInput.build(prompt="door creaking open slowly", duration=2, steps=25)


@pytest.fixture
def double() -> Iterator[ReplicateDouble]:
    d = ReplicateDouble(TOKEN)
    d.start()
    yield d
    d.stop()


class Sleeps(list[float]):
    """Records the client's backoff sleeps instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def settings_for(url: str, **overrides: Any) -> Settings:
    values = {"replicate_api_token": TOKEN, "replicate_api_url": url, "retry_delay_ms": 100, **overrides}
    return make_settings(**values)


def client_for(double: ReplicateDouble, sleeps: Sleeps | None = None, **overrides: Any) -> ReplicateClient:
    return ReplicateClient(
        settings_for(double.url, **overrides), sleep=sleeps if sleeps is not None else Sleeps()
    )


def wait_for_audio(client: ReplicateClient, prediction_id: str, budget_s: float = 30) -> Any:
    deadline = Deadline(budget_s)  # each look is a GET, which the double does not report as a change
    return wait_until(lambda: client.result(prediction_id, deadline), budget_s)


# -- the request ---------------------------------------------------------------------------------------


def test_a_create_sends_the_version_the_input_and_the_bearer_token(double: ReplicateDouble) -> None:
    prediction = client_for(double).create(TANGO, Deadline(30))
    (method, path, headers) = double.seen[0]
    record = double.predictions[prediction.id]
    assert (method, path) == ("POST", "/v1/predictions")
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert record.input == {
        "prompt": "door creaking open slowly",
        "duration": 2,
        "steps": 25,
        "guidance_scale": 3.5,
    }
    assert (prediction.status, prediction.output_url) == ("starting", None)


@pytest.mark.parametrize(
    ("quality", "steps"), [("low", 25), ("medium", 100), ("high", 200), ("standard", 100), ("draft", 25)]
)
def test_steps_follow_quality_as_the_plugins_worker_sent_them(
    double: ReplicateDouble, quality: str, steps: int
) -> None:
    """The plan decides the steps (sona/catalog.py); the engine sends them with the fixed guidance."""
    settings = settings_for(double.url, designer_model="tangoflux")
    row = Job.model_validate(
        {"id": uuid.uuid4(), "prompt": "rain", "duration": 5, "quality": quality, "mode": "designer"}
        | {"status": "queued"}
    )
    request = plan_job(row, settings).request
    generation_id = TangoFluxEngine(ReplicateClient(settings)).submit(request, Deadline(30))
    sent = double.predictions[generation_id].input
    assert (sent["steps"], sent["guidance_scale"]) == (steps, GUIDANCE_SCALE)


@pytest.mark.parametrize(("duration", "prompt"), [(31, "thunder"), (0, "thunder"), (5, "")])
def test_input_the_model_would_refuse_fails_before_anything_is_paid(
    double: ReplicateDouble, duration: int, prompt: str
) -> None:
    with pytest.raises(PermanentError, match="The sound effect engine cannot make this request"):
        TangoFluxInput.build(prompt=prompt, duration=duration, steps=100)
    assert double.predictions_created == 0


# -- waiting and fetching ----------------------------------------------------------------------------


def test_a_prediction_is_polled_until_it_succeeds_then_its_wav_is_downloaded(double: ReplicateDouble) -> None:
    client = client_for(double)
    prediction = client.create(TANGO, Deadline(30))
    audio = wait_for_audio(client, prediction.id)
    assert audio.data[:4] == b"RIFF"
    assert (audio.content_type, audio.model) == ("audio/wav", MODEL_NAME)
    assert double.predictions_created == 1


def test_a_running_prediction_has_no_audio_yet(double: ReplicateDouble) -> None:
    double.generation_s = 5
    client = client_for(double)
    prediction = client.create(TANGO, Deadline(30))
    assert client.result(prediction.id, Deadline(30)) is None


def test_the_output_file_is_fetched_without_the_token(double: ReplicateDouble) -> None:
    client = client_for(double)
    wait_for_audio(client, client.create(TANGO, Deadline(30)).id)
    file_requests = [headers for _, path, headers in double.seen if path.startswith("/files/")]
    assert file_requests
    assert not any("Authorization" in headers for headers in file_requests)


def test_prefer_wait_answers_the_finished_prediction_within_the_deadline(double: ReplicateDouble) -> None:
    prediction = client_for(double).create(TANGO, Deadline(30), wait_s=60)
    (_, _, headers) = double.seen[0]
    assert headers["Prefer"] == "wait=28"  # 60 s asked, cut to what the deadline leaves
    assert prediction.status == "succeeded" and prediction.output_url is not None


# -- failures and their kinds --------------------------------------------------------------------------


@pytest.mark.parametrize("on", ["create", "get"])
@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [
        (401, ServiceOutage, "provider_unauthorized"),
        (402, ServiceOutage, "provider_out_of_credits"),
        (403, ServiceOutage, "provider_edge_refused"),
        (429, TransientError, None),
        (500, TransientError, None),
        (503, TransientError, None),
        (422, PermanentError, None),
        (400, PermanentError, None),
    ],
)
def test_each_error_answer_maps_to_its_kind(
    double: ReplicateDouble, on: Any, status: int, kind: type[Exception], code: str | None
) -> None:
    client = client_for(double, max_retries=0)
    prediction_id = client.create(TANGO, Deadline(30)).id if on == "get" else ""
    double.script(Answer(status, on=on))
    with pytest.raises(kind) as caught:
        client.create(TANGO, Deadline(30)) if on == "create" else client.get(prediction_id, Deadline(30))
    assert type(caught.value) is kind
    assert getattr(caught.value, "code", None) == code


def test_an_account_refusal_says_the_service_not_the_prompt_is_at_fault(double: ReplicateDouble) -> None:
    double.script(Answer(402))
    with pytest.raises(ServiceOutage) as caught:
        client_for(double).create(TANGO, Deadline(30))
    assert "not a problem with your prompt" in caught.value.public_message
    assert "Insufficient credit" in (caught.value.detail or "")


def test_a_throttled_create_carries_the_retry_after(double: ReplicateDouble) -> None:
    double.script(Answer(429, headers={"retry-after": "7"}))
    with pytest.raises(TransientError) as caught:
        client_for(double, max_retries=0).create(TANGO, Deadline(30))
    assert caught.value.retry_after_s == 7


def test_a_throttled_then_accepted_create_waits_the_retry_after_and_pays_once(
    double: ReplicateDouble,
) -> None:
    sleeps = Sleeps()
    double.script(Answer(429, headers={"retry-after": "3"}), Answer(503))
    client_for(double, sleeps).create(TANGO, Deadline(30))
    assert sleeps[0] == 3 and len(sleeps) == 2
    assert double.predictions_created == 1


def test_invalid_input_the_api_refuses_is_permanent_with_its_reason(double: ReplicateDouble) -> None:
    unchecked = TangoFluxInput.model_construct(prompt="x", duration=45, steps=25, guidance_scale=3.5)
    with pytest.raises(PermanentError) as caught:
        client_for(double).create(unchecked, Deadline(30))
    assert caught.value.public_message == (
        "The sound effect engine could not accept the request: "
        "input.duration: Must be less than or equal to 30"
    )


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            'Traceback (most recent call last):\n  File "predict.py", line 9\n'
            "RuntimeError: CUDA out of memory",
            "The sound effect engine could not generate this sound: RuntimeError: CUDA out of memory",
        ),
        (
            "Prompt flagged; see https://replicate.com/docs/nsfw for details",
            "The sound effect engine could not generate this sound: Prompt flagged; see [link] for details",
        ),
        (None, "The sound effect engine could not generate this sound"),
    ],
)
def test_a_failed_prediction_is_permanent_with_its_error_made_readable(
    double: ReplicateDouble, error: str | None, message: str
) -> None:
    double.outcomes(Outcome("failed", error))
    client = client_for(double)
    prediction = client.create(TANGO, Deadline(30))
    with pytest.raises(PermanentError) as caught:
        wait_for_audio(client, prediction.id)
    assert caught.value.public_message == message


def test_a_canceled_prediction_is_permanent(double: ReplicateDouble) -> None:
    double.outcomes(Outcome("canceled"))
    client = client_for(double)
    with pytest.raises(PermanentError, match="canceled"):
        wait_for_audio(client, client.create(TANGO, Deadline(30)).id)


def test_a_long_error_text_is_cut_to_one_short_line() -> None:
    assert readable("x" * 500).endswith("…")
    assert len(readable("x" * 500)) == 200
    assert readable("bad\x00 input\t\tnow") == "bad input now"


# -- expired or unknown -------------------------------------------------------------------------------


def test_an_unknown_prediction_is_gone(double: ReplicateDouble) -> None:
    client = client_for(double)
    prediction_id = client.create(TANGO, Deadline(30)).id
    double.delete(prediction_id)
    with pytest.raises(PredictionGone):
        client.get(prediction_id, Deadline(30))


def test_a_prediction_past_the_hour_is_gone(double: ReplicateDouble) -> None:
    client = client_for(double)
    prediction_id = client.create(TANGO, Deadline(30)).id
    wait_for_audio(client, prediction_id)
    double.retention_s = 0  # the hour has passed
    with pytest.raises(PredictionGone, match="expired"):
        client.result(prediction_id, Deadline(30))


def test_an_output_file_deleted_before_it_was_fetched_is_gone(double: ReplicateDouble) -> None:
    client = client_for(double)
    prediction_id = client.create(TANGO, Deadline(30)).id
    url = wait_until(lambda: client.get(prediction_id, Deadline(30)).output_url, 30)
    double.retention_s = 0
    with pytest.raises(PredictionGone):
        client.download(url, Deadline(30))


def test_gone_is_not_retried_and_not_a_transient_kind(double: ReplicateDouble) -> None:
    sleeps = Sleeps()
    with pytest.raises(PredictionGone) as caught:
        client_for(double, sleeps).get("unknownprediction", Deadline(30))
    assert not isinstance(caught.value, TransientError | PermanentError)
    assert sleeps == []


# -- the deadline ------------------------------------------------------------------------------------


def test_the_deadline_ends_a_slow_poll(double: ReplicateDouble) -> None:
    client = client_for(double, max_retries=0)
    prediction_id = client.create(TANGO, Deadline(30)).id
    double.script(Answer(200, on="get", delay_s=3, passthrough=True))
    with pytest.raises(DeadlineExceeded):
        client.get(prediction_id, Deadline(1))


def test_the_deadline_ends_a_slow_download(double: ReplicateDouble) -> None:
    client = client_for(double, max_retries=0)
    prediction_id = client.create(TANGO, Deadline(30)).id
    wait_for_audio(client, prediction_id)
    url = client.get(prediction_id, Deadline(30)).output_url
    assert url is not None
    double.file_delay_s = 3
    with pytest.raises(DeadlineExceeded):
        client.download(url, Deadline(1))


def test_no_call_starts_when_the_deadline_is_spent(double: ReplicateDouble) -> None:
    with pytest.raises(DeadlineExceeded):
        client_for(double).create(TANGO, Deadline(0.2))
    assert double.seen == []


# -- a create whose answer is lost ---------------------------------------------------------------------


@pytest.fixture
def hangs_up() -> Iterator[tuple[str, list[bytes]]]:
    """An endpoint that reads each request, then closes the connection without answering."""
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                received.append(conn.recv(65536))

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1", received
    server.close()


def test_a_create_whose_answer_is_lost_is_not_sent_again(hangs_up: tuple[str, list[bytes]]) -> None:
    url, received = hangs_up
    sleeps = Sleeps()
    client = ReplicateClient(settings_for(url), sleep=sleeps)
    with pytest.raises(CreateUnanswered):
        client.create(TANGO, Deadline(30))
    assert len(received) == 1 and sleeps == []


def test_an_accepted_create_with_an_unreadable_answer_is_not_sent_again(double: ReplicateDouble) -> None:
    sleeps = Sleeps()
    double.script(Answer(201, on="create", body={"status": "starting"}))
    with pytest.raises(CreateUnanswered):
        client_for(double, sleeps).create(TANGO, Deadline(30))
    assert [m for m, _, _ in double.seen] == ["POST"] and sleeps == []


def test_a_create_that_never_connected_is_retried() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    sleeps = Sleeps()
    client = ReplicateClient(settings_for(f"http://127.0.0.1:{port}/v1", max_retries=2), sleep=sleeps)
    with pytest.raises(TransientError) as caught:
        client.create(TANGO, Deadline(30))
    assert not isinstance(caught.value, CreateUnanswered)
    assert len(sleeps) == 2


# -- the engine shape -------------------------------------------------------------------------------


def test_the_engine_pays_once_answers_the_id_then_fetches_the_audio(double: ReplicateDouble) -> None:
    engine = TangoFluxEngine(client_for(double), poll_interval_s=0.05)
    request = GenerationRequest("text-to-audio", MODEL_NAME, "a sword unsheathed", duration=2, steps=200)
    generation_id = engine.submit(request, Deadline(30))
    assert double.predictions[generation_id].input["steps"] == 200
    audio = wait_until(lambda: engine.fetch(generation_id, MODEL_NAME, Deadline(30)), 30)
    assert audio.data[:4] == b"RIFF"
    assert double.predictions_created == 1


def test_a_prediction_is_read_from_replicates_json() -> None:
    prediction = Prediction.from_json(
        {
            "id": "abc",
            "status": "succeeded",
            "output": ["https://replicate.delivery/x/output.wav"],
            "metrics": {"predict_time": 3.2},
            "data_removed": False,
        }
    )
    assert (prediction.output_url, prediction.predict_time_s, prediction.running) == (
        "https://replicate.delivery/x/output.wav",
        3.2,
        False,
    )


# -- webhook signatures -------------------------------------------------------------------------------

# The Standard Webhooks specification's published test vector (Replicate signs the same way).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_HEADERS = {
    "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "webhook-timestamp": "1614265330",
    "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
}
SIGNED_AT = 1614265330


def test_the_specifications_test_vector_is_accepted() -> None:
    assert (
        verify_webhook(VECTOR_SECRET, VECTOR_HEADERS, VECTOR_BODY, now=SIGNED_AT)
        == "msg_p5jXN8AQM9LWM0D4loKWxJek"
    )


@pytest.mark.parametrize(
    ("secret", "headers", "now"),
    [
        (VECTOR_SECRET.removeprefix("whsec_"), VECTOR_HEADERS, SIGNED_AT),  # pasted without its prefix
        (VECTOR_SECRET, {k.title(): v for k, v in VECTOR_HEADERS.items()}, SIGNED_AT),  # header case
        (
            VECTOR_SECRET,
            {**VECTOR_HEADERS, "webhook-signature": "v1,b3RoZXI= " + VECTOR_HEADERS["webhook-signature"]},
            SIGNED_AT,
        ),
        (VECTOR_SECRET, VECTOR_HEADERS, SIGNED_AT + 299),  # within the tolerance
        (VECTOR_SECRET, VECTOR_HEADERS, SIGNED_AT - 299),
    ],
)
def test_a_genuine_delivery_is_accepted(secret: str, headers: dict[str, str], now: int) -> None:
    assert verify_webhook(secret, headers, VECTOR_BODY, now=now)


@pytest.mark.parametrize(
    ("secret", "headers", "body", "now", "reason"),
    [
        (VECTOR_SECRET, VECTOR_HEADERS, b'{"test": 2432232315}', SIGNED_AT, "no signature matches"),
        (
            "whsec_" + "QUFBQUFBQUFBQUFBQUFBQQ==",
            VECTOR_HEADERS,
            VECTOR_BODY,
            SIGNED_AT,
            "no signature matches",
        ),
        (
            VECTOR_SECRET,
            {**VECTOR_HEADERS, "webhook-id": "msg_other"},
            VECTOR_BODY,
            SIGNED_AT,
            "no signature",
        ),
        (VECTOR_SECRET, VECTOR_HEADERS, VECTOR_BODY, SIGNED_AT + 301, "from our clock"),  # replayed later
        (VECTOR_SECRET, VECTOR_HEADERS, VECTOR_BODY, SIGNED_AT - 301, "from our clock"),  # from the future
        (
            VECTOR_SECRET,
            {**VECTOR_HEADERS, "webhook-timestamp": "yesterday"},
            VECTOR_BODY,
            SIGNED_AT,
            "whole seconds",
        ),
        (
            VECTOR_SECRET,
            {"webhook-id": "msg_1", "webhook-timestamp": "1614265330"},
            VECTOR_BODY,
            SIGNED_AT,
            "missing",
        ),
        (
            VECTOR_SECRET,
            {
                **VECTOR_HEADERS,
                "webhook-signature": VECTOR_HEADERS["webhook-signature"].replace("v1,", "v2,"),
            },
            VECTOR_BODY,
            SIGNED_AT,
            "no signature matches",
        ),
    ],
)
def test_a_forged_altered_or_stale_delivery_is_refused(
    secret: str, headers: dict[str, str], body: bytes, now: int, reason: str
) -> None:
    with pytest.raises(WebhookRefused, match=reason):
        verify_webhook(secret, headers, body, now=now)


# -- secrets --------------------------------------------------------------------------------------------


def test_the_token_never_reaches_a_log_line_or_an_error(
    double: ReplicateDouble, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_for(double)
    errors: list[Exception] = []
    with caplog.at_level(logging.DEBUG):
        wait_for_audio(client, client.create(TANGO, Deadline(30)).id)
        for status in (401, 402, 429, 500):
            double.script(Answer(status))
            try:
                client_for(double, max_retries=0).create(TANGO, Deadline(30))
            except Exception as exc:  # every kind is inspected below
                errors.append(exc)
    assert caplog.records
    assert not any(TOKEN in record.getMessage() for record in caplog.records)
    assert len(errors) == 4
    assert not any(TOKEN in f"{exc} {exc!r} {getattr(exc, 'detail', '')}" for exc in errors)


def test_the_token_is_a_secret_of_the_settings() -> None:
    settings = settings_for("http://127.0.0.1:9/v1")
    assert TOKEN in settings.secret_values
    assert TOKEN not in repr(settings) and TOKEN not in json.dumps(settings.model_dump(mode="json"))


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("replicate_api_token", f"Bearer {TOKEN}", "REPLICATE_API_TOKEN must be the token alone"),
        ("replicate_api_token", f"'{TOKEN}'", "REPLICATE_API_TOKEN must not contain spaces or quotes"),
        ("replicate_api_url", "api.replicate.com/v1", "REPLICATE_API_URL must start with http"),
    ],
)
def test_a_bad_replicate_setting_is_named_without_its_value(field: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_for("http://127.0.0.1:9/v1", **{field: value})
    assert says in str(caught.value)
    assert value not in str(caught.value)


def test_the_api_url_defaults_to_replicates_and_an_empty_token_is_unset() -> None:
    settings = make_settings(replicate_api_token="  ")
    assert settings.replicate_api_url == "https://api.replicate.com/v1"
    assert settings.replicate_api_token is None
    with pytest.raises(ConfigError, match="REPLICATE_API_TOKEN is required"):
        ReplicateClient(settings)


def test_the_version_is_the_one_the_plugin_pinned() -> None:
    assert VERSION == "fcdc421786888a045329d7c4e1874764433a2516b21f4c34bd3da4e054d04cf9"


def test_an_output_answered_inline_as_a_data_url_is_decoded_without_a_request(
    double: ReplicateDouble,
) -> None:
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt "
    url = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    prediction = Prediction.from_json({"id": "abc", "status": "succeeded", "output": url})
    assert prediction.output_url == url
    assert client_for(double).download(url, Deadline(30)) == wav
    assert double.seen == []
