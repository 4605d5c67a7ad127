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
    from sona.engines.stable_audio import StableAudioClient
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

    @cached_property
    def store(self) -> JobsStore:
        from sona.store.jobs import JobsStore

        return JobsStore(self.settings)

    @cached_property
    def ffmpeg(self) -> str:
        from sona.audio.ffmpeg import find_ffmpeg

        return find_ffmpeg(self.settings.ffmpeg_binary)

    @cached_property
    def provider(self) -> StableAudioClient:
        from sona.engines.stable_audio import StableAudioClient

        return StableAudioClient(self.settings)

    @cached_property
    def engines(self) -> Engines:
        """Each engine's client by the name sona/job/modes.py MODELS gives it (a client is only a session
        until its first call, so both are built)."""
        from sona.engines.stable_audio_3 import StableAudio3Client

        engines: dict[str, Engine] = {
            "stable-audio": self.provider,
            "stable-audio-3": StableAudio3Client(self.settings),
        }
        if self.settings.replicate_api_token is not None:  # settings require it for a tangoflux mode
            from sona.engines.replicate import ReplicateClient, TangoFluxEngine

            poll_s = self.settings.generation_poll_ms / 1000
            engines["tangoflux"] = TangoFluxEngine(ReplicateClient(self.settings), poll_interval_s=poll_s)
        return engines

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
