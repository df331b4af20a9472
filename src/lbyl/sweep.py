"""Accuracy sweeps: restore a model over a grid of ratios, methods and criteria.

:func:`run_sweep` returns one row (a dict with the keys of :data:`FIELDS`)
per grid point plus a first row for the unpruned model (method
``"unpruned"``); :func:`write_csv`, :func:`write_markdown`,
:func:`format_table` and :func:`plot_accuracy` turn rows into files.
"""
from __future__ import annotations

import copy
import csv
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from .api import restore
from .methods import as_method
from .data import evaluate

__all__ = [
    "FIELDS",
    "UNPRUNED",
    "run_sweep",
    "subset",
    "write_csv",
    "write_outputs",
    "read_csv",
    "write_markdown",
    "markdown_table",
    "format_table",
    "plot_accuracy",
]

FIELDS = (
    "model", "weights", "ratio", "method", "criterion", "lambda1", "lambda2",
    "accuracy", "params", "macs", "restore_seconds", "re", "be", "ae", "bias_correction", "input_model",
)  # fmt: skip
UNPRUNED = "unpruned"  # method name of the baseline row


def subset(images: torch.Tensor, labels: torch.Tensor, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``limit`` images spread evenly over the set (all of them if ``limit`` is None).

    Evenly spaced rather than the first ``limit``: some copies of a test set
    are sorted by class, and their first images would all share one label.
    """
    if limit is None or limit >= len(labels):
        return images, labels
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    index = torch.arange(limit) * len(labels) // limit
    return images[index], labels[index]


def _inputs(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def run_sweep(
    model: nn.Module,
    example_inputs,
    images: torch.Tensor,
    labels: torch.Tensor,
    ratios: Sequence[float],
    methods: Sequence = ("prune", "nm", "lbyl"),
    criteria: Sequence[str] = ("auto",),
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 500,
    seed: int = 0,
    order: str = "original",
    layers=None,
    model_name: str = "",
    weights_name: str = "",
    channels_last: bool = True,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Evaluate ``model`` unpruned, then restored at every (ratio, method, criterion).

    ``images`` are uint8 together with ``mean``/``std``, or model-ready floats.
    ``methods``: method objects or shortcut strings (:func:`lbyl.as_method`);
    ``seed``, ``order`` and ``layers`` go to :func:`lbyl.restore` unchanged.
    Each row holds the accuracy (top-1 %), parameter and MAC counts, the
    restoration time and the summed RE/BE/AE losses of all layers. ``on_row``
    is called with each row as soon as it is ready (e.g. to print it).
    ``channels_last`` evaluates convolutions in the channels-last memory
    layout, which is faster on CPUs; the maths is the same, but logits may
    differ in the last bits from an evaluation in the default layout.
    """
    inputs = _inputs(example_inputs)
    methods = [as_method(m) for m in methods]
    common = dict(model=model_name, weights=weights_name)

    def score(net: nn.Module) -> float:
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        return evaluate(net, images, labels, batch_size=batch_size, mean=mean, std=std)

    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, inputs)
    # the caller's model is scored on a copy: changing its memory layout would be a side effect
    baseline = dict(
        common, ratio=0.0, method=UNPRUNED, criterion="", accuracy=score(copy.deepcopy(model)),
        params=int(params), macs=int(macs), restore_seconds=0.0, re=0.0, be=0.0, ae=0.0, lambda1="", lambda2="",
        bias_correction="", input_model="",
    )  # fmt: skip
    rows = [baseline]
    if on_row is not None:
        on_row(baseline)

    grid = [(r, m, c) for r in ratios for c in criteria for m in methods]
    bar = None
    if progress and grid:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), desc="sweep", unit="model", leave=False)
    try:
        for ratio, method, criterion in grid:
            if bar is not None:
                bar.set_postfix_str(f"ratio {ratio:g} {method.name}/{criterion}")
            started = time.perf_counter()
            restored, report = restore(
                model, inputs, float(ratio), method, criterion=criterion, seed=seed, order=order, layers=layers
            )
            row = dict(common, **result_row(report, method, time.perf_counter() - started), accuracy=score(restored))
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def result_row(report, method, seconds: float) -> dict:
    """The columns of one restoration: ratio, method, criterion, sizes, time, summed losses, method options."""
    return dict(
        ratio=float(report.settings["ratio"]) if isinstance(report.settings["ratio"], float) else "",
        method=method.name,
        criterion=report.settings["criterion"],
        params=report.params_after,
        macs=report.macs_after,
        restore_seconds=seconds,
        re=sum(layer.re for layer in report.layers),
        be=sum(layer.be for layer in report.layers),
        ae=sum(layer.ae for layer in report.layers),
        **_method_columns(method),
    )


def _method_columns(method) -> dict:
    """The CSV columns that describe a method's options (empty where it has none)."""
    settings = method.settings()
    lambda2 = settings.get("lambda2", "")
    return dict(
        lambda1=float(settings["lambda1"]) if "lambda1" in settings else "",
        lambda2=lambda2 if lambda2 in ("", "auto") else float(lambda2),
        bias_correction=bool(settings["mean_correction"]),
        input_model=settings.get("input_model", ""),
    )


def write_outputs(rows: Sequence[dict], out: str | os.PathLike, title: str) -> tuple[list[Path], str]:
    """``results.csv``, ``results.md`` and, if matplotlib is installed, ``accuracy.png`` in ``out``.

    Returns the files written and a note ("" or why the plot is missing)."""
    out = Path(out)
    files = [write_csv(rows, out / "results.csv"), write_markdown(rows, out / "results.md", title=title)]
    try:
        files.append(plot_accuracy(rows, out / "accuracy.png", title=title))
    except ImportError as error:
        return files, f"no plot: {error}"
    return files, ""


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """Write rows as CSV with the columns of :data:`FIELDS`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in FIELDS})
    return path


def _csv_value(value):
    # repr keeps every float digit, so a CSV round trip is exact
    return repr(value) if isinstance(value, float) else value


def _lambda(text: str):
    return text if text == "auto" else float(text)


def _flag(text: str) -> bool:
    return text == "True"


_PARSERS = {"ratio": float, "lambda1": float, "lambda2": _lambda, "accuracy": float, "params": int, "macs": int,
            "restore_seconds": float, "re": float, "be": float, "ae": float, "bias_correction": _flag}  # fmt: skip


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Read a file written by :func:`write_csv` back into rows with typed values."""
    with open(path, newline="") as f:
        return [{k: _PARSERS[k](v) if k in _PARSERS and v != "" else v for k, v in row.items()} for row in csv.DictReader(f)]


def _series_label(row: dict, several_criteria: bool) -> str:
    return f"{row['method']}/{row['criterion']}" if several_criteria else row["method"]


def _split(rows: Sequence[dict]) -> tuple[dict | None, dict[str, dict[float, dict]]]:
    """(baseline row or None, {series label: {ratio: row}}) in first-seen order."""
    baseline = next((r for r in rows if r["method"] == UNPRUNED), None)
    pruned = [r for r in rows if r["method"] != UNPRUNED]
    several = len({r["criterion"] for r in pruned}) > 1
    series: dict[str, dict[float, dict]] = {}
    for row in pruned:
        series.setdefault(_series_label(row, several), {})[float(row["ratio"])] = row
    return baseline, series


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def markdown_table(rows: Sequence[dict]) -> str:
    """Markdown table: one line per ratio, one top-1 % column per method[/criterion]."""
    baseline, series = _split(rows)
    ratios = sorted({ratio for by_ratio in series.values() for ratio in by_ratio})
    labels = list(series)
    header = ["ratio", "params", "MACs", *(f"{label} top-1 %" for label in labels)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    if baseline is not None:
        cells = ["unpruned", _count(baseline["params"]), _count(baseline["macs"])]
        cells += [f"{baseline['accuracy']:.2f}"] * len(labels)
        lines.append("| " + " | ".join(cells) + " |")
    for ratio in ratios:
        first = next(by_ratio[ratio] for by_ratio in series.values() if ratio in by_ratio)
        cells = [f"{ratio:g}", _count(first["params"]), _count(first["macs"])]
        cells += [f"{series[label][ratio]['accuracy']:.2f}" if ratio in series[label] else "" for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Write :func:`markdown_table` (with an optional heading and a short legend) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}", ""] if title else []
    first = rows[0] if rows else {}
    if first.get("model"):
        parts.append(f"Model `{first['model']}`" + (f", weights `{first['weights']}`" if first.get("weights") else "") + ".")
    parts.append(
        "Top-1 accuracy after removing `ratio` of the output channels of every restorable layer; "
        "params and MACs are those of the pruned model."
    )
    parts += ["", markdown_table(rows), ""]
    path.write_text("\n".join(parts))
    return path


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table for the console: one line per row."""
    header = ("ratio", "method", "criterion", "top-1 %", "params", "MACs", "restore s")
    body = [
        (
            "-" if row["method"] == UNPRUNED else f"{row['ratio']:g}",
            row["method"],
            row["criterion"] or "-",
            f"{row['accuracy']:.2f}",
            f"{row['params']:,}",
            f"{row['macs']:,}",
            f"{row['restore_seconds']:.2f}",
        )
        for row in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    # text columns left-aligned, numbers right-aligned
    align = ["<", "<", "<", ">", ">", ">", ">"]
    fmt = lambda cells: "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def plot_accuracy(rows: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot top-1 accuracy against the pruning ratio, one line per method[/criterion].

    The unpruned accuracy is a dashed horizontal line. Drawn with the Agg
    canvas directly, so no display and no global matplotlib state are needed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plotting needs matplotlib, an optional dependency: pip install 'lbyl[plot]'") from None

    baseline, series = _split(rows)
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    markers = "osD^vP*X"
    for i, (label, by_ratio) in enumerate(series.items()):
        ratios = sorted(by_ratio)
        ax.plot(
            [100 * r for r in ratios],
            [by_ratio[r]["accuracy"] for r in ratios],
            marker=markers[i % len(markers)],
            label=label,
        )
    if baseline is not None:
        ax.axhline(baseline["accuracy"], color="black", linestyle="--", linewidth=1,
                   label=f"unpruned ({baseline['accuracy']:.2f}%)")  # fmt: skip
    ax.set_xlabel("channels removed per layer (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
