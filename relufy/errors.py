"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class RelufyError(Exception):
    """A problem with the user's input (paths, files, options), not a bug in relufy."""
