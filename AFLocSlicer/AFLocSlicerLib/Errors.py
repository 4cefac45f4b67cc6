"""The one exception type the module shows to the user as a message box."""

from __future__ import annotations


class AFLocSlicerError(Exception):
    """A problem the user can fix (no volume, empty prompt, failed job, ...); the message says what and where."""


class JobCancelled(AFLocSlicerError):
    """The user cancelled a background job; nothing was added to the scene."""
