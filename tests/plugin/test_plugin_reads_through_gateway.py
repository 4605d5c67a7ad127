"""The plug-in's own reads, sent to the local gateway exactly as supabase-js 2.x puts them on the
wire, answer what the database returns to that role: the owner, an admin, anon.

How supabase-js's query builder (postgrest-js) sends a read, from its source and reference:
- `from(t).select(cols)` is `GET /rest/v1/t?select=<cols without spaces>`; with
  `{count: 'exact', head: true}` the method is HEAD and `Prefer: count=exact` is added, and the
  count is read back from the number after `/` in `Content-Range`.
- filters are query parameters `<column>=<operator>.<value>` in call order (`.not(c, 'is', null)`
  is `c=not.is.null`); `.order(c, {ascending: false})` is `order=c.desc`; `.limit(n)` is
  `limit=n`; `.range(a, b)` is `offset=a&limit=b-a+1`.
- `.single()` sets `Accept: application/vnd.pgrst.object+json`; PostgREST answers one object, or
  406 with code PGRST116 when zero or several rows match (the plug-in's balance read relies on it).
- every request carries `apikey` and `Authorization: Bearer` (the signed-in user's access token,
  or the key itself when nobody is signed in, new publishable keys included), `X-Client-Info`, and
  `Accept-Profile: public` on reads (the client's default schema).
- the query string is built by URLSearchParams: form encoding, so `,` is `%2C` and spaces are gone.

The reads are those of Plugin/ui/src/lib/api/jobs.ts, hooks/use-jobs.ts and use-billing.ts, and
api/admin.ts in JaimeAlonsoGA/sona-plugin (PLUGIN.md names the commits).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
import requests

from devstack.emulators.gateway import Gateway
from devstack.emulators.user_jwt import make_user_jwt
from tests.plugin.plugin_db import ADMIN, COMPLETED_CREATOR, MUSICIAN, OTHER_MUSICIAN, QUEUED_DESIGNER
from tests.support import connect

OBJECT = "application/vnd.pgrst.object+json"
WHO = {"owner": MUSICIAN, "admin": ADMIN, "anon": None}


@dataclass(frozen=True)
class Read:
    """One read: what supabase-js sends, and the SQL that asks the database the same thing."""

    name: str
    who: str  # owner, admin or anon
    method: str
    table: str
    params: tuple[tuple[str, str], ...]
    sql: str  # over the rows the role may see; %(user)s is the caller's id
    single: bool = False
    count: bool = False


READS = [
    Read(
        "poll one job (getJob)",
        "owner",
        "GET",
        "jobs",
        (("select", "*"), ("id", f"eq.{QUEUED_DESIGNER}")),
        f"select * from public.jobs where id = '{QUEUED_DESIGNER}'",
        single=True,
    ),
    Read(
        "my jobs, newest first (getUserJobs)",
        "owner",
        "GET",
        "jobs",
        (("select", "*"), ("order", "created_at.desc"), ("limit", "50")),
        "select * from public.jobs order by created_at desc limit 50",
    ),
    Read(
        "count of completed jobs (getTotalCompletedJobsCount)",
        "owner",
        "HEAD",
        "jobs",
        (("select", "*"), ("status", "eq.completed")),
        "select * from public.jobs where status = 'completed'",
        count=True,
    ),
    Read(
        "latest completed job with audio (useLatestJob)",
        "owner",
        "GET",
        "jobs",
        (
            ("select", "id,prompt,preview_path,created_at"),
            ("status", "eq.completed"),
            ("preview_path", "not.is.null"),
            ("order", "created_at.desc"),
            ("limit", "1"),
        ),
        "select id, prompt, preview_path, created_at from public.jobs where status = 'completed'"
        " and preview_path is not null order by created_at desc limit 1",
        single=True,
    ),
    Read(
        "token balance (fetchUserTokens)",
        "owner",
        "GET",
        "user_tokens",
        (("select", "*"), ("user_id", f"eq.{MUSICIAN}")),
        f"select * from public.user_tokens where user_id = '{MUSICIAN}'",
        single=True,
    ),
    Read(
        "transactions, newest 20 (fetchTokenTransactions)",
        "owner",
        "GET",
        "token_transactions",
        (("select", "*"), ("user_id", f"eq.{MUSICIAN}"), ("order", "created_at.desc"), ("limit", "20")),
        f"select * from public.token_transactions where user_id = '{MUSICIAN}'"
        " order by created_at desc limit 20",
    ),
    Read(
        "admin: recent jobs (getRecentJobs)",
        "admin",
        "GET",
        "jobs",
        (
            (
                "select",
                "id,user_id,user_email,mode,status,prompt,duration,skip_naming,quality,created_at,"
                "completed_at,error_message",
            ),
            ("order", "created_at.desc"),
            ("limit", "20"),
        ),
        "select id, user_id, user_email, mode, status, prompt, duration, skip_naming, quality,"
        " created_at, completed_at, error_message from public.jobs order by created_at desc limit 20",
    ),
    Read(
        "admin: generation stats (getGenerationStats)",
        "admin",
        "GET",
        "jobs",
        (("select", "mode,status,skip_naming,quality,duration,user_id,created_at"),),
        "select mode, status, skip_naming, quality, duration, user_id, created_at from public.jobs",
    ),
    Read(
        "admin: tokens used (getFinanceStats)",
        "admin",
        "GET",
        "token_transactions",
        (("select", "amount"), ("type", "eq.usage")),
        "select amount from public.token_transactions where type = 'usage'",
    ),
    Read(
        "admin: balances (getFinanceStats)",
        "admin",
        "GET",
        "user_tokens",
        (("select", "balance"),),
        "select balance from public.user_tokens",
    ),
    Read(
        "admin: transactions page (getTokenTransactions, range 0..99)",
        "admin",
        "GET",
        "token_transactions",
        (("select", "*"), ("order", "created_at.desc"), ("offset", "0"), ("limit", "100")),
        "select * from public.token_transactions order by created_at desc offset 0 limit 100",
    ),
    Read(
        "admin: admin users (getAdminUsers)",
        "admin",
        "GET",
        "admin_users",
        (("select", "*"), ("order", "created_at.desc")),
        "select * from public.admin_users order by created_at desc",
    ),
    Read(
        "landing page showcase, signed out (usePublicShowcaseJobs)",
        "anon",
        "GET",
        "jobs",
        (
            ("select", "id,prompt,enhanced_prompt,filename,mode,duration,created_at,public_path"),
            ("public", "eq.true"),
            ("status", "eq.completed"),
            ("public_path", "not.is.null"),
            ("order", "created_at.desc"),
            ("limit", "12"),
        ),
        "select id, prompt, enhanced_prompt, filename, mode, duration, created_at, public_path"
        " from public.jobs where public = true and status = 'completed' and public_path is not null"
        " order by created_at desc limit 12",
    ),
]


def supabase_js_headers(gateway: Gateway, who: str) -> dict[str, str]:
    """What supabase-js 2.119 puts on a read: the publishable key, and as Bearer the user's access
    token, or the key itself when signed out."""
    user = WHO[who]
    bearer = make_user_jwt(gateway.jwt_secret, user) if user else gateway.publishable_key
    return {
        "apikey": gateway.publishable_key,
        "Authorization": f"Bearer {bearer}",
        "X-Client-Info": "supabase-js-web/2.119.0",
        "Accept-Profile": "public",
    }


def send(gateway: Gateway, read: Read) -> requests.Response:
    headers = supabase_js_headers(gateway, read.who)
    if read.single:
        headers["Accept"] = OBJECT
    if read.count:
        headers["Prefer"] = "count=exact"
    query = urlencode(read.params)  # URLSearchParams' form encoding
    return requests.request(
        read.method, f"{gateway.url}/rest/v1/{read.table}?{query}", headers=headers, timeout=10
    )


def as_role(url: str, read: Read) -> list[dict[str, Any]]:
    """The rows the database returns to the read's role, rendered by the database as JSON."""
    user = WHO[read.who]
    role = "authenticated" if user else "anon"
    with connect(url, role, user) as conn:
        row = conn.execute(
            f"select coalesce(json_agg(t), '[]') from ({read.sql}) t"  # type: ignore[arg-type]
        ).fetchone()
    assert row is not None
    rows: list[dict[str, Any]] = next(iter(row.values()))
    return rows


@pytest.mark.parametrize("read", READS, ids=[r.name for r in READS])
def test_each_plugin_read_answers_what_the_database_returns_to_that_role(
    plugin_migrated_gateway: Gateway, plugin_migrated_db_url: str, read: Read
) -> None:
    expected = as_role(plugin_migrated_db_url, read)
    assert expected, "every read has rows to show in the fixture"
    answer = send(plugin_migrated_gateway, read)
    assert answer.status_code == 200, answer.text
    if read.count:
        assert answer.headers["Content-Range"] == f"*/{len(expected)}"
        assert answer.content == b""
    elif read.single:
        assert answer.headers["Content-Type"].startswith(OBJECT)
        assert [answer.json()] == expected
    else:
        assert answer.json() == expected
        assert answer.headers["Content-Range"] == f"0-{len(expected) - 1}/*"


def test_the_admin_sees_every_job_and_the_musician_only_their_own(plugin_migrated_gateway: Gateway) -> None:
    read = READS[1]
    seen = {
        who: {
            row["user_id"]
            for row in send(plugin_migrated_gateway, Read(**{**read.__dict__, "who": who})).json()
        }
        for who in ("owner", "admin")
    }
    assert seen["owner"] == {str(MUSICIAN)}
    assert seen["admin"] == {str(MUSICIAN), str(OTHER_MUSICIAN)}


def test_a_balance_that_does_not_exist_is_pgrst116_as_the_billing_page_expects(
    plugin_migrated_gateway: Gateway,
) -> None:
    """fetchUserTokens turns PGRST116 into a zero balance; any other answer is an error on screen."""
    read = Read(
        "someone else's balance",
        "owner",
        "GET",
        "user_tokens",
        (("select", "*"), ("user_id", f"eq.{OTHER_MUSICIAN}")),
        "",
        single=True,
    )
    answer = send(plugin_migrated_gateway, read)
    assert answer.status_code == 406
    assert answer.json() == {
        "code": "PGRST116",
        "details": "The result contains 0 rows",
        "hint": None,
        "message": "Cannot coerce the result to a single JSON object",
    }


def test_several_rows_for_one_object_is_pgrst116_with_their_number(plugin_migrated_gateway: Gateway) -> None:
    read = Read("all my jobs as one", "owner", "GET", "jobs", (("select", "id"),), "", single=True)
    answer = send(plugin_migrated_gateway, read)
    assert (answer.status_code, answer.json()["code"]) == (406, "PGRST116")
    assert answer.json()["details"].startswith("The result contains ")
    assert answer.headers["Proxy-Status"] == "PostgREST; error=PGRST116"


def test_a_page_with_an_exact_count_is_partial_content_with_its_range(
    plugin_migrated_gateway: Gateway,
) -> None:
    headers = {**supabase_js_headers(plugin_migrated_gateway, "admin"), "Prefer": "count=exact"}
    query = urlencode({"select": "id", "order": "created_at.desc", "offset": "1", "limit": "2"})
    answer = requests.get(f"{plugin_migrated_gateway.url}/rest/v1/jobs?{query}", headers=headers, timeout=10)
    total = int(answer.headers["Content-Range"].split("/")[1])
    assert (answer.status_code, answer.headers["Content-Range"]) == (206, f"1-2/{total}")
    assert len(answer.json()) == 2 and total > 3


def test_the_showcase_row_is_what_anon_reads_of_a_public_job(plugin_migrated_gateway: Gateway) -> None:
    answer = send(plugin_migrated_gateway, READS[-1])
    assert [row["id"] for row in answer.json()] == [str(COMPLETED_CREATOR)]


def test_generates_insert_asked_for_as_one_object_answers_the_row_with_its_id(
    plugin_migrated_gateway: Gateway, plugin_migrated_db_url: str
) -> None:
    """generate's `.insert([row]).select().single()` with the secret key: POST with the array,
    `columns` naming its keys, `select=*`, `Prefer: return=representation` and the singular Accept."""
    gateway = plugin_migrated_gateway
    row = {
        "user_id": str(MUSICIAN),
        "prompt": "a single object back",
        "duration": 5,
        "mode": "designer",
        "status": "queued",
        "quality": "high",
    }
    query = urlencode({"columns": ",".join(f'"{c}"' for c in row), "select": "*"})
    answer = requests.post(
        f"{gateway.url}/rest/v1/jobs?{query}",
        data=json.dumps([row]),
        headers={
            "apikey": gateway.secret_key,
            "Authorization": f"Bearer {gateway.secret_key}",
            "Content-Type": "application/json",
            "Content-Profile": "public",
            "Prefer": "return=representation",
            "Accept": OBJECT,
        },
        timeout=10,
    )
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert isinstance(job, dict) and uuid.UUID(job["id"])
    with connect(plugin_migrated_db_url) as conn:
        stored = conn.execute("select prompt from public.jobs where id = %s", (job["id"],)).fetchone()
    assert stored == {"prompt": "a single object back"}
