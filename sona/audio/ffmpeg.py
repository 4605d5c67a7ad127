"""Where ffmpeg is. Kept apart from sona.audio.master (and pydub) because process_job checks for ffmpeg
before it claims anything, on the cold-start path."""

from __future__ import annotations

import os
import shutil
from functools import cache

from sona.errors import FfmpegMissing


@cache
def find_ffmpeg(configured: str | None = None) -> str:
    """FFMPEG_BINARY (which must then work), else the imageio-ffmpeg wheel's (in the runtime lock, so
    the function never depends on what the runtime image carries: DESIGN.md, Cloud Functions 2nd
    gen), else ffmpeg on PATH. The commands also run on an older system ffmpeg such as the 4.4 of
    Ubuntu 22's full image (checked by hand with a 4.2 build; see sona/audio/master.py's ebur128 note)."""
    configured = configured or os.environ.get("FFMPEG_BINARY")
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise FfmpegMissing(f"FFMPEG_BINARY={configured} is not an executable ffmpeg")
        return found
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        pass
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    raise FfmpegMissing(
        "ffmpeg was not found: set FFMPEG_BINARY, pip install imageio-ffmpeg (requirements.txt "
        "has it), or put ffmpeg on PATH"
    )
