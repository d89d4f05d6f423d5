"""What a search runs on: the supernet, its cost model and sensitivity, the data; and its budgets.

Everything here is cheap validation (a checkpoint and a JSON file read, no training, nothing written), so a bad
input is one clear error before any candidate is evaluated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hasb.cli import check_out_dir as cli_check_out_dir
from hasb.cost import _NUM, _UNITS_SIZE, Budget, BudgetError, CostModel
from hasb.data import open_source, parse_data_opts, spec_task
from hasb.errors import HasbError
from hasb.export import load_quantized
from hasb.models import build_record
from hasb.quantize import searchable_layers
from hasb.sensitivity_file import check_for_model, load_sensitivity

from .evaluate import file_digest


class InputError(HasbError):
    """Bad command-line input (reported as one line, exit 2)."""


@dataclass
class Inputs:
    """A supernet ready to search: model, cost model, sensitivity dict, provenance, and the data it names."""

    model: Any
    model_name: str
    cost: CostModel
    sensitivity: dict
    checkpoint: Path | None
    checkpoint_sha: str
    data: str
    data_dir: str | None
    val_size: int = 5000
    seed: int = 0
    demo: bool = False
    extra: dict = field(default_factory=dict)
    task: str = "classification"  # the data's task: decides the metric (search.evaluate.metric_for)
    data_opts: dict = field(default_factory=dict)  # source options (hasb.data.open_source), e.g. context=64
    source: Any = None  # the opened hasb.data.DataSource, once validated (None: opened when first needed)


SIZE_UNITS_TEXT = "B, kB, MB, GB, KiB, MiB, GiB (a bare number is MB)"


def check_size_unit(text: str) -> None:
    """A --size budget must be in a size unit: ``15000GBOPs`` or ``12xyz`` is an error naming the accepted units."""
    m = re.fullmatch(_NUM + r"\s*([A-Za-z]*)", str(text).strip())
    unit = m.group(2) if m else ""  # no number at all: the cost model's parser names the problem
    if unit and unit.lower() not in _UNITS_SIZE:
        hint = " (BitOPs budgets go to --budget)" if "op" in unit.lower() else ""
        raise BudgetError(f"--size {text!r} has unknown unit {unit!r}{hint}; accepted: {SIZE_UNITS_TEXT}")


def check_out_dir(out: str | Path) -> None:
    """--out must be a folder or creatable as one (hasb.cli.check_out_dir; an InputError here)."""
    try:
        cli_check_out_dir(out)
    except HasbError as e:
        raise InputError(str(e)) from None


def parse_budgets(
    cost: CostModel, budget: Sequence[str] | None, size: Sequence[str] | None, avg_bits: Sequence[str] | None
) -> list[Budget]:
    """All budgets given on the command line, parsed by the CostModel (BudgetError on bad ones)."""
    for t in size or ():
        check_size_unit(t)
    out = [cost.parse_budget(t) for t in budget or ()]
    out += [cost.parse_budget(t, "size") for t in size or ()]
    out += [cost.parse_budget(t, "plain_avg") for t in avg_bits or ()]
    if not out:
        raise InputError(
            "no budget given: pass --budget 3.5 (average-bit equivalent), --budget 25GBOPs, --budget 3.5ebits "
            "(effective bits), --size 1.2MB or --avg-bits 3"
        )
    return out


def checkpoint_file(path: str | Path) -> Path:
    """The ``model.pt`` of a checkpoint path or of the run directory holding one (InputError when missing)."""
    p = Path(path)
    p = p / "model.pt" if p.is_dir() else p
    if not p.is_file():
        raise InputError(f"checkpoint not found: {p}")
    return p


def recorded_data_opts(tc: dict) -> dict:
    """Data-source options a training config recorded (``data_opt``/``data_opts``: a dict or ``k=v,...`` text)."""
    raw = tc.get("data_opt", tc.get("data_opts"))
    if isinstance(raw, dict):
        return dict(raw)
    return parse_data_opts(raw) if isinstance(raw, str) else {}


def data_setup(spec: str, data_dir: str | None, opts: dict, model) -> tuple[str, dict, Any]:
    """(task, source options, the opened source or None) of the search's data, without reading it where the spec
    tells the task.

    A language-model source (``text:``/``python-stdlib``) without ``context`` gets the model's own context
    (its ``example_input_shape``), so windows are never longer than the model takes.  A user callable is
    opened (called) here, since only it knows its task.
    """
    opts, source = dict(opts), None
    task = spec_task(spec)
    if task is None:
        source = open_source(spec, data_dir, **opts)  # a user callable: only calling it tells
        task = source.task
    shape = getattr(model, "example_input_shape", None)
    if task == "lm" and spec_task(spec) == "lm" and "context" not in opts and shape is not None and len(shape) == 1:
        opts["context"] = int(shape[0])
    return task, opts, source


def _train_config(extra: dict) -> dict:
    """The training config recorded in a checkpoint's extra (a dict; {} when absent or unreadable)."""
    tc = extra.get("train_config") or {}
    if isinstance(tc, str):
        try:
            tc = json.loads(tc)
        except json.JSONDecodeError:
            tc = {}
    return tc if isinstance(tc, dict) else {}


def checkpoint_inputs(
    checkpoint: str | Path,
    sensitivity: str | Path | None = None,
    *,
    model: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    data_opts: dict | None = None,
) -> Inputs:
    """Inputs of a trained supernet: its model.pt and sensitivity.json (default: next to the checkpoint).

    ``model`` (when given) must name the checkpoint's model; ``data``/``data_dir``/``data_opts`` default to the
    checkpoint's training data (``data_opts`` given here update the recorded ones).
    """
    ck = checkpoint_file(checkpoint)
    net, extra = load_quantized(ck, trusted_model=model)
    name = (build_record(net) or {}).get("name", "?")
    if model is not None and model != name:
        raise InputError(f"checkpoint {ck} is a {name!r} model, not --model {model!r}")
    sens_path = Path(sensitivity) if sensitivity else ck.parent / "sensitivity.json"
    if sensitivity is None and not sens_path.is_file():
        raise InputError(
            f"no sensitivity given and none next to the checkpoint ({sens_path}); pass --sensitivity "
            "(from: python -m analysis.sensitivity)"
        )
    layers = searchable_layers(net)
    if not layers:
        raise InputError("empty search space: the model has no searchable layer")
    sens = check_for_model(load_sensitivity(sens_path), name, layers, str(sens_path))
    tc = _train_config(extra)
    # the recorded source options belong to the recorded source: another --data starts from none
    recorded = recorded_data_opts(tc) if data in (None, tc.get("data")) else {}
    data = data or tc.get("data") or "fashion-mnist"
    data_dir = data_dir or tc.get("data_dir")
    task, opts, source = data_setup(data, data_dir, {**recorded, **(data_opts or {})}, net)
    return Inputs(
        model=net,
        model_name=name,
        cost=CostModel.from_model(net),
        sensitivity=sens,
        checkpoint=ck,
        checkpoint_sha=file_digest(ck),
        data=data,
        data_dir=data_dir,
        val_size=int(tc.get("val_size") or 5000),
        seed=int(tc.get("seed") or 0),
        extra=extra,
        task=task,
        data_opts=opts,
        source=source,
    )


__all__ = [
    "InputError",
    "Inputs",
    "parse_budgets",
    "check_size_unit",
    "check_out_dir",
    "checkpoint_file",
    "checkpoint_inputs",
    "data_setup",
    "recorded_data_opts",
]
