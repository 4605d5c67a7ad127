"""The capacity cap in front of a function URL: Cloud Run at max instances (slots, 10 s wait, 429, 504)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from devstack.emulators.cloud_run import NO_INSTANCE_LOG, CapacityCap
from devstack.serving import serve_in_thread, stop_server
from tests.support import wait_until


@dataclass
class Upstream:
    """A function that takes `?sleep=` seconds and echoes the body; it counts what runs at once."""

    busy: int = 0
    most_busy: int = 0
    finished: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        with self.lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        time.sleep(float(request.args.get("sleep", "0")))
        with self.lock:
            self.busy -= 1
            self.finished += 1
        body = request.get_data()
        headers = {"X-Echo": request.headers.get("X-Webhook-Secret", "")}
        return Response(body, status=200, content_type="application/json", headers=headers)(
            environ, start_response
        )


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    app = Upstream()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serve_in_thread(server, "test-upstream")
    app.url = f"http://127.0.0.1:{server.server_port}"
    yield app
    stop_server(server)


def capped(upstream: Upstream, **limits: Any) -> CapacityCap:
    cap = CapacityCap(upstream.url, **limits)
    cap.start()
    return cap


def post_all(url: str, count: int) -> list[requests.Response]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: requests.post(url, data=b"{}", timeout=30), range(count)))


def test_requests_beyond_the_slots_wait_then_get_cloud_runs_429(upstream: Upstream) -> None:
    cap = capped(upstream, instances=1, concurrency=2, queue_wait_s=0.3)
    try:
        answers = post_all(f"{cap.url}/?sleep=1.5", 4)
    finally:
        cap.stop()

    statuses = sorted(a.status_code for a in answers)
    refused = [a for a in answers if a.status_code == 429]
    assert statuses == [200, 200, 429, 429]
    assert all(
        "Rate exceeded." in a.text and a.headers["Content-Type"].startswith("text/html") for a in refused
    )
    assert cap.rejected == 2
    assert cap.log == [NO_INSTANCE_LOG, NO_INSTANCE_LOG]


def test_a_waiting_request_takes_a_slot_freed_within_the_wait(upstream: Upstream) -> None:
    cap = capped(upstream, instances=1, concurrency=1, queue_wait_s=3.0)
    try:
        answers = post_all(f"{cap.url}/?sleep=0.3", 3)
    finally:
        cap.stop()

    assert [a.status_code for a in answers] == [200, 200, 200]
    assert cap.rejected == 0


def test_never_more_than_instances_times_concurrency_reach_the_function(upstream: Upstream) -> None:
    cap = capped(upstream, instances=3, concurrency=2, queue_wait_s=10.0)
    try:
        answers = post_all(f"{cap.url}/?sleep=0.2", 18)
    finally:
        cap.stop()

    assert {a.status_code for a in answers} == {200}
    assert upstream.most_busy == 6
    assert cap.max_in_flight == 6


def test_a_request_past_the_function_timeout_gets_504_and_its_slot_stays_taken(upstream: Upstream) -> None:
    cap = capped(upstream, instances=1, concurrency=1, queue_wait_s=0.2, timeout_s=0.4)
    try:
        began = time.monotonic()
        late = requests.post(f"{cap.url}/?sleep=1.2", data=b"{}", timeout=30)
        answered_after = time.monotonic() - began
        meanwhile = requests.post(f"{cap.url}/", data=b"{}", timeout=30)
        wait_until(lambda: cap.in_flight == 0, timeout_s=10)  # the slow function ended: its slot is free
        after = requests.post(f"{cap.url}/", data=b"{}", timeout=30)
    finally:
        cap.stop()

    assert (late.status_code, late.text) == (504, "upstream request timeout")
    assert answered_after < 1.0
    assert meanwhile.status_code == 429  # the timed-out request still occupies the only instance
    assert after.status_code == 200
    assert cap.timed_out == 1
    assert upstream.finished == 2


def test_the_body_headers_and_status_pass_through(upstream: Upstream) -> None:
    cap = capped(upstream, instances=1, concurrency=1)
    try:
        answer = requests.post(
            f"{cap.url}/process_job", json={"job_id": "j-1"}, headers={"X-Webhook-Secret": "s"}, timeout=30
        )
    finally:
        cap.stop()

    assert answer.status_code == 200
    assert answer.json() == {"job_id": "j-1"}
    assert answer.headers["X-Echo"] == "s"
    assert cap.served == 1


def test_stop_leaves_no_thread_even_with_a_timed_out_request_running(upstream: Upstream) -> None:
    cap = capped(upstream, instances=1, concurrency=1, timeout_s=0.2)
    requests.post(f"{cap.url}/?sleep=3", data=b"{}", timeout=30)

    began = time.monotonic()
    cap.stop()

    assert time.monotonic() - began < 1.5
    assert not [t for t in threading.enumerate() if t.name.startswith("cloud-run")]
