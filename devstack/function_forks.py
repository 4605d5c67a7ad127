"""Functions-framework processes forked from one server that has already imported the libraries
every function imports (functions-framework, Flask, gunicorn, pydantic, the HTTP clients), for the
test suite, which starts about 45 of them: a start costs about 0.2 CPU-s to its first answer
instead of 0.6 (2026-12-07, this 2-core VM), and the suite is bound by CPU (PERFORMANCE.md).

Each child is still a whole functions-framework process: a session of its own (a kill of its group
takes gunicorn's worker too), its own environment, working directory and log, running
functions-framework's own command line and serving real HTTP. Nothing of this project (main.py,
sona) is imported before the fork, so each function imports and configures its own code as a fresh
interpreter does. The server is the standard library's (multiprocessing's forkserver: it is
spawned, never forked from the caller's threads). `python -m devstack dev`, the demo and the
cold-start measurements keep starting plain interpreters (devstack/stack.py: FunctionProcess)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

# What a function imports before its first answer, and on its first job, outside this project.
PRELOAD = (
    "functions_framework",
    "functions_framework._cli",
    "functions_framework._http.gunicorn",
    "flask",
    "gunicorn.app.base",
    "gunicorn.arbiter",
    "gunicorn.glogging",
    "gunicorn.workers.gthread",
    "pydantic",
    "pydantic.main",
    "pydantic.fields",
    "pydantic.types",
    "httpx",
    "httpcore",  # httpx's transport (with h11, h2 and anyio), imported on its first request: 46 ms
    "requests",
    "urllib3",
    "storage3",
    "tenacity",
    "pydub",
    "imageio_ffmpeg",
    "certifi",
    "dotenv",
)


class ForkedFunction:
    """A forked function as FunctionProcess uses a Popen: its pid, poll() and wait()."""

    def __init__(self, process: BaseProcess) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        assert self._process.pid is not None  # set once started
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode  # negative: ended by that signal, as Popen's

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"function {self.pid}", timeout or 0)
        return self._process.exitcode


class FunctionForks:
    """Starts functions-framework processes from the fork server (started on first use, ended with
    the process that started it)."""

    def __init__(self, preload: Sequence[str] = PRELOAD) -> None:
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(preload))

    def start(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path) -> ForkedFunction:
        """`argv` as `python -m functions_framework` takes it; output appended to log_path."""
        # daemon: if the caller ends with the function still up, multiprocessing ends it (SIGTERM)
        process = self._context.Process(
            target=_serve, args=(list(argv), dict(env), str(log_path), str(cwd)), daemon=True
        )
        process.start()
        return ForkedFunction(process)


def _serve(argv: list[str], env: dict[str, str], log_path: str, cwd: str) -> None:
    """In the child: become what `python -m functions_framework ARGV` started in cwd with env, its
    output to log_path, would be; then run functions-framework's command line."""
    os.setsid()
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.clear()
    os.environ.update(env)  # putenv too: ffmpeg and other children see the function's environment
    os.chdir(cwd)
    sys.path.insert(0, cwd)  # as `python -m` puts the working directory first
    sys.argv = ["functions_framework", *argv]
    from functions_framework._cli import _cli

    _cli.main(args=argv, prog_name="functions-framework")
