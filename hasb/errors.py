"""The one error base of hasb.

Every error that a user can cause (bad input, a missing or malformed file, an infeasible budget) is a
``HasbError``; the CLIs catch exactly this class and print one line on stderr with exit code 2. Anything else
is a bug and keeps its traceback (exit code 1). ``HasbError`` derives from ``ValueError`` so code written
against the older per-module classes (all of which now derive from it) keeps working.
"""

from __future__ import annotations

__all__ = ["HasbError"]


class HasbError(ValueError):
    """A problem with the user's input or files; the message says what was wrong and what is accepted."""
