"""The figures, re-exported from :mod:`hasb.plots` (their one home, below every layer that draws them)."""

from hasb.plots import *  # noqa: F401,F403
from hasb.plots import __all__  # noqa: F401
