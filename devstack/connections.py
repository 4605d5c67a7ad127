"""Reused database connections for the local stack's and the tests' helpers.

Each new connection costs the server a backend start (a process, about 4 ms of CPU); the helpers
run a statement or two per call, thousands of times a suite. A `Connections` keeps the idle ones
and lends them out one at a time, each reset to a new session's state when lent (DISCARD ALL:
role, settings, locks, LISTENs, temporary tables; and its pending statistics flushed), so a
borrower sees what a fresh connection would show, except that a custom setting such as
request.jwt.claims reads '' instead of NULL (as on Supabase's pooled connections, which its SQL
reads through nullif). A borrowed connection is never shared: a second borrower (a nested helper
call, another thread) gets a connection of its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import RowFactory, dict_row

MAX_IDLE = 4  # what one caller nests at most; more would only hold server processes
# A process keeps idle connections to this many databases, the most recently used: a test worker
# goes through hundreds of databases, and idle connections to all of them would use up the
# server's max_connections.
MAX_DATABASES = 4


class Connections:
    def __init__(self, url: str) -> None:
        self.url = url
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._retired = False  # once closed, connections given back are closed, not kept

    @contextmanager
    def borrow(
        self, autocommit: bool = False, row_factory: RowFactory[Any] = dict_row
    ) -> Iterator[psycopg.Connection[Any]]:
        """A connection as psycopg.connect would give it: without autocommit, one transaction
        committed when the block ends and rolled back if it raises."""
        conn = self._take()
        conn.row_factory = row_factory
        conn.autocommit = autocommit
        try:
            yield conn
        except BaseException:
            self._give_back(conn, commit=False)
            raise
        self._give_back(conn, commit=True)

    def close(self) -> None:
        with self._lock:
            self._retired = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> psycopg.Connection[Any]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                # No prepared statements: DISCARD ALL would drop them under psycopg's cache.
                return psycopg.connect(self.url, prepare_threshold=None)
            try:
                conn.autocommit = True
                # The statistics of the last borrower's transactions are flushed, as a session's
                # end would: pg_stat_xact_* then counts this borrower's transaction alone.
                conn.execute("discard all")
                conn.execute("select pg_stat_force_next_flush()")
                return conn
            except psycopg.OperationalError:
                conn.close()  # its server process ended while idle (a forced drop, a restart)

    def _give_back(self, conn: psycopg.Connection[Any], commit: bool) -> None:
        if conn.closed or conn.broken:
            conn.close()
            return
        try:
            conn.commit() if commit else conn.rollback()
        except BaseException:
            conn.close()
            raise
        with self._lock:
            if not self._retired and len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()


_SHARED: OrderedDict[str, Connections] = OrderedDict()
_SHARED_LOCK = threading.Lock()


def shared(url: str) -> Connections:
    """This process's reused connections to one database (those of the least recently used
    database beyond MAX_DATABASES are closed)."""
    with _SHARED_LOCK:
        found = _SHARED.get(url)
        if found is None or found._retired:
            found = _SHARED[url] = Connections(url)
        _SHARED.move_to_end(url)
        retired = [_SHARED.popitem(last=False)[1] for _ in range(len(_SHARED) - MAX_DATABASES)]
    for connections in retired:
        connections.close()
    return found
