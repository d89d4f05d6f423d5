"""``python -m reports.build --run DIR [--out FOLDER]``: execute the sensitivity notebook headless, export HTML.

Outputs (in ``--out``, default: the run folder): ``report.html`` (standalone: images embedded as base64),
``report_figures/<figure>.png`` with ``report_figures/manifest.json`` (section outcomes), and with
``--save-notebook`` the executed ``report.ipynb``.  The old form ``--out FILE.html`` (figures in
``FILE_figures/`` beside it) still works for one release and prints a deprecation warning.

Steps: validate every input before any work (run folder, ``--budget``, the notebook: JSON, nbformat v4, a cell
tagged ``parameters``; ``--out``: a folder, writable); insert a cell after the ``parameters`` cell that sets
``run_dir``, ``fig_dir`` and ``budget`` (what papermill does, with nbformat only); execute it with nbclient on
the ``python3`` kernel; export HTML (nbconvert).

Outputs are atomic as a set: everything is rendered into a staging folder inside ``--out`` and then moved into
place, the old ``report.html`` out first and the new one in last.  ``report.html`` is the commit marker: an
interrupted build leaves the old set, or no ``report.html`` at all, never a report of one build beside figures of
another.  Staging folders of builds that died are removed on the next build.

Kernel: nbclient starts kernel spec ``python3``.  jupyter_client replaces a spec's ``python`` command by the
running interpreter, so the kernel is this process's Python (the venv); the notebook records its
``sys.executable`` in the manifest and the build warns if it differs.  The repository root is put on the
kernel's PYTHONPATH so ``reports``/``hasb`` resolve to this checkout; ``--threads`` reaches the kernel's torch
through OMP_NUM_THREADS / MKL_NUM_THREADS.

Exit status: 0 when every section rendered or was skipped for a missing artifact; 1 when a section raised an
error (the HTML is still written, with the traceback shown); 2 for bad input (one line on stderr, nothing
written).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hasb.cli import (
    add_options,
    config_from_args,
    default_threads,
    option,
    out_option,
    quiet_option,
    run_cli,
    threads_option,
)
from hasb.errors import HasbError

from .artifacts import COMMANDS, find_search_dir

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(__file__).with_name("sensitivity.ipynb")
HTML_NAME, FIGURES_NAME, NOTEBOOK_NAME = "report.html", "report_figures", "report.ipynb"
STAGING_PREFIX, OLD_PREFIX = ".report-staging-", ".report-old-"


class BuildError(HasbError):
    """The report cannot be built (bad input, a notebook without a parameters cell, kernel failure)."""


@dataclass
class BuildConfig:
    """Options of ``python -m reports.build`` (each spelled once; argparse is generated from the fields)."""

    run: str = option(
        None,
        required=True,
        help="run folder holding the artifacts (sensitivity.json; "
        "multi/ and supernet/ or train/multi/ and train/supernet/; pareto.csv, config.json at the top "
        "or in budget-<B>/)",
    )
    out: str | None = out_option(
        help="folder for report.html and report_figures/ (default: the run folder). Deprecated, for one release: "
        "a name ending in .html is the HTML file itself, figures in <name>_figures/ beside it"
    )
    budget: str | None = option(
        None, help="which search folder RUN/budget-<B>/ to report, e.g. 3.5 (default: the newest search outputs)"
    )
    notebook: str = option(str(NOTEBOOK), help="notebook to execute (nbformat v4 with a cell tagged 'parameters')")
    show_code: bool = option(False, help="keep code cells in the HTML (hidden by default)")
    save_notebook: bool = option(False, help="also write the executed notebook (report.ipynb)")
    timeout: int = option(600, help="seconds per cell before giving up")
    threads: int | None = threads_option()
    progress: bool = quiet_option()


@dataclass(frozen=True)
class Outputs:
    """Where one build's set goes: ``folder`` holds ``html``, ``figures`` (a folder) and ``notebook``."""

    folder: Path
    html: Path
    figures: Path
    notebook: Path

    @property
    def names(self) -> tuple[str, str, str]:
        return self.html.name, self.figures.name, self.notebook.name


def resolve_outputs(out: str | os.PathLike | None, run: Path) -> tuple[Outputs, bool]:
    """(the output set, whether ``out`` used the deprecated ``FILE.html`` form)."""
    o = Path(out) if out is not None else run
    if o.suffix.lower() in (".html", ".htm"):
        return Outputs(o.parent, o, o.with_name(o.stem + "_figures"), o.with_suffix(".ipynb")), True
    return Outputs(o, o / HTML_NAME, o / FIGURES_NAME, o / NOTEBOOK_NAME), False


# ---------------------------------------------------------------------------------------------- validation
def check_run(run: Path, budget: str | None) -> None:
    """BuildError for a missing run folder; ArtifactError for a ``budget`` with no RUN/budget-<B>/ folder."""
    if not run.is_dir():
        cmds = ", ".join(COMMANDS[k].format(run=run) for k in ("sensitivity", "supernet", "pareto"))
        raise BuildError(f"run directory {str(run)!r} does not exist; create it with {cmds}")
    find_search_dir(run, budget)


def load_notebook(path: str | os.PathLike):
    """The notebook at ``path`` as an nbformat v4 node; BuildError naming what is wrong (missing, not JSON,
    not nbformat v4, invalid)."""
    import nbformat

    p = Path(path)
    if not p.is_file():
        raise BuildError(f"--notebook {str(p)!r}: no such file (accepted: an .ipynb file in nbformat v4)")
    try:
        text = p.read_text()
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BuildError(f"--notebook {str(p)!r} is not a notebook (not JSON: {e})") from None
    if not isinstance(raw, dict) or raw.get("nbformat") != 4:
        got = raw.get("nbformat") if isinstance(raw, dict) else type(raw).__name__
        raise BuildError(f"--notebook {str(p)!r} is not an nbformat v4 notebook (nbformat: {got!r})")
    cells = raw.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise BuildError(
            f"--notebook {str(p)!r} is not a valid nbformat v4 notebook: 'cells' must be a list of cell objects"
        )
    with warnings.catch_warnings():  # nbformat warns (a second stderr line) about missing cell ids
        warnings.simplefilter("ignore")
        try:  # validate the plain dict first: nbformat.reads would log the error on stderr as well
            nbformat.validate(copy.deepcopy(raw))
        except nbformat.ValidationError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BuildError(f"--notebook {str(p)!r} is not a valid nbformat v4 notebook: {first}") from None
        nb = nbformat.reads(text, as_version=4)  # as the file says (v4): joins multi-line sources
    return nb


def check_out(outs: Outputs) -> None:
    """BuildError unless ``outs.folder`` is (or can become) a writable folder and the set's names are free for
    their kind (the HTML/notebook not a folder, the figures not a file).  Writes nothing that stays."""
    folder = outs.folder
    if folder.exists() and not folder.is_dir():
        raise BuildError(
            f"--out {str(folder)!r} is a file; give a folder (report.html and report_figures/ go inside it)"
        )
    base = folder
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise BuildError(f"--out {str(folder)!r}: {str(base)!r} is a file, so the folder cannot be made")
    for p, want_dir in ((outs.html, False), (outs.notebook, False), (outs.figures, True)):
        if p.exists() and p.is_dir() != want_dir:
            raise BuildError(
                f"--out: {str(p)!r} exists and is a {'folder' if p.is_dir() else 'file'}; "
                "move it away or choose another --out"
            )
    try:  # the one reliable test of writability (os.access says yes to root on read-only file systems)
        probe = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}probe-", dir=base)
    except OSError as e:
        raise BuildError(f"--out {str(folder)!r}: cannot write in {str(base)!r} ({e.strerror})") from None
    os.rmdir(probe)


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
        raise BuildError(
            "the notebook has no cell tagged 'parameters' (reports.build sets run_dir, fig_dir and budget after it)"
        )
    src = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(idx + 1, cell)
    return nb


# ---------------------------------------------------------------------------------------------- execution
@contextlib.contextmanager
def _kernel_env(threads: int):
    """The kernel inherits this environment: headless matplotlib, this checkout importable, ``threads``."""
    keys = ("MPLBACKEND", "PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    backup = {k: os.environ.get(k) for k in keys}
    os.environ.update(
        MPLBACKEND="Agg",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join([str(REPO)] + ([backup["PYTHONPATH"]] if backup["PYTHONPATH"] else [])),
    )
    try:
        yield
    finally:
        for k, v in backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute(nb, cwd: Path, timeout: int = 600, kernel_name: str = "python3", threads: int | None = None):
    """Run ``nb`` in a fresh kernel (cwd = ``cwd``); returns the executed notebook."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    with _kernel_env(threads or default_threads()):
        try:
            client = NotebookClient(
                nb,
                timeout=timeout,
                kernel_name=kernel_name,
                allow_errors=False,
                resources={"metadata": {"path": str(cwd)}},
            )
            client.execute()
        except CellExecutionError as e:
            # Sections trap their own errors; reaching here means setup failed (imports, run dir).
            raise BuildError(f"notebook setup failed: {str(e).strip().splitlines()[-1]}") from None
    return nb


def export_html(nb, show_code: bool = False) -> str:
    """Standalone HTML: output images are inlined as base64; markdown images too (embed_images)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(
        embed_images=True, exclude_input_prompt=True, exclude_output_prompt=True, exclude_input=not show_code
    )
    body, _ = exporter.from_notebook_node(nb)
    return body


# ---------------------------------------------------------------------------------------------- the output set
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: Path) -> None:
    """Remove staging/old folders left in ``folder`` by builds that died (their pid, in the name, is gone)."""
    if not folder.is_dir():
        return
    for d in folder.iterdir():
        for prefix in (STAGING_PREFIX, OLD_PREFIX):
            pid = d.name[len(prefix) :].split("-", 1)[0] if d.name.startswith(prefix) else ""
            if pid.isdigit() and d.is_dir() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)


def swap_in(staged: Path, outs: Outputs) -> None:
    """Move the set in ``staged`` (same file system) into ``outs``: the old report.html out first, the new in last,
    so report.html is never beside figures of another build."""
    old = Path(tempfile.mkdtemp(prefix=f"{OLD_PREFIX}{os.getpid()}-", dir=outs.folder))
    try:
        for name in outs.names:  # html first: from here on no report.html claims the old figures
            if (outs.folder / name).exists():
                os.replace(outs.folder / name, old / name)
        for name in reversed(outs.names):  # notebook, figures, then html last: the commit
            if (staged / name).exists():
                os.replace(staged / name, outs.folder / name)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def render(cfg: BuildConfig, nb, run: Path, outs: Outputs, say) -> dict:
    """Execute ``nb`` on ``run`` into a staging folder in ``outs.folder``, swap the set in; returns the manifest."""
    import nbformat

    from hasb import atomic_write_text

    staged = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=outs.folder))
    try:
        figs = staged / outs.figures.name
        figs.mkdir()
        nb = inject_parameters(
            nb, {"run_dir": str(run.resolve()), "fig_dir": str(figs.resolve()), "budget": cfg.budget}
        )
        say(f"executing {len(nb.cells)} cells on kernel python3 (run {run})")
        nb = execute(nb, cwd=REPO, timeout=cfg.timeout, threads=cfg.threads)
        atomic_write_text(staged / outs.html.name, export_html(nb, show_code=cfg.show_code))
        if cfg.save_notebook:
            atomic_write_text(staged / outs.notebook.name, nbformat.writes(nb))
        man_path = figs / "manifest.json"
        manifest = json.loads(man_path.read_text()) if man_path.is_file() else {"python": None, "sections": {}}
        swap_in(staged, outs)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return manifest


# ---------------------------------------------------------------------------------------------- the library call
def build_report(cfg: BuildConfig) -> dict:
    """Validate everything, then build the report; returns the manifest ({"python", "sections": {name:
    {status, figures, message}}, "html", "fig_dir"}).  HasbError (BuildError, ArtifactError) for bad input,
    raised before anything is written."""
    run = Path(cfg.run)
    check_run(run, cfg.budget)
    outs, deprecated = resolve_outputs(cfg.out, run)
    nb = load_notebook(cfg.notebook)
    inject_parameters(nb, {"run_dir": "", "fig_dir": "", "budget": None})  # has a parameters cell?
    check_out(outs)
    if cfg.threads is not None and cfg.threads < 1:
        raise BuildError(f"--threads must be ≥ 1, got {cfg.threads}")
    if cfg.timeout < 1:  # nbclient reads 0 or a negative timeout as "no limit": say so instead of ignoring it
        raise BuildError(f"--timeout must be ≥ 1 second per cell, got {cfg.timeout}")
    if deprecated:
        print(
            f"warning: --out {outs.html} (an .html file) is deprecated and goes in the next release; give a "
            f"folder: --out {outs.folder} writes {outs.folder / HTML_NAME} and {outs.folder / FIGURES_NAME}/",
            file=sys.stderr,
        )

    def say(msg: str) -> None:
        if cfg.progress:
            print(f"[reports.build] {msg}", flush=True)

    t0 = time.time()
    new = [p for p in (outs.folder, *outs.folder.parents) if not p.exists()]  # folders this build creates
    outs.folder.mkdir(parents=True, exist_ok=True)
    clean_stale(outs.folder)
    try:
        manifest = render(cfg, nb, run, outs, say)
    except BaseException:
        with contextlib.suppress(OSError):  # a failed build leaves no empty folders behind (rmdir: only empty)
            for p in new:
                p.rmdir()
        raise
    _warn_kernel(manifest.get("python"))
    manifest.update(html=str(outs.html), fig_dir=str(outs.figures))
    _print_sections(manifest, outs.figures)
    say(f"wrote {outs.html} ({outs.html.stat().st_size / 1e3:.0f} kB) and {outs.figures}/ in {time.time() - t0:.1f}s")
    return manifest


def _warn_kernel(kernel_py: str | None) -> None:
    if kernel_py and Path(kernel_py).resolve() != Path(sys.executable).resolve():
        print(
            f"[reports.build] warning: the kernel ran {kernel_py}, not this interpreter {sys.executable}; "
            "install a kernel spec for this environment: python -m ipykernel install --sys-prefix",
            flush=True,
        )


def _print_sections(manifest: dict, fig_dir: Path) -> None:
    for name, s in manifest["sections"].items():
        figs = ", ".join(str(fig_dir / f) for f in s["figures"])
        line = f"  {s['status']:8s} {name}" + (f" → {figs}" if figs else "")
        if s["status"] != "ok":
            line += f"\n           {s['message']}"
        print(line, flush=True)


def build(run_dir: os.PathLike | str, out: os.PathLike | str | None = None, **kw) -> dict:
    """Shorthand for :func:`build_report` with keyword options (``notebook``, ``budget``, ``show_code``, ...)."""
    return build_report(BuildConfig(run=str(run_dir), out=None if out is None else str(out), **kw))


def _exit_code(manifest: dict) -> int:
    errors = [n for n, s in manifest["sections"].items() if s["status"] == "error"]
    if errors:
        print(f"error: section(s) failed: {', '.join(errors)} (see the report)", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m reports.build",
        description=(
            "Execute reports/sensitivity.ipynb headless on a run folder and write a standalone HTML report "
            "(report.html, figures as PNG in report_figures/) into --out. Exit 0: every section rendered or was "
            "skipped for a missing artifact; 1: a section failed; 2: bad input (nothing written)."
        ),
    )
    return add_options(ap, BuildConfig)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return run_cli(lambda: _exit_code(build_report(config_from_args(BuildConfig, ns))))


if __name__ == "__main__":
    sys.exit(main())
