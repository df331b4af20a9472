"""Architecture coverage: every torchvision classification model through ``lbyl.restore``.

For each architecture of ``torchvision.models.list_models(module=torchvision.models)``
(random weights, BatchNorm statistics made plausible, one 224x224 image, 299x299 for
Inception v3), restore at ratio 0.3 with the default method and record what happened:
how many Conv/Linear layers were restored and skipped (and why), the fraction of
parameters and MACs removed, the time, whether the outputs are finite, whether ratio 0
leaves the outputs identical, or the error if ``restore`` raised. Results go to
``benchmarks/coverage/results.csv`` (resumable: models already there are not run again
unless ``--rerun``); ``--doc`` writes the Markdown page from the CSV. Public API only.

Run from the repository root, in an environment with torchvision:

    PYTHONPATH=src .venv-torch2.14/bin/python -m benchmarks.coverage --doc docs/architectures.md
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import os
import platform
import re
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

import lbyl

REPO_ROOT = Path(__file__).resolve().parents[1]
CSV_PATH = REPO_ROOT / "benchmarks" / "coverage" / "results.csv"
DOC_PATH = REPO_ROOT / "docs" / "architectures.md"
COMMAND = "PYTHONPATH=src .venv-torch2.14/bin/python -m benchmarks.coverage --doc docs/architectures.md"
RATIO = 0.3
SEED = 0

#: input sizes other than 224 (Inception v3 is built for 299x299 images)
INPUT_SIZE = {"inception_v3": 299}

COLUMNS = (
    "model", "input", "ratio", "status", "layers", "restorable", "restored", "skipped", "params_removed",
    "macs_removed", "restore_seconds", "finite", "ratio0_identical", "skip_reasons", "error", "torch",
    "torchvision", "lbyl", "machine",
)  # fmt: skip
#: status values; only the first two are the outcome of a model lbyl handled
RESTORED, NOTHING = "restored", "nothing restorable"
REFUSED, CRASHED = "refused", "crashed"

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --- one model ---------------------------------------------------------------------------------


def plausible_batchnorm(model: nn.Module, size: int, seed: int = SEED) -> nn.Module:
    """Give every BatchNorm statistics a trained network could have.

    Random affine parameters (gamma in [0.75, 1.25], beta ~ N(0, 0.1^2)); running mean
    and variance measured on two random images in training mode (so activations stay
    of order one through any depth), then jittered (mean shifted by 0.1 standard
    deviation, variance scaled by a log-normal factor of spread 0.2) so that they are
    not the statistics of the example input itself. Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = []
    for m in norms:
        if m.affine:
            with torch.no_grad():
                m.weight.copy_(0.75 + 0.5 * torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=gen))
        if m.track_running_stats:
            momenta.append((m, m.momentum))
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch gives its statistics exactly
    if momenta:
        model.train()
        with torch.no_grad():
            model(torch.randn(2, 3, size, size, generator=gen))
        for m, momentum in momenta:
            m.momentum = momentum
            with torch.no_grad():
                std = m.running_var.clamp_min(0).sqrt()
                m.running_mean.add_(0.1 * std * torch.randn(m.num_features, generator=gen))
                m.running_var.mul_(torch.exp(0.2 * torch.randn(m.num_features, generator=gen)))
            m.num_batches_tracked.zero_()
    return model.eval()


def build(name: str, size: int, seed: int = SEED) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    return plausible_batchnorm(model, size, seed)


def tensors(output) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, a tuple / named tuple, a list or a dict)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    return []


def normalised_reason(reason: str, names: set[str]) -> str:
    """A skip reason with its layer names replaced by ``<layer>``, so that reasons group."""
    text = re.sub(r"[\w.-]+", lambda m: "<layer>" if m.group(0) in names else m.group(0), reason)
    return re.sub(r"<layer>(?:, <layer>)+", "<layer>", text)


def reasons_of(skipped, model: nn.Module) -> dict[str, int]:
    names = {n for n, m in model.named_modules() if n}
    counts = Counter(normalised_reason(s.reason, names) for s in skipped)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def describe(error: BaseException) -> str:
    """``Type: message (file:line in function)`` of the innermost frame, one line."""
    frames = traceback.extract_tb(error.__traceback__)
    where = ""
    if frames:
        f = frames[-1]
        path = Path(f.filename)
        for marker in ("site-packages", "src"):
            if marker in path.parts:
                path = Path(*path.parts[path.parts.index(marker) + 1 :])
                break
        where = f" ({path.as_posix()}:{f.lineno} in {f.name})"
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message[:400]}{where}"


def environment() -> dict[str, str]:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "lbyl": lbyl.__version__,
            "machine": machine()}  # fmt: skip


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return f"{cpu}, {cores} cores, {torch.get_num_threads()} torch threads"


def measure(name: str, size: int | None = None, ratio: float = RATIO, seed: int = SEED, ratio0: bool = True) -> dict:
    """Restore one torchvision architecture; the CSV row (values as strings).

    ``ratio0=False`` skips the second restoration at ratio 0 (``ratio0_identical`` stays empty).
    """
    size = size or INPUT_SIZE.get(name, 224)
    model = build(name, size, seed)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    layers = sum(isinstance(m, WEIGHTED) for m in model.modules())
    row = dict.fromkeys(COLUMNS, "")
    row.update(model=name, input=str(size), ratio=f"{ratio:g}", layers=str(layers), **environment())
    with torch.no_grad():
        reference = tensors(model(x))
    try:
        restored, report = lbyl.restore(model, x, ratio)
    except ValueError as error:
        if not str(error).startswith("no restorable layer found"):
            return dict(row, status=REFUSED, error=describe(error))
        groups, skipped = lbyl.find_groups(model, x)
        return dict(row, status=NOTHING, restorable=str(len(groups)), restored="0", skipped=str(len(skipped)),
                    skip_reasons=json.dumps(reasons_of(skipped, model)))  # fmt: skip
    except Exception as error:  # the point of this benchmark: record it, go on with the next model
        return dict(row, status=CRASHED, error=describe(error))
    with torch.no_grad():
        finite = all(torch.isfinite(t).all() for t in tensors(restored(x)))
    del restored
    identical = None
    if ratio0:
        try:
            untouched, _ = lbyl.restore(model, x, 0.0)
            with torch.no_grad():
                after = tensors(untouched(x))
            identical = len(after) == len(reference) and all(torch.equal(a, b) for a, b in zip(after, reference))
        except Exception as error:
            return dict(row, status=CRASHED, error="ratio 0: " + describe(error))
    return dict(
        row, status=RESTORED, restorable=str(layers - len(report.skipped)), restored=str(len(report.layers)),
        skipped=str(len(report.skipped)), params_removed=f"{1 - report.params_after / report.params_before:.4f}",
        macs_removed=f"{1 - report.macs_after / report.macs_before:.4f}", restore_seconds=f"{report.seconds:.1f}",
        finite="yes" if finite else "no", ratio0_identical={None: "", True: "yes", False: "no"}[identical],
        skip_reasons=json.dumps(reasons_of(report.skipped, model)),
    )  # fmt: skip


# --- the CSV -----------------------------------------------------------------------------------


def read_rows(path: str | os.PathLike = CSV_PATH) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(rows: Sequence[dict], path: str | os.PathLike = CSV_PATH) -> None:
    """All rows, sorted by model, written to a temporary file first (an interrupted run keeps the old file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in sorted(rows, key=lambda r: r["model"]):
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    tmp.replace(path)


# --- the document ------------------------------------------------------------------------------


def _percent(value: str) -> str:
    return f"{100 * float(value):.1f} %" if value else "-"


def _top(reasons: dict[str, int], n: int) -> str:
    items = list(reasons.items())[:n]
    return "; ".join(f"{reason} ({count})" for reason, count in items) or "-"


def _md(text: str) -> str:
    """Text for a table cell: pipes escaped, ``<layer>`` and the like shown as code."""
    return re.sub(r"<[^<>|`]*>", lambda m: f"`{m.group(0)}`", text.replace("|", "\\|"))


def render(rows: Sequence[dict]) -> str:
    """The Markdown page, a function of the CSV rows alone."""
    run = sorted(rows, key=lambda r: r["model"])
    by_status = Counter(r["status"] for r in run)
    envs = sorted({(r["torch"], r["torchvision"], r["lbyl"], r["machine"]) for r in run})
    ratios = sorted({r["ratio"] for r in run})
    lines = [
        "# Architecture coverage: torchvision classification models",
        "",
        "<!-- generated from benchmarks/coverage/results.csv by benchmarks/coverage.py; "
        "tests/test_coverage.py checks that they agree -->",
        "",
        "What `lbyl.restore` does with every classification architecture of torchvision",
        f"(`torchvision.models.list_models(module=torchvision.models)`): random weights (seed {SEED}),",
        "BatchNorm affine parameters randomised and running statistics measured on two random",
        "images then jittered (so that restoration has real corrections to make), one random",
        "1x3x224x224 input (299x299 for Inception v3), ratio " + ", ".join(ratios) + " with the default",
        "method and layer choice (`lbyl.restore(model, x, 0.3)`). Regenerate with",
        "",
        "```",
        COMMAND,
        "```",
        "",
        "(resumable: models already in the CSV are skipped unless `--rerun`; `--models` picks some).",
        "",
    ]
    for torch_v, tv_v, lbyl_v, where in envs:
        lines.append(f"- torch {torch_v}, torchvision {tv_v}, lbyl {lbyl_v}; {where}")
    versions = sorted({r["lbyl"] for r in run})
    mixed = len(versions) > 1
    if mixed:  # a row measured with an older lbyl says so in its own column
        newest = max(versions, key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))
        older = sum(r["lbyl"] != newest for r in run)
        lines += ["", f"{older} rows were measured with an older lbyl than {newest} (column *lbyl*); "
                  f"`--rerun --models ...` remeasures them."]  # fmt: skip
    lines += [
        "",
        f"{len(run)} architectures run: " + ", ".join(f"{by_status[s]} {s}" for s in (RESTORED, NOTHING, REFUSED, CRASHED)) + ".",
        "*restored*: at least one layer was pruned and restored; *nothing restorable*: `restore` refuses the",
        "model with its documented `no restorable layer found` error (the skip reasons below say why);",
        "*refused*: another `ValueError`; *crashed*: any other exception.",
        "",
    ]
    lines += [
        "Columns: Conv/Linear layers of the model; restored / restorable of those (restorable layers that the",
        "default choice leaves whole are the classifier's hidden Linear layers of a CNN); parameters and MACs",
        "removed; restore time; outputs finite; ratio 0 leaves the outputs bit-identical; the most frequent",
        "skip reasons (layer names replaced by `<layer>`; count of layers).",
        "",
        "| model | input | status | Conv/Linear | restored / restorable | params removed | MACs removed "
        "| restore s | finite | ratio 0 identical | top skip reasons |" + (" lbyl |" if mixed else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if mixed else ""),
    ]
    for r in run:
        reasons = json.loads(r["skip_reasons"]) if r["skip_reasons"] else {}
        restored = f"{r['restored']} / {r['restorable']}" if r["restorable"] else "-"
        last = _md(_top(reasons, 2)) if r["status"] in (RESTORED, NOTHING) else f"error: {_md(r['error'])}"
        lines.append(
            f"| `{r['model']}` | {r['input']} | {r['status']} | {r['layers']} | {restored} | {_percent(r['params_removed'])} "
            f"| {_percent(r['macs_removed'])} | {r['restore_seconds'] or '-'} | {r['finite'] or '-'} "
            f"| {r['ratio0_identical'] or '-'} | {last} |" + (f" {r['lbyl']} |" if mixed else "")
        )
    totals, models = Counter(), Counter()
    for r in run:
        for reason, count in (json.loads(r["skip_reasons"]) if r["skip_reasons"] else {}).items():
            totals[reason] += count
            models[reason] += 1
    lines += [
        "",
        "## Why layers are skipped",
        "",
        "Every skip reason over all architectures, grouped (layer names replaced by `<layer>`).",
        "",
        "| reason | layers | architectures |",
        "|---|---|---|",
    ]
    for reason, count in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"| {_md(reason)} | {count} | {models[reason]} |")
    errors = [r for r in run if r["status"] in (REFUSED, CRASHED)]
    lines += ["", "## Errors", ""]
    if errors:
        lines += [f"- `{r['model']}` ({r['status']}): {_md(r['error'])}" for r in errors]
    else:
        lines.append("None: `restore` raised no exception other than the documented `no restorable layer found`.")
    return "\n".join(lines) + "\n"


def write_doc(doc: str | os.PathLike, rows: Sequence[dict]) -> None:
    Path(doc).write_text(render(rows))


# --- the command -------------------------------------------------------------------------------


def selected(names: Sequence[str], patterns: str | None) -> list[str]:
    if not patterns:
        return list(names)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    unknown = [p for p in wanted if not fnmatch.filter(names, p)]
    if unknown:
        raise SystemExit(f"unknown torchvision models: {', '.join(unknown)}")
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in wanted)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=str(CSV_PATH), help="results file (default: %(default)s)")
    parser.add_argument("--doc", help="write the Markdown page here from the CSV (docs/architectures.md)")
    parser.add_argument("--models", help="comma-separated names or globs (default: all)")
    parser.add_argument("--rerun", action="store_true", help="run models already in the CSV again")
    parser.add_argument("--doc-only", action="store_true", help="only regenerate the page from the CSV")
    args = parser.parse_args(argv)

    rows = {r["model"]: r for r in read_rows(args.csv)}
    if not args.doc_only:
        import torchvision

        names = selected(torchvision.models.list_models(module=torchvision.models), args.models)
        for name in names:
            if name in rows and not args.rerun:
                continue
            t0 = time.perf_counter()
            rows[name] = measure(name)
            write_rows(list(rows.values()), args.csv)  # after every model: an interrupted run resumes here
            r = rows[name]
            print(f"{name:24s} {r['status']:18s} restored {r['restored'] or '-':>3s} skipped {r['skipped'] or '-':>3s} "
                  f"MACs -{_percent(r['macs_removed'])} {time.perf_counter() - t0:6.1f} s {r['error']}", flush=True)  # fmt: skip
        write_rows(list(rows.values()), args.csv)
    if args.doc:
        write_doc(args.doc, list(rows.values()))
        print(f"wrote {args.doc} from {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
