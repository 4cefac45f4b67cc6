"""Exceptions the engine raises for bad input; each names the problem and the file."""

from __future__ import annotations

from pathlib import Path


class AFLocError(Exception):
    """Base class: an error a user can fix (bad file, bad prompt, bad checkpoint).

    The CLI turns it into one line on stderr and exit code 2.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class ImageReadError(AFLocError):
    """An input image is missing, unreadable, truncated, of the wrong shape or has bad pixels."""


class PromptError(AFLocError):
    """A prompt is empty or too long."""


class CheckpointError(AFLocError):
    """A model folder is missing, corrupt, of the wrong architecture, or fails its checksum."""


class ConfigError(AFLocError):
    """A configuration has unknown keys or invalid values."""


class DataError(AFLocError):
    """A dataset, manifest or mask set cannot be used."""
