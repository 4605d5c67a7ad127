"""The Replicate double over real loopback HTTP: the contract it stands in for, as a client sees it."""

from __future__ import annotations

import io
import wave
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from werkzeug.wrappers import Request, Response

from devstack.doubles.replicate_double import VERSION, Answer, Outcome, ReplicateDouble
from devstack.doubles.replicate_webhooks import verify_webhook
from devstack.serving import serve_wsgi, stop_server
from tests.support import wait_until

TOKEN = "r8_sentinel-double-token-5e6f"
INPUT = {"prompt": "glass shattering on stone", "duration": 2, "steps": 25, "guidance_scale": 3.5}


@pytest.fixture
def double() -> Iterator[ReplicateDouble]:
    d = ReplicateDouble(TOKEN)
    d.start()
    yield d
    d.stop()


def create(double: ReplicateDouble, body: dict[str, Any] | None = None, **headers: str) -> requests.Response:
    return requests.post(
        f"{double.url}/predictions",
        json=body if body is not None else {"version": VERSION, "input": INPUT},
        headers={"authorization": f"Bearer {TOKEN}", **headers},
        timeout=70,
    )


def get(double: ReplicateDouble, prediction_id: str) -> requests.Response:
    return requests.get(
        f"{double.url}/predictions/{prediction_id}", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
    )


def until(check: Callable[[], Any], timeout_s: float = 10) -> Any:
    """The first truthy answer of check, looked for again each time a prediction of the double
    moves on (it runs them on its own clock and reports each step; reading one reports nothing)."""
    return wait_until(check, timeout_s)


def finished(double: ReplicateDouble, prediction_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        prediction: dict[str, Any] = get(double, prediction_id).json()
        return None if prediction["status"] in ("starting", "processing") else prediction

    ended_prediction: dict[str, Any] = until(ended)
    return ended_prediction


class Receiver:
    """A webhook endpoint on loopback that records what arrives and answers scripted statuses."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.statuses = statuses or []
        self._server, self.url = serve_wsgi(self, "127.0.0.1", 0, "webhook-receiver")

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        self.received.append(({k.lower(): v for k, v in request.headers.items()}, request.get_data()))
        status = self.statuses.pop(0) if self.statuses else 204
        return Response(status=status)(environ, start_response)

    def stop(self) -> None:
        stop_server(self._server)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


# -- predictions --------------------------------------------------------------------------------------


def test_a_create_answers_the_prediction_at_once_as_starting(double: ReplicateDouble) -> None:
    answer = create(double)
    prediction = answer.json()
    assert answer.status_code == 201
    assert prediction["status"] == "starting"
    assert prediction["output"] is None
    assert prediction["urls"]["get"] == f"{double.url}/predictions/{prediction['id']}"
    assert prediction["input"] == INPUT


def test_a_prediction_goes_from_starting_through_processing_to_succeeded(double: ReplicateDouble) -> None:
    double.generation_s = 0.5
    prediction_id = create(double).json()["id"]
    until(lambda: get(double, prediction_id).json()["status"] == "processing")
    done = finished(double, prediction_id)
    assert done["status"] == "succeeded"
    assert done["metrics"]["predict_time"] > 0


def test_the_output_is_a_wav_of_the_asked_length_served_without_the_token(double: ReplicateDouble) -> None:
    done = finished(double, create(double).json()["id"])
    audio = requests.get(done["output"], timeout=10)
    with wave.open(io.BytesIO(audio.content)) as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (44_100, 2)
        assert wav.getnframes() == 2 * 44_100
    assert audio.headers["content-type"] == "audio/wav"


def test_prefer_wait_holds_the_create_answer_until_the_prediction_ends(double: ReplicateDouble) -> None:
    answer = create(double, prefer="wait").json()
    assert answer["status"] == "succeeded"
    assert answer["output"].endswith("/output.wav")


def test_a_wait_that_runs_out_answers_the_prediction_as_it_is(double: ReplicateDouble) -> None:
    double.generation_s = 3
    assert create(double, prefer="wait=1").json()["status"] in ("starting", "processing")


def test_a_failed_prediction_carries_its_error_text(double: ReplicateDouble) -> None:
    double.outcomes(Outcome("failed", "CUDA out of memory"))
    done = finished(double, create(double).json()["id"])
    assert (done["status"], done["error"], done["output"]) == ("failed", "CUDA out of memory", None)


def test_every_prediction_made_counts_as_paid_and_refusals_do_not(double: ReplicateDouble) -> None:
    create(double)
    create(double, {"version": VERSION, "input": {**INPUT, "duration": 31}})
    create(double)
    assert double.predictions_created == 2


# -- the one-hour deletion -------------------------------------------------------------------------


def test_after_the_retention_the_output_is_removed_and_its_file_is_gone(double: ReplicateDouble) -> None:
    prediction_id = create(double).json()["id"]
    output_url = finished(double, prediction_id)["output"]
    double.retention_s = 0  # the hour has passed
    removed = get(double, prediction_id).json()
    assert removed["data_removed"] is True
    assert (removed["status"], removed["output"], removed["input"]) == ("succeeded", None, {})
    assert requests.get(output_url, timeout=10).status_code == 404


def test_a_prediction_deleted_by_hand_answers_404(double: ReplicateDouble) -> None:
    prediction_id = create(double).json()["id"]
    double.delete(prediction_id)
    answer = get(double, prediction_id)
    assert (answer.status_code, answer.json()["detail"]) == (404, "Not found.")


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(f"Bearer {TOKEN}", 201), (f"Token {TOKEN}", 201), ("Bearer r8_not-the-token", 401), ("", 401)],
)
def test_only_the_accounts_token_is_accepted(
    double: ReplicateDouble, authorization: str, status: int
) -> None:
    answer = create(double, authorization=authorization)
    assert answer.status_code == status
    if status == 401:
        assert answer.json() == {
            "title": "Unauthenticated",
            "detail": "You did not pass a valid authentication token",
            "status": 401,
        }


def test_an_unknown_version_is_refused_with_422(double: ReplicateDouble) -> None:
    answer = create(double, {"version": "0" * 64, "input": INPUT})
    assert (answer.status_code, answer.json()["title"]) == (422, "Invalid version or not permitted")


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"duration": 31}, "input.duration", "Must be less than or equal to 30"),
        ({"duration": 0}, "input.duration", "Must be greater than or equal to 1"),
        ({"steps": 201}, "input.steps", "Must be less than or equal to 200"),
        ({"steps": 2.5}, "input.steps", "Invalid type. Expected: integer"),
        ({"guidance_scale": 25}, "input.guidance_scale", "Must be less than or equal to 20"),
        ({"prompt": ""}, "input.prompt", "is required"),
    ],
)
def test_input_out_of_the_models_range_is_refused_with_the_field(
    double: ReplicateDouble, change: dict[str, Any], field: str, says: str
) -> None:
    answer = create(double, {"version": VERSION, "input": {**INPUT, **change}})
    problem = answer.json()
    assert (answer.status_code, problem["title"]) == (422, "Input validation failed")
    assert problem["invalid_fields"] == [{"field": field, "description": says}]
    assert double.predictions_created == 0


@pytest.mark.parametrize(
    ("status", "title"),
    [(402, "Insufficient credit"), (500, "Internal server error")],
)
def test_scripted_errors_answer_the_documented_problem(
    double: ReplicateDouble, status: int, title: str
) -> None:
    double.script(Answer(status))
    answer = create(double)
    assert (answer.status_code, answer.json()["title"]) == (status, title)
    assert double.predictions_created == 0


def test_a_throttled_request_says_when_the_limit_resets(double: ReplicateDouble) -> None:
    double.script(Answer(429, headers={"retry-after": "30"}))
    answer = create(double)
    assert answer.status_code == 429
    assert answer.json()["detail"] == "Request was throttled. Your rate limit resets in ~30s."
    assert answer.headers["retry-after"] == "30"


def test_a_scripted_answer_can_be_narrowed_to_gets(double: ReplicateDouble) -> None:
    double.script(Answer(500, on="get"))
    prediction_id = create(double).json()["id"]
    assert get(double, prediction_id).status_code == 500
    assert get(double, prediction_id).status_code == 200


# -- webhooks ----------------------------------------------------------------------------------------


def test_a_webhook_and_its_events_filter_are_sent_when_asked(double: ReplicateDouble) -> None:
    """Moved from test_replicate.py with the client's webhook parameters, which only tests used (the
    function waits by polling): the double keeps what a create asks for."""
    body = {
        "version": VERSION,
        "input": INPUT,
        "webhook": "http://127.0.0.1:9/hook",
        "webhook_events_filter": ["completed"],
    }
    record = double.predictions[create(double, body).json()["id"]]
    assert (record.webhook, record.events) == ("http://127.0.0.1:9/hook", ("completed",))


def test_the_webhook_is_the_prediction_signed_with_the_accounts_secret(
    double: ReplicateDouble, receiver: Receiver
) -> None:
    body = {
        "version": VERSION,
        "input": INPUT,
        "webhook": receiver.url,
        "webhook_events_filter": ["completed"],
    }
    prediction_id = create(double, body).json()["id"]
    headers, raw = until(lambda: receiver.received and receiver.received[-1])
    assert verify_webhook(double.webhook_secret, headers, raw) == headers["webhook-id"]
    assert b'"status": "succeeded"' in raw and prediction_id.encode() in raw


def test_the_events_filter_picks_which_events_are_sent(double: ReplicateDouble, receiver: Receiver) -> None:
    body = {"version": VERSION, "input": INPUT, "webhook": receiver.url}
    finished(double, create(double, body).json()["id"])
    until(lambda: len(double.deliveries) == 3)
    assert [d.event for d in double.deliveries] == ["start", "output", "completed"]

    filtered = {**body, "webhook_events_filter": ["completed"]}
    finished(double, create(double, filtered).json()["id"])
    until(lambda: len(double.deliveries) == 4)
    assert double.deliveries[3].event == "completed"


def test_a_failed_webhook_is_retried_with_the_same_id(double: ReplicateDouble) -> None:
    receiver = Receiver(statuses=[500])
    try:
        body = {
            "version": VERSION,
            "input": INPUT,
            "webhook": receiver.url,
            "webhook_events_filter": ["completed"],
        }
        create(double, body)
        until(lambda: len(double.deliveries) == 2)
    finally:
        receiver.stop()
    (first, _), (second, _) = receiver.received
    assert first["webhook-id"] == second["webhook-id"]
    assert [d.answered for d in double.deliveries] == [500, 204]


def test_the_signing_secret_is_served_to_the_account(double: ReplicateDouble) -> None:
    answer = requests.get(
        f"{double.url}/webhooks/default/secret", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert answer.json() == {"key": double.webhook_secret}
    assert double.webhook_secret.startswith("whsec_")
