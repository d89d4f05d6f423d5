"""The built-in demo behind ``python -m search.pareto --budget 3.5``: small_cnn on real Fashion-MNIST.

The demo's supernet ships with the package (``search/demo_supernet/``, 160 kB): small_cnn trained on all 55k
Fashion-MNIST training images on one GPU by ``python -m benchmarks.demo_workload --out DIR`` (multi-precision 12
epochs → Hessian traces of the float twin → HASB supernet 6 epochs; benchmarks/RESULTS.md). On it 2-bit layers
cost about 3 points (w8a8 88.4%, w2a2 85.3% on 5,000 validation images, SE 0.4), so the front shows a choice. The
first run lays the supernet's traces and training records out in ``--out`` (``sensitivity.json``,
``train/{multi,supernet}/``) so the report finds them; nothing is trained on the user's machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import hasb
from hasb.config import atomic_write_text
from hasb.cost import CostModel
from hasb.data import check_idx_dir
from hasb.errors import HasbError
from hasb.models import build_model
from hasb.quantize import DEFAULT_BITS

from .inputs import InputError, Inputs, checkpoint_inputs

DEMO_MODEL = "small_cnn"
ASSETS = Path(__file__).with_name("demo_supernet")
CHECKPOINT = ASSETS / "model.pt"
SENSITIVITY = ASSETS / "sensitivity.json"


class DemoError(HasbError):
    """The demo cannot be set up (its packaged supernet is missing: reinstall hasb)."""


def ensure_demo(out: Path, data_dir: str | None = None) -> tuple[Path, Path]:
    """(supernet model.pt, sensitivity.json) of the demo, with its records laid out in ``out`` for the report."""
    if not (CHECKPOINT.is_file() and SENSITIVITY.is_file()):
        raise DemoError(f"the demo supernet is missing from {ASSETS}; reinstall hasb (pip install -e .)")
    out.mkdir(parents=True, exist_ok=True)
    sens = out / "sensitivity.json"
    if not sens.is_file() or sens.read_bytes() != SENSITIVITY.read_bytes():
        atomic_write_text(sens, SENSITIVITY.read_text())
    for stage in ("multi", "supernet"):
        d = out / "train" / stage
        d.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.csv", "train_config.json"):
            if not (d / name).is_file():
                shutil.copyfile(ASSETS / f"{stage}_{name}", d / name)
    return CHECKPOINT, sens


def skeleton(bits=DEFAULT_BITS):
    """An untrained quantized demo model: enough to validate budgets before any training."""
    return hasb.quantize_model(build_model(DEMO_MODEL), bits=bits)


def check_demo_args(model: str | None, data: str | None, sensitivity: str | None, data_dir: str | None) -> None:
    """The demo runs small_cnn on Fashion-MNIST: other models or data need a checkpoint (InputError/DataError)."""
    if sensitivity is not None:
        raise InputError("--sensitivity needs --checkpoint (the supernet it was computed for)")
    if model not in (None, DEMO_MODEL):
        raise InputError(
            f"--model {model} needs --checkpoint (a trained supernet); without one the "
            "built-in demo (small_cnn on Fashion-MNIST) runs"
        )
    if data not in (None, "fashion-mnist"):
        raise InputError(f"the built-in demo runs on fashion-mnist; --data {data} needs --checkpoint")
    check_idx_dir("fashion-mnist", data_dir)  # DataError (one line) before anything is trained


def skeleton_inputs(data_dir: str | None = None) -> Inputs:
    """Inputs of an untrained demo skeleton (cost model only, no sensitivity): budgets are validated on it."""
    m = skeleton()
    return Inputs(
        model=m,
        model_name=DEMO_MODEL,
        cost=CostModel.from_model(m),
        sensitivity={},
        checkpoint=None,
        checkpoint_sha="",
        data="fashion-mnist",
        data_dir=data_dir,
        demo=True,
    )


def demo_inputs(out: Path, data_dir: str | None = None) -> Inputs:
    """Inputs of the packaged demo supernet (its records laid out in ``out`` on first use)."""
    ck, sens = ensure_demo(out, data_dir)
    inp = checkpoint_inputs(ck, sens, data_dir=data_dir)
    inp.demo = True
    return inp
