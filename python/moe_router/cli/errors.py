"""The command line's error type and exit statuses."""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""
