"""Training recipes: a CPU-small one (tests, the demo) and a GPU one (ResNet-20 on full Fashion-MNIST).

``run_recipe`` is the whole one-shot pipeline — multi-precision stage, sensitivity
(``analysis.sensitivity``), HASB supernet — and caches: a second call with finished
stages returns at once.  ``demo_recipe`` runs it for small_cnn on 8k images (about
90 s on 2 CPU cores; the search demo's supernet), ``gpu_recipe`` for ResNet-20 on
all of Fashion-MNIST on one GPU:  ``python -m search.recipes resnet20-gpu --out DIR`` (``python -m hasb.recipes`` is an alias).

The recipes chain training (hasb) → sensitivity (analysis), so they live in the search layer, above both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from analysis.sensitivity import SensitivityConfig, compute_sensitivity
from hasb.cli import check_out_dir, parse_bits, run_cli
from hasb.data import batches, load_dataset
from hasb.errors import HasbError
from hasb.export import read_checkpoint
from hasb.models import build_record
from hasb.quantize import float_twin, get_spec
from hasb.train import TrainConfig, TrainError, load_supernet, train


def cpu_small(stage: str = "multi", out: str = "runs/cpu_small", **kw) -> TrainConfig:
    """small_cnn, 8k training images, batch 128: ~20 s per epoch and stage on 2 CPU cores."""
    # the supernet stage starts from trained weights with a fresh Adam: a lower lr keeps the 2-bit sub-nets intact
    base = dict(
        stage=stage,
        model="small_cnn",
        out=out,
        epochs=2 if stage == "multi" else 1,
        batch_size=128,
        lr=3e-3 if stage == "multi" else 1e-3,
        wd=5e-5,
        train_limit=8192,
        val_limit=1000,
        warmup_epochs=0,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def gpu_resnet20(stage: str = "multi", out: str = "runs/resnet20", **kw) -> TrainConfig:
    """ResNet-20 on all 55k Fashion-MNIST training images, bf16, batch 256, one GPU: multi-precision 8 epochs,
    supernet 6 epochs (warm-up round(6·10/90) = 1); the whole recipe fits one 10-minute call on an H100/H200.

    Sizing: ~30 s per eager multi-precision epoch at b256 on one H100/H200 (4 bit passes + validation of each
    bit), a supernet epoch about the same; ``compile=True`` halves the step (benchmarks/RESULTS.md).
    """
    base = dict(
        stage=stage,
        model="resnet20",
        out=out,
        epochs=8 if stage == "multi" else 6,
        batch_size=256,
        lr=2e-3 if stage == "multi" else 5e-4,
        wd=5e-5,
        augment=True,
        device="cuda",
        bf16=True,
    )
    base.update(kw)
    return TrainConfig(**base)


# what a finished stage must agree on to be reused (progress, overwrite, out, init paths may differ)
_REUSE_KEYS = (
    "stage",
    "model",
    "data",
    "epochs",
    "bits",
    "batch_size",
    "lr",
    "wd",
    "alrs",
    "sampler",
    "sigma",
    "train_limit",
    "val_limit",
    "augment",
    "fixed_bits",
    "seed",
)


def _done(out: Path, cfg: TrainConfig) -> bool:
    """True when ``out`` holds a finished run of the same recipe; TrainError when it holds a different one."""
    pt = out / "model.pt"
    if not pt.is_file():
        return False
    have = json.loads(read_checkpoint(pt).get("extra", "{}")).get("train_config", {})
    want = cfg.to_dict()
    diff = [k for k in _REUSE_KEYS if k in have and have[k] != want[k]]
    if diff:
        what = ", ".join(f"{k}={have[k]!r}, now {want[k]!r}" for k in diff[:3])
        raise TrainError(
            f"{out} holds a finished run with other settings ({what}); "
            f"pass --overwrite to retrain it or choose another --out"
        )
    return True


def sensitivity_for(multi_pt: Path, out: Path, splits_kw: dict, max_hvp: int = 96, device: str = "cpu") -> Path | None:
    """Per-layer traces of the demo's multi-precision model via analysis.sensitivity; returns the JSON path.

    Traces are taken on the float twin of the multi-precision model (its float weights with the top bit's BN
    statistics: the multi stage never trains the 'fp' BN entries of quantized layers).
    """
    qmodel = load_supernet(multi_pt)
    bits = list(get_spec(qmodel).bits)  # Ω for the supernet's own candidates ({4,3,2} too)
    model = float_twin(qmodel).to(device)
    splits = load_dataset(**splits_kw)
    calib = list(batches(splits.calib, 256, device=device))[:2]
    # layer-restricted Hutchinson (the measured default; see benchmarks/RESULTS.md), fixed layers skipped
    cfg = SensitivityConfig(rtol=0.1, max_hvp=max_hvp, estimator="layer", bits=bits, include_fixed=False)
    res = compute_sensitivity(
        model,
        calib,
        cfg,
        model_name=build_record(model)["name"],
        fingerprint=f"demo:{multi_pt.stat().st_mtime_ns}",
        measured_on={
            "data": splits.name,
            "split": "calib",
            "n_images": sum(len(y) for _, y in calib),
            "network": "float twin",
        },
    )
    return res.to_json(out / "sensitivity.json")


def _stage_sensitivity(
    sensitivity: str | Path | Callable | None,
    multi_pt: Path,
    out: Path,
    overwrite: bool,
    splits_kw: dict,
    max_hvp: int,
    device: str,
) -> Path | None:
    """The sensitivity.json for the supernet stage: the given file, the callable's, a finished one in ``out``
    (unless ``overwrite``), or one computed by :func:`sensitivity_for`."""
    if callable(sensitivity):
        return Path(sensitivity(multi_pt))
    if sensitivity is not None:
        return Path(sensitivity)
    if (out / "sensitivity.json").is_file() and not overwrite:
        return out / "sensitivity.json"
    return sensitivity_for(multi_pt, out, splits_kw, max_hvp=max_hvp, device=device)


def run_recipe(
    make_cfg: Callable[..., TrainConfig],
    out_dir: str | Path,
    *,
    sensitivity_splits: dict,
    sensitivity: str | Path | Callable | None = None,
    max_hvp: int = 96,
    progress: bool = False,
    overwrite: bool = False,
    **kw,
) -> dict:
    """The one-shot pipeline: multi-precision stage → sensitivity → HASB supernet; returns paths and timings.

    Args:
        make_cfg: ``make_cfg(stage, out, **kw) -> TrainConfig`` (:func:`cpu_small`, :func:`gpu_resnet20`).
        out_dir: writes ``multi/``, ``sensitivity.json`` and ``supernet/`` below it; finished stages are reused
            unless ``overwrite``.
        sensitivity_splits: ``load_dataset`` limits for the traces (``train_limit``, ``val_limit``).
        sensitivity: a sensitivity.json to use, or a callable ``f(multi_model_pt) -> path``; default computes one
            with ``analysis.sensitivity.compute_sensitivity`` (falls back to the uniform sampler if that package
            is missing, recorded under ``"sampler"``).
        kw: TrainConfig overrides for both stages (device, progress, ...).
    Returns:
        {"multi": Path, "supernet": Path (model.pt), "sensitivity": Path|None, "sampler": str, "seconds": {...}}
    """
    out = Path(out_dir)
    check_out_dir(out)  # a file or an unwritable place: one line before any training
    t = {}
    multi_dir, sup_dir = out / "multi", out / "supernet"
    t0 = time.time()
    cfg = make_cfg("multi", str(multi_dir), progress=progress, overwrite=True, **kw)
    if overwrite or not _done(multi_dir, cfg):
        train(cfg)
    t["multi"] = time.time() - t0
    t0 = time.time()
    device = "cpu" if cfg.device == "auto" else cfg.device
    sens = _stage_sensitivity(sensitivity, multi_dir / "model.pt", out, overwrite, sensitivity_splits, max_hvp, device)
    t["sensitivity"] = time.time() - t0
    sampler = "hasb" if sens is not None else "uniform"
    t0 = time.time()
    sup_kw = dict(init=str(multi_dir / "model.pt"), sampler=sampler, sensitivity=str(sens) if sens else None)
    cfg = make_cfg("supernet", str(sup_dir), **sup_kw, progress=progress, overwrite=True, **kw)
    if overwrite or not _done(sup_dir, cfg):
        train(cfg)
    t["supernet"] = time.time() - t0
    paths = {"multi": multi_dir / "model.pt", "supernet": sup_dir / "model.pt"}
    return {**paths, "sensitivity": sens, "sampler": sampler, "seconds": t}


def demo_recipe(
    out_dir: str | Path = "runs/demo/train",
    *,
    sensitivity: str | Path | Callable | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict:
    """The search demo's supernet: :func:`run_recipe` with :func:`cpu_small` (small_cnn, 8k images, ~90 s on 2 CPU
    cores); same arguments and return value."""
    return run_recipe(
        cpu_small,
        out_dir,
        sensitivity_splits=dict(train_limit=8192, val_limit=1000),
        sensitivity=sensitivity,
        progress=progress,
        overwrite=overwrite,
    )


def gpu_recipe(out_dir: str | Path = "runs/resnet20", *, progress: bool = True, overwrite: bool = False, **kw) -> dict:
    """ResNet-20 on full Fashion-MNIST on one GPU: :func:`run_recipe` with :func:`gpu_resnet20` (256 HVPs)."""
    return run_recipe(
        gpu_resnet20, out_dir, sensitivity_splits={}, max_hvp=256, progress=progress, overwrite=overwrite, **kw
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m search.recipes",
        description="Run a training recipe end to end (multi-precision → sensitivity → "
        "HASB supernet) and print where its outputs went.",
    )
    p.add_argument(
        "recipe",
        choices=("demo", "resnet20-gpu"),
        help="demo: small_cnn, 8k images, CPU (~90 s); resnet20-gpu: ResNet-20, all 55k images, one GPU",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/demo/train or runs/resnet20)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true", help="retrain finished stages")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    p.add_argument(
        "--bits",
        default=None,
        help="candidate bits, comma separated (default 8,6,4,2; e.g. 4,3,2; resnet20-gpu only)",
    )
    return p


def run_named(
    recipe: str, out: str | None = None, *, force: bool = False, compile: bool = False, bits: list | None = None
) -> dict:
    """Run the recipe called ``recipe`` ("demo" or "resnet20-gpu"); returns :func:`run_recipe`'s dict."""
    kw = {"bits": bits} if bits else {}
    if recipe == "demo":
        if kw or compile:
            raise HasbError("--bits and --compile apply to the resnet20-gpu recipe only")
        return demo_recipe(out or "runs/demo/train", progress=True, overwrite=force)
    return gpu_recipe(out or "runs/resnet20", overwrite=force, compile=compile, **kw)


def _print_result(r: dict) -> None:
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}, indent=1))


def main(argv=None) -> int:
    """``python -m search.recipes {demo,resnet20-gpu} --out DIR``: run a recipe end to end, print where it went."""
    a = build_parser().parse_args(argv)
    # --bits is parsed inside the exit-code policy: a bad value is one "error:" line, not argparse's usage + error
    return run_cli(
        lambda: _print_result(
            run_named(a.recipe, a.out, force=a.force, compile=a.compile, bits=parse_bits(a.bits) if a.bits else None)
        )
    )


__all__ = [
    "cpu_small",
    "gpu_resnet20",
    "run_recipe",
    "demo_recipe",
    "gpu_recipe",
    "sensitivity_for",
    "run_named",
    "main",
]


if __name__ == "__main__":
    sys.exit(main())
