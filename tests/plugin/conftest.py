"""Fixtures: a database holding the real plug-in's schema and rows, bare or with this project's
migrations applied on top, each test getting its own clone of a session template; and the local
gateway over it with the rows' audio objects stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.database import apply_sql, create_database, drop_database, migrate
from devstack.emulators.gateway import Gateway, make_jwt
from devstack.stack import _stand_in
from tests.conftest import throwaway_database
from tests.plugin.plugin_db import build_plugin_database, store_plugin_audio
from tests.support import wav_bytes

PLUGIN_TEMPLATE = "plugin_template"
PLUGIN_EMPTY_TEMPLATE = "plugin_empty_template"
PLUGIN_MIGRATED_TEMPLATE = "plugin_migrated_template"
PLUGIN_REFUNDS_TEMPLATE = "plugin_refunds_template"


def _template(pg_server: str, name: str, build: object) -> str:
    drop_database(pg_server, name)
    url = create_database(pg_server, name, "template0")
    build(url)  # type: ignore[operator]
    return name


@pytest.fixture(scope="session")
def plugin_template(pg_server: str) -> str:
    return _template(pg_server, PLUGIN_TEMPLATE, build_plugin_database)


@pytest.fixture(scope="session")
def plugin_empty_template(pg_server: str) -> str:
    return _template(pg_server, PLUGIN_EMPTY_TEMPLATE, lambda url: build_plugin_database(url, rows=False))


@pytest.fixture(scope="session")
def plugin_migrated_template(pg_server: str, plugin_template: str) -> str:
    def build(url: str) -> None:
        build_plugin_database(url)
        migrate(url)
        apply_sql(url, _stand_in("supabase_functions_stand_in.sql"))

    return _template(pg_server, PLUGIN_MIGRATED_TEMPLATE, build)


@pytest.fixture(scope="session")
def plugin_refunds_template(pg_server: str) -> str:
    """The plug-in's schema with no rows, then every migration of this project (the refunds'
    included)."""

    def build(url: str) -> None:
        build_plugin_database(url, rows=False)
        migrate(url)

    return _template(pg_server, PLUGIN_REFUNDS_TEMPLATE, build)


@pytest.fixture
def plugin_refunds_db_url(pg_server: str, plugin_refunds_template: str) -> Iterator[str]:
    with throwaway_database(pg_server, plugin_refunds_template) as url:
        yield url


@pytest.fixture
def plugin_db_url(pg_server: str, plugin_template: str) -> Iterator[str]:
    """The plug-in's schema and rows, none of this project's migrations."""
    with throwaway_database(pg_server, plugin_template) as url:
        yield url


@pytest.fixture
def plugin_empty_db_url(pg_server: str, plugin_empty_template: str) -> Iterator[str]:
    """The plug-in's schema with no rows (and no users)."""
    with throwaway_database(pg_server, plugin_empty_template) as url:
        yield url


@pytest.fixture
def plugin_migrated_db_url(pg_server: str, plugin_migrated_template: str) -> Iterator[str]:
    """The plug-in's schema and rows, then every migration of this project, as a deploy would do."""
    with throwaway_database(pg_server, plugin_migrated_template) as url:
        yield url


def _gateway(url: str, storage: Path) -> Gateway:
    secret = "local-jwt-secret-for-plugin-tests"
    return Gateway(
        url,
        storage,
        service_role_key=make_jwt(secret, "service_role"),
        anon_key=make_jwt(secret, "anon"),
        jwt_secret=secret,
    )


@pytest.fixture
def plugin_gateway(plugin_db_url: str, tmp_path: Path) -> Iterator[Gateway]:
    """The local gateway over the bare plug-in database, every path the rows name stored."""
    gw = _gateway(plugin_db_url, tmp_path / "storage")
    gw.start()
    store_plugin_audio(gw, plugin_db_url, wav_bytes(0.5))
    yield gw
    gw.stop()


@pytest.fixture
def plugin_migrated_gateway(plugin_migrated_db_url: str, tmp_path: Path) -> Iterator[Gateway]:
    gw = _gateway(plugin_migrated_db_url, tmp_path / "storage")
    gw.start()
    store_plugin_audio(gw, plugin_migrated_db_url, wav_bytes(0.5))
    yield gw
    gw.stop()
