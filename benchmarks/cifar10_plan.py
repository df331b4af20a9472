"""The plan of the CIFAR-10 ResNet benchmark: which runs, with which settings, under which keys.

A run names its method by the shortcut string of :func:`lbyl.as_method` and
overrides some of that method object's settings (lambdas, corrections, input
model); everything it does not override is the method's default, read from
``lbyl.as_method(name).settings()``. The key of a run spells out the resolved
settings, so the rows of ``results.csv`` computed under other defaults stop
matching the plan and are recomputed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import lbyl


@dataclass(frozen=True)
class Checkpoint:
    label: str  # name in tables and file names
    arch: str  # registry name
    path: str  # relative to the shared assets root
    note: str = ""


CHECKPOINTS: dict[str, Checkpoint] = {
    c.label: c
    for c in (
        Checkpoint("resnet20-jpeg", "resnet20", "weights/resnet-cifar10-jpeg/resnet20-jpeg.pt", "adapted to the JPEG copy"),
        Checkpoint("resnet56-jpeg", "resnet56", "weights/resnet-cifar10-jpeg/resnet56-jpeg.pt", "adapted to the JPEG copy"),
        Checkpoint("resnet20", "resnet20", "weights/resnet-cifar10/resnet20-12fca82f.th", "original (lossless CIFAR-10)"),
        Checkpoint("resnet32", "resnet32", "weights/resnet-cifar10/resnet32-d509ac18.th", "original (lossless CIFAR-10)"),
        Checkpoint("resnet56", "resnet56", "weights/resnet-cifar10/resnet56-4bfd9763.th", "original (lossless CIFAR-10)"),
    )
}
# Published / recorded JPEG test accuracy of the unpruned checkpoints (assets README and SOURCE.md).
EXPECTED_UNPRUNED = {"resnet56-jpeg": 89.48, "resnet20-jpeg": 87.47, "resnet56": 83.20, "resnet20": 81.03}

METHODS = ("prune", "nm", "nm-paper", "lbyl", "lbyl-paper")  # shortcut strings of lbyl.as_method
LAMBDA_METHODS = ("lbyl", "lbyl-paper")
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
CRITERIA_CHECKPOINT = "resnet56-jpeg"  # the checkpoint that also runs every criterion
EXTRA_CRITERIA = ("l1", "l2gm", "random")
# lbyl-paper: a fixed, data-free rule. A small ridge on both terms only guards the
# solve against ill-conditioning; it is never chosen by looking at (test) labels.
PAPER_LAMBDAS = (1e-4, 1e-4)
SEED = 0

# --oracle: a lambda grid for lbyl and lbyl-paper; the best point is picked with TEST labels
ORACLE_CHECKPOINTS = ("resnet20-jpeg", "resnet56-jpeg", "resnet20", "resnet32", "resnet56")  # every checkpoint
ORACLE_RATIOS = (0.3, 0.5)
LAMBDA1_GRID = (0.0, 1e-4, 1e-2, 1.0)
LAMBDA2_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
ABLATION_METHODS = ("prune", "nm", "lbyl", "lbyl-paper")  # --oracle also flips their mean-shift correction
ORACLE_LIMIT = 2000  # images (evenly spread) that score the grid; the best point is re-scored on all

LAYER_RATIO = 0.3  # ratio of the per-layer RE/BE/AE tables
# The results are part of the repository, so the tables of docs/benchmarks.md can be
# remade (and the run resumed) from any clone.
DEFAULT_OUT = "benchmarks/cifar10"

SMOKE = dict(checkpoints=("resnet20-jpeg",), ratios=(0.0, 0.5), limit=500)

# The method options a run may override (``Run`` fields of the same names).
OPTIONS = ("lambda1", "lambda2", "mean_correction", "input_model", "variance_correction")


def method_defaults() -> dict[str, dict]:
    """``{method shortcut: its settings}``: what a run that overrides nothing gets
    (``lbyl.as_method(name).settings()``, e.g. ``lbyl.LBYL().settings()`` for ``"lbyl"``)."""
    return {name: dict(lbyl.as_method(name).settings()) for name in METHODS}


def corrected(method: str, defaults: Mapping[str, Mapping], option: str = "mean_correction") -> bool:
    """Whether a correction (``mean_correction`` or ``variance_correction``) is on by default for ``method``."""
    return bool(defaults.get(method, {}).get(option, False))


def fmt(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    return f"{float(value):g}"


@dataclass(frozen=True)
class Run:
    """One benchmark run. A setting left at None is not overridden: the method's default applies."""

    label: str
    kind: str  # "baseline", "main", "oracle" (grid point) or "oracle-best" (best grid point, all images)
    ratio: float = 0.0
    method: str = "unpruned"
    criterion: str = ""
    lambda1: float | None = None
    lambda2: float | str | None = None
    images: int = 10000
    seed: int = SEED
    mean_correction: bool | None = None  # the CSV column and key part "bc" (it was called bias_correction)
    input_model: str | None = None  # ``lbyl`` only
    variance_correction: bool | None = None

    def overrides(self) -> dict:
        """The method options this run sets (the others keep the method's defaults)."""
        return {name: getattr(self, name) for name in OPTIONS if getattr(self, name) is not None}

    def method_object(self) -> lbyl.Method:
        """The method object of this run: the shortcut's class with the overridden options."""
        base = lbyl.as_method(self.method)
        settings = {k: v for k, v in base.settings().items() if k != "method"}
        unknown = sorted(set(self.overrides()) - set(settings))
        if unknown:
            raise ValueError(f"method {self.method!r} has no option(s) {', '.join(unknown)}")
        return type(base)(**{**settings, **self.overrides()})

    def resolved(self, defaults: Mapping[str, Mapping]) -> dict:
        """The settings the run uses, defaults resolved ("-" where a setting does not apply),
        under the CSV's column names."""
        if self.kind == "baseline":
            return dict(lambda1="-", lambda2="-", bias_correction="-", input_model="-", variance_correction="-")
        own = defaults.get(self.method, {})

        def setting(name, fallback):
            value = getattr(self, name)
            return value if value is not None else own.get(name, fallback)

        uses_lambdas = self.method in LAMBDA_METHODS
        return dict(
            lambda1=fmt(setting("lambda1", 0.0)) if uses_lambdas else "-",
            lambda2=fmt(setting("lambda2", 0.0)) if uses_lambdas else "-",
            bias_correction=fmt(bool(setting("mean_correction", False))),
            input_model=setting("input_model", "white") if self.method == "lbyl" else "-",
            variance_correction=fmt(bool(setting("variance_correction", False))),
        )

    def key(self, defaults: Mapping[str, Mapping]) -> str:
        if self.kind == "baseline":
            return f"{self.label}|baseline|n={self.images}"
        s = self.resolved(defaults)
        # an input-model or variance run is a main run with one setting changed: it keeps that run's key,
        # so that switching the default swaps the two without recomputing either
        kind = "main" if self.kind in ("input-model", "variance") else self.kind
        # "propagated" restores these ResNets exactly as "white": none of their restorable producers is a
        # 1x1 convolution (tests/test_bench_cifar10.py::test_propagated_input_model_is_white_on_the_resnets)
        extra = f"|im={s['input_model']}" if s["input_model"] not in ("-", "white", "propagated") else ""
        extra += "|vc=true" if s["variance_correction"] == "true" else ""  # rows from before it existed: off
        threshold = defaults.get(self.method, {}).get("threshold") if self.method == "nm-paper" else None
        extra += f"|th={fmt(threshold)}" if threshold is not None else ""  # the runs so far merged every channel
        return (
            f"{self.label}|{kind}|r={fmt(self.ratio)}|{self.method}|{self.criterion}|"
            f"l1={s['lambda1']}|l2={s['lambda2']}|bc={s['bias_correction']}|n={self.images}|seed={self.seed}{extra}"
        )


def paper_lambdas(method: str) -> tuple:
    """(lambda1, lambda2) of a main run: the fixed rule for ``lbyl-paper``, the defaults otherwise."""
    return PAPER_LAMBDAS if method == "lbyl-paper" else (None, None)


def main_runs(label: str, ratios: Sequence[float], criteria: Sequence[str], images: int) -> list[Run]:
    runs = [Run(label, "baseline", images=images)]
    for criterion in criteria:
        for ratio in ratios:
            for method in METHODS:
                runs.append(Run(label, "main", ratio, method, criterion, *paper_lambdas(method), images=images))
    return runs


def grid_runs(label: str, images: int, lambda1_grid: Sequence[float], lambda2_grid: Sequence[float]) -> list[Run]:
    """The oracle's lambda grid of ``lbyl`` and ``lbyl-paper`` on one checkpoint (with its baseline)."""
    runs = [Run(label, "baseline", images=images)]
    for ratio in ORACLE_RATIOS:
        for method in LAMBDA_METHODS:
            for l1 in lambda1_grid:
                for l2 in lambda2_grid:
                    runs.append(Run(label, "oracle", ratio, method, "l2", float(l1), float(l2), images=images))
    return runs


def ablation_runs(label: str, images: int, defaults: Mapping[str, Mapping]) -> list[Run]:
    """The mean-shift correction flipped (on where the method leaves it off and vice versa)."""
    return [
        Run(label, "ablation", ratio, method, "l2", *paper_lambdas(method), images=images,
            mean_correction=not corrected(method, defaults))
        for ratio in RATIOS for method in ABLATION_METHODS
    ]  # fmt: skip


def build_plan(
    config: str = "full",
    limit: int | None = None,
    oracle: bool = False,
    oracle_limit: int = ORACLE_LIMIT,
    lambda1_grid: Sequence[float] = LAMBDA1_GRID,
    lambda2_grid: Sequence[float] = LAMBDA2_GRID,
    checkpoints: Sequence[str] | None = None,
) -> list[Run]:
    """Every run of a configuration, most important first.

    ``full``: criterion L2 on the JPEG-adapted checkpoints and the small
    originals, the ResNet-20 (JPEG) lambda grid and correction ablation
    (``oracle``), ResNet-56 (original), the same grid and ablation on
    ResNet-56 (JPEG), the grids of the original checkpoints, then the other
    criteria on ResNet-56 (JPEG). ``smoke``: one checkpoint, two ratios, 500 images. The oracle's
    best points (kind ``oracle-best``) depend on the grid's results and are
    added by :func:`oracle_best_runs`.
    """
    if config == "smoke":
        labels = checkpoints or SMOKE["checkpoints"]
        images = limit or SMOKE["limit"]
        return [r for label in labels for r in main_runs(label, SMOKE["ratios"], ("l2",), images)]
    if config != "full":
        raise ValueError(f"unknown config {config!r}; use 'full' or 'smoke'")
    images = limit or 10000
    labels = list(checkpoints or CHECKPOINTS)
    defaults = method_defaults()
    n = min(oracle_limit, images)

    def grid(label: str) -> list[Run]:
        return grid_runs(label, n, lambda1_grid, lambda2_grid) if oracle and label in ORACLE_CHECKPOINTS else []

    def ablation(label: str) -> list[Run]:
        return ablation_runs(label, images, defaults) if oracle and label in labels else []

    # cheap and important first: the JPEG-adapted checkpoints, the small originals, the ResNet-20 grid
    first = [label for label in ("resnet20-jpeg", "resnet56-jpeg", "resnet20", "resnet32") if label in labels]
    rest = [label for label in labels if label not in first]
    plan = [r for label in first for r in main_runs(label, RATIOS, ("l2",), images)]
    # lbyl with the input model that is not the default, every checkpoint (a main run's key: see Run.key)
    other = "white" if defaults["lbyl"].get("input_model", "white") == "bn" else "bn"
    plan += [Run(label, "input-model", ratio, "lbyl", "l2", images=images, input_model=other)
             for label in labels for ratio in RATIOS]  # fmt: skip
    # and with the variance correction flipped
    flipped = not corrected("lbyl", defaults, "variance_correction")
    plan += [Run(label, "variance", ratio, "lbyl", "l2", images=images, variance_correction=flipped)
             for label in labels for ratio in RATIOS]  # fmt: skip
    plan += grid("resnet20-jpeg") if "resnet20-jpeg" in labels else []
    plan += ablation("resnet20-jpeg")
    plan += [r for label in rest for r in main_runs(label, RATIOS, ("l2",), images)]
    plan += grid("resnet56-jpeg") if "resnet56-jpeg" in labels else []
    plan += ablation("resnet56-jpeg")
    plan += [r for label in ORACLE_CHECKPOINTS if label in labels and "jpeg" not in label for r in grid(label)]
    if CRITERIA_CHECKPOINT in labels:
        plan += [r for r in main_runs(CRITERIA_CHECKPOINT, RATIOS, EXTRA_CRITERIA, images) if r.kind != "baseline"]
    return plan


def oracle_best_runs(plan: Sequence[Run], rows: dict[str, dict], defaults: Mapping, images: int) -> list[Run]:
    """For each (checkpoint, method, ratio) of the grid: the best grid point by TEST accuracy,
    to be re-scored on ``images`` images. Only groups whose grid is complete."""
    groups: dict[tuple, list[Run]] = {}
    for r in plan:
        if r.kind == "oracle":
            groups.setdefault((r.label, r.method, r.ratio), []).append(r)
    best = []
    for (label, method, ratio), runs in groups.items():
        scored = [(rows[r.key(defaults)]["accuracy"], -i, r) for i, r in enumerate(runs) if r.key(defaults) in rows]
        if len(scored) < len(runs):
            continue
        top = max(scored, key=lambda t: (t[0], t[1]))[2]  # ties: the first grid point (smallest lambdas)
        if top.images != images:
            best.append(Run(label, "oracle-best", ratio, method, "l2", top.lambda1, top.lambda2, images=images))
    return best
