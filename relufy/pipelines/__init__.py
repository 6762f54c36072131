"""The Makefile pipelines' own pieces: reports that tie the steps' outputs together."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import RelufyError


def run_command(command: Callable[[], object]) -> int:
    """``command()``; a refusal (``RelufyError``) as one line on stderr and exit status 2, else 0."""
    try:
        command()
    except RelufyError as e:
        print(f"relufy: error: {e}", file=sys.stderr)
        return 2
    return 0
