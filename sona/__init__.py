"""Sona's job function: claim a job row, generate audio with Stable Audio, store it, complete the row."""

__version__ = "0.1.0"
