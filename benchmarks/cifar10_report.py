"""The CIFAR-10 benchmark report: ``summary.md``, the plots and ``docs/benchmarks.md``,
made from ``results.csv`` and ``layers.jsonl`` alone."""
from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from lbyl.sweep import markdown_table, plot_accuracy

from . import cifar10_sections as sec
from .cifar10_plan import (
    CHECKPOINTS, CRITERIA_CHECKPOINT, DEFAULT_OUT, EXPECTED_UNPRUNED, EXTRA_CRITERIA, METHODS, PAPER_LAMBDAS, SEED,
    Run, corrected, fmt,
)  # fmt: skip
from .cifar10_store import latest_by_key, read_layers, read_rows

COMMAND = "python -m benchmarks.cifar10_resnets"
ANALYSIS_BEGIN = "<!-- analysis:begin (kept when the document is regenerated) -->"
ANALYSIS_END = "<!-- analysis:end -->"


def _sweep_rows(found, plan: Sequence[Run], defaults, label: str, criterion: str) -> list[dict]:
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


def _unpruned_section(plan, found, defaults, labels) -> str:
    body = []
    for label in labels:
        base = found.get(Run(label, "baseline", images=_plan_images(plan, label)).key(defaults))
        if base is None:
            continue
        expected = EXPECTED_UNPRUNED.get(label)
        body.append([
            f"`{label}`", CHECKPOINTS[label].note, f"{base['lossless']}/20", f"{base['accuracy']:.2f}",
            f"{expected:.2f}" if expected is not None and base["images"] == 10000 else "-",
            sec.count(base["params"]), sec.count(base["macs"]),
        ])  # fmt: skip
    if not body:
        return ""
    header = ["checkpoint", "weights", "lossless samples", "JPEG top-1 %", "recorded top-1 %", "params", "MACs"]
    return "## Unpruned checkpoints\n\n" + sec.table(header, body, "lllrrrr")


def _accuracy_sections(plan, found, defaults, labels, out: Path, img_prefix: str, pngs: list) -> list[str]:
    """The accuracy tables and plots per checkpoint (criterion L2) and per criterion."""
    sections = []
    parts = ["## Accuracy per method and ratio (criterion L2)"]
    for label in labels:
        table_rows = _sweep_rows(found, plan, defaults, label, "l2")
        if not any(r["method"] != "unpruned" for r in table_rows):
            continue
        title = f"{label}, CIFAR-10 JPEG test ({_plan_images(plan, label):,} images), criterion L2"
        png = plot_accuracy(table_rows, out / f"cifar10-{label}.png", title=title)
        pngs.append(png)
        parts.append(f"### `{label}` ({CHECKPOINTS[label].note})\n\n{markdown_table(table_rows)}\n\n"
                     f"![{label}]({img_prefix}{png.name})")  # fmt: skip
    if len(parts) > 1:
        sections.append("\n\n".join(parts))
    criteria = [c for c in EXTRA_CRITERIA if any(r.criterion == c and r.label == CRITERIA_CHECKPOINT for r in plan)]
    if criteria:
        parts = [f"## Criteria on `{CRITERIA_CHECKPOINT}`"]
        for criterion in ("l2", *criteria):
            table_rows = _sweep_rows(found, plan, defaults, CRITERIA_CHECKPOINT, criterion)
            if not any(r["method"] != "unpruned" for r in table_rows):
                continue
            if criterion == "l2":
                parts.append("### criterion `l2`\n\nSee the table above.")
                continue
            title = f"{CRITERIA_CHECKPOINT}, criterion {criterion}"
            png = plot_accuracy(table_rows, out / f"cifar10-{CRITERIA_CHECKPOINT}-{criterion}.png", title=title)
            pngs.append(png)
            parts.append(f"### criterion `{criterion}`\n\n{markdown_table(table_rows)}\n\n"
                         f"![{title}]({img_prefix}{png.name})")  # fmt: skip
        if len(parts) > 2:
            sections.append("\n\n".join(parts))
    return sections


def _timings_section(plan, found, defaults, labels) -> str:
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
    if not body:
        return ""
    return (
        "## Timings\n\nSeconds of wall time on the benchmark machine (see above) for the main runs; restore = "
        "`lbyl.restore` including tracing and counting, evaluation = the whole test set (pruned models are "
        "cheaper to evaluate). The cores were shared with other jobs whose load changed during the run, so "
        "means are pessimistic; the minima are the closest to an unloaded machine.\n\n"
        + sec.table(["checkpoint", "runs", "eval unpruned s", "eval mean s", "eval min s", "restore mean s",
                     "restore min s", "total min"], body)
    )


def report_sections(
    plan: Sequence[Run],
    rows: Sequence[dict],
    layers: dict[str, list[dict]],
    defaults: Mapping,
    out: Path,
    img_prefix: str = "",
) -> tuple[list[str], list[Path], dict]:
    """Markdown sections and PNGs from the results. Returns (sections, png paths, facts)."""
    found = latest_by_key(rows)
    planned = {r.key(defaults) for r in plan}
    missing = [r for r in plan if r.key(defaults) not in found]
    stale = [row for key, row in found.items() if key not in planned and row["kind"] != "oracle-best"]
    labels = list(dict.fromkeys(r.label for r in plan))
    pngs: list[Path] = []
    sections = [_unpruned_section(plan, found, defaults, labels)]
    sections += _accuracy_sections(plan, found, defaults, labels, out, img_prefix, pngs)
    sections += [
        sec.default_standing(plan, found, defaults),
        sec.variance_section(plan, found, defaults),
        sec.input_model_section(plan, found, defaults),
    ]
    wins = sec.win_counts(plan, found, defaults)
    if wins["rows"]:
        sections.append(
            "## Head to head\n\n"
            "Number of (checkpoint, criterion, ratio) points where the first method's accuracy is higher, "
            "equal or lower than the second's, and the mean difference in points.\n\n"
            + sec.table(["comparison", "points", "higher", "equal", "lower", "mean diff", "best", "worst"], wins["rows"])
        )
    sections += [sec.layer_errors(plan, found, layers, defaults, label) for label in ("resnet20-jpeg", "resnet56-jpeg")]
    sections += [
        _timings_section(plan, found, defaults, labels),
        sec.ablation_section(plan, found, defaults),
        sec.oracle_sections(plan, found, defaults),
    ]
    sections = [s for s in sections if s]
    status = []
    if missing:
        status.append(f"**Incomplete:** {len(missing)} of {len(plan)} planned runs have no result yet.")
    if stale:
        status.append(f"{len(stale)} older rows of the CSV (other settings or defaults) are not shown.")
    if status:
        sections.insert(0, " ".join(status))
    facts = dict(wins=wins, missing=len(missing), planned=len(plan), stale=len(stale))
    return sections, pngs, facts


def _kept_analysis(doc: Path) -> str:
    if doc.is_file():
        text = doc.read_text()
        if ANALYSIS_BEGIN in text and ANALYSIS_END in text:
            return text[text.index(ANALYSIS_BEGIN) + len(ANALYSIS_BEGIN) : text.index(ANALYSIS_END)].strip("\n")
    return "_No analysis written yet._"


def command(oracle: bool, limit: int | None, config: str) -> str:
    """The command that (re)runs this configuration."""
    parts = [COMMAND]
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
    defaults: Mapping,
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


def _protocol(plan, defaults: Mapping, oracle: bool, limit, config, rows) -> list[str]:
    n = max((r.images for r in plan if r.kind == "main"), default=10000)
    images = "all 10,000 images" if n == 10000 else f"{n:,} evenly spread images"
    latest = latest_by_key(rows)
    seconds = sum(r.get("restore_seconds", 0.0) + r.get("eval_seconds", 0.0) for r in latest.values())
    hours = f"The {len(latest)} runs in the CSV took {seconds / 3600:.1f} hours of restore and evaluation time."
    on = [m for m in METHODS if corrected(m, defaults)]
    corrections = f"on for {', '.join(f'`{m}`' for m in on)}, off for the others" if on else "off for every method"
    lbyl = defaults["lbyl"]
    lam = f"lambda1 = {fmt(lbyl.get('lambda1', 0.0))}, lambda2 = {fmt(lbyl.get('lambda2', 0.0))}"
    return [
        f"- **Command:** `{command(oracle, limit, config)}` (resumable: rerunning it skips the runs already "
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
        f"`{lbyl.get('input_model', 'white')}`: nothing is passed), `lbyl-paper` (released "
        f"LBYL) with the fixed rule lambda1 = {fmt(PAPER_LAMBDAS[0])}, lambda2 = {fmt(PAPER_LAMBDAS[1])} (a small "
        "ridge; chosen without data and without test labels). The mean-shift bias correction follows the "
        f"library default: {corrections}.",
        f"- **Evaluation:** top-1 on {images} of the CIFAR-10 JPEG test copy, inputs normalised as the "
        "checkpoints expect. The evaluated copy has BatchNorm folded into the convolutions (`torch.fx` "
        "conv-BN fusion, channels-last layout): the same network, about twice as fast on CPU, logits within "
        "about 1e-5 of the unfolded model.",
    ]


def _header(machine: dict, plan, defaults: Mapping, oracle: bool, limit, config, rows=()) -> str:
    lines = [
        "# CIFAR-10 ResNet benchmark",
        "",
        f"Generated from `{DEFAULT_OUT}/results.csv` (in the repository) by "
        f"`{COMMAND} --report-only{' --oracle' if oracle else ''} --doc docs/benchmarks.md`; "
        "do not edit the tables by hand (the Analysis section is kept on regeneration).",
        "",
        "## Protocol",
        "",
        *_protocol(plan, defaults, oracle, limit, config, rows),
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
