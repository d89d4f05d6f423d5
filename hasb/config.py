"""BitConfig: per-layer (weight bits, activation bits), as data with a JSON round trip."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HasbError

Bit = int | None  # None = full precision ("fp" in JSON)
BitLike = int | str | None
MAX_BITS = 16


class ConfigError(HasbError):
    """A bit configuration names an unknown layer or a bit that is not accepted."""


def parse_bit(b: BitLike, where: str = "") -> Bit:
    """``8``, ``"8"``, ``"fp"``/``None``/``32`` → int or None; anything else → ConfigError."""
    if b is None:
        return None
    if type(b) is int and 1 <= b <= MAX_BITS:  # the common case first: a config is parsed at every bit switch
        return b
    at = f" for layer {where!r}" if where else ""
    if isinstance(b, str):
        s = b.strip().lower()
        if s in ("fp", "fp32", "float", "32"):
            return None
        if not s.isdigit():
            raise ConfigError(f"bad bit {b!r}{at}: accepted an integer 1..{MAX_BITS} or 'fp'")
        b = int(s)
    if isinstance(b, bool) or not isinstance(b, int):
        raise ConfigError(f"bad bit {b!r}{at}: accepted an integer 1..{MAX_BITS} or 'fp'")
    if b == 32:
        return None
    if not 1 <= b <= MAX_BITS:
        raise ConfigError(f"bad bit {b}{at}: accepted an integer 1..{MAX_BITS} or 'fp'")
    return b


def bit_str(b: Bit) -> int | str:
    return "fp" if b is None else int(b)


@dataclass
class BitConfig:
    """Per-layer bits: ``layers[name] = (w_bits, a_bits)``; ``None`` means fp.

    Layer names are module paths (``"layer1.0.conv1"``).  Order is kept.
    """

    layers: dict[str, tuple[Bit, Bit]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean: dict[str, tuple[Bit, Bit]] = {}
        for name, wb in dict(self.layers).items():
            if isinstance(wb, (int, str)) or wb is None:
                w = a = parse_bit(wb, name)
            else:
                try:
                    w_raw, a_raw = wb
                except (TypeError, ValueError):
                    raise ConfigError(
                        f"layer {name!r}: expected a bit or a pair (w_bits, a_bits), got {wb!r}"
                    ) from None
                w, a = parse_bit(w_raw, name), parse_bit(a_raw, name)
            clean[str(name)] = (w, a)
        self.layers = clean

    # -- construction ----------------------------------------------------------
    @classmethod
    def uniform(cls, names: Iterable[str], bit: BitLike) -> BitConfig:
        b = parse_bit(bit)
        return cls({n: (b, b) for n in names})

    def with_layers(self, updates: Mapping[str, tuple[Bit, Bit]]) -> BitConfig:
        d = dict(self.layers)
        d.update(updates)
        return BitConfig(d)

    # -- views -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> tuple[Bit, Bit]:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers)

    def w_bits(self) -> list[Bit]:
        return [w for w, _ in self.layers.values()]

    def a_bits(self) -> list[Bit]:
        return [a for _, a in self.layers.values()]

    def is_uniform(self) -> Bit | None:
        vals = {b for pair in self.layers.values() for b in pair}
        return next(iter(vals)) if len(vals) == 1 else None

    def short(self) -> str:
        """Compact string, e.g. ``8-8-4-4|8-8-4-4`` when W=A tied, else ``w..|a..``."""
        ws = "-".join(str(bit_str(b)) for b in self.w_bits())
        as_ = "-".join(str(bit_str(b)) for b in self.a_bits())
        return ws if ws == as_ else f"w{ws}|a{as_}"

    def digest(self) -> str:
        return hashlib.sha1(self.to_json(indent=None).encode()).hexdigest()[:16]

    # -- validation --------------------------------------------------------------
    def validate(
        self,
        allowed: Mapping[str, Collection[int]],
        fixed: Mapping[str, Bit] = {},
        complete: bool = True,
        allow_fp: bool = True,
    ) -> None:
        """Check names and bits against a model's layers.

        Args:
            allowed: searchable layer name → candidate bits.
            fixed: fixed layer name → its bit (a config may list it only at that bit).
            complete: every searchable layer must be present.
            allow_fp: a searchable layer may run at full precision (never chosen by search).
        """
        for name, (w, a) in self.layers.items():
            if name in fixed:
                if (w, a) != (fixed[name], fixed[name]):
                    raise ConfigError(
                        f"layer {name!r} is fixed at {bit_str(fixed[name])}; got w={bit_str(w)} a={bit_str(a)}"
                    )
                continue
            if name not in allowed:
                near = ", ".join(list(allowed)[:6])
                raise ConfigError(
                    f"unknown layer {name!r}; searchable layers are: {near}{', ...' if len(allowed) > 6 else ''}"
                )
            cands = allowed[name]
            for kind, b in (("weight", w), ("activation", a)):
                if (b is None and not allow_fp) or (b is not None and b not in cands):
                    raise ConfigError(
                        f"layer {name!r}: {kind} bit {bit_str(b)} is not a candidate; accepted: "
                        f"{', '.join(map(str, sorted(cands)))}{' or fp' if allow_fp else ''}"
                    )
        if complete:
            missing = [n for n in allowed if n not in self.layers]
            if missing:
                raise ConfigError(f"config misses {len(missing)} searchable layer(s), e.g. {missing[0]!r}")

    # -- JSON --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"layers": {n: {"w_bits": bit_str(w), "a_bits": bit_str(a)} for n, (w, a) in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> BitConfig:
        if not isinstance(d, Mapping) or "layers" not in d or not isinstance(d["layers"], Mapping):
            raise ConfigError(
                "a BitConfig JSON must be an object with a 'layers' object ({name: {'w_bits': b, 'a_bits': b}})"
            )
        out = {}
        for n, v in d["layers"].items():
            if isinstance(v, Mapping):
                if "w_bits" not in v or "a_bits" not in v:
                    raise ConfigError(f"layer {n!r}: expected keys 'w_bits' and 'a_bits', got {sorted(v)}")
                out[n] = (v["w_bits"], v["a_bits"])
            else:
                out[n] = v
        return cls(out)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, s: str) -> BitConfig:
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(f"not valid JSON: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> BitConfig:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        d = json.loads(p.read_text())
        if isinstance(d, Mapping) and "config" in d and "layers" not in d:
            d = d["config"]  # an exported search result wraps the config
        return cls.from_dict(d)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to ``path`` through a temp file + rename, so a crash never leaves half a file."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p
