"""The webhook relay: delivers what the database queued, as pg_net would for Supabase.

The database builds the payload itself (supabase_functions_stand_in.sql), so uuid and timestamp
formats are the real ones. Each delivery runs in its own thread and holds its connection open for
the trigger's timeout, the way the function needs it. Like pg_net, it never retries.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import psycopg
import requests

log = logging.getLogger(__name__)


class WebhookRelay:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.enabled = True  # off: deliveries are dropped, like pg_net's unlogged queue on a crash
        self.delivered: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inflight: set[threading.Thread] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="webhook-relay")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("listen sona_webhook")
            while not self._stop.is_set():
                self._drain(conn)
                for _ in conn.notifies(timeout=0.25, stop_after=1):
                    pass

    def _drain(self, conn: psycopg.Connection[Any]) -> None:
        rows = conn.execute(
            "update supabase_functions.local_queue set taken_at = now()"
            " where id in (select id from supabase_functions.local_queue where taken_at is null"
            " order by id for update skip locked) returning id, url, method, headers, body, timeout_ms"
        ).fetchall()
        for row in rows:
            if not self.enabled:
                conn.execute(
                    "update supabase_functions.local_queue set error = 'dropped' where id = %s",
                    (row[0],),
                )
                continue
            thread = threading.Thread(target=self._deliver, args=row, daemon=True, name=f"webhook-{row[0]}")
            with self._lock:
                self._inflight.add(thread)
            thread.start()

    def _deliver(
        self,
        queue_id: int,
        url: str,
        method: str,
        headers: dict[str, str],
        body: dict[str, Any],
        timeout_ms: int,
    ) -> None:
        status: int | None = None
        error: str | None = None
        try:
            response = requests.request(
                method, url, data=json.dumps(body), headers=headers, timeout=timeout_ms / 1000
            )
            status = response.status_code
        except requests.RequestException as exc:
            error = type(exc).__name__
        with self._lock:
            self.delivered.append({"id": queue_id, "status": status, "error": error})
            self._inflight.discard(threading.current_thread())
        try:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                conn.execute(
                    "update supabase_functions.local_queue set status_code = %s, error = %s where id = %s",
                    (status, error, queue_id),
                )
        except psycopg.Error:
            log.warning("could not record delivery %s", queue_id)

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)
