"""When is a layer's Gauss–Newton block its Hessian block?  The exactness check of issue 16.

H_ll = G_ll + Σ (∂L/∂f)·∂²f/∂W_l², so the diagonal Hessian block equals the Gauss–Newton block
J_lᵀ ∇²L J_l whenever the network output f is piecewise linear in W_l (the second term vanishes almost
everywhere), whatever the loss.  :func:`layer_exactness` decides it from one traced forward: every op
downstream of W_l must be ReLU-like, pooling, BatchNorm in eval mode, conv/linear with W_l entering once,
an add or a reshape.  Used by :mod:`analysis.exact` (exact per-sample traces), :mod:`analysis.hvp`
(the ``ggn_block`` backend) and :mod:`analysis.curvature` (the estimator choice).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .params import composite, resolve_params

__all__ = ["exactness_check", "layer_exactness"]


# -- when is the Gauss–Newton block the Hessian block? -------------------------------------------------------
# Op names (torch function __name__ with underscores stripped).  Each is piecewise linear in every tensor
# argument, so it has zero second derivative almost everywhere and passes dependence on W_l through.
_PIECEWISE_LINEAR = frozenset(
    """
    add radd iadd sub rsub isub neg pos cat concat concatenate stack hstack vstack reshape view view_as
    reshape_as flatten unflatten permute transpose t contiguous getitem mean sum cumsum avg_pool1d avg_pool2d
    avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d max_pool1d max_pool2d max_pool3d
    max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d relu relu6 hardtanh leaky_relu clamp clip clamp_min clamp_max
    round floor ceil trunc sign abs pad chunk split squeeze unsqueeze expand expand_as repeat flip roll unbind
    narrow select to type float double half clone where masked_fill max amax min amin maximum minimum
    index_select gather pixel_shuffle channel_shuffle interpolate identity batch_norm dropout dropout1d
    dropout2d dropout3d feature_alpha_dropout alpha_dropout
""".split()
)
# Linear in each argument separately: nonlinear in W_l only if two arguments both depend on W_l.
_MULTILINEAR = frozenset(
    """
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear bilinear matmul rmatmul mm
    bmm mul rmul imul einsum addmm baddbmm outer dot tensordot
""".split()
)
_DIVISION = {"div": 1, "truediv": 1, "true_divide": 1, "divide": 1, "itruediv": 1, "rtruediv": 0}
_NO_DEPENDENCE = frozenset({"detach", "zeros_like", "ones_like", "empty_like", "randn_like", "rand_like"})


def _op_name(func) -> str:
    return getattr(func, "__name__", str(func)).strip("_")


def _train_flag(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a batch_norm / dropout call runs in training mode (batch statistics, random masks)."""
    if name == "batch_norm":
        return bool(kwargs.get("training", args[5] if len(args) > 5 else False))
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    return bool(kwargs.get("training", args[2] if len(args) > 2 else True)) and float(p) > 0


class _Dependence(TorchFunctionMode):
    """Tracks which selected weights each tensor depends on through one forward; flags nonlinear uses.

    ``flags[l]`` collects reasons why the network is not piecewise linear in weight l.  Tensors made
    under ``no_grad`` or by ``detach`` depend on nothing (autograd does not differentiate them).
    """

    def __init__(self, weights: Sequence[torch.Tensor], names: Sequence[str], where):
        super().__init__()
        self.deps = {id(w): frozenset({l}) for l, w in enumerate(weights)}
        self.keep = list(weights)  # ids stay unique while the tensors are alive
        self.names, self.where = list(names), where
        self.flags: list[list[str]] = [[] for _ in names]

    def _flag(self, layers, why: str) -> None:
        for l in sorted(layers):
            if why not in self.flags[l]:
                self.flags[l].append(why)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs or not torch.is_grad_enabled() or name in _NO_DEPENDENCE:
            return out  # sizes, dtypes: no tensor; detached / no_grad tensors: constants
        arg_deps = [
            self.deps.get(id(t), frozenset()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        ]
        union = frozenset().union(*arg_deps) if arg_deps else frozenset()
        if not union:
            return out
        at = f"{name} in {self.where()}"
        if name in ("batch_norm",) or "dropout" in name:
            if _train_flag(name, args, kwargs):
                self._flag(union, f"{at} runs in training mode (batch statistics / random mask)")
        elif name in _MULTILINEAR:
            twice = [l for l in union if sum(l in d for d in arg_deps) > 1]
            self._flag(twice, f"{at} multiplies two tensors that both depend on the weight (used twice)")
        elif name in _DIVISION:
            i = _DIVISION[name]
            den = self.deps.get(id(args[i]), frozenset()) if len(args) > i else frozenset()
            self._flag(den, f"{at} divides by a tensor that depends on the weight")
        elif name not in _PIECEWISE_LINEAR:
            self._flag(union, f"{at} is not piecewise linear")
        for t in outs:
            self.deps[id(t)] = union | self.deps.get(id(t), frozenset())
            self.keep.append(t)
        return out


def layer_exactness(model: nn.Module, example_input: torch.Tensor, params=None) -> dict[str, list[str]]:
    """Per selected weight: the reasons its Gauss–Newton block may differ from its Hessian block (empty: equal).

    Runs one forward of ``example_input`` (e.g. one sample, [1, ...]) in the model's current mode,
    recording every torch op: a non-piecewise-linear op (GELU, softmax, tanh, LayerNorm, ...)
    downstream of W_l, a product of two tensors that both depend on W_l, a division by one, BatchNorm or
    dropout in training mode, a module that owns W_l called more than once, or W_l registered under two
    names (tied weights) all mark W_l.  ``params`` as in :func:`analysis.hvp.resolve_params`.
    """
    named = resolve_params(model, params)
    names, weights = list(named), list(named.values())
    stack: list[str] = []
    calls: dict[str, int] = {}
    mod_name = {m: n for n, m in model.named_modules()}

    def pre(mod, _inp):
        n = mod_name[mod] or "<model>"
        stack.append(f"{n} ({type(mod).__name__})")
        calls[mod_name[mod]] = calls.get(mod_name[mod], 0) + 1

    def post(*_):
        stack.pop()  # returns None: a forward hook's return value would replace the output

    hooks = [m.register_forward_pre_hook(pre) for m in mod_name]
    hooks += [m.register_forward_hook(post) for m in mod_name]
    mode = _Dependence(weights, names, lambda: stack[-1] if stack else "<model>")
    try:
        with torch.enable_grad(), composite(), mode:
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    owners: dict[int, list[str]] = {id(p): [] for p in weights}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            owners[id(p)].append(pname)
    for l, (name, w) in enumerate(zip(names, weights, strict=True)):
        if len(owners[id(w)]) > 1:
            mode._flag([l], f"weight registered under several names {owners[id(w)]} (tied: used twice)")
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        if calls.get(mod, 0) > 1:
            mode._flag([l], f"module {mod} is called {calls[mod]} times in one forward (weight used twice)")
    return dict(zip(names, mode.flags, strict=True))


def exactness_check(model: nn.Module, example_input: torch.Tensor, params=None) -> tuple[bool, list[str]]:
    """(exact, reasons): exact means every selected layer's Gauss–Newton trace is its Hessian block trace.

    Otherwise the traces of the flagged layers are Gauss–Newton traces; ``reasons`` lists
    "<weight>: <why>" naming the offending op and module (e.g. ``gelu in act (GELU)``).
    Checks the model in its current train/eval mode (BatchNorm must be in eval mode).
    """
    per = layer_exactness(model, example_input, params)
    reasons = [f"{n}: {r}" for n, rs in per.items() for r in rs]
    return not reasons, reasons
