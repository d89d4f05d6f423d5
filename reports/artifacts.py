"""Read a run directory's artifacts (written by the CLIs) for the report — no recomputation of results.

Layout: ``RUN/sensitivity.json|csv`` (analysis.sensitivity; read through its one reader,
:mod:`hasb.sensitivity_file`, which holds the format); training runs (hasb.train: ``metrics.csv|json``,
``train_config.json``, ``model.pt``) in ``RUN/<stage>/``, ``RUN/train/<stage>/`` (the demo and the recipes)
or ``RUN/`` itself, stage = multi or supernet; search outputs (search.pareto: ``pareto.csv``,
``candidates.csv``, ``config.json``) at the top of RUN or in per-budget folders ``RUN/budget-<B>/``.

Each loader raises :class:`MissingArtifact` naming the file it looked for and the command that
writes it, so the notebook can show that message and go on with the other sections.
The only thing derived here is the cost model (MACs per layer) of the run's model, built from
its name with ``hasb.CostModel`` — a shape trace, not a result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hasb.errors import HasbError
from hasb.sensitivity_file import load_sensitivity
from search.evaluate import METRICS, Metric
from search.outputs import axis_label

# The command that produces each artifact; {run} is the run directory.
COMMANDS = {
    "sensitivity": "python -m analysis.sensitivity --model MODEL --data fashion-mnist --out {run}",
    "multi": "python -m hasb.train --stage multi --model MODEL --data fashion-mnist --out {run}/multi",
    "supernet": "python -m hasb.train --stage supernet --model MODEL --data fashion-mnist --out {run}/supernet",
    "pareto": "python -m search.pareto --budget 3.5 --out {run}",
}
TRAIN_STAGES = ("multi", "supernet")
SEARCH_FILES = ("config.json", "pareto.csv", "candidates.csv")
BUDGET_PREFIX = "budget-"


def _has_metrics(d: Path) -> bool:
    return (d / "metrics.csv").is_file() or (d / "metrics.json").is_file()


class MissingArtifact(Exception):
    """An artifact the report needs is absent; ``str()`` names the file and the command that writes it."""

    def __init__(self, what: str, looked: list[Path], command: str, detail: str = ""):
        self.what, self.looked, self.command = what, looked, command
        where = ", ".join(str(p) for p in looked)
        msg = f"{what} not found (looked for {where})" if not detail else f"{what}: {detail}"
        super().__init__(f"{msg}. It is produced by: {command}")


class ArtifactError(HasbError):
    """An artifact exists but cannot be read (malformed JSON/CSV, missing fields)."""


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p} is not valid JSON: {e}") from None


def _read_csv(p: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p} is not a readable CSV: {e}") from None


def budget_dirs(root: Path) -> list[Path]:
    """``root/budget-<B>/`` folders holding search outputs (search.pareto writes one per budget)."""
    return sorted(d for d in root.glob(f"{BUDGET_PREFIX}*") if d.is_dir() and _has_search(d))


def _has_search(d: Path) -> bool:
    return any((d / f).is_file() for f in SEARCH_FILES)


def _newest_mtime(d: Path) -> float:
    return max((d / f).stat().st_mtime for f in SEARCH_FILES if (d / f).is_file())


def find_search_dir(root: Path, budget: str | None = None) -> Path | None:
    """The folder whose search outputs the report shows, or None when the run has none.

    ``budget`` (``3.5`` or ``budget-3.5``) names ``root/budget-<B>/``; :class:`ArtifactError` (a HasbError) when
    that folder is absent, naming the budgets there are.  Without it: the newest (by file time) of ``root``
    itself (when it holds a config.json: the layout before per-budget folders) and its ``budget-*`` folders."""
    subs = budget_dirs(root)
    if budget is not None:
        name = budget if budget.startswith(BUDGET_PREFIX) else BUDGET_PREFIX + budget
        if (root / name) in subs:
            return root / name
        have = ", ".join(d.name[len(BUDGET_PREFIX) :] for d in subs) or "none"
        raise ArtifactError(f"--budget {budget}: no search outputs in {root / name}; budgets in {root}: {have}")
    # the top holds a pick only in the layout before per-budget folders; its shared pareto.csv alone is no pick
    cands = ([root] if (root / "config.json").is_file() else []) + subs
    return max(cands, key=_newest_mtime) if cands else None


@dataclass
class Run:
    """A run directory and lazy access to its artifacts.

    ``budget`` picks one ``budget-<B>/`` folder of search outputs (see :func:`find_search_dir`)."""

    root: Path
    budget: str | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def open(cls, run_dir: str | Path, budget: str | None = None) -> Run:
        p = Path(run_dir)
        if not p.is_dir():
            raise ArtifactError(
                f"run directory {str(p)!r} does not exist; make one with the commands: "
                + "; ".join(c.format(run=p) for c in COMMANDS.values())
            )
        run = cls(p, budget)
        run.search_dir()  # an unknown budget is an error now, not in the sections
        return run

    def search_dir(self) -> Path | None:
        """The folder of the search outputs shown (None: the run has none)."""
        if "search_dir" not in self._cache:
            self._cache["search_dir"] = find_search_dir(self.root, self.budget)
        return self._cache["search_dir"]

    def search_file(self, name: str, what: str) -> Path:
        """``name`` in :meth:`search_dir`, else at the top of the run; MissingArtifact naming both places."""
        d = self.search_dir()
        looked = ([d / name] if d is not None and d != self.root else []) + [self.root / name]
        for p in looked:
            if p.is_file():
                return p
        raise MissingArtifact(what, looked, self.cmd("pareto"))

    def cmd(self, key: str) -> str:
        return COMMANDS[key].format(run=self.root)

    # -- inventory -----------------------------------------------------------------------------------
    def inventory(self) -> pd.DataFrame:
        """Which contract files exist (paths relative to the run), with size and the command that writes each.

        Training files are listed where :meth:`train_dir` finds the stage (else ``<stage>/``), search files in
        :meth:`search_dir` (else the top)."""
        paths = [("sensitivity", self.root / f) for f in ("sensitivity.json", "sensitivity.csv")]
        for st in TRAIN_STAGES:
            try:
                d = self.train_dir(st)
            except MissingArtifact:
                d = self.root / st
            paths += [(st, d / f) for f in ("metrics.csv", "metrics.json", "train_config.json", "model.pt")]
        d = self.search_dir() or self.root
        paths += [("pareto", d / f) for f in SEARCH_FILES]
        rows = [
            {
                "artifact": str(p.relative_to(self.root)),
                "present": p.is_file(),
                "size_kB": round(p.stat().st_size / 1e3, 1) if p.is_file() else None,
                "made by": self.cmd(key),
            }
            for key, p in paths
        ]
        return pd.DataFrame(rows)

    # -- sensitivity -----------------------------------------------------------------------------------
    def sensitivity(self) -> dict:
        """sensitivity.json, validated by its one reader, ``hasb.sensitivity_file``."""
        if "sens" in self._cache:
            return self._cache["sens"]
        p = self.root / "sensitivity.json"
        if not p.is_file():
            raise MissingArtifact("sensitivity.json", [p], self.cmd("sensitivity"))
        sens = load_sensitivity(p)
        self._cache["sens"] = sens
        return sens

    def traces(self) -> pd.DataFrame:
        """Per-layer rows: layer, n_params, trace, trace_per_param, stderr, n_hvp, searchable."""
        df = pd.DataFrame(self.sensitivity()["layers"])
        need = {"layer", "trace", "stderr"}
        if not need <= set(df.columns):
            raise ArtifactError(f"sensitivity.json layers lack {sorted(need - set(df.columns))}")
        if "searchable" not in df.columns:
            df["searchable"] = True
        return df

    def omega(self) -> dict:
        om = self.sensitivity().get("omega")
        if not om:
            raise MissingArtifact(
                "Ω_l(b) table",
                [self.root / "sensitivity.json"],
                self.cmd("sensitivity"),
                detail="sensitivity.json has no 'omega' entry",
            )
        return om

    def spectrum(self) -> tuple[list, list, list | None]:
        s = self.sensitivity()
        dens = s.get("density")
        if not dens or "grid" not in dens or "density" not in dens:
            raise MissingArtifact(
                "spectral density",
                [self.root / "sensitivity.json"],
                self.cmd("sensitivity") + " (with the spectral density enabled; see --help)",
                detail="sensitivity.json has no 'density' entry",
            )
        return dens["grid"], dens["density"], s.get("eigenvalues")

    # -- training ----------------------------------------------------------------------------------------
    def train_dir(self, stage: str) -> Path:
        """Where the ``stage`` training run of this run directory is, first match wins:

        ``RUN/<stage>/`` (``hasb.train --out RUN/<stage>``), ``RUN/train/<stage>/`` (the demo and the recipes:
        ``search.pareto`` builds its supernet in ``RUN/train``), or ``RUN/`` itself when its train_config.json
        names that stage."""
        looked = []
        for sub in (self.root / stage, self.root / "train" / stage):
            if _has_metrics(sub):
                return sub
            looked.append(sub / "metrics.csv")
        cfg = self.root / "train_config.json"
        if (self.root / "metrics.csv").is_file() and cfg.is_file():
            try:
                if _read_json(cfg).get("stage") == stage:
                    return self.root
            except (ArtifactError, AttributeError):
                pass
        raise MissingArtifact(f"{stage} training metrics", looked + [self.root / "metrics.csv"], self.cmd(stage))

    def metrics(self, stage: str) -> pd.DataFrame:
        d = self.train_dir(stage)
        if (d / "metrics.csv").is_file():
            df = _read_csv(d / "metrics.csv")
        else:
            raw = _read_json(d / "metrics.json")
            rows = raw.get("epochs", raw) if isinstance(raw, dict) else raw
            df = pd.DataFrame(rows)
        if "epoch" not in df.columns or df.empty:
            raise ArtifactError(f"{d}/metrics.* has no epoch rows; columns: {list(df.columns)}")
        return df

    def train_config(self, stage: str) -> dict:
        p = self.train_dir(stage) / "train_config.json"
        return _read_json(p) if p.is_file() else {}

    def bit_probabilities(self) -> tuple[dict, list | None, str]:
        """HASB p_l(b) per layer and the sensitive layers, with where they came from.

        Preference: the sampler the supernet was trained with (``supernet/model.pt`` extra
        ``sampler.probabilities``, as hasb.train saves it); else ``hasb.sampler.HASBSampler`` on
        sensitivity.json's per-parameter traces (Alg. 1, the sampler's own code)."""
        try:
            d = self.train_dir("supernet")
        except MissingArtifact:
            d = None
        if d is not None and (d / "model.pt").is_file():
            import torch

            try:
                obj = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
                extra = json.loads(obj.get("extra", "{}")) if isinstance(obj, dict) else {}
            except Exception as e:  # unreadable export: fall back to the traces, but say so
                print(f"could not read {d / 'model.pt'}: {e}")
                extra = {}
            smp = extra.get("sampler") or {}
            probs = smp.get("probabilities")
            if probs:
                # HASB rows are non-uniform exactly for sensitive layers (p ∝ b); uniform sampler: none.
                sensitive = (
                    [n for n, row in probs.items() if max(row.values()) - min(row.values()) > 1e-9]
                    if smp.get("kind") == "hasb"
                    else None
                )
                return probs, sensitive, f"{d / 'model.pt'} (sampler {smp.get('kind', '?')} used in training)"
        sens = self.sensitivity()
        df = self.traces()
        df = df[df["searchable"].astype(bool)]
        if "trace_per_param" not in df.columns:
            raise ArtifactError("sensitivity.json layers lack 'trace_per_param'")
        from hasb.sampler import HASBSampler

        smp = HASBSampler(
            list(df["layer"]),
            [int(b) for b in sens["bits"]],
            dict(zip(df["layer"], df["trace_per_param"].astype(float), strict=True)),
        )
        return smp.probabilities(), smp.sensitive(), "hasb.sampler.HASBSampler on sensitivity.json traces"

    # -- search --------------------------------------------------------------------------------------------
    def metric(self) -> Metric:
        """The search's score metric (search.evaluate.Metric): config.json's ``metric``, else pareto.csv's
        ``metric`` column, else accuracy (outputs written before language models)."""
        for get in (
            lambda: (self.chosen().get("metric") or {}).get("name"),
            lambda: _read_csv(self.search_file("pareto.csv", "pareto.csv"))["metric"].iloc[0],
        ):
            try:
                name = get()
            except (MissingArtifact, ArtifactError, AttributeError, KeyError, IndexError):
                continue
            if name in METRICS:
                return METRICS[name]
        return METRICS["accuracy"]

    def pareto(self) -> pd.DataFrame:
        p = self.search_file("pareto.csv", "pareto.csv")
        df = _read_csv(p)
        name = self.metric().name
        if name not in df.columns or not ({"bitops", "gbitops"} & set(df.columns)):
            raise ArtifactError(f"{p} needs columns {name} and bitops/gbitops; got {list(df.columns)}")
        return df

    def candidates(self) -> pd.DataFrame | None:
        try:
            return _read_csv(self.search_file("candidates.csv", "candidates.csv"))
        except MissingArtifact:
            return None

    def chosen(self) -> dict:
        return _read_json(self.search_file("config.json", "config.json (the chosen config)"))

    def model_name(self) -> str:
        for getter in (
            lambda: self.chosen().get("model"),
            lambda: self.sensitivity().get("model"),
            lambda: self.train_config("supernet").get("model"),
            lambda: self.train_config("multi").get("model"),
        ):
            try:
                name = getter()
            except (MissingArtifact, ArtifactError, AttributeError):
                continue
            if isinstance(name, dict):
                name = name.get("name")
            if name:
                return str(name)
        raise MissingArtifact(
            "the model name",
            [self.root / "config.json", self.root / "sensitivity.json"],
            self.cmd("pareto"),
            detail="no artifact names the model",
        )

    def cost_model(self, bits: list | None = None):
        """hasb.CostModel of the run's model (MACs from one traced forward pass; no weights needed)."""
        if "cost" in self._cache:
            return self._cache["cost"]
        import hasb
        from hasb.models import build_model

        name = self.model_name()
        build: dict = {}
        for src in (self.chosen, lambda: self.train_config("supernet"), lambda: self.train_config("multi")):
            try:
                b = src().get("build") or src().get("hasb_build")
            except (MissingArtifact, ArtifactError, AttributeError):
                continue
            if isinstance(b, dict):  # every recorded build argument (an LM's context changes its MACs)
                build = {k: v for k, v in b.items() if k != "name"}
                break
        if bits is None:
            try:
                bits = [int(b) for b in self.sensitivity()["bits"]]
            except (MissingArtifact, ArtifactError, KeyError):
                bits = list(hasb.DEFAULT_BITS)
        try:
            wo = self.chosen().get("weight_only")
        except (MissingArtifact, ArtifactError):
            wo = None
        mode = {"weight_only": True, "act_bits": wo.get("a_bits", "fp")} if isinstance(wo, dict) else {}
        model = hasb.quantize_model(build_model(name, **build), bits=tuple(bits), **mode)
        cost = hasb.CostModel.from_model(model)
        self._cache["cost"] = cost
        return cost


# ---------------------------------------------------------------------------------------------- configs
def config_from_record(rec: Any, names: list[str]):
    """A hasb.BitConfig from config.json's content or a pareto.csv ``config`` short string.

    Short strings are ``BitConfig.short()``: ``8-8-4-…`` (W = A) or ``w8-4…|a8-4…``, one entry per
    searchable layer in ``names`` order.
    """
    from hasb import BitConfig

    if isinstance(rec, dict):
        inner = rec.get("config", rec)
        if isinstance(inner, dict) and "layers" in inner:
            return BitConfig.from_dict(inner)
        if "bit_config" in rec and isinstance(rec["bit_config"], dict):
            return BitConfig(rec["bit_config"])
        raise ArtifactError("config.json holds no 'layers' / 'config' / 'bit_config' entry")
    s = str(rec).strip()
    if s.startswith("w") and "|a" in s:
        ws, as_ = s[1:].split("|a", 1)
        w, a = ws.split("-"), as_.split("-")
    else:
        w = a = s.split("-")
    if len(w) != len(names) or len(a) != len(names):
        raise ArtifactError(
            f"config string {s[:40]!r} has {len(w)} entries but the model has {len(names)} searchable layers"
        )
    return BitConfig({n: (wb, ab) for n, wb, ab in zip(names, w, a, strict=True)})


def doc_metric(chosen: dict) -> Metric:
    """The metric of a config.json (``metric.name``; accuracy for documents written before it)."""
    m = chosen.get("metric")
    return METRICS.get(m.get("name", "accuracy"), METRICS["accuracy"]) if isinstance(m, dict) else METRICS["accuracy"]


def chosen_point(chosen: dict) -> dict | None:
    """{<metric>, bitops|gbitops} of config.json (top level, or under ``metrics`` as search.export writes), with
    the validation SE (``<metric>_se``) and the held-out test score (``test_<metric>``, ``test_se``) when given;
    the metric is ``accuracy`` or, for a language model, ``bits_per_byte``."""
    name = doc_metric(chosen).name
    src = chosen.get("metrics") if isinstance(chosen.get("metrics"), dict) else chosen
    pick = {k: src[k] for k in (name, "bitops", "gbitops") if src.get(k) is not None}
    if name not in pick or not ({"bitops", "gbitops"} & set(pick)):
        return None
    sc = chosen.get("scores") if isinstance(chosen.get("scores"), dict) else {}
    for split, keys in (("validation", (f"{name}_se",)), ("test", (f"test_{name}", "test_se"))):
        d = sc.get(split)
        if isinstance(d, dict) and isinstance(d.get(name), (int, float)):
            vals = (d.get("se"),) if split == "validation" else (d[name], d.get("se"))
            pick.update({k: v for k, v in zip(keys, vals, strict=True) if v is not None})
    return pick


def pareto_view(run: Run) -> dict:
    """What the report's Pareto section draws and tables, in the run's metric: ``plot`` (keyword arguments of
    hasb.plots.plot_pareto: points, front, uniform configs, chosen point, budget, average-bit axis, the metric
    and its axis label naming split and size), ``front_table``, ``chosen`` (config.json or None) and ``notes``
    (why a part is missing)."""
    m, pts, notes = run.metric(), run.pareto(), []
    cand = run.candidates()
    points = cand if cand is not None and len(cand) >= len(pts) and m.name in cand else pts
    front = pts[pts["on_front"].astype(str).str.lower().isin(["true", "1"])] if "on_front" in pts else None
    uniform = pts[pts["source"] == "uniform"] if "source" in pts else None
    cost = chosen = None
    try:
        cost = run.cost_model()
    except Exception as e:  # the top axis needs the model; the plot is still useful without it
        notes.append(f"no average-bit axis: {e}")
    try:
        chosen = run.chosen()
    except (MissingArtifact, ArtifactError) as e:
        notes.append(f"no chosen config: {e}")
    val = (chosen or {}).get("scores", {}).get("validation") if isinstance((chosen or {}).get("scores"), dict) else None
    plot = {
        "points_df": points,
        "front_df": front,
        "uniform_df": uniform,
        "chosen": chosen_point(chosen) if chosen is not None else None,
        "budget_bitops": budget_bitops(chosen, cost) if (chosen is not None and cost is not None) else None,
        "avg_bits_fn": cost,
        "metric": m.name,
        "higher_is_better": m.higher_is_better,
        "accuracy_label": axis_label(m, val) if isinstance(val, dict) and "n" in val else None,
    }
    cols = [
        c
        for c in ("config_id", "source", "gbitops", "avg_bit_equivalent", "effective_bits", m.name, m.se_col)
        if c in pts
    ]
    table = (front if front is not None else pts)[cols].sort_values(cols[2] if len(cols) > 2 else cols[0])
    return {"plot": plot, "front_table": table, "chosen": chosen, "metric": m, "notes": notes}


def budget_bitops(chosen: dict, cost) -> float | None:
    """The BitOPs budget of config.json: ``budget`` as text/number, {kind, value, limit, text}, or a list of
    those (search.export; the first BitOPs / average-bit one is used)."""
    b = chosen.get("budget")
    items = b if isinstance(b, list) else [b]
    for b in items:
        if b is None:
            continue
        if isinstance(b, dict):
            if (
                b.get("kind") in ("bitops", "avg_bits")
                and isinstance(b.get("limit"), (int, float))
                and math.isfinite(b["limit"])
            ):
                return float(b["limit"])
            if b.get("kind") not in (None, "bitops", "avg_bits"):
                continue
            b = b.get("text") or b.get("value")
            if b is None:
                continue
        try:
            parsed = cost.parse_budget(str(b))
        except ValueError:
            continue
        if parsed.kind in ("bitops", "avg_bits") and math.isfinite(parsed.limit):
            return parsed.limit
    return None


# ---------------------------------------------------------------------------------------------- scores
_SE_KEYS = ("accuracy_se", "accuracy_stderr", "se", "stderr", "standard_error")
_SPLIT_KEYS = ("split", "accuracy_split")
_N_KEYS = ("n", "n_images", "accuracy_n", "size", "n_samples")


def _score_row(label: str, d: dict, name: str = "accuracy") -> dict | None:
    acc = d.get(name)
    if not isinstance(acc, (int, float)) or isinstance(acc, bool):
        return None
    pick = lambda keys: next((d[k] for k in keys if d.get(k) is not None), None)  # noqa: E731
    return {
        "score": label,
        "split": pick(_SPLIT_KEYS),
        "n": pick(_N_KEYS),
        name: float(acc),
        "se": pick((f"{name}_se", *_SE_KEYS)),
    }


def chosen_scores(chosen: dict) -> pd.DataFrame:
    """Every score config.json states for the chosen config, one row each: score (where it was found),
    split, n (images, or windows for a language model), the metric (``accuracy`` as a fraction, or
    ``bits_per_byte``; the column is named by it), se (its standard error; None when the file gives none).

    Tolerant of both layouts: a plain ``metrics.accuracy`` (selection score), and scores nested as objects with
    an ``accuracy`` (e.g. ``"test": {"accuracy", "se", "split", "n"}``) under the top level, ``metrics`` or a
    ``scores`` object/list."""
    rows: list[dict] = []
    name = doc_metric(chosen).name
    metrics = chosen.get("metrics") if isinstance(chosen.get("metrics"), dict) else {}
    for label, d in (("metrics", metrics), ("config.json", chosen)):
        row = _score_row(label, d, name)
        if row is not None and not any(r[name] == row[name] for r in rows):
            rows.append(row)
    nested = [(k, v) for src in (chosen, metrics) for k, v in src.items() if isinstance(v, dict)]
    sc = chosen.get("scores")
    if isinstance(sc, list):
        nested += [(str(v.get("split", i)), v) for i, v in enumerate(sc) if isinstance(v, dict)]
    elif isinstance(sc, dict):
        nested += [(k, v) for k, v in sc.items() if isinstance(v, dict)]
    for k, v in nested:
        row = _score_row(k, v, name)
        if row is not None:
            row["split"] = row["split"] or k
            rows.append(row)
    return pd.DataFrame(rows, columns=["score", "split", "n", name, "se"])
