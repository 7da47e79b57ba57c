"""Exceptions and warnings that imagerec raises for its users.

A user error (a missing path, an unknown backbone, a bad value) raises :class:`ImagerecError`,
a ``ValueError``: its message names the value, the rule and the fix. The command line prints it
as one line and exits with status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ImagerecError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""


class ImagerecWarning(UserWarning):
    """A legal but degenerate situation, for example images that were skipped."""


class SkippedImagesWarning(ImagerecWarning):
    """Some images could not be read and were left out (the run goes on)."""
