"""Training recipes: a CPU-small one (tests, the demo), a GPU one (ResNet-20 on full Fashion-MNIST), and the byte-level
language model on the running Python's standard library (``lm-cpu``, ``lm-gpu``).

``run_recipe`` is the whole one-shot pipeline — (float pre-training,) multi-precision stage, sensitivity
(``analysis.sensitivity``), HASB supernet — and caches: a second call with finished
stages returns at once.  ``demo_recipe`` runs it for small_cnn on 8k images (about
90 s on 2 CPU cores; the search demo's supernet), ``gpu_recipe`` for ResNet-20 on
all of Fashion-MNIST on one GPU:  ``python -m search.recipes resnet20-gpu --out DIR`` (``python -m hasb.recipes`` is an alias).
``lm_recipe`` trains lm_tiny (``lm-cpu``, a few minutes on 2 cores) or lm_small (``lm-gpu``, one H100/H200) float
first, then weight-only multi-precision (activations fp: how language models are deployed) and the supernet.

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
from hasb.metrics import METRIC_COLUMN
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


# lm-cpu: 64-byte windows, at most 2 MB of stdlib text per split (its first files by path hash)
LM_CPU_DATA = {"context": 64, "limit": 2_000_000}
LM_BITS = [8, 6, 4, 3, 2]


def lm_cpu(stage: str = "multi", out: str = "runs/lm_cpu", **kw) -> TrainConfig:
    """lm_tiny on python-stdlib (64-byte windows), weight-only with fp activations, bits 8,4,2, 2,048 training
    windows per epoch: float 2 epochs (128 steps), multi and supernet 1 epoch each (64 steps × 3 passes); the whole
    recipe a few minutes on 2 CPU cores."""
    base = dict(
        stage=stage,
        model="lm_tiny",
        data="python-stdlib",
        data_opts=dict(LM_CPU_DATA),
        out=out,
        epochs=2 if stage == "float" else 1,
        batch_size=32,
        lr={"float": 3e-3, "multi": 1e-3}.get(stage, 5e-4),
        wd=0.0,
        train_limit=2048,
        val_limit=256,
        bits=[8, 4, 2],
        act_bits="fp",
        warmup_epochs=0,
        device="cpu",
    )
    base.update(kw)
    return TrainConfig(**base)


def lm_gpu(stage: str = "multi", out: str = "runs/lm_gpu", **kw) -> TrainConfig:
    """lm_small (~11 M parameters) on all of python-stdlib (256-byte windows, ~94k training windows), bf16, batch 64,
    one GPU: float 1 epoch over every training window (~1,470 steps), then weight-only (fp activations) multi-precision
    at bits 8,6,4,3,2 and the supernet, 24,576 windows each (384 steps × 5 passes).

    Sizing (an estimate from FLOPs, to be confirmed by the run recorded in benchmarks/RESULTS.md): ~1.2 TFLOP per
    pass of 16k bytes, 20-40 ms on an H100/H200 in eager bf16 with fake quantization: float ~1 min, multi and
    supernet ~1.5-2.5 min each, sensitivity (128 HVPs) ~1 min — within 10 minutes.
    """
    base = dict(
        stage=stage,
        model="lm_small",
        data="python-stdlib",
        data_opts={"context": 256},
        out=out,
        epochs=1,
        batch_size=64,
        lr={"float": 1e-3, "multi": 3e-4}.get(stage, 2e-4),
        wd=0.0,
        train_limit=None if stage == "float" else 24_576,
        val_limit=512,
        bits=list(LM_BITS),
        act_bits="fp",
        warmup_epochs=0,
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
    "data_opts",
    "act_bits",
    "epochs",
    "bits",
    "rounding",
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
    obj = read_checkpoint(pt)
    have = json.loads(obj.get("extra") or obj.get("hasb") or "{}").get("train_config", {})  # hasb: the float stage's
    want = cfg.to_dict()
    diff = [k for k in _REUSE_KEYS if k in have and have[k] != want[k]]
    if diff:
        what = ", ".join(f"{k}={have[k]!r}, now {want[k]!r}" for k in diff[:3])
        raise TrainError(
            f"{out} holds a finished run with other settings ({what}); "
            f"pass --overwrite to retrain it or choose another --out"
        )
    return True


def sensitivity_for(
    multi_pt: Path, out: Path, splits_kw: dict, max_hvp: int = 96, device: str = "cpu", backend: str = "auto"
) -> Path | None:
    """Per-layer traces of the demo's multi-precision model via analysis.sensitivity; returns the JSON path.

    ``backend``: the HVP backend (``auto`` times both on the model first: seconds on a CPU, which a tiny run
    may not want to spend).

    Traces are taken on the float twin of the multi-precision model (its float weights with the top bit's BN
    statistics: the multi stage never trains the 'fp' BN entries of quantized layers).
    """
    qmodel = load_supernet(multi_pt)
    bits = list(get_spec(qmodel).bits)  # Ω for the supernet's own candidates ({4,3,2} too)
    model = float_twin(qmodel).to(device)
    splits = load_dataset(**splits_kw)
    calib = list(batches(splits.calib, 256 if splits.task != "lm" else 64, device=device))[:2]
    # auto: exact per-sample traces where the net is piecewise linear, else layer-restricted Hutchinson; fixed
    # layers skipped
    cfg = SensitivityConfig(
        rtol=0.1, max_hvp=max_hvp, estimator="auto", bits=bits, include_fixed=False, backend=backend
    )
    res = compute_sensitivity(
        model,
        calib,
        cfg,
        task=splits.task,  # the task's loss: per example, or per byte for an LM
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
    """The sensitivity.json for the supernet stage: the given file, the callable's (None: no file, the supernet
    samples uniformly), a finished one in ``out`` (unless ``overwrite``), or one computed by :func:`sensitivity_for`."""
    if callable(sensitivity):
        got = sensitivity(multi_pt)
        return None if got is None else Path(got)
    if sensitivity is not None:
        return Path(sensitivity)
    if (out / "sensitivity.json").is_file() and not overwrite:
        return out / "sensitivity.json"
    return sensitivity_for(multi_pt, out, splits_kw, max_hvp=max_hvp, device=device)


def _train_stage(cfg: TrainConfig, overwrite: bool) -> float:
    """Train ``cfg`` unless ``cfg.out`` holds the same finished stage (or ``overwrite``); returns the seconds spent."""
    t0 = time.time()
    if overwrite or not _done(Path(cfg.out), cfg):
        train(cfg)
    return time.time() - t0


def measured(run_dir: str | Path) -> dict:
    """What a training stage measured at its last epoch: the metric, its split and size, and per precision label
    ``[value, standard error]`` (from ``metrics.json``; empty when the run wrote none)."""
    p = Path(run_dir) / "metrics.json"
    if not p.is_file():
        return {}
    rows = json.loads(p.read_text())
    if not rows:
        return {}
    row = rows[-1]
    metric = row.get("metric", "accuracy")
    col = METRIC_COLUMN[metric]
    vals = {k[len(col) + 1 :]: [v, row.get(f"se_{k}")] for k, v in row.items() if k.startswith(col + "_")}
    return {"metric": metric, "split": row.get("val_split"), "n": row.get("val_n"), "epoch": row["epoch"], **vals}


def run_recipe(
    make_cfg: Callable[..., TrainConfig],
    out_dir: str | Path,
    *,
    sensitivity_splits: dict,
    sensitivity: str | Path | Callable | None = None,
    max_hvp: int = 96,
    progress: bool = False,
    overwrite: bool = False,
    pretrain: bool = False,
    **kw,
) -> dict:
    """The one-shot pipeline: (float pre-training →) multi-precision stage → sensitivity → HASB supernet; returns
    paths, timings and what each training stage measured.

    Args:
        make_cfg: ``make_cfg(stage, out, **kw) -> TrainConfig`` (:func:`cpu_small`, :func:`gpu_resnet20`,
            :func:`lm_cpu`, :func:`lm_gpu`).
        out_dir: writes ``float/`` (with ``pretrain``), ``multi/``, ``sensitivity.json`` and ``supernet/`` below
            it; finished stages are reused unless ``overwrite``.
        sensitivity_splits: ``load_dataset`` arguments for the traces (``name``, source options, limits).
        sensitivity: a sensitivity.json to use, or a callable ``f(multi_model_pt) -> path | None`` (None: the
            supernet samples uniformly); default computes one with ``analysis.sensitivity.compute_sensitivity``.
        pretrain: train the float model first (stage ``float``) and start the multi stage from it.
        kw: TrainConfig overrides for every stage (device, progress, ...).
    Returns:
        {"float": Path (with pretrain), "multi": Path, "supernet": Path (model.pt), "sensitivity": Path|None,
        "sampler": str, "seconds": {...}, "measured": {stage: :func:`measured`}}
    """
    out = Path(out_dir)
    check_out_dir(out)  # a file or an unwritable place: one line before any training
    t: dict[str, float] = {}
    paths: dict[str, Path] = {}
    init = {}
    if pretrain:
        t["float"] = _train_stage(
            make_cfg("float", str(out / "float"), progress=progress, overwrite=True, **kw), overwrite
        )
        paths["float"] = out / "float" / "model.pt"
        init = {"init": str(paths["float"])}
    cfg = make_cfg("multi", str(out / "multi"), progress=progress, overwrite=True, **init, **kw)
    t["multi"] = _train_stage(cfg, overwrite)
    paths["multi"] = out / "multi" / "model.pt"
    t0 = time.time()
    device = "cpu" if cfg.device == "auto" else cfg.device
    sens = _stage_sensitivity(sensitivity, paths["multi"], out, overwrite, sensitivity_splits, max_hvp, device)
    t["sensitivity"] = time.time() - t0
    sampler = "hasb" if sens is not None else "uniform"
    sup_kw = dict(init=str(paths["multi"]), sampler=sampler, sensitivity=str(sens) if sens else None)
    cfg = make_cfg("supernet", str(out / "supernet"), **sup_kw, progress=progress, overwrite=True, **kw)
    t["supernet"] = _train_stage(cfg, overwrite)
    paths["supernet"] = out / "supernet" / "model.pt"
    got = {stage: measured(p.parent) for stage, p in paths.items()}
    return {**paths, "sensitivity": sens, "sampler": sampler, "seconds": t, "measured": got}


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


LM_RECIPES = {
    # name: (stage configs, default out, sensitivity data, max HVPs)
    "lm-cpu": (lm_cpu, "runs/lm_cpu", {"name": "python-stdlib", **LM_CPU_DATA, "train_limit": 2048}, 64),
    "lm-gpu": (lm_gpu, "runs/lm_gpu", {"name": "python-stdlib", "context": 256, "train_limit": 24_576}, 128),
}


def lm_recipe(
    name: str = "lm-cpu",
    out_dir: str | Path | None = None,
    *,
    sensitivity: str | Path | Callable | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **kw,
) -> dict:
    """The byte LM on python-stdlib: float pre-training → weight-only multi-precision → sensitivity → supernet
    (:func:`run_recipe` with ``pretrain=True``); ``name`` is ``lm-cpu`` (:func:`lm_cpu`) or ``lm-gpu``
    (:func:`lm_gpu`); ``sensitivity`` as in :func:`run_recipe`; ``kw``: TrainConfig overrides for every stage."""
    make_cfg, default_out, sens_data, max_hvp = LM_RECIPES[name]
    return run_recipe(
        make_cfg,
        out_dir or default_out,
        sensitivity_splits=sens_data,
        sensitivity=sensitivity,
        max_hvp=max_hvp,
        progress=progress,
        overwrite=overwrite,
        pretrain=True,
        **kw,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m search.recipes",
        description="Run a training recipe end to end (multi-precision → sensitivity → "
        "HASB supernet) and print where its outputs went.",
    )
    p.add_argument(
        "recipe",
        choices=("demo", "resnet20-gpu", *LM_RECIPES),
        help="demo: small_cnn, 8k images, CPU (~90 s); resnet20-gpu: ResNet-20, all 55k images, one GPU; lm-cpu: "
        "lm_tiny on python-stdlib, CPU (a few minutes); lm-gpu: lm_small on python-stdlib, one GPU (float → "
        "weight-only multi-precision → sensitivity → supernet)",
    )
    p.add_argument(
        "--out", default=None, help="run directory (default runs/demo/train, runs/resnet20, runs/lm_cpu or runs/lm_gpu)"
    )
    p.add_argument("--force", "--overwrite", dest="force", action="store_true", help="retrain finished stages")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    p.add_argument(
        "--bits",
        default=None,
        help="candidate bits, comma separated (default 8,6,4,2 for resnet20-gpu, 8,4,2 for lm-cpu, 8,6,4,3,2 for "
        "lm-gpu; not for demo)",
    )
    return p


def run_named(
    recipe: str, out: str | None = None, *, force: bool = False, compile: bool = False, bits: list | None = None
) -> dict:
    """Run the recipe called ``recipe`` ("demo", "resnet20-gpu", "lm-cpu", "lm-gpu"); returns :func:`run_recipe`'s
    dict."""
    kw = {"bits": bits} if bits else {}
    if recipe == "demo":
        if kw or compile:
            raise HasbError("--bits and --compile do not apply to the demo recipe")
        return demo_recipe(out or "runs/demo/train", progress=True, overwrite=force)
    if recipe in LM_RECIPES:
        return lm_recipe(recipe, out, overwrite=force, compile=compile, **kw)
    return gpu_recipe(out or "runs/resnet20", overwrite=force, compile=compile, **kw)


def _print_result(r: dict) -> None:
    """Where each output went (JSON), then one line per training stage: its metric ± 1 SE per precision."""
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in r.items() if k != "measured"}, indent=1))
    for stage, m in r.get("measured", {}).items():
        if m:
            vals = " ".join(f"{k}={v[0]:.4f}±{v[1]:.4f}" for k, v in m.items() if isinstance(v, list))
            print(f"{stage}: {m['metric']} on {m['split']} (n={m['n']}, epoch {m['epoch']}): {vals} (± 1 SE)")


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
    "lm_cpu",
    "lm_gpu",
    "lm_recipe",
    "measured",
    "sensitivity_for",
    "run_named",
    "main",
]


if __name__ == "__main__":
    sys.exit(main())
