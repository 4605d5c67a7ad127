"""The job's deadline (sona/deadline.py): what a call still running when it passes gets."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from sona.deadline import Deadline
from sona.errors import DeadlineExceeded


def test_a_block_still_running_at_the_deadline_is_stopped_and_ends_as_the_deadlines() -> None:
    """Even when the block then returns normally: what a read gives after the cut (an SSL socket
    shut down from another thread reads on as a plain one) is not the answer."""
    stopped: list[float] = []
    with (
        pytest.raises(DeadlineExceeded, match="reading the body"),
        Deadline(0.05).ends(lambda: stopped.append(time.monotonic()), "reading the body"),
    ):
        time.sleep(0.15)  # a block that outlives its deadline: the wait is the behaviour
    assert len(stopped) == 1


def test_a_block_done_before_the_deadline_is_left_alone() -> None:
    stopped: list[float] = []
    before = set(threading.enumerate())
    with Deadline(5).ends(lambda: stopped.append(time.monotonic())):
        timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t not in before]
    for timer in timers:
        timer.join(10)  # cancelled, it ends now; left running, it would cut at 5 s and be seen below
    assert len(timers) == 1
    assert stopped == []


def test_a_socket_still_read_at_the_deadline_is_shut_down() -> None:
    left, right = socket.socketpair()
    try:
        with pytest.raises(DeadlineExceeded), Deadline(0.05).cuts(left):
            assert left.recv(10) == b""  # woken by the shutdown, not by data
    finally:
        left.close()
        right.close()
