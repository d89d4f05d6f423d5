"""Training recipes: a CPU-small one (tests, the demo) and a GPU one (ResNet-20 on full Fashion-MNIST).

``demo_recipe(out_dir)`` runs the whole one-shot pipeline the search demo needs
— multi-precision stage, sensitivity (``analysis.sensitivity``), HASB supernet —
for small_cnn on 8k Fashion-MNIST images, in about 90 s on 2 CPU cores, and
caches: a second call with finished stages returns at once.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Union

from .train import TrainConfig, load_supernet, train


def cpu_small(stage: str = "multi", out: str = "runs/cpu_small", **kw) -> TrainConfig:
    """small_cnn, 8k training images, batch 128: ~20 s per epoch and stage on 2 CPU cores."""
    # the supernet stage starts from trained weights with a fresh Adam: a lower lr keeps the 2-bit sub-nets intact
    base = dict(stage=stage, model="small_cnn", out=out, epochs=2 if stage == "multi" else 1, batch_size=128,
                lr=3e-3 if stage == "multi" else 1e-3, wd=5e-5, train_limit=8192, val_limit=1000, warmup_epochs=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def gpu_resnet20(stage: str = "multi", out: str = "runs/resnet20", **kw) -> TrainConfig:
    """ResNet-20 on all 55k Fashion-MNIST training images, bf16, one GPU; each stage fits one 10-minute call.

    Multi-precision: 8 epochs × 430 steps × 4 bit passes; supernet: 6 epochs (warm-up round(6·10/90) = 1).
    Sizing from one H100 measurement (eager, bf16, b256: one ResNet-20 bit pass with its Adam step 37 ms, the
    4-pass step 162 ms): ≈ 45 s per multi-precision epoch at b128, so each stage fits a 10-minute call.
    """
    base = dict(stage=stage, model="resnet20", out=out, epochs=8 if stage == "multi" else 6, batch_size=128,
                lr=2e-3 if stage == "multi" else 5e-4, wd=5e-5, augment=True, device="cuda", bf16=True)
    base.update(kw)
    return TrainConfig(**base)


def _done(out: Path) -> bool:
    return (out / "model.pt").is_file()


def sensitivity_for(multi_pt: Path, out: Path, splits_kw: dict, max_hvp: int = 96, device: str = "cpu") -> Optional[Path]:
    """Per-layer traces of the demo's multi-precision model via analysis.sensitivity (None if unavailable).

    Traces are taken on the float twin of the multi-precision model (its float weights with the top bit's BN
    statistics: the multi stage never trains the 'fp' BN entries of quantized layers).
    """
    try:
        from analysis.sensitivity import compute_sensitivity
    except ImportError:
        return None
    from .data import batches, load_dataset
    qmodel = load_supernet(multi_pt)
    bits = list(qmodel.hasb_spec.bits)          # Ω for the supernet's own candidates ({4,3,2} too)
    model = _float_twin(qmodel).to(device)
    splits = load_dataset(**splits_kw)
    calib = list(batches(splits.calib, 256, device=device))[:2]
    # layer-restricted Hutchinson (the measured default; see benchmarks/RESULTS.md), fixed layers skipped
    res = compute_sensitivity(model, calib, rtol=0.1, max_hvp=max_hvp, model_name=model.hasb_build["name"],
                              estimator="layer", bits=bits,
                              include_fixed=False,
                              fingerprint=f"demo:{multi_pt.stat().st_mtime_ns}")
    return res.to_json(out / "sensitivity.json")


def _float_twin(qmodel):
    """A float zoo model with ``qmodel``'s float weights and, per BN, the entry its top-bit config uses."""
    import torch

    from .models import build_model
    from .quantize import batchnorms, get_spec, set_config
    build = dict(qmodel.hasb_build)
    f = build_model(**build)
    set_config(qmodel, get_spec(qmodel).bits[0])
    state = {}
    bns = batchnorms(qmodel)
    for k, v in f.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if owner in bns:
            state[k] = bns[owner].active.state_dict()[k.rsplit(".", 1)[1]]
        else:
            state[k] = qmodel.state_dict()[k]
    f.load_state_dict(state)
    return f.eval().to(torch.float32)


def demo_recipe(out_dir: Union[str, Path] = "runs/demo/train", *, sensitivity: Union[str, Path, Callable, None] = None,
                progress: bool = False, overwrite: bool = False) -> dict:
    """Train the demo supernet (multi → sensitivity → HASB supernet); returns paths and timings.

    Args:
        out_dir: writes ``multi/``, ``sensitivity.json`` and ``supernet/`` below it.
        sensitivity: a sensitivity.json to use, or a callable ``f(multi_model_pt) -> path``; default computes one
            with ``analysis.sensitivity.compute_sensitivity`` (falls back to the uniform sampler if that package
            is missing, recorded under ``"sampler"``).
    Returns:
        {"multi": Path, "supernet": Path (model.pt), "sensitivity": Path|None, "sampler": str, "seconds": {...}}
    """
    out = Path(out_dir)
    t = {}
    multi_dir, sup_dir = out / "multi", out / "supernet"
    t0 = time.time()
    if overwrite or not _done(multi_dir):
        train(cpu_small("multi", str(multi_dir), progress=progress, overwrite=True))
    t["multi"] = time.time() - t0
    t0 = time.time()
    sens: Optional[Path]
    if callable(sensitivity):
        sens = Path(sensitivity(multi_dir / "model.pt"))
    elif sensitivity is not None:
        sens = Path(sensitivity)
    elif (out / "sensitivity.json").is_file() and not overwrite:
        sens = out / "sensitivity.json"
    else:
        sens = sensitivity_for(multi_dir / "model.pt", out, dict(train_limit=8192, val_limit=1000))
    t["sensitivity"] = time.time() - t0
    sampler = "hasb" if sens is not None else "uniform"
    t0 = time.time()
    if overwrite or not _done(sup_dir):
        train(cpu_small("supernet", str(sup_dir), init=str(multi_dir / "model.pt"), sampler=sampler,
                        sensitivity=str(sens) if sens else None, model="small_cnn", progress=progress,
                        overwrite=True))
    t["supernet"] = time.time() - t0
    return {"multi": multi_dir / "model.pt", "supernet": sup_dir / "model.pt", "sensitivity": sens,
            "sampler": sampler, "seconds": t}


__all__ = ["cpu_small", "gpu_resnet20", "demo_recipe", "sensitivity_for"]
