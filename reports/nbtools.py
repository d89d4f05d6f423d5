"""Notebook-side helpers: guarded sections, figure display + saving, and the section manifest.

Used by ``reports/sensitivity.ipynb``.  A section that lacks its artifact prints which command
makes it and the notebook goes on; any other error is shown with its traceback, recorded as
``error`` in the manifest (``python -m reports.build`` then exits non-zero) and the notebook
still goes on.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from pathlib import Path

from .artifacts import ArtifactError, MissingArtifact
from .plots import DPI, figure_png_bytes

MANIFEST = "manifest.json"


class Report:
    """Collects section outcomes and figures of one notebook execution.

    Args:
        fig_dir: where figures go as ``<name>.png`` (None: display only).
    """

    def __init__(self, fig_dir: str | Path | None = None, dpi: int = DPI):
        self.fig_dir = Path(fig_dir) if fig_dir else None
        self.dpi = dpi
        self.sections: dict[str, dict] = {}
        self._current: str | None = None

    @contextlib.contextmanager
    def section(self, name: str):
        """Run a section's body; MissingArtifact → a visible note, other errors → traceback + 'error' status."""
        from IPython.display import Markdown, display

        self._current = name
        self.sections[name] = {"status": "ok", "figures": [], "message": ""}
        try:
            yield
        except MissingArtifact as e:
            self.sections[name].update(status="missing", message=str(e))
            display(
                Markdown(
                    f"> **Section skipped — missing artifact.** {e.what} not available.  \n"
                    f"> Produce it with: `{e.command}`"
                )
            )
            print(f"[{name}] missing: {e}")
        except (ArtifactError, Exception) as e:  # keep the other sections alive; the manifest flags it
            self.sections[name].update(status="error", message=f"{type(e).__name__}: {e}")
            display(Markdown(f"> **Section failed:** `{type(e).__name__}: {e}`"))
            traceback.print_exc(file=sys.stdout)
        finally:
            self._current = None

    def show(self, fig, name: str) -> None:
        """Display ``fig`` as a PNG (exact figure_size × dpi pixels) and save it as ``fig_dir/<name>.png``."""
        from IPython.display import Image, display

        from hasb import atomic_write_bytes

        png = figure_png_bytes(fig, dpi=self.dpi)
        if self.fig_dir is not None:
            atomic_write_bytes(self.fig_dir / f"{name}.png", png)
        if self._current is not None:
            self.sections[self._current]["figures"].append(f"{name}.png")
        display(Image(data=png, format="png"))

    def write_manifest(self) -> Path | None:
        """``fig_dir/manifest.json``: {"python": sys.executable, "sections": {name: {status, figures, message}}}."""
        if self.fig_dir is None:
            return None
        from hasb import atomic_write_text

        return atomic_write_text(
            self.fig_dir / MANIFEST, json.dumps({"python": sys.executable, "sections": self.sections}, indent=2)
        )
