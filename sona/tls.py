"""One TLS context for every httpx client of an instance: building one reads the CA bundle, which
costs about 20 ms each time (httpx builds a fresh one per client by default)."""

from __future__ import annotations

import ssl
from functools import cache

import certifi


@cache
def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())
