"""Output shared by the benchmarks: the command line they echo and one result row per line."""

from __future__ import annotations

import json
import shlex
import sys


def command_line(argv: list[str] | None) -> str:
    """``python <script> <args>`` as run (``argv`` given to ``main``, else the process's), shell-quoted."""
    return "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])


def print_row(row: dict, as_json: bool, text: str) -> None:
    """One result: ``row`` as a JSON line with ``--json``, else ``text``; flushed, so long runs show progress."""
    print(json.dumps(row) if as_json else text, flush=True)
