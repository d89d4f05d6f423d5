"""The parameter subset the curvature code differentiates, and the model modes it runs in.

One home of the selection helpers shared by :mod:`analysis.hvp`, :mod:`analysis.linearity` and
:mod:`analysis.exact` (they sit below all three, so none imports another to get them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn as nn

from hasb.errors import HasbError
from hasb.quantizer import composite_ops


class HVPError(HasbError):
    """Bad arguments to the HVP engine (unknown backend, empty batches, unknown parameter names)."""


# -- parameter selection ---------------------------------------------------------------------------------
def layer_order(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Module paths of every Conv2d/Linear in execution order.

    hasb quantized models carry the order in ``model.hasb_spec``; a float model is
    traced once on ``example`` (shape [B, C, H, W]) when given, else definition
    order is used.  A module called twice counts once.
    """
    spec = getattr(model, "hasb_spec", None)
    if spec is not None:
        return list(spec.order)
    names = {m: n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if example is None:
        return list(names.values())
    calls: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: calls.append(n)) for m, n in names.items()]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(example)
            model.train(was)
    finally:
        for h in hooks:
            h.remove()
    seen = list(dict.fromkeys(calls))
    return seen + [n for n in names.values() if n not in seen]


def weight_params(
    model: nn.Module, include_fixed: bool = True, example: torch.Tensor | None = None
) -> dict[str, nn.Parameter]:
    """``{"<layer>.weight": parameter}`` of every Conv2d/Linear, execution order.

    ``include_fixed=False`` drops hasb's fixed layers (first/last by default).
    """
    spec = getattr(model, "hasb_spec", None)
    fixed = set(spec.fixed) if (spec is not None and not include_fixed) else set()
    return {
        f"{n}.weight": cast(nn.Parameter, model.get_submodule(n).weight)
        for n in layer_order(model, example)
        if n not in fixed
    }


def resolve_params(model: nn.Module, params: None | Sequence[str] | dict) -> dict[str, torch.Tensor]:
    """Named parameter subset: ``None`` (default weights), a list of parameter names, or a name→tensor dict."""
    if params is None:
        return dict(weight_params(model))
    if isinstance(params, dict):
        return dict(params)
    named = dict(model.named_parameters())
    unknown = [n for n in params if n not in named]
    if unknown:
        raise HVPError(
            f"unknown parameter name(s) {unknown[:5]}; accepted: names from model.named_parameters(), "
            f"e.g. {list(named)[:3]}"
        )
    return {n: named[n] for n in params}


def composite() -> contextlib.AbstractContextManager:
    """hasb's plain-op quantizer path (its fused kernels have no second derivative)."""
    return composite_ops()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside, the previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
