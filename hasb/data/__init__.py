"""Data sources behind one interface; ``--data`` specs parsed by :func:`open_source`.

Accepted specs:

- ``fashion-mnist``, ``mnist``: the IDX layout (``--data-dir`` / ``HASB_DATA_DIR`` for other folders, also the
  user's own data in that layout); class count, shape and normalisation come from the files;
- ``npz:PATH``: arrays ``x``, ``y`` (optional ``x_val``, ``y_val``, ``x_test``, ``y_test``), any input shape;
- ``imagefolder:DIR``: one sub-folder of images per class (options ``size``, ``mean``, ``std``);
- ``text:PATH_OR_GLOB``: byte-level language-model windows (options ``context``, ``limit``);
- ``python-stdlib``: the running interpreter's standard-library ``.py`` files through the text source;
- ``pkg.module:callable``: user code (importable, on ``PYTHONPATH``) called as ``callable(**opts)``, returning a
  :class:`DataSource`, :class:`Splits` or torch Datasets.

Source options (``size``, ``context``, ``limit``, ...) are keyword arguments of :func:`open_source` /
:func:`load_dataset`; a CLI can take them as one string through :func:`parse_data_opts`.
"""

from __future__ import annotations

from ..models import model_task
from .core import (
    TASKS,
    DataError,
    DataSource,
    Splits,
    TensorSource,
    batches,
    evaluate_metric,
    loss_fn,
    metric_name,
)
from .idx import DATASETS, FILES, MEAN, STD, IdxSource, check_idx_dir, find_data_dir, read_idx
from .sources import callable_source, check_opts, imagefolder_source, npz_source
from .text import TextSource, stdlib_source, text_source

SPECS = (
    "fashion-mnist",
    "mnist",
    "npz:PATH",
    "imagefolder:DIR",
    "text:PATH_OR_GLOB",
    "python-stdlib",
    "pkg.module:callable",
)
_PREFIXED = {"npz": npz_source, "imagefolder": imagefolder_source, "text": text_source}


def open_source(spec: str, data_dir: str | None = None, **opts) -> DataSource:
    """The :class:`DataSource` named by a ``--data`` spec (see the module docstring); ``opts`` go to it.

    ``data_dir`` applies to the IDX datasets only (given with another spec it is an error, not ignored).  An unknown spec or bad option is a :class:`DataError`.
    """
    spec = (spec or "").strip()
    prefix, sep, rest = spec.partition(":")
    if spec in DATASETS:
        if opts:
            raise DataError(f"--data {spec}: takes no options, got {', '.join(sorted(opts))}")
        return IdxSource(spec, data_dir)
    if data_dir is not None:
        raise DataError(f"--data-dir applies to {' and '.join(DATASETS)} only; --data {spec} names its own files")
    if spec == "python-stdlib":
        check_opts(stdlib_source, opts, spec)
        return stdlib_source(**opts)
    if sep and prefix in _PREFIXED:
        if not rest:
            raise DataError(f"--data {spec}: missing the path after '{prefix}:'")
        check_opts(_PREFIXED[prefix], opts, spec, first=rest)
        return _PREFIXED[prefix](rest, **opts)
    if sep and rest and prefix.replace(".", "").replace("_", "").isalnum() and rest.isidentifier():
        return callable_source(spec, **opts)
    raise DataError(f"unknown --data {spec!r}; accepted: {', '.join(SPECS)}")


def spec_task(spec: str) -> str | None:
    """The task of a ``--data`` spec without reading any data; None for a user callable (known once called)."""
    spec = (spec or "").strip()
    prefix, sep, _ = spec.partition(":")
    if spec in DATASETS:
        return IdxSource.task
    if spec == "python-stdlib" or (sep and prefix == "text"):
        return TextSource.task
    if sep and prefix in _PREFIXED:
        return TensorSource.task
    return None


def check_model_fits(model: str | None, data: str, task: str | None = None) -> None:
    """A :class:`DataError` when model ``model`` (a name) is for another task than ``--data data`` (``task``: the
    opened source's task, else read from the spec); silent when either is not known (user code)."""
    want, have = model_task(model), task or spec_task(data)
    if want is None or have is None or want == have:
        return
    if want == "lm":
        raise DataError(
            f"--model {model} is a byte-level language model but --data {data} is {have} data; accepted for "
            f"{model}: text:PATH_OR_GLOB, python-stdlib (or a package.module:callable source of task lm)"
        )
    raise DataError(
        f"--model {model} is an image classifier but --data {data} is byte-level text (task {have}); use "
        f"--model lm_tiny or lm_small, or classification data (fashion-mnist, mnist, npz:PATH, imagefolder:DIR)"
    )


def parse_data_opts(text: str | None) -> dict:
    """``"size=64,mean=0.49/0.48/0.45,context=256"`` → ``{"size": 64, "mean": [0.49, 0.48, 0.45], ...}``.

    For a CLI's ``--data-opt``: comma-separated ``key=value`` pairs; ``/`` separates list items; ints, floats
    and ``none`` are converted, anything else stays a string.
    """

    def conv(v: str):
        if v.lower() == "none":
            return None
        for f in (int, float):
            try:
                return f(v)
            except ValueError:
                pass
        return v

    out: dict = {}
    for pair in filter(None, (p.strip() for p in (text or "").split(","))):
        key, eq, val = pair.partition("=")
        if not eq or not key.strip().isidentifier() or not val.strip():
            raise DataError(
                f"bad data option {pair!r}; accepted: key=value pairs separated by commas, e.g. "
                f"size=64,mean=0.5/0.5/0.5,context=256"
            )
        items = [conv(v.strip()) for v in val.split("/")]
        out[key.strip()] = items if len(items) > 1 else items[0]
    return out


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: str | None = None,
    *,
    val_size: int = 5000,
    calib_size: int = 1024,
    seed: int = 0,
    train_limit: int | None = None,
    val_limit: int | None = None,
    **opts,
) -> Splits:
    """Deterministic :class:`Splits` of any ``--data`` spec from ``seed``.

    IDX datasets: val held out of the training file, calib a train subset, test the t10k files.
    ``train_limit``/``val_limit`` truncate (for fast tests and demos); ``opts`` go to the source.
    """
    src = open_source(name, data_dir, **opts)
    return src.splits(seed, val_size=val_size, calib_size=calib_size, train_limit=train_limit, val_limit=val_limit)


__all__ = [
    "DATASETS",
    "FILES",
    "MEAN",
    "STD",
    "SPECS",
    "TASKS",
    "DataError",
    "DataSource",
    "IdxSource",
    "Splits",
    "TensorSource",
    "TextSource",
    "batches",
    "callable_source",
    "check_model_fits",
    "evaluate_metric",
    "find_data_dir",
    "check_idx_dir",
    "imagefolder_source",
    "load_dataset",
    "loss_fn",
    "metric_name",
    "npz_source",
    "open_source",
    "parse_data_opts",
    "read_idx",
    "spec_task",
    "stdlib_source",
    "text_source",
]
