"""CIFAR-10 ResNet benchmark: every method, ratio and criterion on real checkpoints.

Run ``python -m lbyl.bench.cifar10 --help``. For every checkpoint the unpruned
model is verified first (the 20 lossless CIFAR-10 samples and the full JPEG
test set), then the inner convolution of every residual block (the default
layer policy of :func:`lbyl.restore`) is pruned at each ratio with each method
and evaluated. Results go to ``--out``:

- ``results.csv``: one row per run (appended as soon as the run ends; the
  benchmark is resumable: a run whose key is already in the CSV is skipped);
- ``layers.jsonl``: the per-layer RE/BE/AE of every run;
- ``summary.md`` and ``*.png``: tables and plots made from the CSV
  (``--report-only`` remakes them, and ``--doc`` writes ``docs/benchmarks.md``);
- ``machine.json``: the machine and library versions of the last run.

The key of a run holds every setting that changes its result, with the
library defaults resolved (``lbyl`` passes no lambdas and follows the defaults
of :func:`lbyl.restore`): when a default changes, the affected rows no longer
match the plan and are recomputed. ``--rerun METHODS`` drops the rows of some
methods once, for changes that the settings do not show.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHECKPOINTS",
    "METHODS",
    "RATIOS",
    "PAPER_LAMBDAS",
    "Checkpoint",
    "Run",
    "build_plan",
    "read_rows",
    "write_report",
    "add_arguments",
    "run",
    "main",
]


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

METHODS = ("prune", "nm", "nm-paper", "lbyl", "lbyl-paper")
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
ABLATION_METHODS = ("prune", "nm", "lbyl", "lbyl-paper")  # --oracle also flips their bias correction
ORACLE_LIMIT = 2000  # images (evenly spread) that score the grid; the best point is re-scored on all

LAYER_RATIO = 0.3  # ratio of the per-layer RE/BE/AE tables
# The results are part of the repository, so the tables of docs/benchmarks.md can be
# remade (and the run resumed) from any clone.
DEFAULT_OUT = "benchmarks/cifar10"

SMOKE = dict(checkpoints=("resnet20-jpeg",), ratios=(0.0, 0.5), limit=500)

COLUMNS = (
    "key", "label", "kind", "model", "weights", "ratio", "method", "criterion", "lambda1", "lambda2",
    "bias_correction", "accuracy", "params", "macs", "restore_seconds", "eval_seconds", "re", "be", "ae",
    "images", "seed", "lossless", "layer_lambda2_mean", "commit", "finished", "input_model", "variance_correction",
)  # fmt: skip
_FLOATS = ("ratio", "accuracy", "restore_seconds", "eval_seconds", "re", "be", "ae", "layer_lambda2_mean")
_INTS = ("params", "macs", "images", "seed")


# ---------------------------------------------------------------------------
# the plan: which runs, with which settings


def restore_defaults() -> dict:
    """The defaults of :func:`lbyl.restore` (what a run that passes nothing gets)."""
    from .. import api

    defaults = {
        name: p.default for name, p in inspect.signature(api.restore).parameters.items() if p.default is not p.empty
    }
    # bias_correction=None: on for the methods the library corrects by default
    defaults["corrected_by_default"] = tuple(getattr(api, "CORRECTED_BY_DEFAULT", ()))
    return defaults


def _corrected(method: str, defaults: dict, name: str) -> bool:
    """Whether a correction (``bias_correction`` or ``variance_correction``) is on for ``method``."""
    value = defaults.get(name, False)
    if value is None:
        return method in defaults.get("corrected_by_default", ())
    return bool(value)


def _bias_correction(method: str, defaults: dict) -> bool:
    return _corrected(method, defaults, "bias_correction")


def _fmt(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    return f"{float(value):g}"


@dataclass(frozen=True)
class Run:
    """One benchmark run. ``lambda1``/``lambda2`` None: not passed (library default)."""

    label: str
    kind: str  # "baseline", "main", "oracle" (grid point) or "oracle-best" (best grid point, all images)
    ratio: float = 0.0
    method: str = "unpruned"
    criterion: str = ""
    lambda1: float | None = None
    lambda2: float | str | None = None
    images: int = 10000
    seed: int = SEED
    bias_correction: bool | None = None  # None: the library default
    input_model: str | None = None  # None: the library default (``lbyl`` only)
    variance_correction: bool | None = None  # None: the library default

    def restore_kwargs(self) -> dict:
        kwargs = dict(method=self.method, criterion=self.criterion, seed=self.seed)
        if self.lambda1 is not None:
            kwargs["lambda1"] = self.lambda1
        if self.lambda2 is not None:
            kwargs["lambda2"] = self.lambda2
        if self.bias_correction is not None:
            kwargs["bias_correction"] = self.bias_correction
        if self.input_model is not None:
            kwargs["input_model"] = self.input_model
        if self.variance_correction is not None:
            kwargs["variance_correction"] = self.variance_correction
        return kwargs

    def resolved(self, defaults: dict) -> dict:
        """The settings the run uses, defaults resolved ("-" where a setting does not apply)."""
        if self.kind == "baseline":
            return dict(lambda1="-", lambda2="-", bias_correction="-", input_model="-", variance_correction="-")
        uses_lambdas = self.method in LAMBDA_METHODS
        lambda1 = self.lambda1 if self.lambda1 is not None else defaults.get("lambda1", 0.0)
        lambda2 = self.lambda2 if self.lambda2 is not None else defaults.get("lambda2", 0.0)
        return dict(
            lambda1=_fmt(lambda1) if uses_lambdas else "-",
            lambda2=_fmt(lambda2) if uses_lambdas else "-",
            bias_correction=_fmt(
                self.bias_correction if self.bias_correction is not None else _bias_correction(self.method, defaults)
            ),
            input_model=(self.input_model or defaults.get("input_model", "white")) if self.method == "lbyl" else "-",
            variance_correction=_fmt(
                self.variance_correction if self.variance_correction is not None
                else _corrected(self.method, defaults, "variance_correction")
            ),
        )

    def key(self, defaults: dict) -> str:
        if self.kind == "baseline":
            return f"{self.label}|baseline|n={self.images}"
        s = self.resolved(defaults)
        # an input-model run is a main run with one setting changed: it keeps that run's key, so that
        # switching the default swaps the two without recomputing either
        kind = "main" if self.kind in ("input-model", "variance") else self.kind
        model = f"|im={s['input_model']}" if s["input_model"] not in ("-", "white") else ""
        model += "|vc=true" if s["variance_correction"] == "true" else ""  # rows from before it existed: off
        return (
            f"{self.label}|{kind}|r={_fmt(self.ratio)}|{self.method}|{self.criterion}|"
            f"l1={s['lambda1']}|l2={s['lambda2']}|bc={s['bias_correction']}|n={self.images}|seed={self.seed}{model}"
        )


def _main_runs(label: str, ratios: Sequence[float], criteria: Sequence[str], images: int) -> list[Run]:
    runs = [Run(label, "baseline", images=images)]
    for criterion in criteria:
        for ratio in ratios:
            for method in METHODS:
                lambdas = PAPER_LAMBDAS if method == "lbyl-paper" else (None, None)
                runs.append(Run(label, "main", ratio, method, criterion, *lambdas, images=images))
    return runs


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
        return [r for label in labels for r in _main_runs(label, SMOKE["ratios"], ("l2",), images)]
    if config != "full":
        raise ValueError(f"unknown config {config!r}; use 'full' or 'smoke'")
    images = limit or 10000
    labels = list(checkpoints or CHECKPOINTS)
    n = min(oracle_limit, images)

    def grid(label: str) -> list[Run]:
        if not oracle or label not in ORACLE_CHECKPOINTS:
            return []
        runs = [Run(label, "baseline", images=n)]
        for ratio in ORACLE_RATIOS:
            for method in LAMBDA_METHODS:
                for l1 in lambda1_grid:
                    for l2 in lambda2_grid:
                        runs.append(Run(label, "oracle", ratio, method, "l2", float(l1), float(l2), images=n))
        return runs

    def ablation(label: str) -> list[Run]:
        """The mean-shift correction flipped (on where the library leaves it off and vice versa)."""
        if not oracle:
            return []
        defaults = restore_defaults()
        return [
            Run(label, "ablation", ratio, method, "l2", *(PAPER_LAMBDAS if method == "lbyl-paper" else (None, None)),
                images=images, bias_correction=not _bias_correction(method, defaults))
            for ratio in RATIOS for method in ABLATION_METHODS
        ]  # fmt: skip

    # cheap and important first: the JPEG-adapted checkpoints, the small originals, the ResNet-20 grid
    first = [label for label in ("resnet20-jpeg", "resnet56-jpeg", "resnet20", "resnet32") if label in labels]
    rest = [label for label in labels if label not in first]
    plan = [r for label in first for r in _main_runs(label, RATIOS, ("l2",), images)]
    # lbyl with the input model that is not the default, every checkpoint (a main run's key: see Run.key)
    other = next(m for m in ("white", "bn") if m != restore_defaults().get("input_model", "white"))
    plan += [Run(label, "input-model", ratio, "lbyl", "l2", images=images, input_model=other)
             for label in labels for ratio in RATIOS]  # fmt: skip
    # and with the variance correction flipped
    flipped = not _corrected("lbyl", restore_defaults(), "variance_correction")
    plan += [Run(label, "variance", ratio, "lbyl", "l2", images=images, variance_correction=flipped)
             for label in labels for ratio in RATIOS]  # fmt: skip
    plan += grid("resnet20-jpeg") if "resnet20-jpeg" in labels else []
    plan += ablation("resnet20-jpeg") if "resnet20-jpeg" in labels else []
    plan += [r for label in rest for r in _main_runs(label, RATIOS, ("l2",), images)]
    plan += grid("resnet56-jpeg") if "resnet56-jpeg" in labels else []
    plan += ablation("resnet56-jpeg") if "resnet56-jpeg" in labels else []
    plan += [r for label in ORACLE_CHECKPOINTS if label in labels and "jpeg" not in label for r in grid(label)]
    if CRITERIA_CHECKPOINT in labels:
        plan += [r for r in _main_runs(CRITERIA_CHECKPOINT, RATIOS, EXTRA_CRITERIA, images) if r.kind != "baseline"]
    return plan


def oracle_best_runs(plan: Sequence[Run], rows: dict[str, dict], defaults: dict, images: int) -> list[Run]:
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


# ---------------------------------------------------------------------------
# CSV / JSONL storage


def _convert(row: dict) -> dict:
    out = dict(row)
    for k in _FLOATS:
        if out.get(k) not in (None, ""):
            out[k] = float(out[k])
    for k in _INTS:
        if out.get(k) not in (None, ""):
            out[k] = int(out[k])
    return out


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All rows of ``results.csv`` in file order, numeric columns converted."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [_convert(row) for row in csv.DictReader(f)]


def latest_by_key(rows: Iterable[dict]) -> dict[str, dict]:
    """The last row of every key (a rerun supersedes an older row)."""
    return {row["key"]: row for row in rows}


def _csv_value(value):
    return repr(value) if isinstance(value, float) else value


def _append_row(path: Path, row: dict) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:  # written by another version: rewrite with the current columns
            rows = read_rows(path)
            _rewrite(path, rows)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: _csv_value(row.get(k, "")) for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in COLUMNS})
    os.replace(tmp, path)


def read_layers(path: str | os.PathLike) -> dict[str, list[dict]]:
    """``layers.jsonl``: {run key: per-layer records} (last line of a key wins)."""
    path = Path(path)
    out = {}
    if path.is_file():
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
                    out[record["key"]] = record["layers"]
    return out


def drop_methods(out: Path, methods: Sequence[str]) -> int:
    """Remove the main/oracle rows of ``methods`` (a backup of the CSV is kept); returns the count."""
    csv_path = out / "results.csv"
    rows = read_rows(csv_path)
    keep = [r for r in rows if r["kind"] == "baseline" or r["method"] not in methods]
    dropped = len(rows) - len(keep)
    if dropped:
        shutil.copyfile(csv_path, csv_path.with_suffix(".csv.bak"))
        _rewrite(csv_path, keep)
        kept_keys = {r["key"] for r in keep}
        layers_path = out / "layers.jsonl"
        if layers_path.is_file():
            lines = [ln for ln in layers_path.read_text().splitlines() if ln.strip()]
            lines = [ln for ln in lines if _line_key(ln) in kept_keys]
            layers_path.write_text("".join(ln + "\n" for ln in lines))
    return dropped


def _line_key(line: str) -> str | None:
    try:
        return json.loads(line)["key"]
    except (json.JSONDecodeError, KeyError):
        return None


@contextlib.contextmanager
def _lock(out: Path):
    """One writer per output folder (two would also fight for the same CPU cores)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"another benchmark is writing to {out}; wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------
# machine and code identity


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src/lbyl"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{commit}{'+dirty' if dirty else ''}" if commit else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import torch

    try:
        import torch_pruning

        tp_version = getattr(torch_pruning, "__version__", "")
    except ImportError:  # pragma: no cover
        tp_version = ""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = []
    return dict(
        nproc=cores,
        cpu=_cpu_model(),
        threads=threads,
        torch=torch.__version__,
        torch_pruning=tp_version,
        python=platform.python_version(),
        platform=platform.platform(),
        loadavg_at_start=load,
        commit=_git_commit(),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


# ---------------------------------------------------------------------------
# running


class _Data:
    """The CIFAR-10 JPEG test set, normalised once, and its evenly spread subsets."""

    def __init__(self, assets: Path):
        import torch

        from ..data import load_cifar10, load_lossless_samples, normalize
        from ..models.registry import model_info

        info = model_info("resnet20")
        self.mean, self.std = info.mean, info.std
        images, self.labels = load_cifar10("test", root=assets / "cifar10-jpeg", source="jpeg")
        self.images = normalize(images, self.mean, self.std).contiguous(memory_format=torch.channels_last)
        samples, self.sample_labels = load_lossless_samples("cifar10", root=assets / "cifar-lossless-samples")
        self.samples = normalize(samples, self.mean, self.std)
        self._subsets = {}

    def subset(self, n: int):
        from ..sweep import subset

        if n not in self._subsets:
            self._subsets[n] = subset(self.images, self.labels, n)
        return self._subsets[n]


def inference_copy(model):
    """A copy of ``model`` for evaluation only: BatchNorm folded into the convolutions
    (``torch.fx`` conv-BN fusion) in channels-last layout, about twice as fast on CPU.

    Mathematically the same network (logits differ by about 1e-5 in float32);
    the model itself is returned if it cannot be traced.
    """
    import torch
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model.eval())
    except Exception:  # not traceable by torch.fx: evaluate it as it is
        return model
    return fused.to(memory_format=torch.channels_last)


def _lossless_count(model, data: _Data) -> int:
    from ..data import evaluate

    accuracy = evaluate(model, data.samples, data.sample_labels, batch_size=len(data.sample_labels))
    return round(accuracy * len(data.sample_labels) / 100)


def _execute(
    runs: Sequence[Run],
    out: Path,
    assets: Path,
    defaults: dict,
    commit: str,
    progress: bool = True,
    batch_size: int = 1000,
    log=print,
) -> None:
    """Run ``runs`` (already filtered to the missing ones), one checkpoint at a time."""
    import torch

    from ..api import restore
    from ..data import evaluate
    from ..models.registry import build_model, example_input, load_weights

    if not runs:
        return
    data = _Data(assets)
    csv_path, layers_path = out / "results.csv", out / "layers.jsonl"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc="cifar10 bench", unit="run", dynamic_ncols=True)
    loaded = {}
    try:
        for r in runs:
            ckpt = CHECKPOINTS[r.label]
            if r.label not in loaded:
                loaded.clear()  # one model in memory at a time
                model = load_weights(build_model(ckpt.arch), assets / ckpt.path, spec=ckpt.arch).eval()
                loaded[r.label] = model
            model = loaded[r.label]
            images, labels = data.subset(r.images)
            if bar is not None:
                bar.set_postfix_str(f"{r.label} {r.kind} r={_fmt(r.ratio)} {r.method}/{r.criterion or '-'}")
            settings = r.resolved(defaults)
            row = dict(
                key=r.key(defaults), label=r.label, kind=r.kind, model=ckpt.arch, weights=Path(ckpt.path).name,
                ratio=float(r.ratio), method=r.method, criterion=r.criterion, images=len(labels), seed=r.seed,
                commit=commit, **settings,
            )  # fmt: skip
            layer_records = None
            if r.kind == "baseline":
                from ..counting import count_ops_and_params

                macs, params = count_ops_and_params(model, (example_input(ckpt.arch),))
                restored, restore_seconds = inference_copy(model), 0.0
                row.update(params=int(params), macs=int(macs), re=0.0, be=0.0, ae=0.0, lossless=_lossless_count(restored, data))
            else:
                started = time.perf_counter()
                restored, report = restore(model, example_input(ckpt.arch), float(r.ratio), **r.restore_kwargs())
                restore_seconds = time.perf_counter() - started
                restored = inference_copy(restored)
                effective = report.settings.get("bias_correction")
                if effective is not None and _fmt(bool(effective)) != row["bias_correction"]:
                    log(f"warning: {row['key']} ran with bias_correction={effective}")
                    row["bias_correction"] = _fmt(bool(effective))
                lam2 = [layer.lambda2 for layer in report.layers if hasattr(layer, "lambda2")]
                row.update(
                    params=report.params_after,
                    macs=report.macs_after,
                    re=sum(layer.re for layer in report.layers),
                    be=sum(layer.be for layer in report.layers),
                    ae=sum(layer.ae for layer in report.layers),
                    lossless=_lossless_count(restored, data),
                    layer_lambda2_mean=sum(lam2) / len(lam2) if lam2 else "",
                )
                layer_records = [
                    dict(name=x.name, before=x.channels_before, after=x.channels_after, re=x.re, be=x.be, ae=x.ae,
                         lambda2=getattr(x, "lambda2", None))
                    for x in report.layers
                ]  # fmt: skip
            started = time.perf_counter()
            with torch.inference_mode():
                accuracy = evaluate(restored, images, labels, batch_size=batch_size)
            row.update(
                accuracy=accuracy,
                restore_seconds=restore_seconds,
                eval_seconds=time.perf_counter() - started,
                finished=time.strftime("%Y-%m-%d %H:%M:%S"),
            )
            if layer_records is not None:
                with open(layers_path, "a") as f:
                    f.write(json.dumps(dict(key=row["key"], layers=layer_records)) + "\n")
            _append_row(csv_path, row)
            if r.kind == "baseline":
                log(
                    f"{r.label}: lossless samples {row['lossless']}/{len(data.sample_labels)}, "
                    f"JPEG test top-1 {accuracy:.2f}% on {len(labels):,} images"
                )
            if bar is not None:
                bar.update(1)
            del restored
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------
# report


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(map(str, b)) + " |" for b in body)])


def _sweep_rows(found: dict[str, dict], plan: Sequence[Run], defaults: dict, label: str, criterion: str) -> list[dict]:
    """Rows of one checkpoint and criterion in the shape :mod:`lbyl.sweep` tables and plots take."""
    rows = []
    for r in plan:
        if r.label != label or r.kind not in ("baseline", "main"):
            continue
        if r.kind == "main" and r.criterion != criterion:
            continue
        row = found.get(r.key(defaults))
        if row is not None:
            rows.append(row)
    return rows


def _plan_images(plan: Sequence[Run], label: str) -> int:
    return next((r.images for r in plan if r.label == label and r.kind == "main"), 0)


def _stage(name: str) -> str:
    return name.split(".")[0] if "." in name else name


def report_sections(
    plan: Sequence[Run],
    rows: Sequence[dict],
    layers: dict[str, list[dict]],
    defaults: dict,
    out: Path,
    img_prefix: str = "",
) -> tuple[list[str], list[Path], dict]:
    """Markdown sections and PNGs from the results. Returns (sections, png paths, facts)."""
    from ..sweep import markdown_table, plot_accuracy

    found = latest_by_key(rows)
    planned = {r.key(defaults) for r in plan}
    missing = [r for r in plan if r.key(defaults) not in found]
    stale = [row for key, row in found.items() if key not in planned and row["kind"] != "oracle-best"]
    labels = list(dict.fromkeys(r.label for r in plan))
    sections, pngs, facts = [], [], {}

    # unpruned checkpoints -----------------------------------------------------
    body = []
    for label in labels:
        base = found.get(Run(label, "baseline", images=_plan_images(plan, label)).key(defaults))
        if base is None:
            continue
        expected = EXPECTED_UNPRUNED.get(label)
        body.append([
            f"`{label}`", CHECKPOINTS[label].note, f"{base['lossless']}/20", f"{base['accuracy']:.2f}",
            f"{expected:.2f}" if expected is not None and base["images"] == 10000 else "-",
            _count(base["params"]), _count(base["macs"]),
        ])  # fmt: skip
    if body:
        header = ["checkpoint", "weights", "lossless samples", "JPEG top-1 %", "recorded top-1 %", "params", "MACs"]
        sections.append("## Unpruned checkpoints\n\n" + _table(header, body, "lllrrrr"))

    # accuracy per method and ratio, L2 --------------------------------------------
    parts = ["## Accuracy per method and ratio (criterion L2)"]
    for label in labels:
        table_rows = _sweep_rows(found, plan, defaults, label, "l2")
        if not any(r["method"] != "unpruned" for r in table_rows):
            continue
        n = _plan_images(plan, label)
        title = f"{label}, CIFAR-10 JPEG test ({n:,} images), criterion L2"
        png = plot_accuracy(table_rows, out / f"cifar10-{label}.png", title=title)
        pngs.append(png)
        parts.append(f"### `{label}` ({CHECKPOINTS[label].note})\n\n{markdown_table(table_rows)}\n\n"
                     f"![{label}]({img_prefix}{png.name})")  # fmt: skip
    if len(parts) > 1:
        sections.append("\n\n".join(parts))

    # criteria ---------------------------------------------------------------------
    criteria = [c for c in EXTRA_CRITERIA if any(r.criterion == c and r.label == CRITERIA_CHECKPOINT for r in plan)]
    if criteria:
        parts = [f"## Criteria on `{CRITERIA_CHECKPOINT}`"]
        for criterion in ("l2", *criteria):
            table_rows = _sweep_rows(found, plan, defaults, CRITERIA_CHECKPOINT, criterion)
            if not any(r["method"] != "unpruned" for r in table_rows):
                continue
            title = f"{CRITERIA_CHECKPOINT}, criterion {criterion}"
            if criterion == "l2":
                parts.append(f"### criterion `l2`\n\nSee the table above.")
                continue
            png = plot_accuracy(table_rows, out / f"cifar10-{CRITERIA_CHECKPOINT}-{criterion}.png", title=title)
            pngs.append(png)
            parts.append(f"### criterion `{criterion}`\n\n{markdown_table(table_rows)}\n\n"
                         f"![{title}]({img_prefix}{png.name})")  # fmt: skip
        if len(parts) > 2:
            sections.append("\n\n".join(parts))

    sections += [s for s in (_default_standing(plan, found, defaults), _variance_section(plan, found, defaults),
                             _input_model_section(plan, found, defaults)) if s]  # fmt: skip

    # win counts ---------------------------------------------------------------------
    wins = _win_counts(plan, found, defaults)
    facts["wins"] = wins
    if wins["rows"]:
        sections.append(
            "## Head to head\n\n"
            "Number of (checkpoint, criterion, ratio) points where the first method's accuracy is higher, "
            "equal or lower than the second's, and the mean difference in points.\n\n"
            + _table(["comparison", "points", "higher", "equal", "lower", "mean diff", "best", "worst"], wins["rows"])
        )

    # per-layer errors ---------------------------------------------------------------
    for label in ("resnet20-jpeg", "resnet56-jpeg"):
        layer_section = _layer_errors(plan, found, layers, defaults, label, LAYER_RATIO)
        if layer_section:
            sections.append(layer_section)

    # timings -----------------------------------------------------------------------------
    body = []
    for label in labels:
        runs = [found[r.key(defaults)] for r in plan if r.label == label and r.kind == "main" and r.key(defaults) in found]
        base = found.get(Run(label, "baseline", images=_plan_images(plan, label)).key(defaults))
        if not runs or base is None:
            continue
        restore_s = [x["restore_seconds"] for x in runs]
        eval_s = [x["eval_seconds"] for x in runs]
        body.append([
            f"`{label}`", len(runs), f"{base['eval_seconds']:.1f}", f"{sum(eval_s) / len(eval_s):.1f}",
            f"{min(eval_s):.1f}", f"{sum(restore_s) / len(restore_s):.2f}", f"{min(restore_s):.2f}",
            f"{(sum(eval_s) + sum(restore_s)) / 60:.1f}",
        ])  # fmt: skip
    if body:
        sections.append(
            "## Timings\n\nSeconds of wall time on the benchmark machine (see above) for the main runs; restore = "
            "`lbyl.restore` including tracing and counting, evaluation = the whole test set (pruned models are "
            "cheaper to evaluate). The cores were shared with other jobs whose load changed during the run, so "
            "means are pessimistic; the minima are the closest to an unloaded machine.\n\n"
            + _table(["checkpoint", "runs", "eval unpruned s", "eval mean s", "eval min s", "restore mean s",
                      "restore min s", "total min"], body)
        )

    ablation = _ablation_section(plan, found, defaults)
    if ablation:
        sections.append(ablation)

    # oracle -------------------------------------------------------------------------------------
    oracle = _oracle_sections(plan, found, defaults)
    if oracle:
        sections.append(oracle)

    status = []
    if missing:
        status.append(f"**Incomplete:** {len(missing)} of {len(plan)} planned runs have no result yet.")
    if stale:
        status.append(f"{len(stale)} older rows of the CSV (other settings or defaults) are not shown.")
    facts.update(missing=len(missing), planned=len(plan), stale=len(stale))
    if status:
        sections.insert(0, " ".join(status))
    return sections, pngs, facts


def _grid_pick(found, defaults, runs) -> tuple[dict, Run, dict | None] | None:
    """The grid point picked with test labels: (its row, its run, its row on all 10,000 images or None);
    None while the grid is not complete."""
    done = [(found[r.key(defaults)], r) for r in runs if r.key(defaults) in found]
    if not runs or len(done) < len(runs):
        return None
    top_row, top = max(done, key=lambda t: t[0]["accuracy"])
    if top.images == 10000:
        return top_row, top, top_row
    full = found.get(Run(top.label, "oracle-best", top.ratio, top.method, "l2", top.lambda1, top.lambda2).key(defaults))
    return top_row, top, full


def _oracle_best(plan, found, defaults, label, method, ratio) -> float | None:
    """Accuracy on all images of the grid point picked with test labels (None: not available)."""
    runs = [r for r in plan if r.kind == "oracle" and (r.label, r.method, r.ratio) == (label, method, ratio)]
    pick = _grid_pick(found, defaults, runs)
    return pick[2]["accuracy"] if pick and pick[2] else None


def _default_standing(plan, found, defaults) -> str:
    """Per (checkpoint, ratio), criterion L2: the default ``lbyl`` against the best baseline and the ceiling."""
    body = []
    for r in plan:
        if not (r.kind == "main" and r.method == "lbyl" and r.criterion == "l2") or r.key(defaults) not in found:
            continue
        acc = {}
        for m in ("prune", "nm", "lbyl-paper"):
            other = Run(r.label, "main", r.ratio, m, "l2", *(PAPER_LAMBDAS if m == "lbyl-paper" else (None, None)))
            row = found.get(other.key(defaults))
            if row is not None:
                acc[m] = row["accuracy"]
        if len(acc) < 3:
            continue
        paper_best = _oracle_best(plan, found, defaults, r.label, "lbyl-paper", r.ratio)
        if paper_best is not None:
            acc["lbyl-paper"] = max(acc["lbyl-paper"], paper_best)
        ours = found[r.key(defaults)]["accuracy"]
        rival = max(acc, key=acc.get)
        ceiling = _oracle_best(plan, found, defaults, r.label, "lbyl", r.ratio)
        body.append([
            f"`{r.label}`", f"{r.ratio:g}", f"{ours:.2f}", f"`{rival}` {acc[rival]:.2f}", f"{ours - acc[rival]:+.2f}",
            f"{ceiling:.2f}" if ceiling is not None else "-", f"{ours - ceiling:+.2f}" if ceiling is not None else "-",
        ])  # fmt: skip
    if not body:
        return ""
    return (
        "## Where the data-free default stands (criterion L2)\n\n"
        "`lbyl` with its defaults against the best of `prune`, `nm` and `lbyl-paper` at the same point "
        "(`lbyl-paper` at its fixed rule or, where the lambda grid ran, at its best grid point picked with test "
        "labels, whichever is higher), and against the oracle ceiling of `lbyl` (best grid point picked with "
        "test labels; `-` where the grid did not run). Top-1 % on all 10,000 images.\n\n"
        + _table(["checkpoint", "ratio", "`lbyl` default", "best baseline", "margin", "oracle `lbyl`",
                  "gap to oracle"], body, "lrrlrrr")
    )


def _flip_rows(plan, found, defaults, kind: str, default_is_second: bool) -> list[list[str]]:
    """Per checkpoint: ``lbyl`` main run against the ``kind`` run (one setting flipped), as
    "first -> second" cells per ratio and the mean change; ``default_is_second``: the main
    run (the library default) is the second of the pair."""
    flipped = {(r.label, r.ratio): found.get(r.key(defaults)) for r in plan if r.kind == kind}
    body = []
    for label in dict.fromkeys(label for label, _ in flipped):
        cells, diffs = [f"`{label}`"], []
        for ratio in RATIOS:
            other = flipped.get((label, ratio))
            main = found.get(Run(label, "main", ratio, "lbyl", "l2").key(defaults))
            first, second = (other, main) if default_is_second else (main, other)
            cells.append(f"{first['accuracy']:.2f} -> {second['accuracy']:.2f}" if first and second else "")
            if first and second:
                diffs.append(second["accuracy"] - first["accuracy"])
        cells.append(f"{sum(diffs) / len(diffs):+.2f}" if diffs else "")
        body.append(cells)
    return body if any(c for row in body for c in row[1:]) else []


def _input_model_section(plan, found, defaults) -> str:
    """``lbyl`` with the paper's white-input loss against the BN input model (criterion L2)."""
    default = defaults.get("input_model", "white")
    return _flip_section(
        "Input model of `lbyl`: white inputs -> BN covariance",
        "Top-1 % of `lbyl` with `input_model=\"white\"` (the paper's loss: plain distance between filters) "
        "and with `input_model=\"bn\"` (the residual measured in the metric of the input covariance estimated "
        f"from the BatchNorm variances, docs/method.md section 5b); the library default is `\"{default}\"`",
        _flip_rows(plan, found, defaults, "input-model", default_is_second=default == "bn"),
    )


def _variance_section(plan, found, defaults) -> str:
    """``lbyl`` with and without the variance correction (criterion L2)."""
    on_by_default = _corrected("lbyl", defaults, "variance_correction")
    return _flip_section(
        "Variance correction of `lbyl`: off -> on",
        "Top-1 % of `lbyl` without and with `variance_correction` (the running variance of the BatchNorm after "
        "each consumer rescaled by the predicted change of the consumer's output variance, docs/method.md "
        f"section 5d); the library default is {'on' if on_by_default else 'off'}",
        _flip_rows(plan, found, defaults, "variance", default_is_second=on_by_default),
    )


def _flip_section(heading: str, caption: str, body: list[list[str]]) -> str:
    """A section of :func:`_flip_rows` (empty without rows)."""
    if not body:
        return ""
    return (
        f"## {heading} (criterion L2)\n\n{caption}, everything else at the defaults, all 10,000 images.\n\n"
        + _table(["checkpoint", *(f"{r:g}" for r in RATIOS), "mean change"], body)
    )


def _win_counts(plan, found, defaults) -> dict:
    pairs = [("lbyl", "nm"), ("lbyl", "prune"), ("nm", "prune"), ("lbyl", "lbyl-paper"), ("nm", "nm-paper"),
             ("lbyl-paper", "nm")]  # fmt: skip
    by_point = {}
    for r in plan:
        if r.kind == "main" and r.key(defaults) in found:
            by_point.setdefault((r.label, r.criterion, r.ratio), {})[r.method] = found[r.key(defaults)]["accuracy"]
    rows = []
    for a, b in pairs:
        diffs = [(acc[a] - acc[b], point) for point, acc in by_point.items() if a in acc and b in acc]
        if not diffs:
            continue
        values = [d for d, _ in diffs]
        hi = max(diffs, key=lambda t: t[0])
        lo = min(diffs, key=lambda t: t[0])
        where = lambda t: f"{t[0]:+.2f} ({t[1][0]}, {t[1][1]}, {_fmt(t[1][2])})"  # noqa: E731
        rows.append([
            f"`{a}` vs `{b}`", len(values), sum(v > 0 for v in values), sum(v == 0 for v in values),
            sum(v < 0 for v in values), f"{sum(values) / len(values):+.2f}", where(hi), where(lo),
        ])  # fmt: skip
    return {"rows": rows}


def _layer_errors(plan, found, layers, defaults, label=CRITERIA_CHECKPOINT, ratio=LAYER_RATIO) -> str:
    runs = {r.method: r for r in plan if r.kind == "main" and r.label == label and r.criterion == "l2" and r.ratio == ratio}
    records = {m: layers.get(r.key(defaults)) for m, r in runs.items()}
    records = {m: v for m, v in records.items() if v}
    if len(records) < 2:
        return ""
    methods = [m for m in METHODS if m in records]
    # per stage sums
    stages = list(dict.fromkeys(_stage(x["name"]) for x in records[methods[0]]))
    body = []
    for stage in stages:
        cells = [f"`{stage}`"]
        for m in methods:
            sel = [x for x in records[m] if _stage(x["name"]) == stage]
            cells.append(" / ".join(f"{sum(x[k] for x in sel):.3g}" for k in ("re", "be", "ae")))
        body.append(cells)
    cells = ["**total**"]
    for m in methods:
        cells.append(" / ".join(f"{sum(x[k] for x in records[m]):.3g}" for k in ("re", "be", "ae")))
    body.append(cells)
    acc = [f"{found[runs[m].key(defaults)]['accuracy']:.2f}" for m in methods]
    body.append(["mean-shift correction", *(found[runs[m].key(defaults)]["bias_correction"] for m in methods)])
    body.append(["top-1 %", *acc])
    text = (
        f"## Per-layer restoration errors (`{label}`, ratio {ratio:g}, L2)\n\n"
        "RE / BE / AE summed over the layers of each stage, as the report of `lbyl.restore` gives them: "
        "RE = residual of the pruned BN-scaled filters after delivery, BE = BN-bias error, "
        "AE = activation-error proxy |s|^2 (the squared delivery coefficients). The totals do not include the "
        "mean-shift correction, which acts after the delivery.\n\n"
        + _table(["stage", *(f"`{m}` RE / BE / AE" for m in methods)], body)
    )
    per_layer = []
    for i, x in enumerate(records[methods[0]]):
        cells = [f"`{x['name']}`", f"{x['before']}->{x['after']}"]
        for m in methods:
            y = records[m][i]
            cells.append(" / ".join(f"{y[k]:.3g}" for k in ("re", "be", "ae")))
        per_layer.append(cells)
    text += (
        "\n\n<details><summary>every layer</summary>\n\n"
        + _table(["layer", "channels", *(f"`{m}` RE / BE / AE" for m in methods)], per_layer)
        + "\n\n</details>"
    )
    return text


def _ablation_section(plan, found, defaults) -> str:
    flipped = [r for r in plan if r.kind == "ablation"]
    parts = []
    for label in dict.fromkeys(r.label for r in flipped):
        main = {(r.ratio, r.method): r for r in plan if r.kind == "main" and r.label == label and r.criterion == "l2"}
        runs = [r for r in flipped if r.label == label]
        methods = list(dict.fromkeys(r.method for r in runs))
        body = []
        for ratio in sorted({r.ratio for r in runs}):
            cells = [f"{ratio:g}"]
            for m in methods:
                a = found.get(main[(ratio, m)].key(defaults)) if (ratio, m) in main else None
                b = next((found.get(r.key(defaults)) for r in runs if r.ratio == ratio and r.method == m), None)
                cells.append(f"{a['accuracy']:.2f}" if a else "")
                cells.append(f"{b['accuracy']:.2f}" if b else "")
            body.append(cells)
        if not any(c for row in body for c in row[1:]):
            continue
        header = ["ratio"]
        for m in methods:
            on = _bias_correction(m, defaults)
            header += [f"`{m}` {'with' if on else 'without'} (default)", f"`{m}` {'without' if on else 'with'}"]
        parts.append(f"### `{label}`\n\n" + _table(header, body))
    if not parts:
        return ""
    return (
        "## Mean-shift correction on and off (criterion L2)\n\n"
        "Each method with the library's default for `bias_correction` and with it flipped; top-1 %.\n\n"
        + "\n\n".join(parts)
    )


def _oracle_sections(plan, found, defaults) -> str:
    grid = [r for r in plan if r.kind == "oracle"]
    if not grid:
        return ""
    parts = [
        "## Oracle (NOT a result): lambdas picked with test labels",
        "The lambdas below are chosen by looking at test accuracy, which a data-free method cannot do. "
        "They show how much a perfect choice of (lambda1, lambda2) could add: a ceiling, never a result. "
        "The grid is scored on an evenly spread subset of the test set; the best point is then re-scored "
        "on all 10,000 images (`oracle-best` rows).",
    ]
    best_rows = []
    groups = {}
    for r in grid:
        groups.setdefault((r.label, r.method, r.ratio), []).append(r)
    for (label, method, ratio), runs in groups.items():
        done = [(found[r.key(defaults)], r) for r in runs if r.key(defaults) in found]
        if not done:
            continue
        l1s = list(dict.fromkeys(r.lambda1 for r in runs))
        l2s = list(dict.fromkeys(r.lambda2 for r in runs))
        acc = {(r.lambda1, r.lambda2): row["accuracy"] for row, r in done}
        base = found.get(Run(label, "baseline", images=runs[0].images).key(defaults))
        body = [[f"{_fmt(l1)}", *(f"{acc[(l1, l2)]:.2f}" if (l1, l2) in acc else "" for l2 in l2s)] for l1 in l1s]
        n = runs[0].images
        parts.append(
            f"### Sensitivity: `{label}`, `{method}`, ratio {ratio:g} ({n:,} images"
            + (f"; unpruned {base['accuracy']:.2f}" if base else "")
            + ")\n\nRows lambda1, columns lambda2.\n\n"
            + _table(["lambda1 \\ lambda2", *(_fmt(l2) for l2 in l2s)], body)
        )
        pick = _grid_pick(found, defaults, runs)
        if pick:
            top_row, top, full = pick
            main = [
                r for r in plan
                if r.kind == "main" and r.label == label and r.method == method and r.ratio == ratio and r.criterion == "l2"
            ]  # fmt: skip
            bench = found.get(main[0].key(defaults)) if main else None
            best_rows.append([
                f"`{label}`", f"`{method}`", f"{ratio:g}", f"{_fmt(top.lambda1)}, {_fmt(top.lambda2)}",
                f"{top_row['accuracy']:.2f}", f"{full['accuracy']:.2f}" if full else "",
                f"{bench['accuracy']:.2f}" if bench else "",
                f"{bench['lambda1']}, {bench['lambda2']}" if bench else "",
            ])  # fmt: skip
    if best_rows:
        parts.insert(2, "### Ceiling\n\n" + _table(
            ["checkpoint", "method", "ratio", "oracle lambda1, lambda2", "grid subset top-1 %",
             "oracle top-1 % (10,000)", "benchmark top-1 % (data-free setting)", "benchmark lambda1, lambda2"],
            best_rows, "lllrrrrr",
        ))  # fmt: skip
    return "\n\n".join(parts)


ANALYSIS_BEGIN = "<!-- analysis:begin (kept when the document is regenerated) -->"
ANALYSIS_END = "<!-- analysis:end -->"


def _kept_analysis(doc: Path) -> str:
    if doc.is_file():
        text = doc.read_text()
        if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
            return text[text.index(ANALYSIS_BEGIN) + len(ANALYSIS_BEGIN) : text.index(ANALYSIS_END)].strip("\n")
    return "_No analysis written yet._"


def _command(plan: Sequence[Run], oracle: bool, limit: int | None, config: str) -> str:
    parts = ["python -m lbyl.bench.cifar10"]
    if config != "full":
        parts.append(f"--config {config}")
    if limit:
        parts.append(f"--limit {limit}")
    if oracle:
        parts.append("--oracle")
    return " ".join(parts)


def write_report(
    out: Path,
    plan: Sequence[Run],
    defaults: dict,
    doc: Path | None = None,
    oracle: bool = False,
    limit: int | None = None,
    config: str = "full",
) -> Path:
    """Write ``summary.md`` and the PNGs to ``out`` (and ``doc`` with its images under ``docs/img``)."""
    rows = read_rows(out / "results.csv")
    layers = read_layers(out / "layers.jsonl")
    machine = {}
    if (out / "machine.json").is_file():
        machine = json.loads((out / "machine.json").read_text())
    sections, pngs, _ = report_sections(plan, rows, layers, defaults, out)
    header = _header(machine, plan, defaults, oracle, limit, config, rows)
    summary = out / "summary.md"
    summary.write_text("\n\n".join([header, *sections]) + "\n")
    if doc is not None:
        doc = Path(doc)
        img_dir = doc.parent / "img"
        img_dir.mkdir(parents=True, exist_ok=True)
        for png in pngs:
            shutil.copyfile(png, img_dir / png.name)
        doc_sections, _, _ = report_sections(plan, rows, layers, defaults, out, img_prefix="img/")
        analysis = _kept_analysis(doc)
        text = "\n\n".join([
            header,
            "## Analysis\n\n" + ANALYSIS_BEGIN + "\n" + analysis + "\n" + ANALYSIS_END,
            *doc_sections,
        ])  # fmt: skip
        doc.write_text(text + "\n")
    return summary


def _header(machine: dict, plan, defaults: dict, oracle: bool, limit, config, rows=()) -> str:
    n = max((r.images for r in plan if r.kind == "main"), default=10000)
    images = "all 10,000 images" if n == 10000 else f"{n:,} evenly spread images"
    seconds = sum(r.get("restore_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in latest_by_key(rows).values())
    hours = f"The {len(latest_by_key(rows))} runs in the CSV took {seconds / 3600:.1f} hours of restore and evaluation time."
    on = [m for m in METHODS if _bias_correction(m, defaults)]
    corrected = f"on for {', '.join(f'`{m}`' for m in on)}, off for the others" if on else "off for every method"
    lam = f"lambda1 = {_fmt(defaults.get('lambda1', 0.0))}, lambda2 = {_fmt(defaults.get('lambda2', 0.0))}"
    lines = [
        "# CIFAR-10 ResNet benchmark",
        "",
        f"Generated from `{DEFAULT_OUT}/results.csv` (in the repository) by "
        f"`python -m lbyl.bench.cifar10 --report-only{' --oracle' if oracle else ''} --doc docs/benchmarks.md`; "
        "do not edit the tables by hand (the Analysis section is kept on regeneration).",
        "",
        "## Protocol",
        "",
        f"- **Command:** `{_command(plan, oracle, limit, config)}` (resumable: rerunning it skips the runs already "
        f"in the CSV). {hours}",
        "- **Checkpoints:** ResNet-20/32/56 of akamaster/pytorch_resnet_cifar10 (original, trained on lossless "
        "CIFAR-10) and ResNet-20/56 adapted to the JPEG copy (`weights/resnet-cifar10-jpeg`, BN statistics "
        "re-estimated and 3-4 epochs of fine-tuning on the JPEG train set).",
        "- **Verification:** each checkpoint classifies the 20 lossless CIFAR-10 samples (count reported) and is "
        "evaluated on the whole JPEG test set before pruning.",
        "- **Pruning:** `lbyl.restore` with its default layer policy: the first convolution of every residual "
        "block loses `ratio` of its output channels (the block's second convolution loses the same input "
        "channels; the residual channels stay whole). Ratios 0.1 to 0.7, criterion L2 for every checkpoint; "
        f"L1, L2-GM and random (seed {SEED}) on `{CRITERIA_CHECKPOINT}`. No fine-tuning, no data.",
        "- **Methods:** `prune` (no compensation), `nm` (Neuron Merging, exact BN factor), `nm-paper` (released "
        f"Neuron Merging), `lbyl` with the library defaults ({lam}, input model "
        f"`{defaults.get('input_model', 'white')}`: nothing is passed), `lbyl-paper` (released "
        f"LBYL) with the fixed rule lambda1 = {_fmt(PAPER_LAMBDAS[0])}, lambda2 = {_fmt(PAPER_LAMBDAS[1])} (a small "
        "ridge; chosen without data and without test labels). The mean-shift bias correction follows the "
        f"library default: {corrected}.",
        f"- **Evaluation:** top-1 on {images} of the CIFAR-10 JPEG test copy, inputs normalised as the "
        "checkpoints expect. The evaluated copy has BatchNorm folded into the convolutions (`torch.fx` "
        "conv-BN fusion, channels-last layout): the same network, about twice as fast on CPU, logits within "
        "about 1e-5 of the unfolded model.",
        "",
        "**Data caveat.** The test images are a JPEG copy of CIFAR-10 (quality about 75, 4:2:0 chroma), not the "
        "lossless originals. Absolute accuracies are therefore not the published ones: the original checkpoints "
        "lose about 10 points on this copy (ResNet-56: 93.6 published, 83.2 here). Comparisons between methods on "
        "the same checkpoint and images remain meaningful; the JPEG-adapted checkpoints are the closest to the "
        "published setting.",
    ]
    if machine:
        lines += [
            "",
            f"**Machine:** {machine.get('nproc')} CPU cores ({machine.get('cpu')}), {machine.get('threads')} torch "
            f"threads, torch {machine.get('torch')}, torch-pruning {machine.get('torch_pruning')}, Python "
            f"{machine.get('python')}, {machine.get('platform')}; code {machine.get('commit') or 'unknown'}; "
            f"load average at start {machine.get('loadavg_at_start')} (the cores were shared, so timings are "
            "upper bounds).",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# command line


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers >= 0, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _methods(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in METHODS]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; choose from {', '.join(METHODS)}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (for ``python -m lbyl.bench.cifar10`` and a ``lbyl bench cifar10`` command)."""
    parser.add_argument("--config", choices=("full", "smoke"), default="full",
                        help="full: 5 checkpoints x 7 ratios x 5 methods (+ 3 criteria on resnet56-jpeg); "
                        "smoke: resnet20-jpeg, ratios 0 and 0.5, 500 images (default full)")  # fmt: skip
    parser.add_argument("--assets-root", metavar="PATH", help="shared assets folder (default $LBYL_ASSETS or ../shared/assets)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help=f"output folder (default {DEFAULT_OUT}, tracked in git)")
    parser.add_argument("--limit", type=_positive, metavar="N", help="evaluate on N test images spread evenly over the set")
    parser.add_argument("--checkpoints", metavar="A,B", help=f"only these checkpoints ({', '.join(CHECKPOINTS)})")
    parser.add_argument("--oracle", action="store_true",
                        help="also run the lambda grid for lbyl and lbyl-paper on every checkpoint at "
                        "ratios 0.3 and 0.5, and report the best point picked WITH TEST LABELS as a ceiling; "
                        "and run prune, nm, lbyl, lbyl-paper with the mean-shift correction flipped on resnet20-jpeg and resnet56-jpeg")  # fmt: skip
    parser.add_argument("--oracle-limit", type=_positive, default=ORACLE_LIMIT, metavar="N",
                        help=f"images (evenly spread) that score the lambda grid (default {ORACLE_LIMIT}); "
                        "the best point is re-scored on all images")  # fmt: skip
    parser.add_argument("--lambda1-grid", type=_float_list, default=list(LAMBDA1_GRID), metavar="X,Y")
    parser.add_argument("--lambda2-grid", type=_float_list, default=list(LAMBDA2_GRID), metavar="X,Y")
    parser.add_argument("--rerun", type=_methods, metavar="M,M",
                        help="drop the existing rows of these methods once and recompute them (when the library "
                        "changed in a way the settings do not show); omit it when resuming")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="only remake the tables, plots (and --doc) from the CSV")
    parser.add_argument("--doc", metavar="PATH", help="also write this Markdown document (e.g. docs/benchmarks.md), images in its img/")
    parser.add_argument("--threads", type=_positive, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=_positive, default=1000, help="evaluation batch size (default 1000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import assets_root

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    defaults = restore_defaults()
    checkpoints = None
    if args.checkpoints:
        checkpoints = [c.strip() for c in args.checkpoints.split(",") if c.strip()]
        unknown = [c for c in checkpoints if c not in CHECKPOINTS]
        if unknown:
            raise ValueError(f"unknown checkpoint(s) {unknown}; choose from {', '.join(CHECKPOINTS)}")
    plan = build_plan(
        args.config, args.limit, args.oracle, args.oracle_limit, args.lambda1_grid, args.lambda2_grid, checkpoints
    )
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if not args.report_only:
        assets = assets_root(args.assets_root)
        needed = [assets / "cifar10-jpeg" / "test_jpg.tar.gz", assets / "cifar-lossless-samples"]
        needed += [assets / CHECKPOINTS[label].path for label in dict.fromkeys(r.label for r in plan)]
        absent = [str(p) for p in needed if not p.exists()]
        if absent:
            raise FileNotFoundError(f"shared assets missing: {', '.join(absent)} (set --assets-root or LBYL_ASSETS)")
        with _lock(out):
            if args.rerun:
                log(f"--rerun: dropped {drop_methods(out, args.rerun)} rows of {', '.join(args.rerun)}")
            commit = _git_commit()
            info = machine_info(args.threads)
            (out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
            done = set(latest_by_key(read_rows(out / "results.csv")))
            pending = [r for r in plan if r.key(defaults) not in done]
            log(f"{len(plan)} planned runs, {len(plan) - len(pending)} already in {out / 'results.csv'}, "
                f"{len(pending)} to do")  # fmt: skip
            # segments end after each lambda grid: its best point is re-scored at once
            ends = [i + 1 for i, r in enumerate(pending) if r.kind == "oracle"
                    and (i + 1 == len(pending) or pending[i + 1].kind != "oracle")]  # fmt: skip
            start = 0
            for end in [*ends, len(pending)]:
                _execute(pending[start:end], out, assets, defaults, commit, not args.no_progress, args.batch_size, log)
                start = end
                if args.oracle:
                    rows = latest_by_key(read_rows(out / "results.csv"))
                    best = oracle_best_runs(plan, rows, defaults, args.limit or 10000)
                    best = [r for r in best if r.key(defaults) not in rows]
                    _execute(best, out, assets, defaults, commit, not args.no_progress, args.batch_size, log)
    if not (out / "results.csv").is_file():
        raise FileNotFoundError(f"no results in {out} (run the benchmark first)")
    summary = write_report(out, plan, defaults, Path(args.doc) if args.doc else None, args.oracle, args.limit, args.config)
    log(f"wrote {summary}" + (f" and {args.doc}" if args.doc else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lbyl.bench.cifar10",
        description="CIFAR-10 ResNet benchmark: every method, ratio and criterion on the shared checkpoints.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"cifar10 bench: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
