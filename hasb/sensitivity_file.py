"""sensitivity.json: its one reader and validator (written by analysis.sensitivity, read by every stage).

The format (``version`` 1): ``model`` (zoo name or callable path), ``fingerprint``, ``bits`` (candidate bits),
``layers`` (one object per weight layer with ``LAYER_KEYS``: per-layer trace, per-parameter trace
``trace_per_param`` = Tr(H_ll)/n_l, its standard error ``stderr`` of the per-layer trace (null when not
estimated), the number of Hessian-vector products, and whether the layer is searchable; optionally both
curvatures, ``OPTIONAL_LAYER_KEYS``: ``hessian_trace``/``hessian_stderr`` and ``gn_trace``/``gn_stderr``
(Gauss–Newton), each absent when not measured, finite when present — ``trace`` is the one of them that drives Ω,
named by ``meta.curvature``), ``omega`` (searchable layer -> bit (as a string) -> Ω, the predicted loss
increase), ``negative_traces`` and optionally ``density``.  ``measured_on`` says what the traces were measured
on (data, split, and ``n_images`` or, for a byte LM, ``n_windows`` × ``bytes_per_window`` = ``n_bytes``).
It lives in hasb, the lowest layer that reads it (the HASB sampler needs the traces).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from .errors import HasbError

__all__ = [
    "VERSION",
    "LAYER_KEYS",
    "OPTIONAL_LAYER_KEYS",
    "SensitivityError",
    "load_sensitivity",
    "validate_sensitivity",
    "traces_for_model",
    "check_for_model",
]

VERSION = 1
LAYER_KEYS = ("layer", "n_params", "trace", "trace_per_param", "stderr", "n_hvp", "searchable")
OPTIONAL_LAYER_KEYS = ("hessian_trace", "hessian_stderr", "gn_trace", "gn_stderr")


class SensitivityError(HasbError):
    """A sensitivity file is missing, malformed, or belongs to another model or layer set."""


def load_sensitivity(path: str | Path) -> dict:
    """Read and validate sensitivity.json (a file, or a run folder holding one); SensitivityError names the problem."""
    p = Path(path)
    if p.is_dir():
        p = p / "sensitivity.json"
    if not p.is_file():
        raise SensitivityError(f"sensitivity file not found: {p}")
    try:
        d = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SensitivityError(f"{p} is not valid JSON: {e}") from None
    validate_sensitivity(d, where=str(p))
    return d


def validate_sensitivity(d: dict, where: str = "sensitivity") -> None:
    """Raise SensitivityError naming the first violation of the format."""

    def bad(msg: str) -> NoReturn:
        raise SensitivityError(f"{where}: {msg}")

    _check_top_level(d, bad)
    names = _check_layers(d["layers"], bad)
    _check_omega(d, bad)
    unknown = [n for n in d["negative_traces"] if n not in names]
    if unknown:
        bad(f"negative_traces names unknown layers {unknown[:3]}")
    if "density" in d and d["density"] is not None:
        den = d["density"]
        if not (
            isinstance(den, dict)
            and isinstance(den.get("grid"), list)
            and isinstance(den.get("density"), list)
            and len(den["grid"]) == len(den["density"])
        ):
            bad("density must be {'grid': [...], 'density': [...]} of equal length")


def _check_top_level(d: dict, bad: Callable[[str], NoReturn]) -> None:
    """Check the object, its version, the types of the top-level keys and that ``bits`` are integers."""
    if not isinstance(d, dict):
        bad("top level must be a JSON object")
    if d.get("version") != VERSION:
        bad(f"version must be {VERSION}, got {d.get('version')!r}")
    for k, typ in (
        ("model", str),
        ("fingerprint", str),
        ("bits", list),
        ("layers", list),
        ("omega", dict),
        ("negative_traces", list),
    ):
        if not isinstance(d.get(k), typ):
            bad(f"key {k!r} missing or not a {typ.__name__}")
    bits = d["bits"]
    if not bits or any(not isinstance(b, int) or isinstance(b, bool) for b in bits):
        bad(f"'bits' must be a non-empty list of integers, got {bits!r}")


def _check_layers(layers: list, bad: Callable[[str], NoReturn]) -> list[str]:
    """Check every layer row (keys, finite numbers, boolean ``searchable``); return the layer names in order."""
    names = []
    for i, row in enumerate(layers):
        if not isinstance(row, dict):
            bad(f"layers[{i}] is not an object")
        miss = [k for k in LAYER_KEYS if k not in row]
        if miss:
            bad(f"layers[{i}] lacks {miss}; each layer needs {list(LAYER_KEYS)}")
        for k in ("trace", "trace_per_param", "stderr", *OPTIONAL_LAYER_KEYS):
            if k not in row or (k == "stderr" and row[k] is None):
                continue  # stderr null = not estimated (the HVP budget ran out before 2 samples of this layer)
            if not isinstance(row[k], (int, float)) or isinstance(row[k], bool) or not math.isfinite(row[k]):
                bad(f"layers[{i}] ({row['layer']}): {k} must be a finite number, got {row[k]!r}")
        if not isinstance(row["searchable"], bool):
            bad(f"layers[{i}] ({row['layer']}): searchable must be true/false")
        names.append(row["layer"])
    return names


def _check_omega(d: dict, bad: Callable[[str], NoReturn]) -> None:
    """Check that ``omega`` maps exactly the searchable layers, each to a finite number per candidate bit."""
    bits = d["bits"]
    searchable = {r["layer"] for r in d["layers"] if r["searchable"]}
    if set(d["omega"]) != searchable:
        bad(
            f"omega must have exactly the searchable layers; missing {sorted(searchable - set(d['omega']))[:3]}, "
            f"extra {sorted(set(d['omega']) - searchable)[:3]}"
        )
    for n, om in d["omega"].items():
        if not isinstance(om, dict) or set(om) != {str(b) for b in bits}:
            bad(f"omega[{n!r}] must map every bit of {bits} (as strings) to a number")
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in om.values()):
            bad(f"omega[{n!r}] has a non-finite value")


def traces_for_model(
    sens: dict, model_name: str, layers: Sequence[str], where: str = "sensitivity file"
) -> dict[str, float]:
    """Per-parameter traces of exactly ``layers``; clear error if the file is for another model or layer set."""
    name = sens.get("model")
    if name is not None and model_name is not None and str(name) != str(model_name):
        raise SensitivityError(f"{where} is for model {name!r}, but training model {model_name!r}")
    rows = {}
    for r in sens["layers"]:
        if not isinstance(r, dict) or "layer" not in r:
            raise SensitivityError(f"{where}: every 'layers' entry needs a 'layer' name")
        if r.get("searchable", True):
            rows[r["layer"]] = r
    missing = [n for n in layers if n not in rows]
    extra = [n for n in rows if n not in layers]
    if missing or extra:
        raise SensitivityError(
            f"{where} does not match the model's searchable layers (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    out = {}
    for n in layers:
        v = rows[n].get("trace_per_param")
        if v is None:
            raise SensitivityError(f"{where}: layer {n!r} has no 'trace_per_param'")
        v = float(v)
        if not math.isfinite(v):
            raise SensitivityError(f"{where}: layer {n!r} has a non-finite trace")
        out[n] = v
    return out


def check_for_model(sens: dict, model_name: str, layers: Sequence[str], where: str = "sensitivity file") -> dict:
    """``sens`` if it is for ``model_name`` and has Ω for every one of ``layers``; else SensitivityError."""
    name = sens.get("model")
    if name is not None and str(name) != str(model_name):
        raise SensitivityError(f"{where} is for model {name!r}, but the checkpoint is a {model_name!r}")
    missing = [n for n in layers if n not in sens["omega"]]
    if missing:
        raise SensitivityError(
            f"{where} does not match the model's layers: no omega for {missing[0]!r} "
            f"({len(missing)} of {len(layers)} searchable layers missing)"
        )
    return sens
