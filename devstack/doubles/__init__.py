"""Doubles of the paid providers (Stable Audio, Replicate), answering by their documented contracts."""
