"""Layer-restricted Gauss–Newton products G_ll V = J_lᵀ ∇²L J_l V (the ``ggn_block`` HVP backend).

For one batch with logits z = f(x; θ) [B, ...] and scalar loss L = loss_fn(z, y), the Gauss–Newton block
of weight W_l applied to a probe v (shape of W_l) is

    G_ll v = J_lᵀ (∇²_z L) (J_l v),      J_l = ∂z/∂W_l,

and G_ll = H_ll exactly where the network is piecewise linear in W_l (see :mod:`analysis.linearity`).
One product costs, per probe, one tangent forward from layer l (``torch.func.jvp`` with a tangent on
W_l only: the layers before l carry none), the loss Hessian on the output tangent (closed form for the
mean softmax cross-entropy: (diag p − ppᵀ) u / B per sample; else ``jvp(grad(loss_fn))`` at z), and one
backward from the logits to W_l (autograd stops at W_l).  No second-order graph is built.  The probes of
a block are ``vmap``-ped, so the primal forward inside the jvp is computed once per layer and chunk; the
primal forward graph of the whole batch (``z`` with its autograd history) is built once and shared by
every layer's backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from .params import composite

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_hessian_product(loss_fn: LossFn, z: torch.Tensor, y: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """(∇²_z loss_fn(z, y)) U for probes U [k, *z.shape] → [k, *z.shape].

    ``F.cross_entropy`` (mean over B samples, no ignored targets) on logits [B, C] uses the closed form
    (p ⊙ u − p (pᵀu)) / B per sample; any other loss (or shape) differentiates ``loss_fn`` twice at z
    with ``torch.func`` (forward-over-reverse, cheap: the logits are small).
    """
    if loss_fn is F.cross_entropy and z.dim() == 2 and bool((y >= 0).all()):
        p = torch.softmax(z.detach(), dim=-1)
        pu = p * U
        return (pu - p * pu.sum(-1, keepdim=True)) / z.shape[0]
    g = grad(lambda zz: loss_fn(zz, y))
    zd = z.detach()
    return vmap(lambda u: jvp(g, (zd,), (u,))[1])(U)


def output_tangents(model: nn.Module, x: torch.Tensor, name: str, w: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """J_l V: the logits' tangents [k, *z.shape] for probes V [k, *w.shape] on the parameter ``name`` only."""
    w = w.detach()

    def f(wl: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {name: wl}, (x,), strict=False)

    # no_grad: the model's parameters require grad; torch.func's transforms do not need the tape
    with torch.no_grad(), composite():
        return vmap(lambda v: jvp(f, (w,), (v,))[1])(V)


def ggn_block_products(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    V: dict[int, torch.Tensor],
    loss_fn: LossFn,
    chunk: int,
) -> dict[int, torch.Tensor]:
    """{l: G_ll V_l} of one batch (loss_fn's reduction, not yet weighted by the batch size).

    Args:
        z: the logits ``model(x)`` with their autograd graph (every ``params[l]`` requires grad); the
            graph is reused by every layer's backward and kept (``retain_graph``) for the caller.
        V: probes per block index l, [k_l, *params[l].shape].
        chunk: most probes per ``vmap`` call (memory: chunk tangent activations and backward buffers).
    """
    out: dict[int, torch.Tensor] = {}
    for l, Vl in V.items():
        parts = []
        for s in range(0, Vl.shape[0], chunk):
            Jv = output_tangents(model, x, names[l], params[l], Vl[s : s + chunk])
            U = loss_hessian_product(loss_fn, z, y, Jv)
            with torch.enable_grad():
                (h,) = torch.autograd.grad(z, params[l], U, retain_graph=True, is_grads_batched=True, allow_unused=True)
            parts.append(torch.zeros_like(Vl[s : s + chunk]) if h is None else h)  # None: z does not use W_l
        out[l] = torch.cat(parts) if parts else torch.zeros_like(Vl)
    return out
