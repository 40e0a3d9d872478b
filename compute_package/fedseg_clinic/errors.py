"""The one exception type for bad user input (files, values, settings).

The CLI turns a :class:`FedsegError` into a single line on stderr and a non-zero
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedsegError(Exception):
    """A user-facing error: the message names the file or value and the problem."""
