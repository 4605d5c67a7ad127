"""Supabase Storage through storage3 (the package supabase-py ships): uploads and their URLs."""

from __future__ import annotations

import io
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, cast
from urllib.parse import quote, urlsplit

import httpx
from storage3 import SyncStorageClient
from storage3.exceptions import StorageApiError

from sona.audio.input_audio import MAX_BYTES, check_size
from sona.config import Settings
from sona.deadline import Deadline
from sona.errors import BadRequest, ServiceOutage, StorageRefused, StorageUnavailable, TransientError
from sona.retrying import retrying
from sona.store.bounded_http import DeadlineTransport
from sona.supabase_keys import request_headers
from sona.tls import tls_context

log = logging.getLogger(__name__)

CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "json": "application/json"}
CACHE_CONTROL_S = "31536000"  # a path is never rewritten with other audio: cache it for a year


def object_path(prefix: str, job_id: object, stamp: datetime, ext: str) -> str:
    """{STORAGE_PATH_PREFIX}/{job_id}_{timestamp}.{ext}; one timestamp for both files of an attempt."""
    return _join(prefix, f"{job_id}_{stamp.strftime('%Y%m%dT%H%M%S%fZ')}.{ext}")


def attempt_stamp() -> datetime:
    return datetime.now(UTC)


class BufferFile(io.RawIOBase):
    """A read-only, seekable file over a buffer, read without copying it whole (io.BytesIO would copy
    a bytearray). httpx reads the upload's body from it in chunks, and rewinds it for a retry."""

    def __init__(self, data: bytes | bytearray) -> None:
        super().__init__()
        self._data, self._at = data, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data[self._at : self._at + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._at += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: len(self._data)}[whence]
        self._at = max(0, base + offset)
        return self._at

    def tell(self) -> int:
        return self._at


class AudioStorage:
    # One bucket check per instance, not per job; it also learns whether the bucket is public.
    _public: ClassVar[dict[tuple[str, str], bool]] = {}
    _check_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, settings: Settings, *, timeout_s: float = 30.0) -> None:
        headers = request_headers(settings.supabase_service_role_key.get_secret_value())
        self._settings = settings
        self._client = SyncStorageClient(
            f"{settings.supabase_url}/storage/v1/",
            headers,
            # Each call ends by the job's deadline when one applies (upload, or Deadline.applies).
            http_client=httpx.Client(
                headers=headers,
                timeout=timeout_s,
                transport=DeadlineTransport(httpx.HTTPTransport(verify=tls_context())),
            ),
        )

    @property
    def bucket(self) -> str:
        return self._settings.supabase_storage_bucket

    def ensure_bucket(self) -> None:
        """Create the bucket when it is missing (private unless STORAGE_PUBLIC says otherwise), and
        learn whether it is public: a private bucket never gets public URLs (the plug-in's
        `audio-files` is private in production; docs/plugin-client.md)."""
        key = (self._settings.supabase_url, self.bucket)
        with self._check_lock:
            if key in self._public:
                return
            try:
                public = bool(self._client.get_bucket(self.bucket).public)
            except StorageApiError as exc:
                if str(exc.status) != "404":
                    raise _translate(exc) from None
                public = self._create_bucket()
            except httpx.HTTPError as exc:
                raise _unreachable(exc) from None
            self._public[key] = public

    @property
    def public(self) -> bool:
        """Whether the bucket serves public URLs (as ensure_bucket found it; private until then)."""
        return self._public.get((self._settings.supabase_url, self.bucket), False)

    def _create_bucket(self) -> bool:
        """Create the bucket; whether it is public (another instance may have created it first)."""
        options: dict[str, Any] = {
            "public": self._settings.storage_public,
            "allowed_mime_types": sorted(set(CONTENT_TYPES.values())),
        }
        limit = self._settings.storage_file_size_limit_bytes
        if limit is not None:  # else no bucket limit: only the project's global one applies
            options["file_size_limit"] = limit
        try:
            self._client.create_bucket(self.bucket, options=cast(Any, options))
            log.info("created storage bucket %s (public: %s)", self.bucket, options["public"])
            return bool(options["public"])
        except StorageApiError as exc:
            if str(exc.status) != "409":  # another instance created it first
                raise _bucket_refused(exc, self._settings) from None
        return bool(self._client.get_bucket(self.bucket).public)

    def upload(
        self,
        path: str,
        data: bytes | bytearray,
        ext: str,
        deadline: Deadline,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Upload (upsert, so a retried attempt can write again) and return the file's URL."""
        options: dict[str, Any] = {
            "content-type": CONTENT_TYPES[ext],
            "cache-control": CACHE_CONTROL_S,
            "upsert": "true",  # storage3 wants the string; a bool crashes it
        }
        if metadata is not None:
            options["metadata"] = metadata
        policy = retrying(
            f"upload of {path}",
            max_retries=self._settings.max_retries,
            base_delay_s=self._settings.internal_retry_delay_s,
            deadline=deadline,
        )
        with deadline.applies():  # this runs on the pipeline's upload thread too
            for attempt in policy:
                with attempt:
                    deadline.check("upload")
                    self._upload_once(path, data, options)
            return self.url(path)

    def _upload_once(self, path: str, data: bytes | bytearray, options: dict[str, Any]) -> None:
        # storage3 sends bytes as they are and streams a BufferedReader; anything else it would open
        # as a path. A bytearray (the master, cut in place) is streamed, never copied.
        body = data if isinstance(data, bytes) else io.BufferedReader(BufferFile(data))
        try:
            self._client.from_(self.bucket).upload(path, body, options)  # type: ignore[arg-type]
        except StorageApiError as exc:
            if str(exc.status) == "409":
                # Paths are unique per attempt, so an existing object is our own earlier try that
                # landed before its answer was lost.
                log.info("%s already stored by an earlier try", path)
                return
            raise _translate(exc) from None
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None

    def find_output(self, job_id: object) -> StoredOutput | None:
        """The files an earlier attempt of this job stored completely (its MP3, uploaded last,
        carries the audio info as metadata), so a retry can complete without paying again."""
        prefix = self._settings.storage_path_prefix
        bucket = self._client.from_(self.bucket)
        try:
            items = bucket.list(
                prefix,
                {
                    "search": f"{job_id}_",
                    "limit": 100,  # type: ignore[typeddict-item]
                    "sortBy": {"column": "name", "order": "desc"},
                },
            )
            names = {item["name"] for item in items}
            for name in (item["name"] for item in items):  # newest first, as listed
                wav = name.removesuffix(".mp3") + ".wav"
                if not name.endswith(".mp3") or wav not in names:
                    continue
                mp3_path, wav_path = _join(prefix, name), _join(prefix, wav)
                audio = (bucket.info(mp3_path).get("metadata") or {}).get("sona_audio")
                if audio:
                    return StoredOutput(self.url(wav_path), self.url(mp3_path), audio, wav_path, mp3_path)
        except StorageApiError as exc:
            raise _translate(exc) from None
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None
        return None

    def read_input(self, name: str, deadline: Deadline, max_bytes: int = MAX_BYTES) -> bytes:
        """An audio-to-audio input from the private inputs bucket, read with the service role under
        the job's deadline; its size is checked from its info before any byte is fetched."""
        policy = retrying(
            f"read of input {name}",
            max_retries=self._settings.max_retries,
            base_delay_s=self._settings.internal_retry_delay_s,
            deadline=deadline,
        )
        with deadline.applies():
            return policy(self._read_input_once, name, deadline, max_bytes)

    def _read_input_once(self, name: str, deadline: Deadline, max_bytes: int) -> bytes:
        bucket = self._client.from_(self._settings.supabase_input_bucket)
        try:
            deadline.check("input info")
            check_size(bucket.info(name).get("size"), max_bytes)
            deadline.check("input download")
            data = bucket.download(name)
        except StorageApiError as exc:
            raise _input_refused(exc) from None
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None
        check_size(len(data), max_bytes)
        return data

    def remove(self, names: list[str]) -> None:
        """Delete objects of the output bucket; a name already gone is no error (Storage answers
        only what it deleted)."""
        if not names:
            return
        try:
            self._client.from_(self.bucket).remove(names)
        except StorageApiError as exc:
            raise _translate(exc) from None
        except httpx.HTTPError as exc:
            raise _unreachable(exc) from None

    def url(self, path: str) -> str:
        """The file's URL, percent-encoded: names may hold spaces and punctuation Storage allows.
        A public bucket's is built locally; a private bucket's is signed for
        STORAGE_SIGNED_URL_TTL_S (the plug-in itself signs preview_path when it plays it)."""
        if self.public:
            # Built locally: the public URL needs no request.
            return self._object_url("public", path)
        try:
            signed = self._client.from_(self.bucket).create_signed_url(
                path, self._settings.storage_signed_url_ttl_s
            )
        except StorageApiError as exc:
            raise _translate(exc) from None
        # Storage answers the object name unencoded; only its token is kept from the answer.
        return f"{self._object_url('sign', path)}?{urlsplit(str(signed['signedURL'])).query}"

    def _object_url(self, kind: str, path: str) -> str:
        return (
            f"{self._settings.supabase_url}/storage/v1/object/{kind}/"
            f"{quote(self.bucket, safe='')}/{quote(path, safe='/')}"
        )


@dataclass(frozen=True)
class StoredOutput:
    wav_url: str
    mp3_url: str
    audio: dict[str, Any]
    wav_path: str
    mp3_path: str


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _unreachable(exc: httpx.HTTPError) -> TransientError:
    return StorageUnavailable("The file storage is unavailable", detail=type(exc).__name__)


def _bucket_refused(exc: StorageApiError, settings: Settings) -> Exception:
    """Storage refusing to create the bucket is the project's configuration, never the musician's
    request: an outage, so the job is released for a retry once the setting is fixed."""
    status = str(exc.status)
    if _temporary(status):
        return _translate(exc)
    limit = settings.storage_file_size_limit
    if status == "413":
        detail = (
            f"STORAGE_FILE_SIZE_LIMIT={limit} is above the project's global upload limit "
            "(Supabase dashboard, Storage settings; 50 MB on the Free plan): lower it or leave it "
            "empty for no bucket limit"
        )
    else:
        detail = (
            f"storage {status} {exc.code}: {exc.message}; check SUPABASE_STORAGE_BUCKET and "
            f"STORAGE_FILE_SIZE_LIMIT={limit or '(none)'} against the project's global upload limit"
        )
    return ServiceOutage(
        "The file storage is not set up to accept the audio; the job will be retried",
        code="storage_bucket_refused",
        detail=detail,
    )


def _input_refused(exc: StorageApiError) -> Exception:
    """Reading an input: missing is the musician's to fix; a temporary fault or a refused key is
    Storage's or the service's, as for any call (_translate)."""
    status = str(exc.status)
    detail = f"storage {status} {exc.code}"
    if status == "404":
        return BadRequest("The input file was not found; upload it again.", detail=detail)
    if _temporary(status) or status in ("401", "403"):
        return _translate(exc)
    return BadRequest("The input file could not be read.", detail=detail)


def _temporary(status: str) -> bool:
    """Storage's original status (a string in its body) says a retry may work."""
    return status.startswith("5") or status in ("429", "408")


def _translate(exc: StorageApiError) -> Exception:
    """Storage's original status travels as a string in the body; the kind follows from it."""
    status = str(exc.status)
    detail = f"storage {status} {exc.code}"
    if _temporary(status):
        return StorageUnavailable("The file storage had a temporary problem", detail=detail)
    if status == "413":
        return StorageRefused("The generated audio is larger than the storage allows", detail=detail)
    if status in ("401", "403"):
        # Storage refusing our key (rotated, wrong, or not the secret one): the project's fault.
        return ServiceOutage(
            "The file storage refused the service's credentials; your job will run when it is fixed",
            code="storage_refused",
            detail=detail,
        )
    return StorageRefused("The generated audio could not be stored", detail=detail)
