"""Small stand-in artifacts for tests and benchmarks (test support: not part of the installed packages): an untrained quantized supernet and a contract sensitivity.

The supernet is a zoo model quantized with ``hasb.quantize_model``, activation scales initialised on real
data, saved with ``hasb.export.save_quantized``; the sensitivity dict follows the analysis contract with
Ω_l(b) = t_l · ||Q_b(W_l) − W_l||² computed from the model's own quantizer (``layer.quant_weight``) and
random per-parameter traces t_l (no Hessian is computed: this is a fixture, not an analysis).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import hasb
from hasb.export import save_quantized
from hasb.models import build_model
from hasb.quantize import get_spec, quantized_layers
from search.ilp import SearchSpace, _choices, make_units


def fake_sensitivity(model, seed: int = 0) -> dict:
    """A contract-shaped sensitivity dict for a quantized model (random traces, exact ||ΔW||²)."""
    spec = get_spec(model)
    rng = np.random.default_rng(seed)
    layers, omega = [], {}
    for name, m in quantized_layers(model).items():
        searchable = name not in spec.fixed
        n = m.weight.numel()
        tpp = float(rng.lognormal(0.0, 1.0))
        layers.append(
            {
                "layer": name,
                "n_params": n,
                "trace": tpp * n,
                "trace_per_param": tpp,
                "stderr": 0.05 * tpp * n,
                "n_hvp": 0,
                "searchable": searchable,
            }
        )
        if searchable:
            with torch.no_grad():
                omega[name] = {str(b): tpp * float(((m.quant_weight(b) - m.weight) ** 2).sum()) for b in spec.bits}
    fp = hashlib.sha1(json.dumps([layers, seed], sort_keys=True).encode()).hexdigest()[:16]
    return {
        "version": 1,
        "model": model.hasb_build["name"],
        "fingerprint": fp,
        "bits": list(spec.bits),
        "layers": layers,
        "omega": omega,
        "negative_traces": [],
        "meta": {"fake": True, "seed": seed},
    }


def make_fake_run(
    out: str | Path,
    model: str = "small_cnn",
    bits: Sequence[int] = (8, 6, 4, 2),
    seed: int = 0,
    calib: torch.Tensor | None = None,
    **build_kw,
) -> tuple[Path, Path]:
    """Write ``out/model.pt`` and ``out/sensitivity.json``; returns their paths."""
    torch.manual_seed(seed)
    m = hasb.quantize_model(build_model(model, **build_kw), bits=bits)
    if calib is None:
        calib = torch.randn(64, *m.example_input_shape)
    hasb.init_quantizers(m, calib)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ck = save_quantized(m, out / "model.pt", extra={"stage": "fake", "bn": "bit"})
    sens = fake_sensitivity(m, seed)
    sp = hasb.atomic_write_text(out / "sensitivity.json", json.dumps(sens, indent=1))
    return ck, sp


def synthetic_space(
    seed: int = 0, n_layers: int = 6, bits: Sequence[int] = (8, 6, 4, 2), tied_wa: bool = True, groups=None
):
    """A random knapsack instance as a :class:`search.ilp.SearchSpace` (no model): BitOPs = MACs·w·a,
    size = params·w/8, plain average = w/L, objective ∝ sensitivity·(4^−w + 4^−a) with noise."""
    rng = np.random.default_rng(seed)
    L = n_layers
    choices = _choices(bits, tied_wa)
    w = np.array([c[0] for c in choices], float)
    a = np.array([c[1] for c in choices], float)
    macs = rng.integers(1_000, 100_000, L).astype(float)
    params = rng.integers(100, 10_000, L).astype(float)
    sens = rng.lognormal(0, 1.5, L)
    obj = sens[:, None] * (4.0**-w + 4.0**-a)[None, :] * (1 + 0.3 * rng.random((L, len(choices))))
    metrics = {
        "bitops": macs[:, None] * w * a,
        "size_bytes": params[:, None] * w / 8,
        "plain_avg_bits": np.tile(w / L, (L, 1)),
    }
    names = [f"l{i}" for i in range(L)]
    return SearchSpace(
        layers=names,
        choices=choices,
        units=make_units(names, groups),
        metrics=metrics,
        offsets={"bitops": 1234.0, "size_bytes": 56.0, "plain_avg_bits": 0.0},
        objective=obj,
        allowed=np.ones((L, len(choices)), bool),
    )


def synthetic_accuracy(space, config) -> float:
    """A deterministic stand-in for accuracy: exp(−objective) of the config (higher = less perturbation)."""
    uc = space.unit_choice_of(config)
    return float(np.exp(-space.evaluate(uc)["objective"]))


LM_WORDS = (
    "def return self import class for while if else elif try except with as yield lambda none true false "
    "and or not in is pass break continue global assert raise from print range len list dict set tuple"
).split()


def write_text_corpus(root: str | Path, n_files: int = 48, words: int = 120, seed: int = 0) -> Path:
    """``n_files`` small deterministic text files (Python-like word soup) under ``root``; returns ``root``.

    The text source splits whole files by a hash of their names, so 48 files give every split a few files.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [" ".join(rng.choice(LM_WORDS, 8)) + ":" for _ in range(words // 8)]
        (root / f"doc{i:03d}.txt").write_text("\n    ".join(lines) + "\n")
    return root


def make_fake_lm_run(
    out: str | Path,
    corpus: str | Path,
    bits: Sequence[int] = (8, 4, 2),
    *,
    weight_only: bool = True,
    act_bits: str | int = "fp",
    context: int = 32,
    seed: int = 0,
    float_steps: int = 0,
) -> tuple[Path, Path]:
    """A quantized ``lm_tiny`` supernet as a training run would leave it: ``out/model.pt`` (its extra records the
    training config: data ``text:<corpus>``, seed, val size) and a contract ``out/sensitivity.json``.

    ``float_steps`` Adam steps (batch 32) on the float model first, so that fewer weight bits cost bits per byte.
    """
    from hasb.data import batches, loss_fn, open_source

    torch.manual_seed(seed)
    splits = open_source(f"text:{corpus}", context=context).splits(seed, calib_size=32)
    net = build_model("lm_tiny", context=context)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for step, (x, y) in enumerate(batches(splits.train, 32, shuffle=True, generator=g, drop_last=True)):
        if step >= float_steps:
            break
        opt.zero_grad()
        loss_fn("lm", net(x), y).backward()
        opt.step()
    m = hasb.quantize_model(net, bits=bits, weight_only=weight_only, act_bits=act_bits)
    hasb.init_quantizers(m, splits.calib[0].long())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tc = {"data": f"text:{corpus}", "seed": seed, "val_size": 5000}
    ck = save_quantized(m, out / "model.pt", extra={"stage": "fake", "train_config": tc})
    sp = hasb.atomic_write_text(out / "sensitivity.json", json.dumps(fake_sensitivity(m, seed), indent=1))
    return ck, sp
