"""CIFAR-10 ResNet benchmark: every method, ratio and criterion on real checkpoints.

Run ``python -m benchmarks.cifar10_resnets --help`` from the repository root. For
every checkpoint the unpruned model is verified first (the 20 lossless CIFAR-10
samples and the full JPEG test set), then the inner convolution of every residual
block (the default layer policy of :func:`lbyl.restore`) is pruned at each ratio
with each method and evaluated. Results go to ``--out``:

- ``results.csv``: one row per run (appended as soon as the run ends; the
  benchmark is resumable: a run whose key is already in the CSV is skipped);
- ``layers.jsonl``: the per-layer RE/BE/AE of every run;
- ``summary.md`` and ``*.png``: tables and plots made from the CSV
  (``--report-only`` remakes them, and ``--doc`` writes ``docs/benchmarks.md``);
- ``machine.json``: the machine and library versions of the last run;
- ``verify.md``: with ``--verify``, tracked rows recomputed (the CSV is not written) and
  compared with the CSV (:mod:`benchmarks.cifar10_verify`); the exit status is 1 when an
  accuracy, parameter or MAC count differs.

A run is a method object (:func:`lbyl.as_method` of its name, some options
overridden). The key of a run holds every setting that changes its result, with
the method's defaults resolved (``lbyl`` overrides nothing and follows
``lbyl.LBYL().settings()``): when a default changes, the affected rows no longer
match the plan and are recomputed. ``--rerun METHODS`` drops the rows of some
methods once, for changes that the settings do not show.

Modules: :mod:`benchmarks.cifar10_plan` (runs and keys), :mod:`benchmarks.cifar10_store`
(CSV, JSONL, machine), :mod:`benchmarks.cifar10_execute` (restore and evaluate),
:mod:`benchmarks.cifar10_report` and :mod:`benchmarks.cifar10_sections` (the report),
:mod:`benchmarks.cifar10_verify` (``--verify``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .cifar10_plan import (
    CHECKPOINTS, DEFAULT_OUT, LAMBDA1_GRID, LAMBDA2_GRID, METHODS, ORACLE_LIMIT, PAPER_LAMBDAS, RATIOS, SMOKE, Run,
    build_plan, fmt, method_defaults, oracle_best_runs,
)  # fmt: skip
from .cifar10_report import COMMAND, report_sections, write_report
from .cifar10_store import COLUMNS, drop_methods, git_commit, latest_by_key, lock, machine_info, read_layers, read_rows

__all__ = [
    "CHECKPOINTS", "COLUMNS", "DEFAULT_OUT", "METHODS", "PAPER_LAMBDAS", "RATIOS", "SMOKE", "Run", "add_arguments",
    "build_plan", "main", "method_defaults", "read_layers", "read_rows", "report_sections", "run", "write_report",
]  # fmt: skip


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


def _ratios(text: str) -> list[float]:
    values = _float_list(text)
    bad = [fmt(v) for v in values if fmt(v) not in {fmt(r) for r in RATIOS}]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown ratio(s) {', '.join(bad)}; choose from {', '.join(map(fmt, RATIOS))}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options."""
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
    parser.add_argument("--verify", action="store_true",
                        help="recompute the tracked main runs (criterion L2, at their recorded image count) "
                        "selected by --checkpoints, --ratios and --methods WITHOUT writing to the CSV, compare "
                        "accuracy, params, MACs and RE/BE/AE with their rows, write OUT/verify.md; exit 1 when "
                        "accuracy, params or MACs differ")  # fmt: skip
    parser.add_argument("--ratios", type=_ratios, metavar="X,Y", help="--verify: only these ratios (default all)")
    parser.add_argument("--methods", type=_methods, metavar="M,M", help="--verify: only these methods (default all)")
    parser.add_argument("--report-only", action="store_true", help="only remake the tables, plots (and --doc) from the CSV")
    parser.add_argument("--doc", metavar="PATH", help="also write this Markdown document (e.g. docs/benchmarks.md), images in its img/")
    parser.add_argument("--threads", type=_positive, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=_positive, default=1000, help="evaluation batch size (default 1000)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _checkpoints(text: str | None) -> list[str] | None:
    if not text:
        return None
    labels = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in labels if c not in CHECKPOINTS]
    if unknown:
        raise ValueError(f"unknown checkpoint(s) {unknown}; choose from {', '.join(CHECKPOINTS)}")
    return labels


def _compute(args: argparse.Namespace, plan: Sequence[Run], out: Path, defaults: dict, log) -> None:
    """Run what the CSV lacks, re-scoring each lambda grid's best point as soon as the grid is complete."""
    from lbyl.data import assets_root

    from .cifar10_execute import check_assets, execute

    assets = assets_root(args.assets_root)
    check_assets(assets, plan)
    with lock(out):
        if args.rerun:
            log(f"--rerun: dropped {drop_methods(out, args.rerun)} rows of {', '.join(args.rerun)}")
        commit = git_commit()
        (out / "machine.json").write_text(json.dumps(machine_info(args.threads), indent=2) + "\n")
        done = set(latest_by_key(read_rows(out / "results.csv")))
        pending = [r for r in plan if r.key(defaults) not in done]
        log(f"{len(plan)} planned runs, {len(plan) - len(pending)} already in {out / 'results.csv'}, "
            f"{len(pending)} to do")  # fmt: skip
        # segments end after each lambda grid: its best point is re-scored at once
        ends = [i + 1 for i, r in enumerate(pending) if r.kind == "oracle"
                and (i + 1 == len(pending) or pending[i + 1].kind != "oracle")]  # fmt: skip
        options = dict(progress=not args.no_progress, batch_size=args.batch_size, log=log)
        start = 0
        for end in [*ends, len(pending)]:
            execute(pending[start:end], out, assets, defaults, commit, **options)
            start = end
            if args.oracle:
                rows = latest_by_key(read_rows(out / "results.csv"))
                best = oracle_best_runs(plan, rows, defaults, args.limit or 10000)
                execute([r for r in best if r.key(defaults) not in rows], out, assets, defaults, commit, **options)


def _check_options(args: argparse.Namespace) -> None:
    if args.verify:
        given = [name for name in ("config", "limit", "oracle", "rerun", "report_only", "doc")
                 if getattr(args, name) not in (None, False, "full")]  # fmt: skip
        if given:
            raise ValueError(f"--verify takes no --{', --'.join(n.replace('_', '-') for n in given)}")
    elif args.ratios or args.methods:
        raise ValueError("--ratios and --methods select the rows of --verify")


def run(args: argparse.Namespace) -> int:
    import torch

    _check_options(args)
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.verify:
        from .cifar10_verify import verify

        return verify(args, _checkpoints(args.checkpoints) or list(CHECKPOINTS), log)
    out = Path(args.out)
    defaults = method_defaults()
    plan = build_plan(
        args.config, args.limit, args.oracle, args.oracle_limit, args.lambda1_grid, args.lambda2_grid,
        _checkpoints(args.checkpoints),
    )  # fmt: skip
    if not args.report_only:
        _compute(args, plan, out, defaults, log)
    if not (out / "results.csv").is_file():
        raise FileNotFoundError(f"no results in {out} (run the benchmark first)")
    summary = write_report(out, plan, defaults, Path(args.doc) if args.doc else None, args.oracle, args.limit, args.config)
    log(f"wrote {summary}" + (f" and {args.doc}" if args.doc else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
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
