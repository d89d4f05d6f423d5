"""The built-in demo behind ``python -m search.pareto --budget 3.5``: small_cnn on real Fashion-MNIST.

On first use (or when the recipe's fingerprint changes) it runs the project's own pipeline,
``search.recipes.demo_recipe(--out/train)``: multi-precision training → ``analysis.sensitivity`` → HASB
supernet training.  ``--out/sensitivity.json`` is the contract copy; ``--out/demo.json`` records the
fingerprint (recipe source + configs + hasb version) and is written last, so an interrupted first run
resumes from the recipe's finished stages.  Later runs only read it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import hasb
from hasb.config import atomic_write_text
from hasb.cost import CostModel
from hasb.data import find_data_dir
from hasb.errors import HasbError
from hasb.models import build_model
from hasb.quantize import DEFAULT_BITS

from . import recipes
from .inputs import InputError, Inputs, checkpoint_inputs

DEMO_MODEL = "small_cnn"
MARKER = "demo.json"


class DemoError(HasbError):
    """The demo cannot be built (a missing project component or dataset)."""


def fingerprint() -> str:
    """Hash of what the demo's artifacts depend on: the recipe code and its configs, and the hasb version."""
    src = Path(recipes.__file__).read_bytes()
    cfgs = [dataclasses.asdict(recipes.cpu_small(st)) for st in ("multi", "supernet")]
    blob = json.dumps({"hasb": hasb.__version__, "cfgs": cfgs}, sort_keys=True, default=str).encode() + src
    return hashlib.sha1(blob).hexdigest()[:16]


def _marker(out: Path) -> dict | None:
    p = out / MARKER
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def ensure_demo(out: Path, data_dir: str | None = None) -> tuple[Path, Path]:
    """(supernet model.pt, sensitivity.json) of the demo in ``out``, building them when missing or stale.

    Runs ``search.recipes.demo_recipe(out / "train")`` (multi-precision stage → analysis.sensitivity → HASB
    supernet) and copies its sensitivity.json to ``out`` (the run directory's contract file).
    """
    fp = fingerprint()
    m = _marker(out)
    if m and m.get("fingerprint") == fp:
        ck, sens = out / m["checkpoint"], out / m["sensitivity"]
        if ck.is_file() and sens.is_file():
            return ck, sens
    if data_dir is not None:
        os.environ["HASB_DATA_DIR"] = str(data_dir)    # the recipe loads the dataset by name
    t0 = time.perf_counter()
    _say(f"building the demo supernet in {out / 'train'} (first run or changed recipe; cached afterwards)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    # a stale fingerprint means the recipe changed: retrain every stage
    r = recipes.demo_recipe(out / "train", progress=True, overwrite=m is not None)
    sens_src = r.get("sensitivity")
    if sens_src is None or not Path(sens_src).is_file():
        raise DemoError("the demo recipe produced no sensitivity.json (is analysis.sensitivity installed?)")
    sens = out / "sensitivity.json"
    if Path(sens_src).resolve() != sens.resolve():
        atomic_write_text(sens, Path(sens_src).read_text())
    ck = Path(r["supernet"])
    atomic_write_text(out / MARKER, json.dumps({
        "fingerprint": fp, "checkpoint": str(ck.resolve().relative_to(out.resolve())), "sensitivity": sens.name,
        "model": DEMO_MODEL, "sampler": r.get("sampler"), "built_seconds": round(time.perf_counter() - t0, 1),
        "stage_seconds": r.get("seconds")}, indent=2))
    _say(f"demo supernet ready ({time.perf_counter() - t0:.0f} s)")
    return ck, sens


def skeleton(bits=DEFAULT_BITS):
    """An untrained quantized demo model: enough to validate budgets before any training."""
    return hasb.quantize_model(build_model(DEMO_MODEL), bits=bits)


def check_demo_args(model: str | None, data: str | None, sensitivity: str | None,
                    data_dir: str | None) -> None:
    """The demo runs small_cnn on Fashion-MNIST: other models or data need a checkpoint (InputError/DataError)."""
    if sensitivity is not None:
        raise InputError("--sensitivity needs --checkpoint (the supernet it was computed for)")
    if model not in (None, DEMO_MODEL):
        raise InputError(f"--model {model} needs --checkpoint (a trained supernet); without one the "
                         "built-in demo (small_cnn on Fashion-MNIST) runs")
    if data not in (None, "fashion-mnist"):
        raise InputError(f"the built-in demo runs on fashion-mnist; --data {data} needs --checkpoint")
    find_data_dir("fashion-mnist", data_dir)      # DataError (one line) before anything is trained


def skeleton_inputs(data_dir: str | None = None) -> Inputs:
    """Inputs of an untrained demo skeleton (cost model only, no sensitivity): budgets are validated on it."""
    m = skeleton(tuple(recipes.cpu_small("multi").bits))
    return Inputs(model=m, model_name=DEMO_MODEL, cost=CostModel.from_model(m), sensitivity={},
                  checkpoint=None, checkpoint_sha="", data="fashion-mnist", data_dir=data_dir, demo=True)


def demo_inputs(out: Path, data_dir: str | None = None) -> Inputs:
    """Inputs of the trained demo supernet in ``out`` (trained and analysed on first use, cached after)."""
    ck, sens = ensure_demo(out, data_dir)
    inp = checkpoint_inputs(ck, sens, data_dir=data_dir)
    inp.demo = True
    return inp
