"""One-shot training: multi-precision Double Rounding with ALRS, then the HASB mixed-precision supernet.

Library: ``train(TrainConfig(...)) -> Path`` (the run directory); ``load_supernet(path) -> model``.
CLI: ``python -m hasb.train --stage multi|supernet --model M --data D --epochs E --out DIR`` (``--help``).

Stage ``multi`` (Alg. A.2): every step, for each candidate bit from high to low,
all searchable layers switch to that bit, forward, loss, backward and an
optimizer step — each precision updates the shared weights in turn; BN is
per-bit.  There is no extra step after the loop (the reference's
``step_inside`` quirk steps Adam once more on zeroed gradients).

Stage ``supernet`` (Alg. A.3): starts from a multi-precision ``model.pt``; each
base-bit pass runs a per-layer config drawn by the sampler (HASB by default);
BatchNorm is Transitional BN keyed by (previous layer's bit, this layer's bit).

Optimizer: Adam with explicit parameter groups — ``weights`` (conv/linear
weights, weight decay), ``scales`` (quantizer scales, plus per-bit BN affine
parameters and biases by default as in the reference; ``scales_include``
chooses; wd 0; ALRS scales its lr per pass) and ``no_decay`` (any remaining
parameter; wd 0).  Learning rates follow a per-step cosine schedule without
warm-up.

Run directory: ``train_config.json``, ``checkpoint.pt`` (resumable: model,
optimizer, schedule position, sampler, RNG and PSKD state; written atomically,
readable with ``weights_only=True``), ``metrics.csv``/``metrics.json`` (per
epoch), and at the end ``model.pt`` (:func:`hasb.export.save_quantized`).

Distributed: launch with ``torchrun --nproc_per_node K -m hasb.train ...``; every
rank takes its slice of the same global batch and gradients are all-reduced
(averaged) before every per-bit step (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

from .errors import HasbError
import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import alrs as A
from .config import ConfigError, atomic_write_bytes, atomic_write_text
from .data import DataError, batches, load_dataset
from .distill import DISTILL_MODES, inplace_loss, pskd_alpha, pskd_target, soft_cross_entropy
from .export import CheckpointError, load_quantized, read_checkpoint, save_quantized
from .models import UnknownModelError, build_model
from .modules import QUANT_TYPES
from .quantize import get_spec, init_quantizers, quantize_model, searchable_layers, set_config
from .sampler import SAMPLERS, BitSampler, build_sampler, default_warmup
from .sensitivity_file import SensitivityError, load_sensitivity
from .supernet import enable_tbn, tbn_enabled

STAGES = ("multi", "supernet")
SCALE_CATEGORIES = ("quant", "bn", "bias")
CKPT_FORMAT = "hasb-train"
# fields that may differ between a run and its --resume (they do not change what is computed)
RESUME_FREE = {"resume", "max_steps", "progress", "checkpoint_every", "device", "compile", "out", "data_dir",
               "overwrite"}


class TrainError(HasbError):
    """Bad training input (reported as one line on stderr with exit code 2 by the CLI)."""


USER_ERRORS = (TrainError, ConfigError, SensitivityError, CheckpointError, DataError, UnknownModelError)


@dataclass
class TrainConfig:
    """Everything a training run depends on; JSON round trip via ``to_json``/``from_json``."""

    stage: str = "multi"                   # multi | supernet
    model: str = "small_cnn"               # zoo name or package.module:callable (multi stage)
    data: str = "fashion-mnist"
    data_dir: Optional[str] = None
    out: str = "runs/train"
    epochs: int = 1
    bits: list = field(default_factory=lambda: [8, 6, 4, 2])
    batch_size: int = 128                  # global batch (split over DDP ranks)
    lr: float = 2e-3                       # λ₀ of every group (Adam)
    wd: float = 5e-5                       # weight decay of the weights group only
    alrs: str = "code"                     # code | paper | off
    alrs_alpha: float = 0.1
    scales_include: list = field(default_factory=lambda: list(SCALE_CATEGORIES))
    sampler: str = "hasb"                  # hasb | uniform | tempered (supernet stage)
    sensitivity: Optional[str] = None      # sensitivity.json (hasb / tempered samplers)
    sigma: float = 0.5
    warmup_epochs: Optional[int] = None    # None: round(epochs·10/90)
    tau: float = 1.0                       # tempered sampler temperature
    tbn: bool = True                       # Transitional BN in the supernet stage
    init: Optional[str] = None             # multi: float state dict; supernet: multi-precision model.pt
    distill: str = "inplace"               # inplace | pskd | none
    kd_weight: float = 0.5                 # weight of the soft term in in-place distillation
    pskd_alpha_T: float = 0.7
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    val_size: int = 5000
    augment: bool = False
    fixed_bits: str = "fp"                 # precision of the fixed first/last layers
    seed: int = 0
    device: str = "auto"
    bf16: bool = False
    compile: bool = False
    checkpoint_every: int = 0              # steps; 0 = end of every epoch only
    resume: bool = False
    overwrite: bool = False
    max_steps: Optional[int] = None        # stop (with a checkpoint) after this many global steps
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training option(s) {unknown}; accepted: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "TrainConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise TrainError(f"training config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise TrainError("training config JSON must be an object")
        return cls.from_dict(d)


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
        raise TrainError(f"unknown scales-group categor{'y' if len(bad) == 1 else 'ies'} {bad}; "
                         f"accepted: {', '.join(SCALE_CATEGORIES)}")
    cats = param_categories(model)
    groups: dict[str, list] = {"weights": [], "scales": [], "no_decay": []}
    for name, p in model.named_parameters():
        c = cats[name]
        g = "weights" if c == "weight" else "scales" if c in scales_include else "no_decay"
        groups[g].append(p)
    wds = {"weights": wd, "scales": 0.0, "no_decay": 0.0}
    return [{"name": g, "params": ps, "weight_decay": wds[g]} for g, ps in groups.items() if ps]


# ----------------------------------------------------------------------------------------------------------------
# distributed helpers

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(device_kind: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _allreduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average the gradients present on every rank (the same set everywhere: configs are drawn identically)."""
    import torch.distributed as dist
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[i:i + n].view_as(g))
        i += n


def _allreduce_bn_stats(model: nn.Module, world: int) -> None:
    import torch.distributed as dist
    for n, b in model.named_buffers():
        if n.endswith("running_mean") or n.endswith("running_var"):
            dist.all_reduce(b)
            b /= world


def _broadcast_state(model: nn.Module) -> None:
    import torch.distributed as dist
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, 0)


# ----------------------------------------------------------------------------------------------------------------
# model construction

def _resolve_model_pt(path: Union[str, Path]) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p


def load_supernet(path: Union[str, Path]) -> nn.Module:
    """The trained model from ``DIR/model.pt`` (or a directory containing it), in eval mode."""
    model, _ = load_quantized(_resolve_model_pt(path))
    return model.eval()


def _load_float_init(model: nn.Module, path: str) -> None:
    obj = read_checkpoint(path)
    for k in ("state_dict", "model"):
        if k in obj and isinstance(obj[k], dict):
            obj = obj[k]
    if obj.get("format") is not None:
        raise TrainError(f"--init {path} is a {obj.get('format')} file; the multi stage wants a float state dict "
                         f"(the supernet stage takes a multi-precision model.pt)")
    try:
        model.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        raise TrainError(f"--init {path} does not fit model {getattr(model, 'hasb_model_name', '?')}: "
                         f"{str(e).splitlines()[0][:300]}") from None


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
            model(x[i:i + batch_size])
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)


def _parse_bits(bits) -> list[int]:
    try:
        out = sorted({int(b) for b in bits}, reverse=True)
    except (TypeError, ValueError):
        raise TrainError(f"bits must be integers, got {bits!r}") from None
    if not out:
        raise TrainError("bits must name at least one bit-width")
    return out


def _build_model(cfg: TrainConfig, splits, ckpt: Optional[dict]) -> tuple[nn.Module, Optional[dict]]:
    """The model to train (and, for supernet, the multi-stage extra dict)."""
    bits = _parse_bits(cfg.bits)
    if ckpt is not None:   # resume: rebuild from the checkpoint's own description
        build = json.loads(ckpt["build"])
        spec = json.loads(ckpt["spec"])
        model = build_model(**build)
        quantize_model(model, spec["bits"], fixed=list(spec["fixed"]) or "none",
                       fixed_bits="fp" if spec["fixed_bit"] is None else spec["fixed_bit"], rounding=spec["rounding"])
        if ckpt["tbn"]:
            enable_tbn(model)
        model.load_state_dict(ckpt["model"], strict=True)
        return model, None
    if cfg.stage == "multi":
        model = build_model(cfg.model, num_classes=splits.num_classes, in_channels=splits.in_channels,
                            image_size=splits.image_size)
        if cfg.init:
            _load_float_init(model, cfg.init)
        else:
            # from scratch, BN running stats are 0/1 and eval-mode activations far smaller than the
            # train-mode ones: activation scales initialised on them would clip almost everything
            _float_bn_stats(model, splits.calib[0][:512])
        if any(not 1 <= b <= 8 for b in bits):
            raise TrainError(f"bits {bits} not in the candidate set: each must be an integer in 1..8")
        quantize_model(model, bits, fixed_bits=cfg.fixed_bits)
        init_quantizers(model, splits.calib[0][:256])
        return model, None
    # supernet
    if not cfg.init:
        raise TrainError("the supernet stage needs --init PATH (the multi-precision run's model.pt or its directory)")
    model, extra = load_quantized(_resolve_model_pt(cfg.init))
    spec = get_spec(model)
    if extra.get("stage") not in (None, "multi", "supernet"):
        raise TrainError(f"--init {cfg.init} is not a training output (stage={extra.get('stage')!r})")
    not_cand = [b for b in bits if b not in spec.bits]
    if not_cand:
        raise TrainError(f"bits {not_cand} are not in the candidate set of {cfg.init}; accepted: "
                         f"{', '.join(map(str, spec.bits))}")
    name = (getattr(model, "hasb_build", None) or {}).get("name")
    if cfg.model and name and cfg.model != name:
        raise TrainError(f"--model {cfg.model} does not match --init (a {name} model)")
    if cfg.tbn:
        enable_tbn(model)
    return model.train(), extra


def _build_sampler(cfg: TrainConfig, model: nn.Module) -> Optional[BitSampler]:
    if cfg.stage != "supernet":
        return None
    if cfg.sampler not in SAMPLERS:
        raise TrainError(f"unknown sampler {cfg.sampler!r}; accepted: {', '.join(SAMPLERS)}")
    sens = load_sensitivity(cfg.sensitivity) if cfg.sampler != "uniform" else None
    if sens is None and cfg.sampler != "uniform":
        raise SensitivityError(f"sampler {cfg.sampler!r} needs --sensitivity PATH")
    name = (getattr(model, "hasb_build", None) or {}).get("name")
    warm = default_warmup(cfg.epochs) if cfg.warmup_epochs is None else int(cfg.warmup_epochs)
    try:
        return build_sampler(cfg.sampler, searchable_layers(model), _parse_bits(cfg.bits), sensitivity=sens,
                             model_name=name, sigma=cfg.sigma, epochs=cfg.epochs, warmup_epochs=warm, tau=cfg.tau)
    except SensitivityError as e:
        raise SensitivityError(f"--sensitivity {cfg.sensitivity}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], config, *, batch_size: int = 512,
             device=None, bf16: bool = False) -> tuple[float, float]:
    """(accuracy, mean CE loss) of ``config`` (BitConfig or uniform bit) on ``data``; model left in eval mode."""
    device = device or next(model.parameters()).device
    model.eval()
    set_config(model, config)
    correct, loss, n = 0, 0.0, 0
    for x, y in batches(data, batch_size, device=device):
        with _autocast(device, bf16):
            z = model(x)
        loss += float(F.cross_entropy(z.float(), y, reduction="sum"))
        correct += int((z.argmax(1) == y).sum())
        n += len(y)
    return correct / max(n, 1), loss / max(n, 1)


def _autocast(device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16)


def _bit_name(b: int) -> str:
    return f"w{b}a{b}"


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

def _save_checkpoint(path: Path, *, cfg: TrainConfig, model: nn.Module, opt, epoch: int, step_in_epoch: int,
                     global_step: int, sampler: Optional[BitSampler], sgen: torch.Generator,
                     pskd: dict, history: list) -> None:
    spec = get_spec(model)
    obj = {
        "format": CKPT_FORMAT, "version": 1,
        "config": cfg.to_json(),
        "build": json.dumps(getattr(model, "hasb_build", None)),
        "spec": json.dumps(spec.to_dict()),
        "tbn": bool(tbn_enabled(model)),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "epoch": int(epoch), "step_in_epoch": int(step_in_epoch), "global_step": int(global_step),
        "rng": {"torch": torch.get_rng_state(), "sampler": sgen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "sampler": sampler.state_dict() if sampler is not None else None,
        "pskd": {k: (None if v is None else v.detach().cpu().clone()) for k, v in pskd.items()},
        "history": json.dumps(history),
    }
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _read_train_checkpoint(path: Path) -> dict:
    obj = read_checkpoint(path)
    if obj.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a hasb training checkpoint (format={obj.get('format')!r})")
    needed = ("config", "model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng")
    missing = [k for k in needed if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is incomplete (missing {missing})")
    return obj


def _check_resume(cfg: TrainConfig, ckpt: dict, path: Path) -> None:
    old = TrainConfig.from_json(ckpt["config"]).to_dict()
    new = cfg.to_dict()
    diff = [k for k in new if k not in RESUME_FREE and old.get(k) != new[k]]
    if diff:
        k = diff[0]
        raise TrainError(f"--resume: option {k!r} differs from the checkpoint {path} ({old.get(k)!r} vs {new[k]!r}); "
                         f"resume with the original settings")


# ----------------------------------------------------------------------------------------------------------------
# the loop

def _write_metrics(out: Path, history: list) -> None:
    atomic_write_text(out / "metrics.json", json.dumps(history, indent=2))
    keys: list[str] = []
    for row in history:
        for k in row:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow(row)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def _pick_device(name: str, dist_: Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda requested but CUDA is not available")
        if dist_.world > 1:
            dev = torch.device("cuda", dist_.local_rank)
            torch.cuda.set_device(dev)
    return dev


def _validate_cfg(cfg: TrainConfig) -> None:
    if cfg.stage not in STAGES:
        raise TrainError(f"unknown stage {cfg.stage!r}; accepted: {', '.join(STAGES)}")
    if cfg.alrs not in A.ALRS_MODES:
        raise TrainError(f"unknown ALRS mode {cfg.alrs!r}; accepted: {', '.join(A.ALRS_MODES)}")
    if cfg.distill not in DISTILL_MODES:
        raise TrainError(f"unknown distillation {cfg.distill!r}; accepted: {', '.join(DISTILL_MODES)}")
    if cfg.sampler not in SAMPLERS:
        raise TrainError(f"unknown sampler {cfg.sampler!r}; accepted: {', '.join(SAMPLERS)}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise TrainError("epochs and batch size must be ≥ 1")
    if not 0 <= cfg.sigma <= 1:
        raise TrainError(f"sigma must be in [0, 1], got {cfg.sigma}")
    if cfg.lr <= 0 or cfg.wd < 0:
        raise TrainError("lr must be > 0 and wd ≥ 0")
    _parse_bits(cfg.bits)


def train(cfg: TrainConfig) -> Path:
    """Run one stage described by ``cfg``; returns the run directory (``cfg.out``).

    Everything is validated (model, data, bits, init file, sensitivity file, resume
    checkpoint) before the run directory is touched.  Raises one of ``USER_ERRORS``
    on bad input.
    """
    _validate_cfg(cfg)
    out = Path(cfg.out)
    dist_ = _init_dist("cuda" if (cfg.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu")
    device = _pick_device(cfg.device, dist_)
    torch.manual_seed(cfg.seed)

    ckpt = None
    ckpt_path = out / "checkpoint.pt"
    if cfg.resume:
        if not ckpt_path.is_file():
            raise TrainError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = _read_train_checkpoint(ckpt_path)
        _check_resume(cfg, ckpt, ckpt_path)
    elif not cfg.overwrite and ((out / "checkpoint.pt").exists() or (out / "model.pt").exists()):
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it, --overwrite to "
                         f"replace it, or choose another --out")

    splits = load_dataset(cfg.data, cfg.data_dir, val_size=cfg.val_size, train_limit=cfg.train_limit,
                          val_limit=cfg.val_limit)
    model, init_extra = _build_model(cfg, splits, ckpt)
    bits = _parse_bits(cfg.bits)
    if cfg.stage == "multi" and tuple(bits) != tuple(get_spec(model).bits):
        raise TrainError("resume: bits differ from the checkpoint's model")
    sampler = _build_sampler(cfg, model)
    model.to(device).train()
    groups = param_groups(model, cfg.wd, cfg.scales_include)
    opt = torch.optim.Adam([{k: v for k, v in g.items()} for g in groups], lr=cfg.lr)
    base_lrs = {g["name"]: cfg.lr for g in opt.param_groups}
    factors = A.alrs_factors(bits, cfg.alrs, cfg.alrs_alpha)
    params = [p for g in opt.param_groups for p in g["params"]]

    n_train = len(splits.train[0])
    if cfg.batch_size % dist_.world:
        raise TrainError(f"batch size {cfg.batch_size} is not divisible by the {dist_.world} processes")
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"the training set ({n_train} images) is smaller than one batch ({cfg.batch_size})")
    total_steps = steps_per_epoch * cfg.epochs
    sgen = torch.Generator().manual_seed(cfg.seed + 7919)
    pskd: dict = {"prev": None, "cur": None}
    if cfg.distill == "pskd":
        pskd["cur"] = torch.zeros(n_train, splits.num_classes)
    history: list = []
    epoch0, skip, global_step = 0, 0, 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        epoch0, skip, global_step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"]), int(ckpt["global_step"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        sgen.set_state(ckpt["rng"]["sampler"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        if sampler is not None and ckpt.get("sampler") is not None:
            sampler.load_state_dict(ckpt["sampler"])
        if ckpt.get("pskd"):
            pskd = {k: v for k, v in ckpt["pskd"].items()}
        history = json.loads(ckpt.get("history", "[]"))

    # validation passed: now the run directory may be written
    if dist_.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", cfg.to_json())
    if dist_.world > 1:
        _broadcast_state(model)

    fwd = model
    if cfg.compile:
        if cfg.stage == "multi":
            fwd = torch.compile(model)
        else:   # per-layer configs vary every pass: compile leaves (≤ one graph per bit each) not the whole net
            for m in model.modules():
                if isinstance(m, QUANT_TYPES):
                    m.compile()
    x_all, y_all = splits.train
    idx_all = torch.arange(n_train)
    try:
        from tqdm.auto import tqdm
    except ImportError:   # pragma: no cover
        tqdm = None

    stopped = False
    for epoch in range(epoch0, cfg.epochs):
        model.train()
        t0 = time.time()
        loss_sum = {b: 0.0 for b in bits}
        n_steps = 0
        dgen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        it = batches((x_all, idx_all), cfg.batch_size, shuffle=True, generator=dgen, augment=cfg.augment,
                     drop_last=True)
        bar = None
        if cfg.progress and dist_.main and tqdm is not None:
            bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"{cfg.stage} epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True)
        alpha_t = pskd_alpha(epoch, cfg.epochs, cfg.pskd_alpha_T)
        for s, (xb, ib) in enumerate(it):
            if s < skip:      # resume mid-epoch: same order, same augmentation RNG draws
                continue
            yb = y_all[ib]
            if dist_.world > 1:
                xb, yb, ib_local = xb[dist_.rank::dist_.world], yb[dist_.rank::dist_.world], ib[dist_.rank::dist_.world]
            else:
                ib_local = ib
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            sched = A.cosine_factor(global_step, total_steps)
            soft = None
            if cfg.distill == "pskd":
                prev = pskd["prev"][ib_local] if pskd["prev"] is not None else None
                soft = pskd_target(yb, None if prev is None else prev.to(device), alpha_t, splits.num_classes)
            teacher = None
            for k, b in enumerate(bits):
                conf = sampler.sample(b, epoch, sgen) if sampler is not None else b
                set_config(model, conf)
                for g in opt.param_groups:
                    g["lr"] = base_lrs[g["name"]] * sched * (factors[b] if g["name"] == "scales" else 1.0)
                with _autocast(device, cfg.bf16):
                    z = fwd(xb)
                if soft is not None:
                    loss = soft_cross_entropy(z, soft)
                elif cfg.distill == "inplace":
                    loss = inplace_loss(z, yb, teacher, cfg.kd_weight)
                else:
                    loss = F.cross_entropy(z.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if dist_.world > 1:
                    _allreduce_grads(params, dist_.world)
                opt.step()
                if k == 0:
                    p_top = torch.softmax(z.detach().float(), 1)
                    if cfg.distill == "inplace":
                        teacher = p_top
                    elif cfg.distill == "pskd":
                        _store_pskd(pskd, ib, ib_local, p_top, dist_)
                loss_sum[b] = loss_sum[b] + loss.detach().float()   # on device: no sync per pass
            n_steps += 1
            global_step += 1
            if bar is not None:
                bar.update(1)
                if n_steps % 20 == 1:   # reading the loss syncs the device; not every step
                    bar.set_postfix(loss=f"{float(loss_sum[bits[0]]) / n_steps:.3f}")
            last = s + 1 == steps_per_epoch
            want_ckpt = (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0) or \
                (cfg.max_steps is not None and global_step >= cfg.max_steps)
            if want_ckpt and not last:
                if dist_.main:
                    _save_checkpoint(ckpt_path, cfg=cfg, model=model, opt=opt, epoch=epoch, step_in_epoch=s + 1,
                                     global_step=global_step, sampler=sampler, sgen=sgen, pskd=pskd, history=history)
            if cfg.max_steps is not None and global_step >= cfg.max_steps and not last:
                stopped = True
                break
        if bar is not None:
            bar.close()
        skip = 0
        if stopped:
            break
        # ---- end of epoch: metrics + checkpoint
        loss_sum = {b: float(v) for b, v in loss_sum.items()}
        if cfg.distill == "pskd":
            pskd["prev"], pskd["cur"] = pskd["cur"].clone(), pskd["cur"]
        if dist_.world > 1:
            _allreduce_bn_stats(model, dist_.world)
            ls = torch.tensor([loss_sum[b] for b in bits] + [float(n_steps)], dtype=torch.float64)
            import torch.distributed as dist
            dist.all_reduce(ls)
            loss_sum = {b: float(ls[i]) / dist_.world for i, b in enumerate(bits)}
        row: dict[str, Any] = {"epoch": epoch + 1, "step": global_step,
                               "loss": sum(loss_sum.values()) / max(n_steps, 1) / len(bits)}
        for b in bits:
            row[f"loss_{_bit_name(b)}"] = loss_sum[b] / max(n_steps, 1)
        if dist_.main:
            for b in bits:
                acc, vloss = evaluate(model, splits.val, b, device=device, bf16=cfg.bf16)
                row[f"acc_{_bit_name(b)}"] = acc
                row[f"val_loss_{_bit_name(b)}"] = vloss
        sched = A.cosine_factor(global_step - 1, total_steps)
        for g in opt.param_groups:
            row[f"lr_{g['name']}"] = base_lrs[g["name"]] * sched
        for b in bits:
            row[f"lr_scales_{_bit_name(b)}"] = cfg.lr * sched * factors[b]
        if sampler is not None:
            row["sigma"] = sampler.sigma_at(epoch)
        row["epoch_s"] = time.time() - t0
        history.append(row)
        model.train()
        if dist_.main:
            _write_metrics(out, history)
            _save_checkpoint(ckpt_path, cfg=cfg, model=model, opt=opt, epoch=epoch + 1, step_in_epoch=0,
                             global_step=global_step, sampler=sampler, sgen=sgen, pskd=pskd, history=history)
            accs = " ".join(f"{_bit_name(b)}={row[f'acc_{_bit_name(b)}']:.4f}" for b in bits)
            if cfg.progress:
                print(f"[{cfg.stage}] epoch {epoch + 1}/{cfg.epochs} loss={row['loss']:.4f} {accs}", file=sys.stderr)
        if cfg.max_steps is not None and global_step >= cfg.max_steps:
            stopped = epoch + 1 < cfg.epochs
            break

    if dist_.main and not stopped:
        set_config(model, bits[0])
        model.eval()
        extra = {"stage": cfg.stage, "train_config": cfg.to_dict(), "bn": "tbn" if tbn_enabled(model) else "bit",
                 "metrics": history[-1] if history else {}}
        if sampler is not None:
            extra["sampler"] = {"kind": sampler.kind, "probabilities": {n: {str(b): p for b, p in d.items()}
                                                                         for n, d in sampler.probabilities().items()}}
        save_quantized(model, out / "model.pt", extra=extra)
    if dist_.world > 1:
        import torch.distributed as dist
        dist.barrier()
    return out


def _store_pskd(pskd: dict, ib_global: torch.Tensor, ib_local: torch.Tensor, p: torch.Tensor, dist_: Dist) -> None:
    """Keep the highest-bit softmax of every sample of the global batch (all-gathered under DDP)."""
    if dist_.world > 1:
        import torch.distributed as dist
        parts = [torch.empty_like(p) for _ in range(dist_.world)]
        dist.all_gather(parts, p.contiguous())
        full = torch.empty(len(ib_global), p.shape[1], dtype=p.dtype, device=p.device)
        for r in range(dist_.world):
            full[r::dist_.world] = parts[r]
        pskd["cur"][ib_global] = full.cpu()
    else:
        pskd["cur"][ib_local] = p.cpu()


# ----------------------------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m hasb.train",
        description="Train a Double Rounding multi-precision model (stage multi) or the HASB mixed-precision "
                    "supernet from it (stage supernet). Writes DIR/checkpoint.pt, metrics.csv/json, "
                    "train_config.json and finally DIR/model.pt. Bad input: one line on stderr, exit code 2.")
    p.add_argument("--stage", choices=STAGES, default=d.stage, help="multi: all-bit training (Alg. A.2); supernet: "
                   "per-layer stochastic bit switching from a multi-precision model.pt (Alg. A.3). Default %(default)s")
    p.add_argument("--model", default=None, help="zoo model (resnet20, resnet18, resnet50, mobilenet_v2, small_cnn, "
                   "tiny_mlp, vit_tiny) or package.module:callable. Multi stage: required; supernet: taken from --init")
    p.add_argument("--data", default=d.data, help="dataset: fashion-mnist or mnist (IDX files). Default %(default)s")
    p.add_argument("--data-dir", default=None, help="folder with the IDX .gz files (default: the Debian dataset "
                   "location or $HASB_DATA_DIR)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs. Default %(default)s")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--bits", default="8,6,4,2", help="candidate bits, comma separated; in the supernet stage a "
                   "subset of --init's candidates. Default %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size. Default %(default)s")
    p.add_argument("--lr", type=float, default=d.lr, help="initial Adam learning rate λ₀ of every group, cosine "
                   "annealed per step. Default %(default)s")
    p.add_argument("--wd", type=float, default=d.wd, help="weight decay of the weights group (scales: 0). "
                   "Default %(default)s")
    p.add_argument("--alrs", choices=A.ALRS_MODES, default=d.alrs, help="ALRS on the scales group: code "
                   "(λ·α^k, k = rank from the top bit), paper (Eq. 7), off. Default %(default)s")
    p.add_argument("--alrs-alpha", type=float, default=d.alrs_alpha, help="α of --alrs code. Default %(default)s")
    p.add_argument("--scales-include", default=",".join(d.scales_include), help="what joins the ALRS scales group "
                   "besides nothing: any of quant (w_scale, act_scales), bn (BN affine), bias; the rest of these "
                   "go to a no-decay group at λ. Default %(default)s")
    p.add_argument("--sampler", choices=SAMPLERS, default=d.sampler, help="supernet per-layer bit sampler: hasb "
                   "(Alg. 1, needs --sensitivity), uniform, tempered (p ∝ exp(-Ω/τ), needs --sensitivity). "
                   "Default %(default)s")
    p.add_argument("--sensitivity", default=None, help="sensitivity.json from analysis.sensitivity (per-parameter "
                   "traces of the searchable layers; must be for the same model)")
    p.add_argument("--sigma", type=float, default=d.sigma, help="maximum switching probability σ (σ_e = σ·(e+1)/E "
                   "after warm-up). Default %(default)s")
    p.add_argument("--warmup-epochs", type=int, default=None, help="epochs with σ_e = 0. Default round(E·10/90)")
    p.add_argument("--tau", type=float, default=d.tau, help="temperature of --sampler tempered. Default %(default)s")
    p.add_argument("--no-tbn", action="store_true", help="supernet: keep per-bit BN instead of Transitional BN")
    p.add_argument("--init", default=None, help="multi: a float state dict (torch.save, loaded with "
                   "weights_only); supernet: the multi-precision model.pt (or its run directory)")
    p.add_argument("--distill", choices=DISTILL_MODES, default=d.distill, help="inplace: lower bits learn from the "
                   "top bit's softmax in the same step; pskd: progressive self-KD (the paper's KD); none. "
                   "Default %(default)s")
    p.add_argument("--kd-weight", type=float, default=d.kd_weight, help="soft-target weight of --distill inplace. "
                   "Default %(default)s")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--val-limit", type=int, default=None, help="use only the first N validation images")
    p.add_argument("--augment", action="store_true", help="random 2-px shifts + horizontal flips")
    p.add_argument("--fixed-bits", default=d.fixed_bits, help="precision of the fixed first/last layers: fp or "
                   "an int. Default %(default)s")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (init, data order, sampler). Default %(default)s")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda. Default %(default)s")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile (whole model in the multi stage, each "
                   "quantized layer in the supernet stage)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: end of each "
                   "epoch only)")
    p.add_argument("--resume", action="store_true", help="continue DIR/checkpoint.pt exactly (same options)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N global steps (with a checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / per-epoch lines")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    try:
        bits = [int(b) for b in str(a.bits).split(",") if b.strip()]
    except ValueError:
        raise TrainError(f"--bits must be comma-separated integers, got {a.bits!r}") from None
    model = a.model
    if model is None and a.stage == "multi":
        raise TrainError("--model is required for the multi stage")
    return _config_from_namespace(a, bits, model)


def _config_from_namespace(a, bits, model) -> TrainConfig:
    return TrainConfig(stage=a.stage, model=model or "", data=a.data, out=a.out, epochs=a.epochs,
                       bits=bits, batch_size=a.batch_size, lr=a.lr, wd=a.wd, alrs=a.alrs, alrs_alpha=a.alrs_alpha,
                       scales_include=[s for s in a.scales_include.split(",") if s],
                       sampler=a.sampler, sensitivity=a.sensitivity, sigma=a.sigma, warmup_epochs=a.warmup_epochs,
                       tau=a.tau, tbn=not a.no_tbn, init=a.init, distill=a.distill, kd_weight=a.kd_weight,
                       train_limit=a.train_limit, val_limit=a.val_limit, augment=a.augment,
                       fixed_bits=a.fixed_bits, seed=a.seed, device=a.device, bf16=a.bf16, compile=a.compile,
                       checkpoint_every=a.checkpoint_every, resume=a.resume, overwrite=a.overwrite,
                       max_steps=a.max_steps, progress=not a.no_progress, data_dir=a.data_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(a)
        out = train(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        model_pt = out / "model.pt"
        print(f"wrote {model_pt if model_pt.exists() else out / 'checkpoint.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
