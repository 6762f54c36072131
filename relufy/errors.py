"""User-facing errors and notices: the CLI prints an error's message on one line and exits
non-zero; a notice is one line on stderr about work that goes on."""

import sys


class RelufyError(Exception):
    """A problem with the user's input (paths, files, options), not a bug in relufy."""


def notice(message: str) -> None:
    """One line on stderr that is not an error (a kept activation, a skipped checkpoint, a restart)."""
    print(f"relufy: {message}".replace("\n", " "), file=sys.stderr, flush=True)
