"""Where ffmpeg is. Kept apart from sona.audio (and pydub) because process_job checks for ffmpeg
before it claims anything, on the cold-start path."""

from __future__ import annotations

import os
import shutil
from functools import cache

from sona.errors import FfmpegMissing


@cache
def find_ffmpeg(configured: str | None = None) -> str:
    """FFMPEG_BINARY (which must then work), else ffmpeg on PATH, else the imageio-ffmpeg wheel's."""
    configured = configured or os.environ.get("FFMPEG_BINARY")
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise FfmpegMissing(f"FFMPEG_BINARY={configured} is not an executable ffmpeg")
        return found
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        pass
    raise FfmpegMissing(
        "ffmpeg was not found: set FFMPEG_BINARY, put ffmpeg on PATH, or "
        "pip install imageio-ffmpeg (the Cloud Functions image ships ffmpeg)"
    )
