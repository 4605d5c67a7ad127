"""The suite's functions-framework processes, forked from a server that has imported their libraries
(devstack/function_forks.py): each is still a whole process of its own, and nothing of this project
was imported before its fork."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from devstack.function_forks import ForkedFunction
from devstack.stack import FunctionProcess

pytestmark = pytest.mark.slow

# A function that answers what its process is: environment, directory, session and what it imported.
PROBE = textwrap.dedent("""
    import json, os, sys

    import functions_framework


    @functions_framework.http
    def probe(request):
        print("probe answered", flush=True)
        ours = sorted(m for m in sys.modules if m.split(".")[0] in ("sona", "devstack", "tests"))
        return json.dumps({
            "only_here": os.environ.get("ONLY_HERE"),
            "leaked": os.environ.get("SONA_FORKS_LEAK"),
            "cwd": os.getcwd(),
            "session": os.getsid(0),
            "project_modules": ours,
        })
""")


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FunctionProcess]:
    (tmp_path / "main.py").write_text(PROBE)
    monkeypatch.setenv("SONA_FORKS_LEAK", "the test process's own")  # must not reach the function
    env = {"PATH": os.environ["PATH"], "ONLY_HERE": "the function's own"}
    function = FunctionProcess("probe", env, tmp_path / "probe.log", source=tmp_path / "main.py")
    yield function.wait_ready()
    function.stop()


def ended(process: psutil.Process) -> bool:
    """Gone, or a zombie its new parent has not reaped yet."""
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def answer(function: FunctionProcess) -> dict[str, object]:
    response = requests.post(function.url, timeout=10)
    assert response.status_code == 200
    return dict(json.loads(response.text))


def test_a_test_stacks_function_is_forked_and_serves_its_target(probe: FunctionProcess) -> None:
    assert isinstance(probe.process, ForkedFunction)
    assert answer(probe)["cwd"] == str(Path(__file__).resolve().parents[1])


def test_a_forked_function_has_only_the_environment_it_was_given(probe: FunctionProcess) -> None:
    seen = answer(probe)
    assert (seen["only_here"], seen["leaked"]) == ("the function's own", None)


def test_a_forked_function_leads_its_own_session_and_writes_its_own_log(probe: FunctionProcess) -> None:
    assert answer(probe)["session"] == probe.process.pid  # gunicorn's worker, in the arbiter's session
    probe.stop()
    assert "probe answered" in probe.output()


def test_nothing_of_this_project_is_imported_before_a_function_forks(probe: FunctionProcess) -> None:
    """Only the module that carries the child's entry point: sona and the stand-ins are each
    function's own imports, made with its own environment."""
    assert answer(probe)["project_modules"] == ["devstack", "devstack.function_forks"]


def test_a_kill_of_a_forked_function_ends_its_gunicorn_worker_and_frees_its_port(
    probe: FunctionProcess,
) -> None:
    answer(probe)  # served by gunicorn's worker, which the arbiter forks once it listens
    workers = psutil.Process(probe.process.pid).children()
    assert workers, "gunicorn's worker"
    probe.kill(signal.SIGKILL)
    assert probe.process.poll() == -signal.SIGKILL
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert all(ended(worker) for worker in alive)
    with pytest.raises(requests.ConnectionError):
        requests.post(probe.url, timeout=2)


def test_waiting_on_a_forked_function_that_runs_on_times_out_as_popen_does(probe: FunctionProcess) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        probe.process.wait(timeout=0.1)
    assert probe.process.poll() is None
    probe.stop()
    assert probe.process.poll() is not None


def test_another_interpreter_gets_a_process_of_its_own(tmp_path: Path) -> None:
    """The benchmarks time a production environment's python: never a fork of this one."""
    (tmp_path / "main.py").write_text(PROBE)
    other = str(Path(sys.executable).with_name("python3"))
    assert other != sys.executable and Path(other).exists()
    function = FunctionProcess("probe", {"PATH": os.environ["PATH"]}, tmp_path / "p.log", python=other)
    try:
        assert isinstance(function.process, subprocess.Popen)
    finally:
        function.kill()
