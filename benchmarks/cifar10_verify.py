"""``--verify``: recompute tracked rows of ``results.csv`` and compare them, without writing to it.

The selected rows are the main runs (criterion L2) of some checkpoints, ratios and methods
whose key is the key the run has under the current method defaults (older rows, made under
other settings, are not selected). Each is recomputed at its recorded image count; the
accuracy (to the 2 decimals reported), the parameter and MAC counts and the summed RE/BE/AE
are compared with the row. The table goes to stdout and to ``verify.md`` in the output folder.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .cifar10_plan import CHECKPOINTS, DEFAULT_OUT, METHODS, RATIOS, Run, fmt, method_defaults, paper_lambdas
from .cifar10_report import COMMAND
from .cifar10_sections import table
from .cifar10_store import latest_by_key, machine_info, read_rows

ERROR_RTOL = 1e-6  # relative tolerance of the summed RE/BE/AE
ERRORS = ("re", "be", "ae")
MATCH, ERRORS_DIFFER, MISMATCH, MISSING = "match", "errors differ", "MISMATCH", "MISSING"
FAILING = (MISMATCH, MISSING)  # statuses that make --verify exit non-zero


def select(
    rows: Iterable[dict],
    defaults: Mapping,
    labels: Sequence[str],
    ratios: Sequence[float],
    methods: Sequence[str],
) -> tuple[list[tuple[Run, dict]], list[Run]]:
    """The tracked rows to recompute: ``([(run, its CSV row)], [runs without a row])``, in plan order.

    A row is selected when its key is the key under ``defaults`` of the main run (criterion L2) of one
    of ``labels``, ``ratios`` and ``methods`` at the row's image count."""
    wanted = {fmt(r) for r in ratios}
    found: list[tuple[Run, dict]] = []
    for row in latest_by_key(rows).values():
        if row.get("criterion") != "l2":  # the kind is the key's: an input-model or variance run
            continue  # made when the defaults were other has a main run's key (see Run.key)
        if row.get("label") not in labels or row.get("method") not in methods or fmt(row["ratio"]) not in wanted:
            continue
        run = Run(row["label"], "main", row["ratio"], row["method"], "l2", *paper_lambdas(row["method"]),
                  images=int(row["images"]))  # fmt: skip
        if run.key(defaults) == row["key"]:
            found.append((run, row))
    order = lambda run: (list(labels).index(run.label), run.ratio, METHODS.index(run.method), run.images)  # noqa: E731
    found.sort(key=lambda pair: order(pair[0]))
    have = {(run.label, fmt(run.ratio), run.method) for run, _ in found}
    missing = [Run(label, "main", ratio, method, "l2", *paper_lambdas(method))
               for label in labels for ratio in ratios for method in methods
               if (label, fmt(ratio), method) not in have]  # fmt: skip
    return found, missing


def relative_difference(new: float, old: float) -> float:
    """``|new - old| / max(|new|, |old|)``; 0 when both are 0, inf when either is not a number."""
    if not (math.isfinite(new) and math.isfinite(old)):
        return 0.0 if new == old else math.inf
    scale = max(abs(new), abs(old))
    return abs(new - old) / scale if scale else 0.0


def compare(new: Mapping, old: Mapping, rtol: float = ERROR_RTOL) -> dict:
    """The comparison of a recomputed row with its CSV row: the values, the relative differences
    of RE/BE/AE and a status (``match``, ``errors differ`` when only RE/BE/AE are off, ``MISMATCH``
    when the accuracy to 2 decimals, the params or the MACs differ)."""
    result = dict(label=old["label"], ratio=old["ratio"], method=old["method"], images=old["images"])
    for name in ("accuracy", "params", "macs", *ERRORS):
        result[name] = (old[name], new[name])
    rel = {name: relative_difference(float(new[name]), float(old[name])) for name in ERRORS}
    result.update({f"{name}_rel": value for name, value in rel.items()})
    wrong = [name for name in ("params", "macs") if int(new[name]) != int(old[name])]
    if f"{float(new['accuracy']):.2f}" != f"{float(old['accuracy']):.2f}":
        wrong.insert(0, "accuracy")
    off = [name for name in ERRORS if rel[name] > rtol]
    result["differs"] = wrong + off
    result["status"] = MISMATCH if wrong else ERRORS_DIFFER if off else MATCH
    return result


def missing_result(run: Run) -> dict:
    return dict(label=run.label, ratio=run.ratio, method=run.method, images=run.images, differs=[], status=MISSING)


def _pair(values, spec: str) -> str:
    old, new = values
    return format(old, spec) if format(old, spec) == format(new, spec) else f"{old:{spec}} -> {new:{spec}}"


def results_table(results: Sequence[dict]) -> str:
    """The Markdown table of :func:`compare` results (a value that changed reads ``csv -> now``)."""
    body = []
    for r in results:
        if r["status"] == MISSING:
            body.append([f"`{r['label']}`", fmt(r["ratio"]), r["method"], "-", "-", "-", "-", "-", "-", "-", MISSING])
            continue
        body.append([
            f"`{r['label']}`", fmt(r["ratio"]), r["method"], f"{r['images']:,}", _pair(r["accuracy"], ".2f"),
            _pair(r["params"], ","), _pair(r["macs"], ","),
            *(f"{r[f'{name}_rel']:.1e}" for name in ERRORS),
            r["status"] + (f" ({', '.join(r['differs'])})" if r["differs"] else ""),
        ])  # fmt: skip
    header = ["checkpoint", "ratio", "method", "images", "top-1 %", "params", "MACs",
              "RE rel. diff", "BE rel. diff", "AE rel. diff", "status"]  # fmt: skip
    return table(header, body, "lrlrrrrrrrl")


def summary_line(results: Sequence[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in results) for s in (MATCH, ERRORS_DIFFER, MISMATCH, MISSING)}
    verdict = "FAILED" if any(counts[s] for s in FAILING) else "passed"
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"**Result: {verdict}.** {len(results)} rows: {parts}."


def command(labels, ratios, methods, out: str) -> str:
    """The command line that repeats this verification."""
    parts = [COMMAND, "--verify"]
    if list(labels) != list(CHECKPOINTS):
        parts.append(f"--checkpoints {','.join(labels)}")
    if list(ratios) != list(RATIOS):
        parts.append(f"--ratios {','.join(fmt(r) for r in ratios)}")
    if list(methods) != list(METHODS):
        parts.append(f"--methods {','.join(methods)}")
    if out != DEFAULT_OUT:
        parts.append(f"--out {out}")
    return " ".join(parts)


def _tolerance() -> str:
    return f"{ERROR_RTOL:.0e}".replace("e-0", "e-")  # 1e-6


def document(results: Sequence[dict], cmd: str, machine: Mapping, csv_commits: Sequence[str]) -> str:
    """``verify.md``: what was run, where, and the table."""
    return "\n".join([
        "# CIFAR-10 benchmark: tracked results recomputed",
        "",
        f"Generated by `{cmd}` on {machine.get('started')}. It recomputes the selected rows of "
        f"`{DEFAULT_OUT}/results.csv` (main runs, criterion L2, at their recorded image count; rows made under "
        "other settings or defaults are not selected) and compares them with the CSV, which it does not change.",
        "",
        f"**Machine:** {machine.get('nproc')} CPU cores ({machine.get('cpu')}), {machine.get('threads')} torch "
        f"threads, torch {machine.get('torch')}, torch-pruning {machine.get('torch_pruning')}, Python "
        f"{machine.get('python')}, {machine.get('platform')}; code {machine.get('commit') or 'unknown'} "
        f"(the CSV rows: {', '.join(csv_commits) or 'unknown'}).",
        "",
        "**Checks:** top-1 accuracy equal to the 2 decimals reported, parameter and MAC counts equal (a "
        f"difference is a MISMATCH and fails the command); the summed RE, BE and AE within {_tolerance()} "
        "relative (beyond it: `errors differ`, reported only). A changed value reads `csv -> now`.",
        "",
        summary_line(results),
        "",
        results_table(results),
    ]) + "\n"  # fmt: skip


def recompute(runs: Sequence[Run], assets_root: str | None, defaults, commit: str, options: Mapping):
    """The recomputed row of each run, in order (nothing is written)."""
    from lbyl.data import assets_root as find_assets

    from .cifar10_execute import check_assets, measured

    assets = find_assets(assets_root)
    check_assets(assets, runs)
    for _, row, _ in measured(runs, assets, defaults, commit, **options):
        yield row


def verify(args, labels: Sequence[str], log) -> int:
    """The ``--verify`` mode of the command line (``labels``: the checkpoints): 0 when every selected
    row reproduces, 1 otherwise."""
    out = Path(args.out)
    ratios, methods = args.ratios or list(RATIOS), args.methods or list(METHODS)
    rows = read_rows(out / "results.csv")
    if not rows:
        raise FileNotFoundError(f"no results in {out} (run the benchmark first)")
    defaults = method_defaults()
    pairs, missing = select(rows, defaults, labels, ratios, methods)
    if not pairs:
        raise ValueError(f"no row of {out / 'results.csv'} matches the selection")
    log(f"--verify: recomputing {len(pairs)} rows of {out / 'results.csv'} (it is not written)"
        + (f"; {len(missing)} selected runs have no row" if missing else ""))  # fmt: skip
    machine = machine_info(args.threads)
    options = dict(progress=not args.no_progress, batch_size=args.batch_size, log=log)
    started = time.perf_counter()
    new_rows = recompute([run for run, _ in pairs], args.assets_root, defaults, machine["commit"], options)
    results = [compare(new, old) for new, (_, old) in zip(new_rows, pairs, strict=True)]
    results += [missing_result(run) for run in missing]
    machine["seconds"] = time.perf_counter() - started
    commits = sorted({str(old.get("commit") or "") for _, old in pairs} - {""})
    text = document(results, command(labels, ratios, methods, args.out), machine, commits)
    (out / "verify.md").write_text(text)
    print(summary_line(results) + "\n\n" + results_table(results), flush=True)
    log(f"wrote {out / 'verify.md'} ({machine['seconds'] / 60:.1f} minutes)")
    return 1 if any(r["status"] in FAILING for r in results) else 0
