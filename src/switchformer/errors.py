"""Errors shared across packages (configuration errors live in :mod:`switchformer.config`)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model; the message names the file."""
