"""What one function instance builds once and reuses for every request (settings, clients, ffmpeg).

Adapters are imported on first use, so a cold start pays only for what its first request needs.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cached_property
from typing import TYPE_CHECKING

from sona.config import Settings, ignored_settings, load_settings
from sona.logs import setup_logging

if TYPE_CHECKING:
    from sona.engines.base import Engine, Engines
    from sona.job.pipeline import Pipeline
    from sona.store.jobs import JobsStore
    from sona.store.storage import AudioStorage
    from sona.task_queue import TaskQueue

log = logging.getLogger(__name__)


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        setup_logging(settings.log_level, settings.secret_values)
        # What `validate` would print, once per instance.
        for warning in [*settings.warnings(), *ignored_settings(os.environ)]:
            log.warning("%s", warning)
        self._ffmpeg_lock = threading.Lock()
        self._ffmpeg_lookup: threading.Thread | None = None
        self._ffmpeg_result: str | BaseException = ""

    @cached_property
    def store(self) -> JobsStore:
        from sona.store.jobs import JobsStore

        return JobsStore(self.settings)

    def look_for_ffmpeg(self) -> threading.Thread:
        """Start finding ffmpeg on a thread of its own, so the caller's work goes on beside it.
        Without FFMPEG_BINARY the imageio-ffmpeg wheel runs its binary once (`ffmpeg -version`,
        20 to 40 ms on a cold instance), which a cold worker would otherwise wait for before setting
        up its claim (PERFORMANCE.md, cold start). `ffmpeg` waits for the answer: the lookup's
        thread, started once per instance, ends once it has one."""
        with self._ffmpeg_lock:
            if self._ffmpeg_lookup is None:
                self._ffmpeg_lookup = threading.Thread(
                    target=self._find_ffmpeg, name="find-ffmpeg", daemon=True
                )
                self._ffmpeg_lookup.start()
            return self._ffmpeg_lookup

    def _find_ffmpeg(self) -> None:
        from sona.audio.ffmpeg import find_ffmpeg

        try:
            self._ffmpeg_result = find_ffmpeg(self.settings.ffmpeg_binary)
        except BaseException as exc:  # handed to the thread that asks for ffmpeg
            self._ffmpeg_result = exc

    @cached_property
    def ffmpeg(self) -> str:
        """The ffmpeg binary (FfmpegMissing when there is none), found once per instance."""
        self.look_for_ffmpeg().join()
        if isinstance(self._ffmpeg_result, BaseException):
            raise self._ffmpeg_result
        return self._ffmpeg_result

    @cached_property
    def engines(self) -> Engines:
        """Each model's engine, by model name (sona/catalog.py says which engine serves which model):
        the pipeline asks this, never the catalog. A client is only a session until its first call,
        so every engine the settings can reach is built; TangoFlux only with its token."""
        from sona.catalog import MODELS
        from sona.engines.stable_audio import StableAudioClient
        from sona.engines.stable_audio_3 import StableAudio3Client

        by_engine: dict[str, Engine] = {
            "stable-audio": StableAudioClient(self.settings),
            "stable-audio-3": StableAudio3Client(self.settings),
        }
        if self.settings.replicate_api_token is not None:  # settings require it for a tangoflux mode
            from sona.engines.replicate import ReplicateClient, TangoFluxEngine

            poll_s = self.settings.generation_poll_ms / 1000
            by_engine["tangoflux"] = TangoFluxEngine(ReplicateClient(self.settings), poll_interval_s=poll_s)
        return {name: by_engine[m.engine] for name, m in MODELS.items() if m.engine in by_engine}

    @cached_property
    def storage(self) -> AudioStorage:
        from sona.store.storage import AudioStorage

        return AudioStorage(self.settings)

    @cached_property
    def task_queue(self) -> TaskQueue:
        from sona.task_queue import OneShotHttp, TaskQueue

        return TaskQueue(self.settings, OneShotHttp())

    @cached_property
    def pipeline(self) -> Pipeline:
        from sona.job.pipeline import Pipeline

        return Pipeline(self.settings, self.store, self.engines, self.storage, self.ffmpeg)


_lock = threading.Lock()
_services: Services | None = None


def get_services() -> Services:
    """The instance's services, built on the first request (a ConfigError propagates)."""
    global _services
    with _lock:
        if _services is None:
            _services = Services(load_settings())
        return _services


def reset_services(services: Services | None = None) -> None:
    global _services
    with _lock:
        _services = services
