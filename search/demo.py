"""The built-in demo behind ``python -m search.pareto --budget 3.5``: small_cnn on real Fashion-MNIST.

On first use (or when the recipe's fingerprint changes) it runs the project's own commands, in ``--out``:

1. ``hasb.train`` multi-precision stage of ``hasb.recipes.demo_recipe()`` → ``train-multi/model.pt``;
2. ``analysis.sensitivity`` on that model → ``sensitivity.json`` (+ csv/png when the analysis writes them);
3. ``hasb.train`` supernet stage (HASB sampling driven by those traces, Transitional BN) →
   ``train-supernet/model.pt``, the supernet the search evaluates.

``demo.json`` records the fingerprint (recipe + hasb version) and is written last, so an interrupted
first run simply starts over.  Later runs only read it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hasb.config import atomic_write_text

DEMO_MODEL = "small_cnn"
MARKER = "demo.json"
# demo sensitivity: full-model Hutchinson probes (every HVP serves all layers), 2×256 calibration images,
# ≤ 32 HVPs — seconds on a 2-core CPU; the per-layer standard errors are in sensitivity.json
SENS_SETTINGS = {"estimator": "full", "max_hvp": 32, "rtol": 0.1, "n_batches": 2, "backend": "double_backward"}
# fields that do not change what a stage computes (paths, progress bars, restart flags)
_FREE = {"out", "init", "sensitivity", "progress", "overwrite", "resume", "device", "data_dir", "checkpoint_every",
         "max_steps", "compile"}


class DemoError(RuntimeError):
    """The demo cannot be built (a missing project component or dataset)."""


def _stages() -> list:
    """The demo recipe as a list of TrainConfig (multi, then supernet)."""
    try:
        from hasb.recipes import demo_recipe
    except ImportError as e:
        raise DemoError(f"the demo needs hasb.recipes.demo_recipe ({e}); pass --checkpoint/--sensitivity of your "
                        "own run instead") from None
    r = demo_recipe()
    if isinstance(r, dict):
        r = [r[k] for k in ("multi", "supernet") if k in r] or list(r.values())
    stages = list(r) if isinstance(r, (list, tuple)) else [r]
    if not stages or any(not hasattr(s, "stage") for s in stages):
        raise DemoError("hasb.recipes.demo_recipe() did not return TrainConfig stages")
    return stages


def fingerprint(stages) -> str:
    import hasb
    parts = [{k: v for k, v in dataclasses.asdict(s).items() if k not in _FREE} for s in stages]
    blob = json.dumps({"stages": parts, "hasb": hasb.__version__, "sens": SENS_SETTINGS}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _marker(out: Path) -> Optional[dict]:
    p = out / MARKER
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def compute_demo_sensitivity(model_pt: Path, out_json: Path, data_dir: Optional[str], bits) -> Path:
    """analysis.sensitivity on the multi-precision model, written to ``out_json`` (contract format)."""
    try:
        from analysis.sensitivity import compute_sensitivity
    except ImportError as e:
        raise DemoError(f"the demo needs analysis.sensitivity.compute_sensitivity ({e}); pass --checkpoint/"
                        "--sensitivity of your own run instead") from None
    from hasb.data import batches, load_dataset
    from hasb.export import load_quantized
    model, _ = load_quantized(model_pt)
    splits = load_dataset("fashion-mnist", data_dir)
    calib = list(batches(splits.calib, 256))[:SENS_SETTINGS["n_batches"]]
    from .evaluate import file_digest
    kw = {k: v for k, v in SENS_SETTINGS.items() if k != "n_batches"}
    res = compute_sensitivity(model, calib, bits=tuple(bits), model_name=DEMO_MODEL, **kw,
                              fingerprint=f"demo-{file_digest(model_pt)}")
    res.to_json(out_json)
    try:
        res.to_csv(out_json.with_suffix(".csv"))
    except Exception:   # the csv is a convenience; the json is the contract
        pass
    return out_json


def ensure_demo(out: Path, data_dir: Optional[str] = None) -> tuple[Path, Path]:
    """(supernet model.pt, sensitivity.json) of the demo in ``out``, building them when missing or stale."""
    stages = _stages()
    fp = fingerprint(stages)
    m = _marker(out)
    if m and m.get("fingerprint") == fp:
        ck, sens = out / m["checkpoint"], out / m["sensitivity"]
        if ck.is_file() and sens.is_file():
            return ck, sens
    from hasb.train import train
    t0 = time.perf_counter()
    _say(f"building the demo supernet in {out} (first run, or the recipe changed; cached afterwards)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    prev: Optional[Path] = None
    sens_path = out / "sensitivity.json"
    for cfg in stages:
        run_dir = out / f"train-{cfg.stage}"
        kw: dict[str, Any] = {"out": str(run_dir), "overwrite": True, "resume": False}
        if data_dir is not None:
            kw["data_dir"] = data_dir
        if cfg.stage == "supernet":
            if prev is None:
                raise DemoError("demo recipe: a supernet stage needs a multi-precision stage before it")
            kw["init"] = str(prev)
            if not sens_path.is_file():
                compute_demo_sensitivity(prev, sens_path, data_dir, cfg.bits)
                _say(f"sensitivity → {sens_path} ({time.perf_counter() - t0:.0f} s)")
            if getattr(cfg, "sampler", None) in ("hasb", "tempered"):
                kw["sensitivity"] = str(sens_path)
        cfg = dataclasses.replace(cfg, **kw)
        _say(f"training stage {cfg.stage!r} ({cfg.epochs} epoch(s)) → {run_dir}")
        prev = Path(train(cfg)) / "model.pt"
        _say(f"stage {cfg.stage!r} done ({time.perf_counter() - t0:.0f} s)")
    if prev is None:
        raise DemoError("demo recipe has no stage")
    if not sens_path.is_file():
        compute_demo_sensitivity(prev, sens_path, data_dir, stages[-1].bits)
    atomic_write_text(out / MARKER, json.dumps({
        "fingerprint": fp, "checkpoint": str(prev.relative_to(out)), "sensitivity": sens_path.name,
        "model": DEMO_MODEL, "built_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return prev, sens_path


def skeleton(bits=(8, 6, 4, 2)):
    """An untrained quantized demo model: enough to validate budgets before any training."""
    import hasb
    from hasb.models import build_model
    return hasb.quantize_model(build_model(DEMO_MODEL), bits=bits)


def demo_inputs(args, validate_only: bool = False):
    """search.pareto.Inputs of the demo (validate_only: cost model of an untrained skeleton, nothing written)."""
    from hasb.cost import CostModel
    from hasb.data import find_data_dir
    from .pareto import InputError, Inputs, resolve_inputs
    if args.data not in (None, "fashion-mnist"):
        raise InputError(f"the built-in demo runs on fashion-mnist; --data {args.data} needs --checkpoint")
    find_data_dir("fashion-mnist", args.data_dir)      # DataError (one line) before anything is trained
    out = Path(args.out)
    if validate_only:
        try:
            bits = tuple(_stages()[0].bits)
        except DemoError:
            bits = (8, 6, 4, 2)
        m = skeleton(bits)
        return Inputs(model=m, model_name=DEMO_MODEL, cost=CostModel.from_model(m), sensitivity={},
                      checkpoint=None, checkpoint_sha="", data="fashion-mnist", data_dir=args.data_dir, demo=True)
    ck, sens = ensure_demo(out, args.data_dir)
    a = dataclasses.replace(args) if dataclasses.is_dataclass(args) else _ns(args)
    a.checkpoint, a.sensitivity, a.model = str(ck), str(sens), None
    inp = resolve_inputs(a)
    inp.demo = True
    return inp


def _ns(args):
    import argparse
    return argparse.Namespace(**vars(args))
