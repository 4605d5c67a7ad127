"""An upload's body as the local Storage receives it: streamed into a spool file beside the stored
objects and hashed on the way (the ETag is the body's MD5), so a 10 MB master is written once and
renamed into place, never spilled to a temp file, read back and copied in memory.

Why it matters: the local gateway runs on the function's own two cores, beside the MP3 encode that
the WAV upload overlaps. Parsing with werkzeug's default spill file cost the stand-in about 68 ms of
CPU per 10 MB upload (PERFORMANCE.md, the job path); production's Storage runs elsewhere.

What Storage takes (what storage3 and supabase-js send): a multipart form whose `file` part is the
object, with `cacheControl` seconds and `metadata` JSON as fields; or a raw body with Cache-Control
and `x-metadata` (base64 JSON) headers. The parse itself stays werkzeug's.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import mimetypes
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from werkzeug.formparser import parse_form_data
from werkzeug.wrappers import Request

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

_COPY_CHUNK = 1 << 20


class _HashingSpool(io.FileIO):
    """A file that keeps the MD5 and the size of what is written to it; werkzeug's form parser
    writes a file part into it as the part arrives (in its 64 KB reads: no buffering needed)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "w")
        self.path = path
        self.size = 0
        self._md5 = hashlib.md5(usedforsecurity=False)

    def write(self, data: ReadableBuffer) -> int:
        """All of it: the parser ignores the count a raw write answers."""
        view = memoryview(data).cast("B")
        whole = len(view)
        self._md5.update(view)
        self.size += whole
        while view:
            view = view[super().write(view) or 0 :]
        return whole

    @property
    def etag(self) -> str:
        return f'"{self._md5.hexdigest()}"'


@dataclass
class ReceivedUpload:
    """One upload's body, spooled: move it into place with `keep`, or `discard` it. Use it as a
    context manager so a refused upload leaves no spool behind."""

    content_type: str
    cache_control: str
    metadata: dict[str, Any] | None
    size: int
    etag: str
    spool: Path

    def keep(self, target: Path) -> None:
        """Rename the body into place (the same filesystem: atomic, no copy)."""
        self.spool.replace(target)

    def discard(self) -> None:
        self.spool.unlink(missing_ok=True)

    def __enter__(self) -> ReceivedUpload:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()


def receive_upload(request: Request, spool_dir: Path) -> ReceivedUpload:
    """Spool the request's object bytes into `spool_dir` (the objects' folder: a rename moves them).
    Raises ValueError when its metadata is not JSON; nothing is left behind then."""
    spools: list[_HashingSpool] = []

    def spool(
        total_content_length: int | None = None,
        content_type: str | None = None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> _HashingSpool:
        spools.append(_HashingSpool(spool_dir / f".incoming-{uuid.uuid4().hex}"))
        return spools[-1]

    kept: _HashingSpool | None = None
    try:
        if request.mimetype == "multipart/form-data":
            _, form, files = parse_form_data(request.environ, stream_factory=spool)
            part = files.get("file")
            kept = part.stream if part is not None else spool()  # type: ignore[assignment]
            assert isinstance(kept, _HashingSpool)
            content_type = (part.mimetype if part is not None and part.mimetype else None) or (
                mimetypes.guess_type(request.path)[0] or "text/plain"
            )
            raw_meta = form.get("metadata")
            seconds = form.get("cacheControl")
            metadata = json.loads(raw_meta) if raw_meta else None
            cache_control = f"max-age={seconds}" if seconds else "no-cache"
        else:
            kept = spool()
            shutil.copyfileobj(request.stream, kept, _COPY_CHUNK)  # type: ignore[misc]
            header = request.headers.get("x-metadata")
            metadata = json.loads(base64.b64decode(header)) if header else None
            content_type = request.mimetype or "text/plain"
            cache_control = request.headers.get("cache-control") or "no-cache"
    except BaseException:
        kept = None
        raise
    finally:
        for each in spools:
            each.close()
            if each is not kept:
                each.path.unlink(missing_ok=True)
    return ReceivedUpload(content_type, cache_control, metadata, kept.size, kept.etag, kept.path)
