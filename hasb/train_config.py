"""The training run's options, declared once: :class:`TrainConfig` (each field is also its ``python -m hasb.train``
flag, help next to it) and :func:`validate_config`, which checks every value before any work is done."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from . import alrs as A
from .cli import (
    act_bits_option,
    check_out_dir,
    data_dir_option,
    data_option,
    data_opts_option,
    device_option,
    model_option,
    option,
    out_option,
    parse_act_bits,
    parse_bits,
    quiet_option,
    seed_option,
    threads_option,
)
from .distill import DISTILL_MODES
from .errors import HasbError
from .quantize import DEFAULT_BITS
from .quantizer import ROUNDINGS
from .sampler import SAMPLERS

STAGES = ("float", "multi", "supernet")
SCALE_CATEGORIES = ("quant", "bn", "bias")
# fields that may differ between a run and its --resume (they do not change what is computed)
RESUME_FREE = {
    "resume",
    "max_steps",
    "progress",
    "checkpoint_every",
    "device",
    "compile",
    "out",
    "data_dir",
    "overwrite",
    "threads",
}


class TrainError(HasbError):
    """Bad training input (reported as one line on stderr with exit code 2 by the CLI)."""


def _csv_list(text: str) -> list[str]:
    return [s for s in text.split(",") if s]


@dataclass
class TrainConfig:
    """Everything a training run depends on; JSON round trip via ``to_json``/``from_json``."""

    stage: str = option(
        "multi",
        choices=STAGES,
        help="float: plain training of the float zoo model (writes a float state dict model.pt for --init); "
        "multi: all-bit training (Alg. A.2); supernet: per-layer "
        "stochastic bit switching from a multi-precision model.pt (Alg. A.3)",
    )
    model: str | None = model_option()  # float, multi: required; supernet: taken from --init
    data: str = data_option()
    data_dir: str | None = data_dir_option()
    data_opts: dict = data_opts_option()
    out: str = out_option("run directory", default="runs/train", required=True)
    epochs: int = option(1, help="epochs")
    # the CLI keeps the text and parses it with hasb.cli.parse_bits inside the exit-code policy (one error line)
    bits: list = option(
        default_factory=lambda: list(DEFAULT_BITS),
        parse=str,
        help="candidate bits, comma "
        "separated (distinct, in 1..8); in the supernet stage a subset of --init's candidates",
    )
    rounding: str | None = option(
        None,
        choices=ROUNDINGS,
        help="how lower bits derive from the stored INT-h code: half_up / half_even (Double Rounding) or msb "
        "(MSB slicing: the top bits, W_h >> (h-l)); default half_up; the supernet stage takes --init's",
    )
    batch_size: int = option(128, help="global batch size (split over DDP ranks)")
    lr: float = option(2e-3, help="initial Adam learning rate λ₀ of every group, cosine annealed per step")
    wd: float = option(5e-5, help="weight decay of the weights group (scales: 0)")
    alrs: str = option(
        "code",
        choices=A.ALRS_MODES,
        help="ALRS on the scales group: code (λ·α^k, k = rank from the top bit), paper (Eq. 7), off",
    )
    alrs_alpha: float = option(0.1, help="α of --alrs code, in (0, 1]")
    scales_include: list = option(
        default_factory=lambda: list(SCALE_CATEGORIES),
        parse=_csv_list,
        help="what joins the ALRS scales group: any of quant (w_scale, act_scales), bn "
        "(BN affine), bias; the rest of these go to a no-decay group at λ",
    )
    sampler: str = option(
        "hasb",
        choices=SAMPLERS,
        help="supernet per-layer bit sampler: hasb (Alg. 1, needs "
        "--sensitivity), uniform, tempered (p ∝ exp(-Ω/τ), needs --sensitivity)",
    )
    sensitivity: str | None = option(
        None,
        help="sensitivity.json from analysis.sensitivity (per-parameter "
        "traces of the searchable layers; must be for the same model)",
    )
    sigma: float = option(0.5, help="maximum switching probability σ in [0, 1] (σ_e = σ·(e+1)/E after warm-up)")
    warmup_epochs: int | None = option(None, help="epochs with σ_e = 0 (default round(E·10/90))")
    tau: float = option(1.0, help="temperature of --sampler tempered (> 0)")
    tbn: bool = option(True, negate="--no-tbn", help="supernet: keep per-bit BN instead of Transitional BN")
    init: str | None = option(
        None,
        help="float, multi: a float state dict (torch.save, loaded with weights_only; plain or under "
        "'state_dict', e.g. the float stage's model.pt); supernet: the multi-precision model.pt (or its run "
        "directory)",
    )
    distill: str = option(
        "inplace",
        choices=DISTILL_MODES,
        help="inplace: lower bits learn from the top bit's "
        "softmax in the same step; pskd: progressive self-KD (the paper's KD); none",
    )
    kd_weight: float = option(0.5, help="soft-target weight of --distill inplace, in [0, 1]")
    pskd_alpha_T: float = 0.7
    train_limit: int | None = option(None, help="use only the first N (≥ 1) training images")
    val_limit: int | None = option(None, help="use only the first N (≥ 1) validation images")
    val_size: int = 5000
    augment: bool = option(False, help="random 2-px shifts + horizontal flips")
    fixed_bits: str = option("fp", help="precision of the fixed first/last layers: fp or an int in 1..8")
    # multi: chooses the mode; supernet: the mode of --init (same = inherit; anything else must match it)
    act_bits: str = act_bits_option()
    seed: int = seed_option()
    device: str = device_option()
    bf16: bool = option(False, help="bfloat16 autocast (GPU)")
    compile: bool = option(
        False,
        help="torch.compile the whole model, with CUDA graphs on CUDA (multi: one graph per bit; supernet: bits as "
        "data, one graph for every config)",
    )
    checkpoint_every: int = option(0, help="also checkpoint every N steps (0: end of each epoch only)")
    resume: bool = option(False, help="continue DIR/checkpoint.pt exactly (same options)")
    overwrite: bool = option(False, flag="--force", aliases=("--overwrite",), help="replace an existing run in --out")
    max_steps: int | None = option(None, help="stop after N (≥ 1) global steps (with a checkpoint)")
    progress: bool = quiet_option()
    threads: int | None = threads_option()

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training option(s) {unknown}; accepted: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> TrainConfig:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise TrainError(f"training config is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise TrainError("training config JSON must be an object")
        return cls.from_dict(d)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise TrainError(msg)


def _finite(cfg: TrainConfig, name: str, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    v = getattr(cfg, name)
    flag = "--" + name.replace("_", "-")
    inside = math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{']' if math.isfinite(hi) else ')'}"
    _check(inside, f"{flag} must be a finite number in {rng}, got {v}")


def _at_least(cfg: TrainConfig, name: str, lo: int) -> None:
    v = getattr(cfg, name)
    if v is not None:
        _check(v >= lo, f"--{name.replace('_', '-')} must be an integer ≥ {lo}, got {v}")


def validate_config(cfg: TrainConfig) -> list[int]:
    """Check every option's value (cheap, before any work); returns the candidate bits, highest first."""
    for name, choices in (("stage", STAGES), ("alrs", A.ALRS_MODES), ("distill", DISTILL_MODES), ("sampler", SAMPLERS)):
        _check(
            getattr(cfg, name) in choices, f"unknown --{name} {getattr(cfg, name)!r}; accepted: {', '.join(choices)}"
        )
    _check(
        cfg.rounding is None or cfg.rounding in ROUNDINGS,
        f"unknown --rounding {cfg.rounding!r}; accepted: {', '.join(ROUNDINGS)}",
    )
    _check(cfg.stage == "supernet" or bool(cfg.model), f"--model is required for the {cfg.stage} stage")
    _finite(cfg, "lr", 0.0, lo_open=True)
    _finite(cfg, "wd", 0.0)
    _finite(cfg, "alrs_alpha", 0.0, 1.0, lo_open=True)
    _finite(cfg, "sigma", 0.0, 1.0)
    _finite(cfg, "tau", 0.0, lo_open=True)
    _finite(cfg, "kd_weight", 0.0, 1.0)
    _finite(cfg, "pskd_alpha_T", 0.0, 1.0)
    for name in ("epochs", "batch_size", "train_limit", "val_limit", "val_size", "max_steps"):
        _at_least(cfg, name, 1)
    _at_least(cfg, "threads", 1)
    for name in ("checkpoint_every", "warmup_epochs"):
        _at_least(cfg, name, 0)
    _check(
        cfg.fixed_bits == "fp" or str(cfg.fixed_bits).isdigit() and 1 <= int(cfg.fixed_bits) <= 8,
        f"--fixed-bits must be fp or an integer in 1..8, got {cfg.fixed_bits!r}",
    )
    bad = [c for c in cfg.scales_include if c not in SCALE_CATEGORIES]
    _check(
        not bad,
        f"unknown --scales-include categor{'y' if len(bad) == 1 else 'ies'} {bad}; accepted: "
        f"{', '.join(SCALE_CATEGORIES)}",
    )
    try:
        bits = parse_bits(cfg.bits)
        act = parse_act_bits(cfg.act_bits)
        if cfg.out is not None and not Path(cfg.out).is_file():  # a file: _open_checkpoint names it
            check_out_dir(cfg.out)
    except HasbError as e:
        raise TrainError(str(e)) from None
    _check(
        not act.isdigit() or int(act) in bits,
        f"--act-bits {act} is not one of the candidate bits {bits}; accepted: same, fp or one of them",
    )
    return bits


__all__ = ["TrainConfig", "TrainError", "STAGES", "SCALE_CATEGORIES", "RESUME_FREE", "validate_config"]
