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
"""
from __future__ import annotations

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
from .idx import DATASETS, FILES, MEAN, STD, IdxSource, find_data_dir, read_idx
from .sources import callable_source, imagefolder_source, npz_source
from .text import TextSource, stdlib_source, text_source

SPECS = ("fashion-mnist", "mnist", "npz:PATH", "imagefolder:DIR", "text:PATH_OR_GLOB", "python-stdlib",
         "pkg.module:callable")
_PREFIXED = {"npz": npz_source, "imagefolder": imagefolder_source, "text": text_source}


def open_source(spec: str, data_dir: str | None = None, **opts) -> DataSource:
    """The :class:`DataSource` named by a ``--data`` spec (see the module docstring); ``opts`` go to it.

    ``data_dir`` applies to the IDX datasets only.  An unknown spec or bad option is a :class:`DataError`.
    """
    spec = (spec or "").strip()
    prefix, sep, rest = spec.partition(":")
    try:
        if spec in DATASETS:
            if opts:
                raise TypeError(f"unexpected options {sorted(opts)}")
            return IdxSource(spec, data_dir)
        if spec == "python-stdlib":
            return stdlib_source(**opts)
        if sep and prefix in _PREFIXED:
            if not rest:
                raise DataError(f"--data {spec}: missing the path after '{prefix}:'")
            return _PREFIXED[prefix](rest, **opts)
        if sep and rest and prefix.replace(".", "").replace("_", "").isalnum() and rest.isidentifier():
            return callable_source(spec, **opts)
    except TypeError as e:   # an option the source does not take
        raise DataError(f"--data {spec}: bad option ({e})") from None
    raise DataError(f"unknown --data {spec!r}; accepted: {', '.join(SPECS)}")


def load_dataset(name: str = "fashion-mnist", data_dir: str | None = None, *, val_size: int = 5000,
                 calib_size: int = 1024, seed: int = 0, train_limit: int | None = None,
                 val_limit: int | None = None, **opts) -> Splits:
    """Deterministic :class:`Splits` of any ``--data`` spec from ``seed``.

    IDX datasets: val held out of the training file, calib a train subset, test the t10k files.
    ``train_limit``/``val_limit`` truncate (for fast tests and demos); ``opts`` go to the source.
    """
    src = open_source(name, data_dir, **opts)
    return src.splits(seed, val_size=val_size, calib_size=calib_size, train_limit=train_limit,
                      val_limit=val_limit)


__all__ = ["DATASETS", "FILES", "MEAN", "STD", "SPECS", "TASKS", "DataError", "DataSource", "IdxSource", "Splits",
           "TensorSource", "TextSource", "batches", "callable_source", "evaluate_metric", "find_data_dir",
           "imagefolder_source", "load_dataset", "loss_fn", "metric_name", "npz_source", "open_source", "read_idx",
           "stdlib_source", "text_source"]
