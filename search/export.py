"""The chosen config as a versioned JSON document, plus its integer checkpoint.

Document (``schema: "hasb-search-config"``, ``schema_version: 1``)::

    {
      "schema": "hasb-search-config", "schema_version": 1,
      "model": "small_cnn", "build": {...hasb_build...}, "bits": [8, 6, 4, 2],
      "config": {"layers": {layer: {"w_bits": 4, "a_bits": 4}, ...}},     # hasb.BitConfig JSON (searchable)
      "fixed_layers": {layer: "fp" | int},
      "weight_only": {"a_bits": "fp" | int} | absent,                    # v3: activations fixed (weight-only model)
      "hawq_bit_config": {quantizer: bits, ...} | null,                   # HAWQ's bit_config (search.formats)
      "tool_notes": {"hawq": str, "nncf": str},                            # what the tool exports cover
      "metric": {"name": "accuracy"|"bits_per_byte", "higher_is_better": bool, "label": str},   # v3; absent: accuracy
      "metrics": {"bitops", "gbitops", "size_bytes", "avg_bit_equivalent", "effective_bits", "plain_avg_bits",
                  <metric name>, "loss"},
      "budget": [{"kind", "value", "limit", "text"}], "budget_binds": bool, "source": "ilp"|"optuna"|"uniform",
      "provenance": {"sensitivity_fingerprint", "checkpoint_sha256", "hasb_version", "command", "created"},
      "integer_checkpoint": "deploy.pt" | null,                           # relative to the JSON file
      "scores": {"metric": {...}, "validation": SCORE, "test": SCORE,
                 "bn": {"mode": "recal"|"stored"|"none", "calibration_images"[, "note"]}}
    }

A SCORE is ``{"split", "description", "metric", "n", <metric name>, "se", "se_method", "loss", "selected_on",
"note"}`` plus ``correct`` (accuracy) or ``window_bytes`` (language models: n counts windows of that many bytes).
For accuracy ``se`` is the binomial standard error sqrt(p(1−p)/n); for bits per byte the standard error of the
mean over the n windows.  The validation score is the one the config was selected on (the best of many configs
on the same data: optimistic), the test score is measured once, on data selection never saw.
``metrics.<metric>``/``loss`` repeat the validation score.

``hasb.BitConfig.load(path)`` reads the ``config`` part directly.  Units: BitOPs
per sample (GBitOPs = 1e9), bytes, bits; accuracy in [0, 1], bits per byte ≥ 0, loss in nats.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hasb.config import BitConfig, ConfigError, atomic_write_text, bit_str, parse_bit
from hasb.cost import BUDGET_KINDS
from hasb.errors import HasbError
from hasb.export import export_deployment

SCHEMA = "hasb-search-config"
# 2: HAWQ's real bit_config and an NNCF config file replace the *-style keys; 3: task-aware scores ("metric")
SCHEMA_VERSION = 3
COST_KEYS = ("bitops", "gbitops", "size_bytes", "avg_bit_equivalent", "effective_bits", "plain_avg_bits")
SCORE_METRICS = ("accuracy", "bits_per_byte")
METRIC_KEYS = (*COST_KEYS, "accuracy", "loss")  # a classification document's metrics (kept for older readers)
SOURCES = ("ilp", "optuna", "uniform")


class ExportError(HasbError):
    """An export document that does not follow the schema."""


def make_document(
    *,
    model_name: str,
    build: dict | None,
    bits: Sequence[int],
    config: BitConfig,
    fixed: Mapping[str, Any],
    metrics: Mapping[str, float],
    budgets: Sequence[Any],
    budget_binds: bool,
    source: str,
    provenance: Mapping[str, Any],
    integer_checkpoint: str | None = None,
    scores: Mapping[str, Any] | None = None,
    hawq_bit_config: Mapping[str, int] | None = None,
    tool_notes: Mapping[str, str] | None = None,
    metric: Mapping[str, Any] | None = None,
    weight_only_act: Any = "tied",
) -> dict:
    """Assemble (and validate) the export document; ``budgets`` are hasb.Budget objects or dicts.

    ``hawq_bit_config`` is HAWQ's per-quantizer dict (``search.formats.hawq_bit_config``) or None when the model
    cannot be written in HAWQ's names; ``tool_notes`` says why, and where the NNCF config was written.
    ``metric``: ``{"name", "higher_is_better", "label"}`` of the scores (default accuracy).
    ``weight_only_act``: the fixed activation bits of a weight-only model (None = fp); ``"tied"`` (default): W = A.
    """
    met = dict(metric or {"name": "accuracy", "higher_is_better": True, "label": "accuracy"})
    buds = []
    for b in budgets:
        d = b if isinstance(b, Mapping) else {"kind": b.kind, "value": b.value, "limit": b.limit, "text": b.text}
        buds.append({k: (float(d[k]) if k in ("value", "limit") else d[k]) for k in ("kind", "value", "limit", "text")})
    prov = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **dict(provenance)}
    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": model_name,
        "build": build or {},
        "bits": [int(b) for b in bits],
        "config": config.to_dict(),
        "fixed_layers": {n: bit_str(parse_bit(b)) for n, b in fixed.items()},
        "hawq_bit_config": dict(hawq_bit_config) if hawq_bit_config is not None else None,
        "tool_notes": dict(tool_notes or {}),
        "metric": met,
        "metrics": {k: float(metrics[k]) for k in (*COST_KEYS, met["name"], "loss")},
        "budget": buds,
        "budget_binds": bool(budget_binds),
        "source": source,
        "provenance": prov,
        "integer_checkpoint": integer_checkpoint,
    }
    if weight_only_act != "tied":
        doc["weight_only"] = {"a_bits": bit_str(parse_bit(weight_only_act))}
    if scores is not None:
        doc["scores"] = dict(scores)
    validate(doc)
    return doc


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ExportError(f"invalid {SCHEMA} document: {msg}")


_REQUIRED_KEYS = (
    "schema",
    "schema_version",
    "model",
    "bits",
    "config",
    "fixed_layers",
    "hawq_bit_config",
    "metrics",
    "budget",
    "budget_binds",
    "source",
    "provenance",
)


def validate(doc: Any) -> None:
    """Hand-written schema check; raises ExportError naming the first problem."""
    _need(isinstance(doc, Mapping), "top level must be an object")
    for k in _REQUIRED_KEYS:
        _need(k in doc, f"missing key {k!r}")
    _need(doc["schema"] == SCHEMA, f"schema is {doc['schema']!r}, expected {SCHEMA!r}")
    _need(
        isinstance(doc["schema_version"], int) and doc["schema_version"] <= SCHEMA_VERSION,
        f"schema_version {doc['schema_version']!r} not supported (this reader: ≤ {SCHEMA_VERSION})",
    )
    _need(isinstance(doc["model"], str) and doc["model"], "model must be a non-empty string")
    bits = doc["bits"]
    _need(
        isinstance(bits, list)
        and bits
        and all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 16 for b in bits),
        "bits must be a non-empty list of ints 1..16",
    )
    _validate_layers(doc, bits)
    met = doc.get("metric", {"name": "accuracy"})
    _need(isinstance(met, Mapping) and met.get("name") in SCORE_METRICS, f"metric.name must be one of {SCORE_METRICS}")
    _validate_metrics(doc["metrics"], met["name"])
    _validate_budget(doc["budget"])
    _need(isinstance(doc["budget_binds"], bool), "budget_binds must be true/false")
    _need(doc["source"] in SOURCES, f"source must be one of {SOURCES}")
    prov = doc["provenance"]
    _need(isinstance(prov, Mapping), "provenance must be an object")
    for k in ("sensitivity_fingerprint", "checkpoint_sha256", "hasb_version", "command"):
        _need(k in prov, f"provenance misses {k!r}")
    ic = doc.get("integer_checkpoint")
    _need(ic is None or (isinstance(ic, str) and ic), "integer_checkpoint must be a path string or null")
    if "scores" in doc:
        _validate_scores(doc["scores"], met["name"])


def _validate_layers(doc: Mapping, bits: list) -> None:
    """The searched config (each layer's bits among ``bits``), the fixed layers apart from it, HAWQ's dict."""
    try:
        cfg = BitConfig.from_dict(doc["config"])
    except ConfigError as e:
        raise ExportError(f"invalid {SCHEMA} document: config: {e}") from None
    _need(len(cfg) > 0, "config has no layer")
    wo = doc.get("weight_only")
    _need(wo is None or (isinstance(wo, Mapping) and "a_bits" in wo), "weight_only must be {'a_bits': ...}")
    for n, (w, a) in cfg.layers.items():
        ok_a = a in bits if wo is None else bit_str(a) == wo["a_bits"]
        _need(
            w in bits and ok_a,
            f"layer {n!r} bits ({bit_str(w)}, {bit_str(a)}) not in bits {bits}"
            + ("" if wo is None else f" with activations at {wo['a_bits']} (weight-only)"),
        )
    fixed = doc["fixed_layers"]
    _need(isinstance(fixed, Mapping), "fixed_layers must be an object")
    _need(not set(fixed) & set(cfg.layers), "a layer is both fixed and searchable")
    hawq = doc["hawq_bit_config"]
    _need(
        hawq is None
        or (
            isinstance(hawq, Mapping)
            and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in hawq.items())
        ),
        "hawq_bit_config must be null or an object of quantizer name -> int bits",
    )


def _metric_ok(name: str, v: Any) -> bool:
    """A metric value in its range: accuracy in [0, 1], bits per byte finite and ≥ 0."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return False
    return 0.0 <= v <= 1.0 if name == "accuracy" else v >= 0.0


def _validate_metrics(m: Any, metric: str = "accuracy") -> None:
    """Cost entries finite (effective_bits from v3 on), bitops and size positive, gbitops = bitops / 1e9, the
    score metric in its range."""
    _need(isinstance(m, Mapping), "metrics must be an object")
    for k in (*COST_KEYS, "loss"):
        if k == "effective_bits" and k not in m:
            continue  # documents written before effective bits
        _need(k in m and isinstance(m[k], (int, float)) and math.isfinite(m[k]), f"metrics.{k} must be a finite number")
    _need(m["bitops"] > 0 and m["size_bytes"] > 0, "metrics.bitops and size_bytes must be positive")
    _need(abs(m["gbitops"] * 1e9 - m["bitops"]) <= 1e-6 * m["bitops"], "metrics.gbitops != bitops / 1e9")
    rng = "in [0, 1]" if metric == "accuracy" else "a finite number ≥ 0"
    _need(_metric_ok(metric, m.get(metric)), f"metrics.{metric} must be {rng}")


def _validate_budget(buds: Any) -> None:
    """A non-empty list of budgets, each of a known kind with a positive finite value."""
    _need(isinstance(buds, list) and len(buds) > 0, "budget must be a non-empty list")
    for b in buds:
        _need(isinstance(b, Mapping) and b.get("kind") in BUDGET_KINDS, f"budget kind must be one of {BUDGET_KINDS}")
        _need(
            isinstance(b.get("value"), (int, float)) and math.isfinite(b["value"]) and b["value"] > 0,
            "budget value must be a positive number",
        )


def _validate_scores(scores: Any, metric: str = "accuracy") -> None:
    """Each split score carries its split, size, the metric's value and its standard error."""
    _need(isinstance(scores, Mapping), "scores must be an object")
    for split in ("validation", "test"):
        sc = scores.get(split)
        _need(isinstance(sc, Mapping), f"scores.{split} missing")
        n = sc.get("n")
        _need(isinstance(n, int) and n > 0, f"scores.{split}.n must be a positive integer")
        _need(sc.get("metric", "accuracy") == metric, f"scores.{split}.metric must be {metric!r}")
        _need(_metric_ok(metric, sc.get(metric)), f"scores.{split}.{metric} must be a valid {metric}")
        _need(isinstance(sc.get("se"), (int, float)) and math.isfinite(sc["se"]), f"scores.{split}.se must be finite")
        if metric == "accuracy":
            _need(sc.get("correct") == round(sc["accuracy"] * n), f"scores.{split}.correct != accuracy · n")
        _need(
            isinstance(sc.get("split"), str) and isinstance(sc.get("description"), str),
            f"scores.{split} must name its split and describe it",
        )


def write(doc: Mapping, path: str | Path) -> Path:
    """Validate, then write atomically."""
    validate(doc)
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def load(path: str | Path) -> tuple[BitConfig, dict]:
    """Read and validate an export; returns (BitConfig of the searchable layers, the whole document)."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"export not found: {p}")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{p} is not valid JSON: {e}") from None
    validate(doc)
    return BitConfig.from_dict(doc["config"]), doc


def export_integer(model, config: BitConfig, path: str | Path, extra: dict | None = None) -> Path:
    """The integer checkpoint of ``model`` at ``config`` (hasb.export.export_deployment)."""
    return export_deployment(model, config, path, extra=extra)


__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "COST_KEYS",
    "SCORE_METRICS",
    "METRIC_KEYS",
    "BUDGET_KINDS",
    "ExportError",
    "make_document",
    "validate",
    "write",
    "load",
    "export_integer",
]
