"""Model zoo: plain torch.nn, any input channel count, plus any user model via ``package.module:callable``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch.nn as nn

from ..errors import HasbError
from .lm import lm_small, lm_tiny
from .mobilenetv2 import mobilenet_v2
from .resnet import resnet18, resnet20, resnet20_narrow, resnet50
from .small import small_cnn, tiny_mlp
from .vit import vit_tiny

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet20_narrow": resnet20_narrow,  # half width (8/16/32): the evidence benchmark's second vision workload
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "small_cnn": small_cnn,
    "tiny_mlp": tiny_mlp,
    "vit_tiny": vit_tiny,
    "lm_tiny": lm_tiny,  # byte-level LMs: vocab 256, own context; vision arguments ignored (see models.lm)
    "lm_small": lm_small,
}


LM_MODELS = ("lm_tiny", "lm_small")  # byte-level language models: task "lm" (hasb.data); the rest classify


class UnknownModelError(HasbError):
    pass


def model_task(name: str | None) -> str | None:
    """The task a model name is for: ``"lm"`` (the byte LMs), ``"classification"`` (the other zoo models), or
    None for user code (``package.module:callable``) and no name, whose task is not known before it runs."""
    if not name or ":" in name:
        return None
    return "lm" if name in LM_MODELS else "classification" if name in MODELS else None


def state_dict_mismatch(model: nn.Module, state: dict) -> str:
    """Why ``state`` cannot be loaded into ``model`` strictly, naming keys (missing, unexpected, other shape);
    empty when it fits."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}"
        for k in want
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(want[k].shape)
    ]
    parts = []
    for what, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("other shapes (file vs model)", shapes),
    ):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            parts.append(f"{what}: {', '.join(keys[:5])}{more}")
    return "; ".join(parts)


def _user_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """``package.module:callable`` (importable, e.g. on PYTHONPATH) called with num_classes= and in_channels=."""
    mod_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownModelError(f"cannot import model {name!r}: {e} (is its package on PYTHONPATH?)") from None
    try:
        return fn(num_classes=num_classes, in_channels=in_channels)
    except Exception as e:  # the user's code: report it as theirs, in one line
        raise UnknownModelError(
            f"model {name!r} raised {type(e).__name__}: {e} (it is called with num_classes= "
            f"and in_channels= keywords; call it directly to see the traceback)"
        ) from None


def check_model_name(name: str | None) -> None:
    """An :class:`UnknownModelError` for a --model that is neither a zoo name nor ``package.module:callable``: a
    check of the name alone, so every CLI makes it before it opens data or a checkpoint."""
    if name is not None and ":" not in name and name not in MODELS:
        raise UnknownModelError(f"unknown model {name!r}; accepted: {', '.join(MODELS)} or package.module:callable")


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs) -> nn.Module:
    """Build a zoo model (or ``package.module:callable``) and tag it with ``example_input_shape``.

    Models on inputs under 64 px get the small-input stem (3×3, stride 1, no max-pool).
    """
    if ":" in name:
        model = _user_model(name, num_classes, in_channels)
    else:
        if image_size is None and not name.startswith("lm_"):
            raise UnknownModelError(
                f"zoo model {name!r} needs square image inputs x of shape [N, C, S, S]; this "
                "data has another shape: reshape it, or bring a model as package.module:callable"
            )
        kwargs.setdefault("small_input", image_size is not None and image_size < 64)
        check_model_name(name)
        model = MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if not isinstance(model, nn.Module):
        raise UnknownModelError(f"model {name!r} did not return an nn.Module")
    if not hasattr(model, "example_input_shape"):  # a model that knows its input (the LMs) keeps its own
        model.example_input_shape = (in_channels, image_size, image_size)
    model.hasb_model_name = name
    # enough to rebuild the architecture when loading an export
    model.hasb_build = {
        "name": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        **{k: v for k, v in kwargs.items() if isinstance(v, (int, float, bool, str))},
    }
    return model


def build_record(model: nn.Module) -> dict | None:
    """What :func:`build_model` recorded to rebuild ``model``'s architecture (a copy), or None for a model it did
    not build: ``{"name", "num_classes", "in_channels", "image_size", ...}`` (the zoo keyword arguments)."""
    rec = getattr(model, "hasb_build", None)
    return dict(rec) if isinstance(rec, dict) else None


__all__ = [
    "MODELS",
    "LM_MODELS",
    "build_model",
    "build_record",
    "check_model_name",
    "model_task",
    "state_dict_mismatch",
    "UnknownModelError",
]
