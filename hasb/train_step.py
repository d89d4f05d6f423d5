"""One training step of each stage, written as the paper's algorithms (arXiv 2502.01199, App. A).

Alg. A.2 (multi-precision, :func:`multi_precision_step`): for each candidate bit from high to low, every
searchable layer switches to that bit; forward, loss, backward, the scales group's lr set by ALRS for that bit,
an optimizer step — each precision updates the shared weights in turn. There is no extra step after the loop
(the reference's ``step_inside`` quirk steps Adam once more on zeroed gradients).

Alg. A.3 (supernet, :func:`supernet_step`): the same passes, but each base bit's pass runs a per-layer config drawn
by the bit sampler (HASB by default).

The float stage (:func:`float_step`) is one plain pass per step on the unquantized model.

Losses (:func:`pass_loss`): in-place distillation (lower bits learn from the top bit's softmax of the same step),
progressive self-KD targets (``Batch.soft``) or plain cross-entropy (:func:`hasb.data.loss_fn` of the task). A
language model's logits ``[B, T, 256]`` are distilled per byte: logits, targets and soft targets are flattened to
``[B·T, 256]`` rows first, so every byte position is one row of the same losses.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import alrs as A
from .config import BitConfig
from .data import loss_fn
from .distill import inplace_loss, soft_cross_entropy
from .distributed import Dist, allreduce_grads
from .quantize import set_config
from .sampler import BitSampler


@dataclass
class StepContext:
    """What every pass needs: the model (and its possibly compiled forward), optimizer, ALRS factors and losses."""

    model: nn.Module
    fwd: nn.Module
    opt: torch.optim.Optimizer
    base_lrs: dict[str, float]  # group name → λ₀
    factors: dict[int, float]  # bit → ALRS multiplier of the scales group
    distill: str = "inplace"
    kd_weight: float = 0.5
    bf16: bool = False
    dist: Dist = field(default_factory=Dist)
    task: str = "classification"  # hasb.data's task: "classification" or "lm"


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, H, W] images or [B, T] byte ids: this rank's slice
    y: torch.Tensor  # [B] labels or [B, T] next bytes
    soft: torch.Tensor | None = None  # [B, classes] or [B, T, 256] PSKD targets, or None


def autocast(device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def pass_loss(ctx: StepContext, z: torch.Tensor, batch: Batch, teacher: torch.Tensor | None) -> torch.Tensor:
    """The loss of one pass: PSKD soft targets, in-place distillation from ``teacher`` (top bit) or the task's CE.

    ``z``: logits ``[B, K]`` or ``[B, T, K]``; ``teacher``/``batch.soft``: probabilities of the same shape. Every
    loss is a mean over rows of ``[·, K]`` (examples, or bytes for a language model), in nats.
    """
    if batch.soft is None and ctx.distill != "inplace":
        return loss_fn(ctx.task, z, batch.y)
    k = z.shape[-1]
    rows = z.reshape(-1, k)
    if batch.soft is not None:
        return soft_cross_entropy(rows, batch.soft.reshape(-1, k))
    return inplace_loss(
        rows, batch.y.reshape(-1).long(), None if teacher is None else teacher.reshape(-1, k), ctx.kd_weight
    )


def top_probs(z: torch.Tensor) -> torch.Tensor:
    """The detached softmax over the last (class/byte) axis: the in-place teacher and the PSKD record."""
    return torch.softmax(z.detach().float(), -1)


def _set_lrs(ctx: StepContext, lrs: dict[str, float]) -> None:
    for g in ctx.opt.param_groups:
        g["lr"] = lrs[g["name"]]


def float_step(ctx: StepContext, batch: Batch, schedule: float) -> tuple[dict[None, torch.Tensor], torch.Tensor]:
    """The float stage's step: one pass of the unquantized model, every group at λ₀·schedule (no ALRS: there are
    no bits). Returns ({None: detached loss}, softmax of the logits) — ``None`` is the float model's key."""
    _set_lrs(ctx, {g: lr * schedule for g, lr in ctx.base_lrs.items()})
    loss, z = _optimizer_pass(ctx, batch, None)
    return {None: loss.detach().float()}, top_probs(z)


def bit_pass(
    ctx: StepContext, conf: BitConfig | int, bit: int, schedule: float, batch: Batch, teacher: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step at config ``conf`` (base bit ``bit``); returns (loss, logits [B, classes] or [B, T, 256])."""
    set_config(ctx.model, conf)
    _set_lrs(ctx, A.group_lrs(ctx.base_lrs, schedule, bit, ctx.factors))
    return _optimizer_pass(ctx, batch, teacher)


def _optimizer_pass(ctx: StepContext, batch: Batch, teacher: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss, backward (gradients averaged over DDP ranks), one optimizer step; returns (loss, logits)."""
    with autocast(batch.x.device, ctx.bf16):
        z = ctx.fwd(batch.x)
    loss = pass_loss(ctx, z, batch, teacher)
    ctx.opt.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.dist.world > 1:
        allreduce_grads([p for g in ctx.opt.param_groups for p in g["params"]], ctx.dist.world)
    ctx.opt.step()
    return loss, z


def multi_precision_step(
    ctx: StepContext, batch: Batch, bits: list[int], schedule: float
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Alg. A.2: one pass per candidate bit, high → low, each with its own optimizer step.

    Returns (bit → detached float loss, the top bit's softmax [B, classes] or [B, T, 256] — the in-place teacher /
    PSKD record).
    """
    losses: dict[int, torch.Tensor] = {}
    teacher = p_top = None
    for k, b in enumerate(bits):
        loss, z = bit_pass(ctx, b, b, schedule, batch, teacher)
        if k == 0:
            p_top = top_probs(z)
            teacher = p_top if ctx.distill == "inplace" else None
        losses[b] = loss.detach().float()
    return losses, p_top


def supernet_step(
    ctx: StepContext,
    batch: Batch,
    bits: list[int],
    schedule: float,
    sampler: BitSampler,
    epoch: int,
    gen: torch.Generator,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Alg. A.3: per base bit (high → low) a per-layer config drawn by ``sampler``, one optimizer step each.

    Returns (base bit → detached float loss, the top base bit's softmax [B, classes]).
    """
    losses: dict[int, torch.Tensor] = {}
    teacher = p_top = None
    for k, b in enumerate(bits):
        conf = sampler.sample(b, epoch, gen)  # Alg. 1: each layer keeps b or switches with p_l
        loss, z = bit_pass(ctx, conf, b, schedule, batch, teacher)
        if k == 0:
            p_top = top_probs(z)
            teacher = p_top if ctx.distill == "inplace" else None
        losses[b] = loss.detach().float()
    return losses, p_top


__all__ = [
    "StepContext",
    "Batch",
    "autocast",
    "pass_loss",
    "top_probs",
    "bit_pass",
    "float_step",
    "multi_precision_step",
    "supernet_step",
]
