"""The pg_net and webhook-SQL stand-ins against real pg_net 0.20.x with Supabase's webhook SQL on
PostgreSQL 15.20, measured again (issue 25, "pg_net and the webhook SQL: where the stand-in is
wrong"). Each test names the item it holds the stand-in to; each failed on the stand-in as it was."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from devstack.database import apply_sql
from devstack.emulators.relay import WebhookRelay
from tests.support import sql, wait_until

GRANTED = ["supabase_admin", "supabase_functions_admin", "postgres", "anon", "authenticated", "service_role"]
REQUEST_FUNCTIONS = [
    "net.http_get(text, jsonb, jsonb, integer)",
    "net.http_post(text, jsonb, jsonb, jsonb, integer)",
]
A_ROLE_GRANTED_NOTHING = """
do $$ begin
  if not exists (select from pg_roles where rolname = 'sona_plain_caller') then
    create role sona_plain_caller nologin;
  end if;
end $$;
-- So that a role that is not a superuser (postgres on Supabase) may act as it.
grant sona_plain_caller to current_user;
"""


def one(db_url: str, query: str, *params: Any) -> Any:
    (row,) = sql(db_url, query, *params, role=None)
    return next(iter(row.values()))


# -- 1. who may call pg_net, and as whom ------------------------------------------------------------
@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_1_the_request_functions_run_as_their_owner_with_search_path_net(db_url: str, function: str) -> None:
    definer, config = sql(
        db_url, "select prosecdef, proconfig from pg_proc where oid = %s::regprocedure", function, role=None
    )[0].values()
    assert (definer, config) == (True, ["search_path=net"])


@pytest.mark.parametrize("function", REQUEST_FUNCTIONS)
def test_1_execute_is_revoked_from_public_and_granted_to_supabases_roles(db_url: str, function: str) -> None:
    apply_sql(db_url, A_ROLE_GRANTED_NOTHING)
    may = {
        role: one(db_url, "select has_function_privilege(%s, %s, 'execute')", role, function)
        for role in [*GRANTED, "sona_plain_caller"]
    }
    assert may == {**dict.fromkeys(GRANTED, True), "sona_plain_caller": False}


def test_1_a_role_granted_nothing_cannot_queue_a_request(db_url: str) -> None:
    apply_sql(db_url, A_ROLE_GRANTED_NOTHING)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sql(db_url, "select net.http_post('http://127.0.0.1:9/x')", role="sona_plain_caller")


@pytest.mark.parametrize(
    "name",
    [
        "net.http_delete(text, jsonb, jsonb, integer, jsonb)",
        "net.http_collect_response(bigint, boolean)",
        "net.worker_restart()",
        "net.wait_until_running()",
        "net.wake()",
    ],
)
def test_1_pg_nets_other_functions_exist(db_url: str, name: str) -> None:
    assert one(db_url, "select to_regprocedure(%s) is not null", name) is True


@pytest.mark.parametrize("name", ["net.request_status", "net.http_response", "net.http_response_result"])
def test_1_pg_nets_response_types_exist(db_url: str, name: str) -> None:
    assert one(db_url, "select to_regtype(%s) is not null", name) is True


# -- 2. supabase_functions.hooks and its owner --------------------------------------------------------
@pytest.mark.parametrize("role", ["anon", "authenticated", "service_role"])
def test_2_the_api_roles_may_read_insert_and_delete_the_hooks(db_url: str, role: str) -> None:
    may = {
        privilege: one(
            db_url, "select has_table_privilege(%s, 'supabase_functions.hooks', %s)", role, privilege
        )
        for privilege in ("select", "insert", "delete")
    }
    assert may == {"select": True, "insert": True, "delete": True}


def test_2_supabase_functions_admin_owns_http_request(db_url: str) -> None:
    owner = one(
        db_url,
        "select proowner::regrole::text from pg_proc"
        " where oid = 'supabase_functions.http_request()'::regprocedure",
    )
    assert owner == "supabase_functions_admin"


# -- 3. what the worker sends ----------------------------------------------------------------------
@dataclass
class Seen:
    url: str = ""
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)  # method, path


@pytest.fixture
def endpoint() -> Iterator[Seen]:
    """Answers /hop with a 307 to ?to=, anything else with 200; records each request whole."""
    seen = Seen()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            parts = urlsplit(self.path)
            seen.requests.append((self.command, parts.path, dict(self.headers.items()), body))
            if parts.path == "/hop":
                self.send_response(307)
                self.send_header("Location", parse_qs(parts.query)["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b'{"ok":true}')

        def do_GET(self) -> None:
            self.do_POST()

        def do_DELETE(self) -> None:
            self.do_POST()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    seen.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield seen
    server.shutdown()
    server.server_close()


@pytest.fixture
def relay(db_url: str) -> Iterator[WebhookRelay]:
    r = WebhookRelay(db_url, pause_s=0.2)
    r.start()
    yield r
    r.stop()


def delivered(db_url: str, url: str) -> dict[str, Any]:
    (row,) = sql(db_url, "select net.http_post(%s, '{\"n\": 1}'::jsonb) as id", url, role=None)
    found: list[dict[str, Any]] = []

    def answered() -> bool:
        found[:] = sql(db_url, "select * from net._http_response where id = %s", row["id"], role=None)
        return bool(found)

    wait_until(answered, timeout_s=10)
    return found[0]


def test_3_a_307_to_another_url_delivers_there_and_records_the_final_200(
    db_url: str, relay: WebhookRelay, endpoint: Seen
) -> None:
    response = delivered(db_url, f"{endpoint.url}/hop?to={endpoint.url}/final")
    assert (response["status_code"], response["content"]) == (200, '{"ok":true}'), response
    assert [(method, path, body) for method, path, _, body in endpoint.requests] == [
        ("POST", "/hop", b'{"n": 1}'),
        ("POST", "/final", b'{"n": 1}'),
    ]


def test_3_a_request_carries_accept_any_and_no_accept_encoding(
    db_url: str, relay: WebhookRelay, endpoint: Seen
) -> None:
    delivered(db_url, f"{endpoint.url}/plain")
    [(_, _, headers, _)] = endpoint.requests
    names = {name.lower(): value for name, value in headers.items()}
    assert names["accept"] == "*/*"
    assert "accept-encoding" not in names


def test_1_a_delete_is_sent_and_its_response_collected_as_pg_net_does(
    db_url: str, relay: WebhookRelay, endpoint: Seen
) -> None:
    (row,) = sql(db_url, "select net.http_delete(%s) as id", f"{endpoint.url}/gone", role=None)
    query = "select (r).status, (r).message, ((r).response).status_code from net._http_collect_response(%s) r"
    wait_until(lambda: sql(db_url, query, row["id"], role=None)[0]["status"] == "SUCCESS", timeout_s=10)
    assert sql(db_url, query, row["id"], role=None) == [
        {"status": "SUCCESS", "message": "ok", "status_code": 200}
    ]
    assert [(method, path) for method, path, _, _ in endpoint.requests] == [("DELETE", "/gone")]
