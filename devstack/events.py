"""Waiting on events instead of the clock.

A test or a helper that waits for the local world to reach some state (a job's row, a double's
calls, a queue drained) waits on `CHANGES`: every part of the local stack that owns such state
(the database, through a NOTIFY at each commit; the pg_net relay; the Cloud Tasks emulator; Cloud
Run's cap; the providers' doubles) calls `CHANGES.notify()` after it changes, and a wait looks at
its condition again only then. So a wait ends the moment its condition holds, costs nothing while
nothing happens, and still gives up after its timeout, saying what it waited for.

The database's part: `DatabaseChanges` installs a statement-level trigger on every table of the
stack's own database (never in supabase/schemas or the migrations, never in a database the stack
was handed) that sends a NOTIFY naming the table; NOTIFY is delivered when the transaction commits,
so a wait sees a row the moment it can be read. Statement-level, and deduplicated by PostgreSQL
within a transaction, so the reclaim of 10,000 leases sends one NOTIFY, not 10,000.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

log = logging.getLogger(__name__)

CHANGED_CHANNEL = "devstack_changed"
# A wait over a database the stack did not make (a copy of production: no trigger may go there)
# has no NOTIFY to wake it: it looks again at this pace.
UNWATCHED_POLL_S = 0.05


class WaitTimedOut(TimeoutError):
    """A wait's condition did not hold within its timeout; the message says what was waited for."""


class Changes:
    """A count of changes anyone may wait on: each notify() wakes every waiter to look again."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def notify(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def count(self) -> int:
        with self._cond:
            return self._count

    def wait_past(self, seen: int, timeout_s: float) -> bool:
        """Until a change after the one counted as `seen`; False when the timeout passes first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._count != seen, max(0.0, timeout_s))

    def wait_until(
        self, check: Callable[[], Any], timeout_s: float, what: str = "", poll_s: float | None = None
    ) -> Any:
        """`check()`'s first true answer, looked for after each change (the count is read before
        each look, so a change made during one is never missed). Raises WaitTimedOut when no change
        comes before the timeout: a condition that came true unreported is a missing report, and
        fails here rather than ending the wait late. `poll_s` also looks at that pace, for a
        condition no event reports (see UNWATCHED_POLL_S)."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self.count()
            found = check()
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimedOut(f"waited {timeout_s:g} s for {what or describe(check)}")
            if not self.wait_past(seen, left if poll_s is None else min(left, poll_s)) and poll_s is None:
                raise WaitTimedOut(f"waited {timeout_s:g} s for {what or describe(check)} (nothing changed)")


# The process's one stream of changes: the parts of every stack in this process report to it.
CHANGES = Changes()


def describe(check: Callable[[], Any]) -> str:
    """The condition's source line, for a timeout's message."""
    try:
        return " ".join(inspect.getsource(check).split())
    except (OSError, TypeError):
        return getattr(check, "__qualname__", repr(check))


# -- the database's changes -----------------------------------------------------------------------
INSTALL = f"""
create schema if not exists devstack_events;
create or replace function devstack_events.notify_changed() returns trigger language plpgsql as $$
begin
  perform pg_notify('{CHANGED_CHANNEL}', tg_table_schema || '.' || tg_table_name);
  return null;
end $$;
do $$
declare t record;
begin
  for t in select n.nspname, c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where c.relkind in ('r', 'p') and not c.relispartition
              and n.nspname in ('public', 'storage', 'net', 'auth', 'supabase_functions')
  loop
    execute format('drop trigger if exists devstack_changed on %I.%I', t.nspname, t.relname);
    execute format('create trigger devstack_changed after insert or update or delete on %I.%I'
                   ' for each statement execute function devstack_events.notify_changed()',
                   t.nspname, t.relname);
  end loop;
end $$;
"""


class Notifications:
    """A LISTEN on `channels` in a thread of its own: `on_note(channel, payload, arrived)` for each
    NOTIFY, the moment it arrives (`arrived` on the wall clock, as the benchmark's other clocks)."""

    def __init__(
        self, database_url: str, channels: tuple[str, ...], on_note: Callable[[str, str, float], None]
    ) -> None:
        self._conn = psycopg.connect(database_url, autocommit=True)
        for channel in channels:
            self._conn.execute(f"listen {channel}")  # type: ignore[arg-type]  # our own names
        self._on_note = on_note
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="devstack-listen", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        # The timeout only bounds how long close() waits for this thread; a NOTIFY wakes it at once.
        try:
            while not self._stop.is_set():
                for note in self._conn.notifies(timeout=0.25):
                    self._on_note(note.channel, note.payload, time.time())
        except psycopg.Error as exc:
            if not self._stop.is_set():
                log.warning("devstack: listener ended after %s", type(exc).__name__)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._conn.close()


class DatabaseChanges:
    """The stack's own database reporting each commit that changed a table to CHANGES."""

    def __init__(self, database_url: str, changes: Changes = CHANGES) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(INSTALL)  # type: ignore[arg-type]  # a constant
        self._changes = changes
        self._notes = Notifications(database_url, (CHANGED_CHANNEL,), self._note)

    def _note(self, channel: str, payload: str, arrived: float) -> None:
        self._changes.notify()

    def close(self) -> None:
        self._notes.close()
