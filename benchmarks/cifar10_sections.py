"""The analysis sections of the CIFAR-10 benchmark report (Markdown), each made from the
plan and the rows found in ``results.csv``. Every function returns "" when it has nothing to show."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from .cifar10_plan import CRITERIA_CHECKPOINT, LAYER_RATIO, METHODS, RATIOS, Run, corrected, fmt, paper_lambdas

Found = Mapping[str, dict]  # run key -> latest CSV row


def count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def table(header: Sequence[str], body: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(map(str, b)) + " |" for b in body)])


def grid_pick(found: Found, defaults, runs) -> tuple[dict, Run, dict | None] | None:
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


def oracle_best(plan, found: Found, defaults, label, method, ratio) -> float | None:
    """Accuracy on all images of the grid point picked with test labels (None: not available)."""
    runs = [r for r in plan if r.kind == "oracle" and (r.label, r.method, r.ratio) == (label, method, ratio)]
    pick = grid_pick(found, defaults, runs)
    return pick[2]["accuracy"] if pick and pick[2] else None


def default_standing(plan, found: Found, defaults) -> str:
    """Per (checkpoint, ratio), criterion L2: the default ``lbyl`` against the best baseline and the ceiling."""
    body = []
    for r in plan:
        if not (r.kind == "main" and r.method == "lbyl" and r.criterion == "l2") or r.key(defaults) not in found:
            continue
        acc = {}
        for m in ("prune", "nm", "lbyl-paper"):
            row = found.get(Run(r.label, "main", r.ratio, m, "l2", *paper_lambdas(m)).key(defaults))
            if row is not None:
                acc[m] = row["accuracy"]
        if len(acc) < 3:
            continue
        paper_best = oracle_best(plan, found, defaults, r.label, "lbyl-paper", r.ratio)
        if paper_best is not None:
            acc["lbyl-paper"] = max(acc["lbyl-paper"], paper_best)
        ours = found[r.key(defaults)]["accuracy"]
        rival = max(acc, key=acc.get)
        ceiling = oracle_best(plan, found, defaults, r.label, "lbyl", r.ratio)
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
        + table(["checkpoint", "ratio", "`lbyl` default", "best baseline", "margin", "oracle `lbyl`",
                 "gap to oracle"], body, "lrrlrrr")
    )


def _flip_rows(plan, found: Found, defaults, kind: str, default_is_second: bool) -> list[list[str]]:
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


def _flip_section(heading: str, caption: str, body: list[list[str]]) -> str:
    """A section of :func:`_flip_rows` (empty without rows)."""
    if not body:
        return ""
    return (
        f"## {heading} (criterion L2)\n\n{caption}, everything else at the defaults, all 10,000 images.\n\n"
        + table(["checkpoint", *(f"{r:g}" for r in RATIOS), "mean change"], body)
    )


def input_model_section(plan, found: Found, defaults) -> str:
    """``lbyl`` with the paper's white-input loss against the BN input model (criterion L2)."""
    default = defaults["lbyl"].get("input_model", "white")
    return _flip_section(
        "Input model of `lbyl`: white inputs -> BN covariance",
        "Top-1 % of `lbyl` with `input_model=\"white\"` (the paper's loss: plain distance between filters) "
        "and with `input_model=\"bn\"` (the residual measured in the metric of the input covariance estimated "
        f"from the BatchNorm variances, docs/method.md section 5b); the library default is `\"{default}\"`"
        + (", which restores these ResNets exactly as `\"white\"` (none of their restorable producers is a 1x1 "
           "convolution, section 5k)" if default == "propagated" else ""),
        _flip_rows(plan, found, defaults, "input-model", default_is_second=default == "bn"),
    )


def variance_section(plan, found: Found, defaults) -> str:
    """``lbyl`` with and without the variance correction (criterion L2)."""
    on_by_default = corrected("lbyl", defaults, "variance_correction")
    return _flip_section(
        "Variance correction of `lbyl`: off -> on",
        "Top-1 % of `lbyl` without and with `variance_correction` (the running variance of the BatchNorm after "
        "each consumer rescaled by the predicted change of the consumer's output variance, docs/method.md "
        f"section 5d); the library default is {'on' if on_by_default else 'off'}",
        _flip_rows(plan, found, defaults, "variance", default_is_second=on_by_default),
    )


def win_counts(plan, found: Found, defaults) -> dict:
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
        where = lambda t: f"{t[0]:+.2f} ({t[1][0]}, {t[1][1]}, {fmt(t[1][2])})"  # noqa: E731
        rows.append([
            f"`{a}` vs `{b}`", len(values), sum(v > 0 for v in values), sum(v == 0 for v in values),
            sum(v < 0 for v in values), f"{sum(values) / len(values):+.2f}", where(hi), where(lo),
        ])  # fmt: skip
    return {"rows": rows}


def _stage(name: str) -> str:
    return name.split(".")[0] if "." in name else name


def _errors(records: Sequence[dict]) -> str:
    return " / ".join(f"{sum(x[k] for x in records):.3g}" for k in ("re", "be", "ae"))


def layer_errors(plan, found: Found, layers, defaults, label=CRITERIA_CHECKPOINT, ratio=LAYER_RATIO) -> str:
    runs = {r.method: r for r in plan if r.kind == "main" and r.label == label and r.criterion == "l2" and r.ratio == ratio}
    records = {m: layers.get(r.key(defaults)) for m, r in runs.items()}
    records = {m: v for m, v in records.items() if v}
    if len(records) < 2:
        return ""
    methods = [m for m in METHODS if m in records]
    stages = list(dict.fromkeys(_stage(x["name"]) for x in records[methods[0]]))
    body = [
        [f"`{stage}`", *(_errors([x for x in records[m] if _stage(x["name"]) == stage]) for m in methods)]
        for stage in stages
    ]
    body.append(["**total**", *(_errors(records[m]) for m in methods)])
    body.append(["mean-shift correction", *(found[runs[m].key(defaults)]["bias_correction"] for m in methods)])
    body.append(["top-1 %", *(f"{found[runs[m].key(defaults)]['accuracy']:.2f}" for m in methods)])
    text = (
        f"## Per-layer restoration errors (`{label}`, ratio {ratio:g}, L2)\n\n"
        "RE / BE / AE summed over the layers of each stage, as the report of `lbyl.restore` gives them: "
        "RE = residual of the pruned BN-scaled filters after delivery, BE = BN-bias error, "
        "AE = activation-error proxy |s|^2 (the squared delivery coefficients). The totals do not include the "
        "mean-shift correction, which acts after the delivery.\n\n"
        + table(["stage", *(f"`{m}` RE / BE / AE" for m in methods)], body)
    )
    per_layer = [
        [f"`{x['name']}`", f"{x['before']}->{x['after']}", *(_errors([records[m][i]]) for m in methods)]
        for i, x in enumerate(records[methods[0]])
    ]
    return text + (
        "\n\n<details><summary>every layer</summary>\n\n"
        + table(["layer", "channels", *(f"`{m}` RE / BE / AE" for m in methods)], per_layer)
        + "\n\n</details>"
    )


def ablation_section(plan, found: Found, defaults) -> str:
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
            on = corrected(m, defaults)
            header += [f"`{m}` {'with' if on else 'without'} (default)", f"`{m}` {'without' if on else 'with'}"]
        parts.append(f"### `{label}`\n\n" + table(header, body))
    if not parts:
        return ""
    return (
        "## Mean-shift correction on and off (criterion L2)\n\n"
        "Each method with the library's default for `mean_correction` and with it flipped; top-1 %.\n\n"
        + "\n\n".join(parts)
    )


def _grid_table(found: Found, defaults, label, method, ratio, runs) -> str | None:
    """The sensitivity table of one grid (rows lambda1, columns lambda2); None before any result."""
    done = [(found[r.key(defaults)], r) for r in runs if r.key(defaults) in found]
    if not done:
        return None
    l1s = list(dict.fromkeys(r.lambda1 for r in runs))
    l2s = list(dict.fromkeys(r.lambda2 for r in runs))
    acc = {(r.lambda1, r.lambda2): row["accuracy"] for row, r in done}
    base = found.get(Run(label, "baseline", images=runs[0].images).key(defaults))
    body = [[f"{fmt(l1)}", *(f"{acc[(l1, l2)]:.2f}" if (l1, l2) in acc else "" for l2 in l2s)] for l1 in l1s]
    return (
        f"### Sensitivity: `{label}`, `{method}`, ratio {ratio:g} ({runs[0].images:,} images"
        + (f"; unpruned {base['accuracy']:.2f}" if base else "")
        + ")\n\nRows lambda1, columns lambda2.\n\n"
        + table(["lambda1 \\ lambda2", *(fmt(l2) for l2 in l2s)], body)
    )


def _ceiling_row(plan, found: Found, defaults, label, method, ratio, runs) -> list[str] | None:
    pick = grid_pick(found, defaults, runs)
    if not pick:
        return None
    top_row, top, full = pick
    main = [
        r for r in plan
        if r.kind == "main" and r.label == label and r.method == method and r.ratio == ratio and r.criterion == "l2"
    ]  # fmt: skip
    bench = found.get(main[0].key(defaults)) if main else None
    return [
        f"`{label}`", f"`{method}`", f"{ratio:g}", f"{fmt(top.lambda1)}, {fmt(top.lambda2)}",
        f"{top_row['accuracy']:.2f}", f"{full['accuracy']:.2f}" if full else "",
        f"{bench['accuracy']:.2f}" if bench else "",
        f"{bench['lambda1']}, {bench['lambda2']}" if bench else "",
    ]  # fmt: skip


def oracle_sections(plan, found: Found, defaults) -> str:
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
        text = _grid_table(found, defaults, label, method, ratio, runs)
        if text is None:
            continue
        parts.append(text)
        row = _ceiling_row(plan, found, defaults, label, method, ratio, runs)
        if row:
            best_rows.append(row)
    if best_rows:
        parts.insert(2, "### Ceiling\n\n" + table(
            ["checkpoint", "method", "ratio", "oracle lambda1, lambda2", "grid subset top-1 %",
             "oracle top-1 % (10,000)", "benchmark top-1 % (data-free setting)", "benchmark lambda1, lambda2"],
            best_rows, "lllrrrrr",
        ))  # fmt: skip
    return "\n\n".join(parts)
