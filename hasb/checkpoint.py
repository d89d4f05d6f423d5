"""Training checkpoint I/O: the resumable ``checkpoint.pt`` (model, optimizer, schedule position, sampler, RNG,
PSKD state and the epoch's running loss sums; written atomically, readable with ``weights_only=True``) and the
final ``model.pt`` export of a finished run."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import atomic_write_bytes
from .export import CheckpointError, read_checkpoint, save_quantized
from .models import build_record
from .quantize import get_spec, set_config
from .sampler import BitSampler
from .supernet import tbn_enabled
from .train_config import RESUME_FREE, TrainConfig, TrainError

CKPT_FORMAT = "hasb-train"
NEEDED = ("config", "model", "optimizer", "epoch", "step_in_epoch", "global_step", "rng")
# what an interrupted atomic write of this run's files leaves behind (config.atomic_write_*'s mkstemp names)
STALE_TMP = (
    ".checkpoint.pt.*.tmp",
    ".model.pt.*.tmp",
    ".metrics.csv.*.tmp",
    ".metrics.json.*.tmp",
    ".train_config.json.*.tmp",
)


def save_checkpoint(
    path: Path,
    *,
    cfg: TrainConfig,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    pos: dict,
    sampler: BitSampler | None,
    sgen: torch.Generator,
    pskd: dict,
    history: list,
    loss_sums: dict[int, Any],
) -> None:
    """Write everything needed to continue exactly. ``pos``: epoch, step_in_epoch, global_step;
    ``loss_sums``: bit → the epoch's running sum of per-step training losses so far (a tensor or float)."""
    obj = {
        "format": CKPT_FORMAT,
        "version": 1,
        "config": cfg.to_json(),
        "build": json.dumps(build_record(model)),
        "spec": json.dumps(get_spec(model).to_dict() if is_quantized(model) else None),  # None: the float stage
        "tbn": bool(tbn_enabled(model)),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        **{k: int(pos[k]) for k in ("epoch", "step_in_epoch", "global_step")},
        "rng": {
            "torch": torch.get_rng_state(),
            "sampler": sgen.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        "sampler": sampler.state_dict() if sampler is not None else None,
        "pskd": {k: (None if v is None else v.detach().cpu().clone()) for k, v in pskd.items()},
        "history": json.dumps(history),
        "loss_sums": {str(b): torch.as_tensor(v).detach().cpu().clone() for b, v in loss_sums.items()},
    }
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_train_checkpoint(path: Path) -> dict:
    """A training checkpoint, its structure checked (any missing field named)."""
    obj = read_checkpoint(path)
    if obj.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a hasb training checkpoint (format={obj.get('format')!r})")
    missing = [k for k in NEEDED if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is incomplete (missing {missing})")
    return obj


def check_resume(cfg: TrainConfig, ckpt: dict, path: Path) -> None:
    """A resumed run must compute the same thing: every option outside ``RESUME_FREE`` equal to the checkpoint's."""
    old = TrainConfig.from_json(ckpt["config"]).to_dict()
    new = cfg.to_dict()
    diff = [k for k in new if k not in RESUME_FREE and old.get(k) != new[k]]
    if diff:
        k = diff[0]
        raise TrainError(
            f"--resume: option {k!r} differs from the checkpoint {path} ({old.get(k)!r} vs {new[k]!r}); "
            f"resume with the original settings"
        )


def resume_loss_sums(ckpt: dict, bits: list[int], device: torch.device) -> dict[int, Any]:
    """The epoch's running loss sums at the checkpoint (0 at an epoch boundary or in an older checkpoint)."""
    sums = ckpt.get("loss_sums") or {}
    return {b: sums[str(b)].to(device) if str(b) in sums else 0.0 for b in bits}


def clean_stale_tmp(out: Path) -> list[Path]:
    """Remove temp files that a killed atomic write left in the run directory; returns what was removed."""
    gone = [p for pat in STALE_TMP for p in out.glob(pat) if p.is_file()]
    for p in gone:
        p.unlink()
    return gone


def is_quantized(model: nn.Module) -> bool:
    """True for a model quantized by :func:`hasb.quantize.quantize_model` (the float stage trains one that is not)."""
    return getattr(model, "hasb_spec", None) is not None


FLOAT_FORMAT = "hasb-float"  # the float stage's model.pt: {"state_dict": tensors, "hasb": JSON} — no "format" key


def save_float(model: nn.Module, path: Path, cfg: TrainConfig, history: list) -> None:
    """The float stage's ``model.pt``: ``{"state_dict": ..., "hasb": JSON}``, atomically.

    The state dict is what ``--init`` (training) and ``--checkpoint`` (sensitivity, search) read; ``hasb`` records
    what it is (``kind``: ``hasb-float``), the build record (an LM's ``context`` included), the training options
    and the last metrics row. It has no top-level ``format`` key, so readers treat it as a plain float state dict.
    """
    meta = {
        "kind": FLOAT_FORMAT,
        "build": build_record(model),
        "train_config": cfg.to_dict(),
        "metrics": history[-1] if history else {},
    }
    obj = {"state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, "hasb": json.dumps(meta)}
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def save_trained(
    model: nn.Module, path: Path, cfg: TrainConfig, bits: list[int], history: list, sampler: BitSampler | None
) -> None:
    """The finished run's ``model.pt`` (:func:`hasb.export.save_quantized`), at its top bit, in eval mode."""
    set_config(model, bits[0])
    model.eval()
    extra = {
        "stage": cfg.stage,
        "train_config": cfg.to_dict(),
        "bn": "tbn" if tbn_enabled(model) else "bit",
        "metrics": history[-1] if history else {},
    }
    if sampler is not None:
        extra["sampler"] = {
            "kind": sampler.kind,
            "probabilities": {n: {str(b): p for b, p in d.items()} for n, d in sampler.probabilities().items()},
        }
    save_quantized(model, path, extra=extra)


__all__ = [
    "CKPT_FORMAT",
    "save_checkpoint",
    "read_train_checkpoint",
    "check_resume",
    "resume_loss_sums",
    "clean_stale_tmp",
    "save_trained",
    "save_float",
    "is_quantized",
    "FLOAT_FORMAT",
]
