"""Thin CLIs over typed config dataclasses: options spelled once, one meaning across every CLI.

A CLI is ``parse → config dataclass → one library call → exit code``. Its config dataclass declares each option
once with :func:`option` (help next to the field); :func:`add_options` turns the fields into argparse arguments and
:func:`config_from_args` turns the parsed namespace back into the dataclass. The library never sees argparse.

Common options have one spelling and one meaning everywhere; declare them with the helpers below
(``out_option``, ``force_option``, ``device_option``, ``quiet_option``, ``bits_option``, ``model_option``,
``data_option``, ``data_opts_option``, ``seed_option``, ``threads_option``, ``act_bits_option``) rather than
re-spelling them.

Exit codes (:func:`run_cli`): 0 success; 2 a user error (any :class:`~hasb.errors.HasbError`, printed as one line
``error: ...`` on stderr); 1 a bug (the traceback is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, Field, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import HasbError

__all__ = [
    "option",
    "add_options",
    "config_from_args",
    "run_cli",
    "parse_bits",
    "resolve_device",
    "set_threads",
    "out_option",
    "force_option",
    "device_option",
    "quiet_option",
    "bits_option",
    "model_option",
    "data_option",
    "data_dir_option",
    "seed_option",
    "threads_option",
    "act_bits_option",
    "parse_act_bits",
    "act_mode",
    "data_opts_option",
    "check_out_dir",
    "out_lock",
    "DEFAULT_BITS_TEXT",
]

T = TypeVar("T")
DEFAULT_BITS_TEXT = "8,6,4,2"
MAX_BITS = 8


def option(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[str] | None = None,
    aliases: Sequence[str] = (),
    negate: str | None = None,
    default_factory: Callable[[], Any] | None = None,
    required: bool = False,
) -> Any:
    """A dataclass field that is also a CLI option.

    ``flag`` defaults to ``--field-name``; ``parse`` converts the string (default: the field's type); a bool field
    is a switch (``--flag`` sets True), or with ``negate="--no-x"`` a switch that sets False. ``aliases`` keep old
    spellings working.
    """
    meta = {
        "help": help,
        "flag": flag,
        "parse": parse,
        "choices": choices,
        "aliases": tuple(aliases),
        "negate": negate,
        "required": required,
    }
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _scalar_type(tp: Any) -> Any:
    """int for ``int``/``Optional[int]``/``int | None``; the same for float and str; None otherwise."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "str": str, "bool": bool}.get(
            tp.replace(" | None", "").replace("Optional[", "").rstrip("]"), None
        )
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def add_options(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one argparse option per :func:`option` field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        _add_field(parser, f, hints.get(f.name))
    return parser


def _field_default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _add_field(parser: argparse.ArgumentParser, f: Field, hint: Any) -> None:
    m = f.metadata
    flag = m["flag"] or "--" + f.name.replace("_", "-")
    default = _field_default(f)
    names = [flag, *m["aliases"]]
    if _scalar_type(hint) is bool:
        if m["negate"]:
            parser.add_argument(
                m["negate"], *m["aliases"], dest=f.name, action="store_false", default=default, help=m["help"]
            )
        else:
            parser.add_argument(*names, dest=f.name, action="store_true", default=default, help=m["help"])
        return
    # a custom parser runs in config_from_args (inside run_cli), so its HasbError is one clear line, not
    # argparse's "invalid value" with the message lost
    kind = str if m["parse"] else (_scalar_type(hint) or str)
    shown = f" (default: {_show(default)})" if default is not None and not m["required"] else ""
    parser.add_argument(
        *names,
        dest=f.name,
        type=kind,
        choices=m["choices"],
        required=m["required"],
        default=default,
        help=m["help"] + shown,
    )


def _show(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v).replace("%", "%%")


def config_from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass ``cls`` from a parsed namespace (fields without an option keep their defaults)."""
    kw = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if hasattr(ns, f.name):
            v = getattr(ns, f.name)
            parse = f.metadata.get("parse")
            kw[f.name] = parse(v) if parse is not None and isinstance(v, str) else v
    kw.update(overrides)
    return cls(**kw)


def run_cli(call: Callable[[], int | None]) -> int:
    """Run ``call`` under the one exit-code policy: HasbError → one stderr line, exit 2; a bug keeps its traceback."""
    try:
        rc = call()
    except HasbError as e:
        msg = " ".join(str(e).split("\n")[0].split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


# -- the meaning of the common options ------------------------------------------------------------------------


def parse_bits(text: str | Sequence[int], what: str = "--bits") -> list[int]:
    """``"8,6,4,2"`` (or a sequence) → ``[8, 6, 4, 2]``: distinct integers in 1..8, highest first."""
    if isinstance(text, str):
        parts = [t.strip() for t in text.split(",") if t.strip()]
        try:
            bits = [int(t) for t in parts]
        except ValueError:
            raise HasbError(
                f"{what} must be comma-separated integers in 1..{MAX_BITS} like 8,6,4,2, got {text!r}"
            ) from None
    else:
        bits = [int(b) for b in text]
    if not bits or any(not 1 <= b <= MAX_BITS for b in bits):
        raise HasbError(f"{what} must be integers in 1..{MAX_BITS}, got {text!r}")
    if len(set(bits)) != len(bits):
        raise HasbError(f"{what} lists a bit twice ({text!r}); give each candidate bit once")
    return sorted(bits, reverse=True)


def resolve_device(name: str) -> Any:
    """``auto`` → cuda when available else cpu; ``cpu``, ``cuda``, ``cuda:N`` checked against this machine."""
    import torch  # heavy: only when a device is resolved

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise HasbError(f"unknown --device {name!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise HasbError(f"unsupported --device {name!r}; accepted: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HasbError(f"--device {name} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise HasbError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def default_threads() -> int:
    """CPU cores available to this process (its affinity mask, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (default: the cores available to the process); returns the count used."""
    import torch

    n = default_threads() if n is None else n
    if n < 1:
        raise HasbError(f"--threads must be ≥ 1, got {n}")
    torch.set_num_threads(n)
    return n


def out_option(help: str, default: str | None = None, required: bool = False) -> Any:
    return option(default, help=help, required=required)


def force_option() -> Any:
    return option(False, help="replace existing outputs in --out", aliases=("--overwrite",))


def device_option() -> Any:
    return option("auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")


def quiet_option() -> Any:
    return option(True, help="no progress bars or per-step lines", negate="--quiet", aliases=("--no-progress",))


def bits_option(help: str = "candidate bits, comma separated, highest first", default: str = DEFAULT_BITS_TEXT) -> Any:
    return option(default_factory=lambda: parse_bits(default), help=help, parse=parse_bits)


def model_option(default: str | None = None, required: bool = False) -> Any:
    return option(
        default,
        required=required,
        help="zoo model (resnet20, resnet18, resnet50, mobilenet_v2, "
        "small_cnn, tiny_mlp, vit_tiny; byte-level language models lm_tiny, lm_small for text data) or "
        "package.module:callable (importable: on PYTHONPATH; called "
        "with num_classes=, in_channels=, image_size= keywords, returns an nn.Module)",
    )


def data_option(default: str = "fashion-mnist") -> Any:
    return option(
        default,
        help="dataset: fashion-mnist, mnist, npz:PATH (arrays x, y [, x_val, y_val, x_test, "
        "y_test]), imagefolder:DIR, text:PATH_OR_GLOB, python-stdlib or package.module:callable",
    )


def data_dir_option() -> Any:
    return option(None, help="folder with the dataset files (default: the Debian dataset location or $HASB_DATA_DIR)")


def seed_option(default: int = 0) -> Any:
    return option(default, help="random seed")


def threads_option() -> Any:
    return option(None, help="CPU threads for torch (default: the cores available to this process)", parse=int)


def parse_act_bits(text: str | int, what: str = "--act-bits") -> str:
    """``same`` (activations at each layer's weight bit: W+A), ``fp`` or ``N`` in 1..8 (weight-only) → that text."""
    t = str(text).strip().lower()
    if t in ("same", "fp") or (t.isdigit() and 1 <= int(t) <= MAX_BITS):
        return t
    raise HasbError(f"{what} must be same, fp or an integer in 1..{MAX_BITS}, got {text!r}")


def act_mode(act_bits: str) -> dict[str, Any]:
    """``--act-bits`` → ``quantize_model`` keywords: ``{}`` for ``same`` (W+A), else ``weight_only=True`` and
    ``act_bits`` (``"fp"`` or an int)."""
    t = parse_act_bits(act_bits)
    if t == "same":
        return {}
    return {"weight_only": True, "act_bits": t if t == "fp" else int(t)}


def act_bits_option(default: str = "same") -> Any:
    return option(
        default,
        parse=parse_act_bits,
        help="activation bits: same (each layer's activations at its weight bit, W+A), fp or N (weight-only: "
        "only weights switch bits, activations stay fp or at N bits, N one of the candidate bits)",
    )


def _parse_data_opts(text: str) -> dict:
    from .data import parse_data_opts  # heavy (torch): only when the option is given

    return parse_data_opts(text)


def data_opts_option(note: str = "") -> Any:
    """``--data-opt k=v,...`` (a dict field): the same spelling and parsing in every CLI; ``note`` adds what the
    CLI does when it is not given."""
    return option(
        default_factory=dict,
        flag="--data-opt",
        parse=_parse_data_opts,
        help="data source options, key=value pairs separated by commas (e.g. context=64,limit=2000000 for text: "
        "bytes per window, bytes per split; size=64,mean=0.5/0.5/0.5 for imagefolder)" + (f"; {note}" if note else ""),
    )


def check_out_dir(out: str | Path, what: str = "--out") -> None:
    """HasbError unless ``out`` is a folder or creatable as one (its nearest existing ancestor a writable folder);
    creates nothing."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise HasbError(f"{what} {p} is a file, not a directory; give a folder")
    anc = p
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise HasbError(f"{what} {p} cannot be created or written ({anc} is not a writable folder)")


LOCK_NAME = ".hasb.lock"


@contextlib.contextmanager
def out_lock(out: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on the run folder ``out`` (created if missing) while a run writes into it.

    A second run on the same folder fails at once with a HasbError naming the holder, instead of silently
    overwriting the first run's outputs. The lock is an ``flock`` on ``out/.hasb.lock``: the OS releases it when
    the process dies, so a killed run never leaves a stale lock.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise HasbError(
                f"{folder} is in use by another hasb run ({holder}); wait for it or use another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield folder
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
