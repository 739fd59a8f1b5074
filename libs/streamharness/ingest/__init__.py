"""Ingest: decode, validate, resample and bound frames, publish them to the ``frames`` topic."""
