"""One-shot training: float pre-training, multi-precision Double Rounding with ALRS, the HASB mixed-precision
supernet.

Library: ``train(TrainConfig(...)) -> Path`` (the run directory); ``load_supernet(path) -> model``.
CLI: ``python -m hasb.train --stage float|multi|supernet --model M --data D --epochs E --out DIR`` (``--help``);
the options are :class:`~hasb.train_config.TrainConfig`'s fields.

Stage ``float`` trains the zoo model unquantized and writes a float state dict (``--init`` of the multi stage);
stage ``multi`` runs Alg. A.2 and stage ``supernet`` Alg. A.3 every step (:mod:`hasb.train_step`); the supernet
stage starts from a multi-precision ``model.pt`` and uses Transitional BN keyed by (previous layer's bit, this
layer's bit) — for models with BatchNorm. LayerNorm models (the byte LMs) keep no running statistics: nothing is
shared across bits, so there is no Transitional BN and nothing to re-calibrate.

Task-aware (:mod:`hasb.data`): the data source's task picks the loss (cross-entropy per example, or per byte for
the byte LMs, distillation included) and the validation metric (accuracy, or bits per byte — lower is better),
each recorded with its standard error, split and size. ``--act-bits fp|N`` trains in weight-only mode.

Optimizer: Adam with explicit parameter groups — ``weights`` (conv/linear weights, weight decay), ``scales``
(quantizer scales, plus per-bit BN affine parameters and biases by default as in the reference;
``scales_include`` chooses; wd 0; ALRS scales its lr per pass, :func:`hasb.alrs.group_lrs`) and ``no_decay`` (any
remaining parameter; wd 0). Learning rates follow a per-step cosine schedule without warm-up.

Run directory: ``train_config.json``, ``checkpoint.pt`` (:mod:`hasb.checkpoint`; resumable exactly, metrics
included), ``metrics.csv``/``metrics.json`` (:mod:`hasb.metrics`; per epoch, the validation metric per precision
with split, size and standard error), and at the end ``model.pt`` (:func:`hasb.export.save_quantized`; the float
stage: :func:`hasb.checkpoint.save_float`).

Distributed (:mod:`hasb.distributed`): launch with ``torchrun --nproc_per_node K -m hasb.train ...``; every rank
takes its slice of the same global batch and gradients are all-reduced (averaged) before every per-bit step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import alrs as A
from .checkpoint import (
    CKPT_FORMAT,
    check_resume,
    clean_stale_tmp,
    is_quantized,
    read_train_checkpoint,
    resume_loss_sums,
    save_checkpoint,
    save_float,
    save_trained,
)
from .cli import (
    act_mode,
    add_options,
    config_from_args,
    default_threads,
    out_lock,
    parse_bits,
    resolve_device,
    run_cli,
    set_threads,
)
from .config import ConfigError, atomic_write_text, bit_str
from .data import DataError, batches, check_model_fits, evaluate_metric, load_dataset
from .distill import pskd_alpha, pskd_target
from .distributed import (
    Dist,
    allreduce_bn_stats,
    allreduce_mean,
    barrier,
    broadcast_state,
    close_dist,
    gather_rows,
    init_dist,
)
from .errors import HasbError
from .export import CheckpointError, load_quantized, read_checkpoint
from .metrics import BN_NOTE, metric_fields, pass_name, summary_line, write_metrics
from .models import (
    UnknownModelError,
    build_model,
    build_record,
    check_model_name,
    model_task,
    state_dict_mismatch,
)
from .modules import QUANT_TYPES
from .quantize import (
    bits_as_data,
    get_spec,
    init_quantizers,
    quantize_like,
    quantize_model,
    searchable_layers,
    set_config,
)
from .sampler import BitSampler, build_sampler, default_warmup
from .sensitivity_file import SensitivityError, load_sensitivity
from .supernet import enable_tbn, tbn_enabled
from .train_config import (
    RESUME_FREE,
    SCALE_CATEGORIES,
    STAGES,
    TrainConfig,
    TrainError,
    validate_config,
)
from .train_step import (
    Batch,
    StepContext,
    autocast,
    float_step,
    multi_precision_step,
    supernet_step,
)

USER_ERRORS = (TrainError, ConfigError, SensitivityError, CheckpointError, DataError, UnknownModelError)


# ----------------------------------------------------------------------------------------------------------------
# parameter groups


def param_categories(model: nn.Module) -> dict[str, str]:
    """Parameter name → category: ``weight`` | ``quant`` (w_scale, act_scales) | ``bn`` | ``bias`` | ``other``."""
    cats: dict[str, str] = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if isinstance(m, QUANT_TYPES) and pname == "w_scale":
                cats[full] = "quant"
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                cats[full] = "bn"
            elif pname == "bias":
                cats[full] = "bias"
            elif pname == "weight" and p.dim() > 1:
                cats[full] = "weight"
            else:
                cats[full] = "other"
    for full, _ in model.named_parameters():
        if ".act_scales." in f".{full}":
            cats[full] = "quant"
    return cats


def param_groups(model: nn.Module, wd: float, scales_include: Sequence[str] = SCALE_CATEGORIES) -> list[dict]:
    """Explicit optimizer groups ``weights`` (wd), ``scales`` (wd 0, ALRS) and ``no_decay`` (wd 0); empty ones dropped."""
    bad = [c for c in scales_include if c not in SCALE_CATEGORIES]
    if bad:
        raise TrainError(
            f"unknown scales-group categor{'y' if len(bad) == 1 else 'ies'} {bad}; "
            f"accepted: {', '.join(SCALE_CATEGORIES)}"
        )
    cats = param_categories(model)
    groups: dict[str, list] = {"weights": [], "scales": [], "no_decay": []}
    for name, p in model.named_parameters():
        c = cats[name]
        g = "weights" if c == "weight" else "scales" if c in scales_include else "no_decay"
        groups[g].append(p)
    wds = {"weights": wd, "scales": 0.0, "no_decay": 0.0}
    return [{"name": g, "params": ps, "weight_decay": wds[g]} for g, ps in groups.items() if ps]


# ----------------------------------------------------------------------------------------------------------------
# model construction


def _resolve_model_pt(path: str | Path) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p


def load_supernet(path: str | Path, trusted_model: str | None = None) -> nn.Module:
    """The trained model from ``DIR/model.pt`` (or a directory containing it), in eval mode (user-code models
    only when ``trusted_model`` names them: see hasb.export.build_recorded)."""
    model, _ = load_quantized(_resolve_model_pt(path), trusted_model=trusted_model)
    return model.eval()


def _load_float_init(model: nn.Module, path: str) -> None:
    """Load a float state dict (plain, or under ``state_dict``/``model``, e.g. the float stage's model.pt) strictly;
    a mismatch names the missing, unexpected and differently shaped keys."""
    obj = read_checkpoint(path)
    if obj.get("format") is not None:
        raise TrainError(
            f"--init {path} is a {obj.get('format')} file; the float and multi stages want a float state dict "
            f"(the supernet stage takes a multi-precision model.pt)"
        )
    for k in ("state_dict", "model"):
        if k in obj and isinstance(obj[k], dict):
            obj = obj[k]
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TrainError(f"--init {path} is not a float state dict (a dict of tensors)")
    name = (build_record(model) or {}).get("name", "?")
    why = state_dict_mismatch(model, obj)
    if why:
        hint = " (a byte LM's context follows the data's window length: --data-opt context=N)" if "pos." in why else ""
        raise TrainError(f"--init {path} does not fit model {name}: {why}{hint}")
    model.load_state_dict(obj, strict=True)


@torch.no_grad()
def _float_bn_stats(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> None:
    """Cumulative BN running statistics of the float model on ``x`` (train-mode BN, nothing else changes)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was = model.training
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)


def _zoo_model(cfg: TrainConfig, splits) -> nn.Module:
    """A fresh ``cfg.model`` for ``splits``; a byte LM's context is the data's window length T."""
    extra = {"context": splits.image_size} if splits.task == "lm" and model_task(cfg.model) == "lm" else {}
    return build_model(
        cfg.model,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        **extra,
    )


def _rebuild(ckpt: dict) -> nn.Module:
    """Resume: the model rebuilt from the checkpoint's own description (quantized unless the float stage's)."""
    build = json.loads(ckpt["build"])
    spec = json.loads(ckpt["spec"])
    model = build_model(**build)
    if spec is not None:
        quantize_like(model, spec)
    if ckpt["tbn"]:
        enable_tbn(model)
    model.load_state_dict(ckpt["model"], strict=True)
    return model


def _build_model(cfg: TrainConfig, splits, ckpt: dict | None) -> tuple[nn.Module, dict | None]:
    """The model to train (and, for supernet, the multi-stage extra dict)."""
    bits = validate_config(cfg)
    if ckpt is not None:
        return _rebuild(ckpt), None
    if cfg.stage == "supernet":
        return _supernet_model(cfg, bits)
    model = _zoo_model(cfg, splits)
    if cfg.init:
        _load_float_init(model, cfg.init)
    if cfg.stage == "float":
        return model, None
    if not cfg.init:
        # from scratch, BN running stats are 0/1 and eval-mode activations far smaller than the
        # train-mode ones: activation scales initialised on them would clip almost everything
        _float_bn_stats(model, splits.calib[0][:512])
    quantize_model(model, bits, fixed_bits=cfg.fixed_bits, rounding=cfg.rounding or "half_up", **act_mode(cfg.act_bits))
    init_quantizers(model, splits.calib[0][:256])
    return model, None


def _supernet_model(cfg: TrainConfig, bits: list[int]) -> tuple[nn.Module, dict]:
    """The multi-precision model of ``--init`` (its weight-only mode inherited), checked against the options."""
    if not cfg.init:
        raise TrainError("the supernet stage needs --init PATH (the multi-precision run's model.pt or its directory)")
    model, extra = load_quantized(_resolve_model_pt(cfg.init), trusted_model=cfg.model)
    spec = get_spec(model)
    if cfg.rounding is not None and cfg.rounding != spec.rounding:
        raise TrainError(f"--rounding {cfg.rounding} differs from --init's {spec.rounding}; the supernet keeps it")
    if extra.get("stage") not in (None, "multi", "supernet"):
        raise TrainError(f"--init {cfg.init} is not a training output (stage={extra.get('stage')!r})")
    not_cand = [b for b in bits if b not in spec.bits]
    if not_cand:
        raise TrainError(
            f"bits {not_cand} are not in the candidate set of {cfg.init}; accepted: {', '.join(map(str, spec.bits))}"
        )
    name = (build_record(model) or {}).get("name")
    if cfg.model and name and cfg.model != name:
        raise TrainError(f"--model {cfg.model} does not match --init (a {name} model)")
    mode = "same" if not spec.weight_only else str(bit_str(spec.act_bit))
    if cfg.act_bits != "same" and cfg.act_bits != mode:
        raise TrainError(
            f"--act-bits {cfg.act_bits} does not match --init (trained with activations {mode}); the supernet "
            f"stage inherits the mode: leave --act-bits out or give {mode}"
        )
    if cfg.tbn:
        enable_tbn(model)
    return model.train(), extra


def _build_sampler(cfg: TrainConfig, model: nn.Module, bits: list[int]) -> BitSampler | None:
    if cfg.stage != "supernet":
        return None
    sens = load_sensitivity(cfg.sensitivity) if cfg.sampler != "uniform" else None
    if sens is None and cfg.sampler != "uniform":
        raise SensitivityError(f"sampler {cfg.sampler!r} needs --sensitivity PATH")
    name = (build_record(model) or {}).get("name")
    warm = default_warmup(cfg.epochs) if cfg.warmup_epochs is None else int(cfg.warmup_epochs)
    try:
        return build_sampler(
            cfg.sampler,
            searchable_layers(model),
            bits,
            sensitivity=sens,
            model_name=name,
            sigma=cfg.sigma,
            epochs=cfg.epochs,
            warmup_epochs=warm,
            tau=cfg.tau,
        )
    except SensitivityError as e:
        raise SensitivityError(f"--sensitivity {cfg.sensitivity}: {e}") from None


def _load_splits(cfg: TrainConfig):
    """The data source's splits; ``--augment`` (2-px shifts, flips) needs image batches ``[N, C, H, W]``."""
    splits = load_dataset(
        cfg.data,
        cfg.data_dir,
        val_size=cfg.val_size,
        train_limit=cfg.train_limit,
        val_limit=cfg.val_limit,
        **cfg.data_opts,
    )
    if cfg.augment and len(splits.input_shape) != 3:
        raise TrainError(
            f"--augment shifts and flips images [C, H, W]; --data {cfg.data} gives inputs of shape "
            f"{list(splits.input_shape)} ({splits.task}): leave --augment out"
        )
    return splits


PSKD_MAX_BYTES = 8 << 30  # the per-sample PSKD record lives in host memory


def _pskd_store(splits) -> torch.Tensor:
    """Zeros for the per-sample top-bit softmax of the epoch: ``[N, K]`` or, per byte, ``[N, T, 256]``."""
    shape = (len(splits.train[0]), *splits.train[1].shape[1:], splits.num_classes)
    size = 4 * int(torch.Size(shape).numel())
    if size > PSKD_MAX_BYTES:
        raise TrainError(
            f"--distill pskd would keep a softmax per training {'byte' if splits.task == 'lm' else 'example'} "
            f"({size / 2**30:.1f} GiB for shape {list(shape)}); use --distill inplace or a smaller --train-limit"
        )
    return torch.zeros(shape)


# ----------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_config(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    config,
    task: str = "classification",
    *,
    batch_size: int = 512,
    device=None,
    bf16: bool = False,
) -> dict:
    """:func:`hasb.data.evaluate_metric` of ``config`` (BitConfig or uniform bit; ignored for an unquantized model)
    on ``data``: ``{"metric", "value", "se", "loss_nats", "n"}``; model left in eval mode."""
    device = device or next(model.parameters()).device
    if is_quantized(model):
        set_config(model, config)
    with autocast(device, bf16):
        return evaluate_metric(model, data, task, batch_size=batch_size, device=device)


def evaluate(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    config,
    *,
    task: str = "classification",
    batch_size: int = 512,
    device=None,
    bf16: bool = False,
) -> tuple[float, float]:
    """(metric, mean CE loss in nats) of ``config`` on ``data``: accuracy for classification, bits per byte for
    ``task="lm"``; see :func:`evaluate_config` for the standard error and size."""
    r = evaluate_config(model, data, config, task, batch_size=batch_size, device=device, bf16=bf16)
    return r["value"], r["loss_nats"]


# ----------------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Run:
    """A validated, built training run and its position in the schedule."""

    cfg: TrainConfig
    bits: list  # the trained precisions' keys: candidate bits, highest first; [None] (the float model) in stage float
    out: Path
    dist: Dist
    device: torch.device
    splits: Any
    model: nn.Module
    ctx: StepContext
    sampler: BitSampler | None
    sgen: torch.Generator
    steps_per_epoch: int
    total_steps: int
    pskd: dict = field(default_factory=lambda: {"prev": None, "cur": None})
    history: list = field(default_factory=list)
    epoch0: int = 0
    skip: int = 0  # steps of epoch0 already done (resume mid-epoch)
    global_step: int = 0
    loss_sums: dict = field(default_factory=dict)  # epoch0's running loss sums at the resume point
    stopped: bool = False

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def labels(self) -> dict:
        """Key → metrics label: ``w8a8``; ``w8afp`` in weight-only mode; ``fp`` for the float stage."""
        if not is_quantized(self.model):
            return {b: pass_name(None, None) for b in self.bits}
        spec = get_spec(self.model)
        return {b: pass_name(*spec.pair(b)) for b in self.bits}


def _pick_device(name: str) -> tuple[torch.device, Dist]:
    """The checked device (``auto``/``cpu``/``cuda[:N]``) and the process group; under DDP each rank's own GPU."""
    try:
        dev = resolve_device(name)
    except HasbError as e:
        raise TrainError(str(e)) from None
    dist_ = init_dist(dev.type)
    if dev.type == "cuda" and dist_.world > 1:
        dev = torch.device("cuda", dist_.local_rank)
        torch.cuda.set_device(dev)
    return dev, dist_


def _open_checkpoint(cfg: TrainConfig, out: Path) -> dict | None:
    """The checkpoint to resume from (checked against ``cfg``), or None for a fresh run in a free ``out``."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a directory; choose another --out")
    path = out / "checkpoint.pt"
    if cfg.resume:
        if not path.is_file():
            raise TrainError(f"--resume: no checkpoint at {path}")
        ckpt = read_train_checkpoint(path)
        check_resume(cfg, ckpt, path)
        return ckpt
    if not cfg.overwrite and (path.exists() or (out / "model.pt").exists()):
        raise TrainError(
            f"{out} already holds a training run; pass --resume to continue it, --force (--overwrite) "
            f"to replace it, or choose another --out"
        )
    return None


def _prepare(cfg: TrainConfig) -> Run:
    """Validate everything (options, device, checkpoint, data, model, sensitivity) and build the run; writes nothing."""
    bits = validate_config(cfg)
    check_model_name(cfg.model)  # a typo in --model: one line before the data are opened
    check_model_fits(cfg.model, cfg.data)  # an LM on images (or a CNN on text): one line before any work
    device, dist_ = _pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    ckpt = _open_checkpoint(cfg, Path(cfg.out))
    splits = _load_splits(cfg)
    check_model_fits(cfg.model, cfg.data, splits.task)  # a user data source's task is known once it is open
    model, _ = _build_model(cfg, splits, ckpt)
    check_model_fits((build_record(model) or {}).get("name"), cfg.data, splits.task)  # supernet: --init's model
    if cfg.stage == "multi" and tuple(bits) != tuple(get_spec(model).bits):
        raise TrainError("resume: bits differ from the checkpoint's model")
    bits = [None] if cfg.stage == "float" else bits
    sampler = _build_sampler(cfg, model, bits)
    model.to(device).train()
    opt = torch.optim.Adam([dict(g) for g in param_groups(model, cfg.wd, cfg.scales_include)], lr=cfg.lr)
    ctx = StepContext(
        model=model,
        fwd=model,
        opt=opt,
        base_lrs={g["name"]: cfg.lr for g in opt.param_groups},
        factors={None: 1.0} if cfg.stage == "float" else A.alrs_factors(bits, cfg.alrs, cfg.alrs_alpha),
        distill=cfg.distill,
        kd_weight=cfg.kd_weight,
        bf16=cfg.bf16,
        dist=dist_,
        task=splits.task,
    )
    n_train = len(splits.train[0])
    if cfg.batch_size % dist_.world:
        raise TrainError(f"batch size {cfg.batch_size} is not divisible by the {dist_.world} processes")
    steps = n_train // cfg.batch_size
    if steps == 0:
        raise TrainError(f"the training set ({n_train} examples) is smaller than one batch ({cfg.batch_size})")
    run = Run(
        cfg,
        bits,
        Path(cfg.out),
        dist_,
        device,
        splits,
        model,
        ctx,
        sampler,
        torch.Generator().manual_seed(cfg.seed + 7919),
        steps,
        steps * cfg.epochs,
    )
    if cfg.distill == "pskd":
        run.pskd["cur"] = _pskd_store(splits)
    if ckpt is not None:
        _restore(run, ckpt)
    return run


def _restore(run: Run, ckpt: dict) -> None:
    """Continue exactly where ``ckpt`` stopped: optimizer, position, RNGs, sampler, PSKD and loss sums."""
    run.ctx.opt.load_state_dict(ckpt["optimizer"])
    run.epoch0, run.skip, run.global_step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"]), int(ckpt["global_step"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    run.sgen.set_state(ckpt["rng"]["sampler"])
    if torch.cuda.is_available() and ckpt["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    if run.sampler is not None and ckpt.get("sampler") is not None:
        run.sampler.load_state_dict(ckpt["sampler"])
    if ckpt.get("pskd"):
        run.pskd = dict(ckpt["pskd"])
    run.history = json.loads(ckpt.get("history", "[]"))
    run.loss_sums = resume_loss_sums(ckpt, run.bits, run.device) if run.skip else {}


def _start(run: Run) -> None:
    """Validation passed: create the run directory (stale temp files of a killed run removed), sync, compile."""
    if run.dist.main:
        run.out.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(run.out)
        atomic_write_text(run.out / "train_config.json", run.cfg.to_json())
    if run.dist.world > 1:
        broadcast_state(run.model)
    if run.cfg.compile:
        if run.cfg.stage == "supernet":
            # every step samples new mixed configs: with bits as data (tensor buffers) one graph serves them all.
            # Multi-precision keeps one specialised graph per uniform bit: on an H200 with CUDA graphs its 4-pass
            # ResNet-18@224 step costs 4.63x a float step against 5.31x with bits as data (session 7,
            # benchmarks/RESULTS.md), which repays the longer compile (156 vs ~70 s) after a few thousand steps.
            bits_as_data(run.model)
        # CUDA graphs on CUDA: a bits-as-data pass is host-bound without them (2.2-2.5x a compiled float step on
        # an H200, 1.37-1.45x with them). Safe here: every pass clears the gradients before its backward and
        # consumes its outputs before the next pass replays the graphs over their memory (tested on a GPU).
        run.ctx.fwd = torch.compile(run.model, mode="reduce-overhead" if run.device.type == "cuda" else None)


def train(cfg: TrainConfig) -> Path:
    """Run one stage described by ``cfg``; returns the run directory (``cfg.out``).

    Everything is validated (options, device, model, data, bits, init file, sensitivity file, resume checkpoint)
    before the run directory is touched. Raises a :class:`~hasb.errors.HasbError` on bad input.
    """
    run = _prepare(cfg)
    # one writer per run folder (the main rank writes): a second run on it fails at once with one line
    with out_lock(run.out) if run.dist.main else contextlib.nullcontext():
        _run_epochs(run)
    barrier(run.dist)
    return run.out


def _run_epochs(run: Run) -> None:
    """The epochs from ``run.epoch0`` (a resumed run's), then the trained model written by the main rank."""
    cfg = run.cfg
    _start(run)
    for epoch in range(run.epoch0, cfg.epochs):
        t0 = time.time()
        done = _train_epoch(run, epoch)
        if done is None:  # stopped mid-epoch by max_steps (a checkpoint was written)
            run.stopped = True
            break
        _end_epoch(run, epoch, *done, t0)
        if cfg.max_steps is not None and run.global_step >= cfg.max_steps:
            run.stopped = epoch + 1 < cfg.epochs
            break
    if run.dist.main and not run.stopped:
        if cfg.stage == "float":
            save_float(run.model, run.out / "model.pt", cfg, run.history)
        else:
            save_trained(run.model, run.out / "model.pt", cfg, run.bits, run.history, run.sampler)


def _train_epoch(run: Run, epoch: int) -> tuple[dict, int] | None:
    """One epoch's steps; returns (bit → summed training loss, steps in the epoch), or None when stopped early."""
    cfg = run.cfg
    run.model.train()
    loss_sum = run.loss_sums or {b: 0.0 for b in run.bits}
    skip = n_steps = run.skip
    run.loss_sums, run.skip = {}, 0
    dgen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    x_all, y_all = run.splits.train
    it = batches(
        (x_all, torch.arange(len(x_all))),
        cfg.batch_size,
        shuffle=True,
        generator=dgen,
        augment=cfg.augment,
        drop_last=True,
    )
    bar = _progress_bar(run, epoch, skip)
    alpha_t = pskd_alpha(epoch, cfg.epochs, cfg.pskd_alpha_T)
    stopped = False
    for s, (xb, ib) in enumerate(it):
        if s < skip:  # resume mid-epoch: same order, same augmentation RNG draws
            continue
        for b, loss in _step(run, epoch, xb, y_all[ib], ib, alpha_t).items():
            loss_sum[b] = loss_sum[b] + loss  # on device: no sync per pass
        n_steps += 1
        run.global_step += 1
        _update_bar(bar, loss_sum[run.bits[0]], n_steps)
        if s + 1 < run.steps_per_epoch and _mid_epoch_checkpoint(run, epoch, s + 1, loss_sum):
            stopped = True
            break
    if bar is not None:
        bar.close()
    return None if stopped else (loss_sum, n_steps)


def _step(
    run: Run, epoch: int, xb: torch.Tensor, yb: torch.Tensor, ib: torch.Tensor, alpha_t: float
) -> dict[int, torch.Tensor]:
    """One global step on this rank's slice of the batch (``ib``: the batch's sample indices); bit → loss."""
    d, device = run.dist, run.device
    ib_local = ib
    if d.world > 1:
        xb, yb, ib_local = xb[d.rank :: d.world], yb[d.rank :: d.world], ib[d.rank :: d.world]
    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
    sched = A.cosine_factor(run.global_step, run.total_steps)
    soft = None
    if run.cfg.distill == "pskd":
        prev = run.pskd["prev"]
        prev = None if prev is None else prev[ib_local].to(device)
        soft = pskd_target(yb.long(), prev, alpha_t, run.splits.num_classes)
    batch = Batch(xb, yb, soft)
    if run.cfg.stage == "float":
        losses, p_top = float_step(run.ctx, batch, sched)
    elif run.sampler is None:
        losses, p_top = multi_precision_step(run.ctx, batch, run.bits, sched)
    else:
        losses, p_top = supernet_step(run.ctx, batch, run.bits, sched, run.sampler, epoch, run.sgen)
    if run.cfg.distill == "pskd":
        _store_pskd(run.pskd, ib, ib_local, p_top, d)
    return losses


def _store_pskd(pskd: dict, ib_global: torch.Tensor, ib_local: torch.Tensor, p: torch.Tensor, d: Dist) -> None:
    """Keep the highest-bit softmax of every sample of the global batch (all-gathered under DDP)."""
    if d.world > 1:
        pskd["cur"][ib_global] = gather_rows(p, len(ib_global), d).cpu()
    else:
        pskd["cur"][ib_local] = p.cpu()


def _mid_epoch_checkpoint(run: Run, epoch: int, step_in_epoch: int, loss_sum: dict) -> bool:
    """Checkpoint every ``checkpoint_every`` steps and at ``max_steps``; True when ``max_steps`` is reached."""
    cfg = run.cfg
    at_max = cfg.max_steps is not None and run.global_step >= cfg.max_steps
    if (cfg.checkpoint_every and run.global_step % cfg.checkpoint_every == 0) or at_max:
        sums = loss_sum
        if run.dist.world > 1:  # every rank resumes from the ranks' mean partial sum: the epoch mean stays the same
            means = allreduce_mean([float(loss_sum[b]) for b in run.bits], run.dist.world)
            sums = {b: torch.tensor(m, dtype=torch.float32) for b, m in zip(run.bits, means, strict=True)}
        if run.dist.main:
            _save(run, epoch, step_in_epoch, sums)
    return at_max


def _save(run: Run, epoch: int, step_in_epoch: int, loss_sum: dict) -> None:
    save_checkpoint(
        run.ckpt_path,
        cfg=run.cfg,
        model=run.model,
        opt=run.ctx.opt,
        pos={"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": run.global_step},
        sampler=run.sampler,
        sgen=run.sgen,
        pskd=run.pskd,
        history=run.history,
        loss_sums=loss_sum,
    )


def _end_epoch(run: Run, epoch: int, loss_sum: dict, n_steps: int, t0: float) -> None:
    """Epoch metrics (validation on the main rank), metrics files, a checkpoint and the summary line."""
    cfg, bits, d = run.cfg, run.bits, run.dist
    sums = [float(loss_sum[b]) for b in bits]
    if cfg.distill == "pskd":
        run.pskd["prev"], run.pskd["cur"] = run.pskd["cur"].clone(), run.pskd["cur"]
    if d.world > 1:
        allreduce_bn_stats(run.model, d.world)
        sums = allreduce_mean(sums + [float(n_steps)], d.world)[: len(bits)]
    row = _epoch_row(run, epoch, dict(zip(bits, sums, strict=True)), n_steps, t0)
    run.history.append(row)
    run.model.train()
    if d.main:
        write_metrics(run.out, run.history)
        _save(run, epoch + 1, 0, {})
        if cfg.progress:
            print(summary_line(cfg.stage, row, list(run.labels.values()), cfg.epochs), file=sys.stderr)


def _bn_note(run: Run) -> str:
    """How the scores below use normalisation statistics (hasb.metrics.BN_NOTE)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.model.modules()):
        return BN_NOTE["none"]
    if run.cfg.stage == "float":
        return "float BN as trained"
    if run.cfg.stage == "multi":
        return BN_NOTE["multi"]
    return BN_NOTE["supernet" if tbn_enabled(run.model) else "supernet-bit"]


def _epoch_row(run: Run, epoch: int, sums: dict, n_steps: int, t0: float) -> dict[str, Any]:
    """One metrics row: mean training losses, the validation metric ± SE per precision (metric, split, size, BN),
    lrs, σ (columns: :mod:`hasb.metrics`)."""
    cfg, bits, labels = run.cfg, run.bits, run.labels
    n = max(n_steps, 1)
    row: dict[str, Any] = {"epoch": epoch + 1, "step": run.global_step, "loss": sum(sums.values()) / n / len(bits)}
    for b in bits:
        row[f"loss_{labels[b]}"] = sums[b] / n
    if run.dist.main:
        val = run.splits.val
        row.update(
            metric=run.splits.metric,
            higher_is_better=run.splits.higher_is_better,
            val_split="val",
            val_n=len(val[1]),
            bn=_bn_note(run),
        )
        if run.splits.task == "lm":
            row["val_bytes"] = int(val[1].numel())
        for b in bits:
            res = evaluate_config(run.model, val, b, run.splits.task, device=run.device, bf16=cfg.bf16)
            row.update(metric_fields(labels[b], res))
    sched = A.cosine_factor(run.global_step - 1, run.total_steps)
    for g in run.ctx.opt.param_groups:
        row[f"lr_{g['name']}"] = run.ctx.base_lrs[g["name"]] * sched
    for b in bits if cfg.stage != "float" else ():  # ALRS: per-bit lr of the scales group
        row[f"lr_scales_{labels[b]}"] = cfg.lr * sched * run.ctx.factors[b]
    if run.sampler is not None:
        row["sigma"] = run.sampler.sigma_at(epoch)
    row["epoch_s"] = time.time() - t0
    return row


def _progress_bar(run: Run, epoch: int, skip: int) -> Any:
    if not (run.cfg.progress and run.dist.main):
        return None
    return tqdm(
        total=run.steps_per_epoch,
        initial=skip,
        desc=f"{run.cfg.stage} epoch {epoch + 1}/{run.cfg.epochs}",
        leave=False,
        dynamic_ncols=True,
    )


def _update_bar(bar: Any, top_sum: Any, n_steps: int) -> None:
    if bar is None:
        return
    bar.update(1)
    if n_steps % 20 == 1:  # reading the loss syncs the device; not every step
        bar.set_postfix(loss=f"{float(top_sum) / n_steps:.3f}")


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser, generated from :class:`TrainConfig`'s fields."""
    p = argparse.ArgumentParser(
        prog="python -m hasb.train",
        description="Train a float model (stage float), a Double Rounding multi-precision model from it "
        "(stage multi) or the HASB mixed-precision supernet from that (stage supernet), on images or (byte LMs "
        "lm_tiny, lm_small) text. Writes DIR/checkpoint.pt, metrics.csv/json, "
        "train_config.json and finally DIR/model.pt. Bad input: one line on stderr, exit code 2.",
    )
    return add_options(p, TrainConfig)


def _run(ns: argparse.Namespace) -> int:
    cfg = config_from_args(TrainConfig, ns, bits=parse_bits(ns.bits))
    validate_config(cfg)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: share the cores between local ranks
    set_threads(cfg.threads if cfg.threads is not None or local == 1 else max(1, default_threads() // local))
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        model_pt = out / "model.pt"
        print(f"wrote {model_pt if model_pt.exists() else out / 'checkpoint.pt'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return run_cli(lambda: _run(ns))
    finally:
        close_dist()


__all__ = [
    "TrainConfig",
    "TrainError",
    "USER_ERRORS",
    "STAGES",
    "SCALE_CATEGORIES",
    "RESUME_FREE",
    "CKPT_FORMAT",
    "train",
    "evaluate",
    "evaluate_config",
    "load_supernet",
    "param_groups",
    "param_categories",
    "build_parser",
    "main",
]


if __name__ == "__main__":
    sys.exit(main())
