"""The audio a job makes: the WAV master, the MP3 preview, loudness, peaks, and the input it may read."""
