"""The one exception type that reaches the user as a one-line message (exit code 2)."""

from __future__ import annotations


class InputError(Exception):
    """Bad usage or bad input: a file, row, column or key at fault.

    The CLI prints ``str(err)`` on one line and exits 2; it never shows a traceback
    for these, so the message must name what is wrong and where.
    """

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")
