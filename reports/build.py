"""``python -m reports.build --run DIR --out report.html``: execute the sensitivity notebook headless, export HTML.

Steps: read ``reports/sensitivity.ipynb``; insert a cell after the one tagged ``parameters`` that sets
``run_dir`` and ``fig_dir`` (what papermill does, with nbformat only); execute it with nbclient on the
``python3`` kernel; export HTML (nbconvert, images embedded as base64, so the file stands alone); figures
are also saved as ``<out stem>_figures/<section>.png`` beside the HTML.

Kernel: nbclient starts kernel spec ``python3``.  jupyter_client replaces a spec's ``python`` command by
the running interpreter, so the kernel is this process's Python (the venv); the notebook records its
``sys.executable`` in the manifest and the build warns if it differs.  The repository root is put on the
kernel's PYTHONPATH so ``reports``/``hasb`` resolve to this checkout.

Exit status: 0 when every section rendered or was skipped for a missing artifact; 1 when a section
raised an error (the HTML is still written, with the traceback shown); 2 for bad arguments.
"""
from __future__ import annotations

from hasb.errors import HasbError
import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(__file__).with_name("sensitivity.ipynb")


class BuildError(HasbError):
    """The report cannot be built (missing run dir, notebook without a parameters cell, kernel failure)."""


def inject_parameters(nb, params: dict):
    """Return a copy of ``nb`` with a cell assigning ``params`` inserted after the ``parameters``-tagged cell.

    Values are written with ``repr`` of str/int/float/bool/None only, so no user text is executed as code.
    """
    import nbformat
    for k, v in params.items():
        if not k.isidentifier() or not (v is None or isinstance(v, (str, int, float, bool))):
            raise BuildError(f"parameter {k!r}={v!r}: accepted identifiers with str/int/float/bool/None values")
    nb = copy.deepcopy(nb)
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if idx is None:
        raise BuildError("the notebook has no cell tagged 'parameters'")
    src = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(idx + 1, cell)
    return nb


def execute(nb, cwd: Path, timeout: int = 600, kernel_name: str = "python3"):
    """Run ``nb`` in a fresh kernel (cwd = ``cwd``); returns the executed notebook."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    env_backup = {k: os.environ.get(k) for k in ("MPLBACKEND", "PYTHONPATH")}
    # The kernel inherits this environment: headless matplotlib, and this checkout importable.
    os.environ["MPLBACKEND"] = "Agg"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env_backup["PYTHONPATH"]]
                                                             if env_backup["PYTHONPATH"] else []))
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, allow_errors=False,
                                resources={"metadata": {"path": str(cwd)}})
        client.execute()
    except CellExecutionError as e:
        # Sections trap their own errors; reaching here means setup failed (imports, run dir).
        raise BuildError(f"notebook setup failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        for k, v in env_backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def export_html(nb, show_code: bool = False) -> str:
    """Standalone HTML: output images are inlined as base64; markdown images too (embed_images)."""
    from nbconvert import HTMLExporter
    exporter = HTMLExporter(embed_images=True, exclude_input_prompt=True, exclude_output_prompt=True,
                            exclude_input=not show_code)
    body, _ = exporter.from_notebook_node(nb)
    return body


def build(run_dir: os.PathLike, out: os.PathLike, notebook: os.PathLike = NOTEBOOK, show_code: bool = False,
          save_notebook: bool = False, timeout: int = 600) -> dict:
    """Build the report; returns the manifest ({"python", "sections": {name: {status, figures, message}},
    "html", "fig_dir"}).  Raises BuildError for a missing run directory or a failing notebook setup."""
    import nbformat
    from hasb import atomic_write_text

    run = Path(run_dir)
    if not run.is_dir():
        raise BuildError(f"run directory {str(run)!r} does not exist; create it with python -m analysis.sensitivity "
                         f"--out {run}, python -m hasb.train --out {run}/supernet, python -m search.pareto --out {run}")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise BuildError(f"--out {str(out)!r}: expected a .html file name")
    fig_dir = out.with_name(out.stem + "_figures")
    t0 = time.time()
    print(f"[reports.build] reading {notebook}", flush=True)
    nb = nbformat.read(str(notebook), as_version=4)
    # Render figures into a scratch dir first so a failed build never leaves a half-replaced figure folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_figs = Path(tempfile.mkdtemp(prefix=f".{fig_dir.name}.", dir=out.parent))
    try:
        nb = inject_parameters(nb, {"run_dir": str(run.resolve()), "fig_dir": str(tmp_figs.resolve())})
        print(f"[reports.build] executing {len(nb.cells)} cells on kernel python3 (run {run})", flush=True)
        nb = execute(nb, cwd=REPO, timeout=timeout)
        print(f"[reports.build] executed in {time.time() - t0:.1f}s; exporting HTML", flush=True)
        html = export_html(nb, show_code=show_code)
        man_path = tmp_figs / "manifest.json"
        manifest = json.loads(man_path.read_text()) if man_path.is_file() else {"python": None, "sections": {}}
        if fig_dir.exists():
            shutil.rmtree(fig_dir)
        os.replace(tmp_figs, fig_dir)
    finally:
        if tmp_figs.exists():
            shutil.rmtree(tmp_figs, ignore_errors=True)
    atomic_write_text(out, html)
    if save_notebook:
        atomic_write_text(out.with_suffix(".ipynb"), nbformat.writes(nb))
    kernel_py = manifest.get("python")
    if kernel_py and Path(kernel_py).resolve() != Path(sys.executable).resolve():
        print(f"[reports.build] warning: the kernel ran {kernel_py}, not this interpreter {sys.executable}; "
              "install a kernel spec for this environment: python -m ipykernel install --sys-prefix", flush=True)
    manifest.update(html=str(out), fig_dir=str(fig_dir))
    for name, s in manifest["sections"].items():
        figs = ", ".join(str(fig_dir / f) for f in s["figures"])
        line = f"  {s['status']:8s} {name}" + (f" → {figs}" if figs else "")
        if s["status"] != "ok":
            line += f"\n           {s['message']}"
        print(line, flush=True)
    print(f"[reports.build] wrote {out} ({out.stat().st_size / 1e3:.0f} kB) and {fig_dir}/ in "
          f"{time.time() - t0:.1f}s", flush=True)
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reports.build", description=(
        "Execute reports/sensitivity.ipynb headless on a run directory and export a standalone HTML report; "
        "each figure is also saved as PNG in <out stem>_figures/."))
    ap.add_argument("--run", required=True, metavar="DIR",
                    help="run directory holding the artifacts (sensitivity.json, multi/, supernet/, pareto.csv, ...)")
    ap.add_argument("--out", default="report.html", metavar="FILE.html", help="HTML file to write (default report.html)")
    ap.add_argument("--notebook", default=str(NOTEBOOK), help="notebook to execute (default: the packaged one)")
    ap.add_argument("--show-code", action="store_true", help="keep code cells in the HTML (hidden by default)")
    ap.add_argument("--save-notebook", action="store_true", help="also write the executed notebook as <out>.ipynb")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell before giving up (default 600)")
    args = ap.parse_args(argv)
    try:
        manifest = build(args.run, args.out, notebook=args.notebook, show_code=args.show_code,
                         save_notebook=args.save_notebook, timeout=args.timeout)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = [n for n, s in manifest["sections"].items() if s["status"] == "error"]
    if errors:
        print(f"error: section(s) failed: {', '.join(errors)} (see the report)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
