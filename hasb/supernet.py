"""Mixed-precision supernet BatchNorm: Transitional BN (App. A.5.2) and BN re-calibration.

Transitional BN (TBN): the statistics of a layer's output depend on its own bit
*and* on the bit of the layer feeding it, so each :class:`hasb.SwitchBatchNorm`
whose producer is searchable gets one entry per pair ``"prev-cur"`` (e.g.
``"4-8"``: predecessor at 4 bits, producer at 8 bits).  Each pair is initialised
from the per-bit entry of its *current* bit (a module copy, not state-dict key
surgery — the reference's fixed character offsets copy the wrong entries).

BN re-calibration: for any config, reset the running statistics of the BN
entries that config uses and re-estimate them as a cumulative average
(``momentum=None``) over calibration batches in train mode without gradients.
Only running statistics change; affine parameters, weights and every other BN
entry are untouched, and module modes and momenta are restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from .config import BitConfig
from .modules import FP, bit_key
from .quantize import batchnorms, get_spec, use_config


def _layer_keys(layer: nn.Module, spec) -> list[str]:
    """BN keys a quantized layer can produce: its candidate bits, or its fixed bit."""
    if getattr(layer, "fixed", False):
        return [bit_key(spec.fixed_bit)]
    return [str(b) for b in spec.bits]


def enable_tbn(model: nn.Module) -> list[str]:
    """Add Transitional-BN pair entries to every BN fed by a searchable layer with a predecessor; returns their names.

    Idempotent: existing pair entries are kept.  BNs whose producer is fixed (e.g.
    after the first conv) or who have no predecessor stay per-bit, as in the paper
    ("every BN except the first").
    """
    spec = get_spec(model)
    changed = []
    for name, bn in batchnorms(model).items():
        if not bn._producer or not bn._prev or getattr(bn._producer[0], "fixed", False):
            continue
        cur_keys = _layer_keys(bn._producer[0], spec)
        prev_keys = _layer_keys(bn._prev[0], spec)
        for c in cur_keys:
            src = bn.bns[c] if c in bn.bns else bn.bns[FP]
            for p in prev_keys:
                k = f"{p}-{c}"
                if k in bn.bns:
                    continue
                new = type(src)(src.num_features, src.eps, src.momentum, src.affine, src.track_running_stats)
                new.load_state_dict(src.state_dict())
                ref = next(src.buffers(), None)
                bn.bns[k] = new.to(ref.device if ref is not None else "cpu").train(src.training)
        bn.mode = "pair"
        changed.append(name)
    return changed


def tbn_enabled(model: nn.Module) -> bool:
    return any(bn.mode == "pair" for bn in batchnorms(model).values())


def active_bn_entries(model: nn.Module) -> dict[str, nn.Module]:
    """``"bn_path[key]"`` → the BN entry the current config uses, for every SwitchBatchNorm."""
    return {f"{n}[{bn.key}]": bn.active for n, bn in batchnorms(model).items()}


def _as_batches(batches) -> Iterable[torch.Tensor]:
    for b in batches:
        yield b[0] if isinstance(b, (tuple, list)) else b


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    config: BitConfig | dict | int | str | None,
    batches: Iterable,
    *,
    device: str | torch.device | None = None,
) -> int:
    """Re-estimate the running statistics of the BN entries ``config`` uses, in place; returns the batch count.

    Args:
        model: a quantized model (per-bit or TBN).
        config: the sub-net (BitConfig, dict or a uniform bit); ``None`` keeps the current config.
        batches: iterable of input tensors [N, C, H, W] or (x, y) pairs (e.g. ``splits.calib`` batches).
        device: move inputs there first (default: the model's device).

    Statistics are the exact cumulative mean/variance over all batches (``momentum=None``),
    computed in train mode without gradients.  The model's train/eval mode, the
    config and each BN's momentum are restored afterwards.
    """
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    was_training = {m: m.training for m in model.modules()}
    ctx = use_config(model, config) if config is not None else contextlib.nullcontext()
    n = 0
    with ctx:
        entries = {id(m): m for m in active_bn_entries(model).values()}.values()
        saved_momentum = [(m, m.momentum) for m in entries]
        try:
            model.eval()  # everything else (dropout, other BNs) in eval
            for m in entries:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for x in _as_batches(batches):
                model(x.to(device))
                n += 1
        finally:
            for m, mom in saved_momentum:
                m.momentum = mom
            for m, t in was_training.items():
                m.train(t)
    if n == 0:
        raise ValueError("recalibrate_bn got no calibration batches")
    return n


@contextlib.contextmanager
def bn_key_trace(model: nn.Module) -> Iterator[dict[str, list[str]]]:
    """Record which BN entry each SwitchBatchNorm used in the forwards inside the block (for tests/diagnostics)."""
    used: dict[str, list[str]] = {}
    hooks = []
    for n, bn in batchnorms(model).items():
        hooks.append(bn.register_forward_pre_hook(lambda mod, inp, n=n: used.setdefault(n, []).append(mod.key)))
    try:
        yield used
    finally:
        for h in hooks:
            h.remove()


__all__ = ["enable_tbn", "tbn_enabled", "active_bn_entries", "recalibrate_bn", "bn_key_trace"]
