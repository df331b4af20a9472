"""Reproduce the published LeNet-300-100 table with the authors' checkpoint.

Run ``python -m benchmarks.reproduce_lenet [--assets-root PATH] [--out docs/reproduction.md]``
from the repository root.

The table of the LBYL paper (method note, section 5): both hidden layers of
LeNet-300-100 (ip1: 300, ip2: 100 neurons) are pruned at 50/60/70/80 % and
restored without data; every number is top-1 accuracy on the 10,000
FashionMNIST test images, no fine-tuning.

Every number is one call of :func:`lbyl.restore` with a method object; the
columns are :func:`table_method`:

- ``lbyl-paper``: ``lbyl.paper.LBYL(lambda1=0, lambda2=<published lambda2 of the ratio>)``;
- ``nm-paper``: ``lbyl.paper.NeuronMerging(threshold=0.45)`` (the released script's threshold);
- ``nm``, ``prune``: ``lbyl.NeuronMerging()``, ``lbyl.Prune()``;
- ``lbyl``: ``lbyl.LBYL(lambda1=1, lambda2="auto")``, lambda2 chosen per layer by
  generalised cross-validation on the weights alone (the test set plays no part).

The variant study changes one detail at a time through restore's own arguments
(a criterion callable, ``order``, ``kept``) or a custom :class:`lbyl.Method`.
The Markdown report is :mod:`benchmarks.lenet_report`.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import lbyl
from lbyl.data import assets_root, evaluate, load_fashion_mnist, normalize
from lbyl.models import build_model, load_weights

__all__ = [
    "LENET_CHECKPOINT", "LENET_PUBLISHED", "LENET_RATIOS", "LENET_UNPRUNED", "NM_PAPER_THRESHOLD", "EXACT_LAMBDA1",
    "TABLE_METHODS", "LenetSetup", "MergeCounter", "ReleasedRidge", "lenet_paths", "load_lenet_setup",
    "table_method", "restored_accuracy", "run_lenet", "main",
]  # fmt: skip

LENET_CHECKPOINT = "weights/lenet-300-100/LeNet_300_100.original.pth.tar"
LENET_RATIOS = (0.5, 0.6, 0.7, 0.8)
LENET_UNPRUNED = 89.80
# ratio -> published lambda2 (lambda1 = 0) and top-1 of LBYL, NM, plain pruning
LENET_PUBLISHED = {
    0.5: {"lambda2": 0.3, "lbyl": 88.83, "nm": 87.86, "prune": 87.86},
    0.6: {"lambda2": 0.6, "lbyl": 87.75, "nm": 88.07, "prune": 83.03},
    0.7: {"lambda2": 0.3, "lbyl": 83.92, "nm": 83.27, "prune": 71.21},
    0.8: {"lambda2": 1e-6, "lbyl": 78.05, "nm": 77.11, "prune": 63.90},
}
NM_PAPER_THRESHOLD = 0.45  # cosine threshold of the released LeNet-300-100 Neuron Merging script
EXACT_LAMBDA1 = 1.0
DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# FashionMNIST's published pixel mean and std, through the checkpoint's (x - 0.5) / 0.5 preprocessing
FASHION_MNIST_INPUT_STATS = ((0.2860 - 0.5) / 0.5, 0.3530 / 0.5)
TABLE_METHODS = ("lbyl-paper", "prune", "nm", "nm-paper", "lbyl")
LAYERS = ("ip1", "ip2")
SENSITIVITY_LAMBDA2 = (0.0, 0.01, 0.1, 0.3, 1.0)


# ---------------------------------------------------------------------------
# The checkpoint and the test set


@dataclass
class LenetSetup:
    """The authors' model (float32, eval mode), the normalised test set and where they came from."""

    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    checkpoint: Path
    dataset_dir: Path
    checkpoint_sha256: str = ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lenet_paths(assets: str | os.PathLike | None = None, fashion_root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(checkpoint path, FashionMNIST folder), whether or not they exist.

    Assets root: ``assets``, else ``$LBYL_ASSETS``, else ``../shared/assets``
    next to the repository. FashionMNIST: ``fashion_root``, else
    ``$LBYL_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``.
    """
    checkpoint = assets_root(assets) / LENET_CHECKPOINT
    if fashion_root is None:
        fashion_root = os.environ.get("LBYL_FASHION_MNIST") or DEFAULT_FASHION_MNIST
    return checkpoint, Path(fashion_root).expanduser()


def load_lenet_setup(assets: str | os.PathLike | None = None, fashion_root: str | os.PathLike | None = None) -> LenetSetup:
    """Load the authors' LeNet-300-100 checkpoint and the FashionMNIST test set.

    Inputs are normalised as the checkpoint was trained: ``x / 255``, then
    ``(x - 0.5) / 0.5``. Raises ``FileNotFoundError`` when an asset is absent.
    """
    checkpoint, dataset_dir = lenet_paths(assets, fashion_root)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"LeNet-300-100 checkpoint not found at {checkpoint}; set LBYL_ASSETS or pass --assets-root "
            "to the folder holding weights/lenet-300-100/"
        )
    model = load_weights(build_model("lenet-300-100"), checkpoint).eval()
    images, labels = load_fashion_mnist("test", root=dataset_dir)
    return LenetSetup(model, normalize(images, (0.5,), (0.5,)), labels, checkpoint, dataset_dir, _sha256(checkpoint))


# ---------------------------------------------------------------------------
# The methods of the table, and the custom ones of the variant study


def table_method(name: str, ratio: float) -> lbyl.Method:
    """The method object of a column of the table at ``ratio``."""
    if name == "lbyl-paper":
        return lbyl.paper.LBYL(lambda1=0.0, lambda2=LENET_PUBLISHED[ratio]["lambda2"])
    if name == "nm-paper":
        return lbyl.paper.NeuronMerging(threshold=NM_PAPER_THRESHOLD)
    if name == "lbyl":
        return lbyl.LBYL(lambda1=EXACT_LAMBDA1, lambda2="auto")
    return lbyl.as_method(name)  # "prune", "nm": the defaults


class MergeCounter(lbyl.paper.NeuronMerging):
    """The released Neuron Merging that also counts the pruned neurons it merges
    (a column of its delivery matrix with a nonzero entry)."""

    def __init__(self, threshold: float | None = None, **corrections):
        super().__init__(threshold, **corrections)
        self.merged = 0

    def delivery(self, stats, kept, pruned, activation):
        delivery = super().delivery(stats, kept, pruned, activation)
        self.merged += int(delivery.any(dim=0).sum())
        return delivery


class ReleasedRidge(lbyl.Method):
    """Diagnostic variants of the released LBYL without BN: ridge regression of the pruned
    filters on the kept ones, ``intercept`` fitted and discarded or not, the bias appended
    as a column (``with_bias``) or not."""

    name = "ridge-variant"
    options = ("lambda2", "intercept", "with_bias", "mean_correction", "variance_correction")

    def __init__(self, lambda2: float, intercept: bool = True, with_bias: bool = True):
        super().__init__(mean_correction=False, variance_correction=False)
        self.lambda2, self.intercept, self.with_bias = float(lambda2), bool(intercept), bool(with_bias)

    def delivery(self, stats, kept, pruned, activation):
        design = stats.filters.to(torch.float64)
        if self.with_bias and stats.bias is not None:
            design = torch.cat([design, stats.bias.to(torch.float64)[:, None]], dim=1)
        x, y = design[kept].T, design[pruned].T
        if self.intercept:
            x, y = x - x.mean(dim=0), y - y.mean(dim=0)
        gram = x.T @ x + self.lambda2 * torch.eye(x.shape[1], dtype=torch.float64)
        return torch.linalg.solve(gram, x.T @ y)


def weights_only_l2(filters: torch.Tensor) -> torch.Tensor:
    """L2 norm of the weights alone: drops the bias column that restore appends without BN."""
    return filters[:, :-1].norm(dim=1)


def float_keep(model: nn.Module, ratio: float) -> dict[str, list[int]]:
    """``kept`` for restore: per layer the ``int(c * (1 - ratio))`` neurons (float product
    truncated: 59 of 300 and 19 of 100 at 80 %) of largest ``|[w_i | bias_i]|``."""
    kept = {}
    for name in LAYERS:
        layer = getattr(model, name)
        filters = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach().to(torch.float64)
        order = torch.sort(-filters.norm(dim=1), stable=True).indices  # ties: lower index first
        kept[name] = order[: max(1, int(filters.shape[0] * (1 - ratio)))].sort().values.tolist()
    return kept


# ---------------------------------------------------------------------------
# The study


def restored_accuracy(setup: LenetSetup, ratio: float | None, method, **options) -> tuple[float, lbyl.Report]:
    """Top-1 (%) of the model restored by ``lbyl.restore(model, x, ratio, method, **options)``
    (both hidden layers, ip1 and ip2, unless ``kept=`` names the layers itself)."""
    if "kept" not in options:
        options["layers"] = list(LAYERS)
    restored, report = lbyl.restore(setup.model, setup.images[:1], ratio, method, **options)
    return evaluate(restored, setup.images, setup.labels, batch_size=2000), report


def _table(setup: LenetSetup, say) -> dict:
    table = {method: {} for method in TABLE_METHODS}
    keeps, lambda2, merged = {}, {}, {}
    for ratio in LENET_RATIOS:
        for name in TABLE_METHODS:
            method = table_method(name, ratio)
            if name == "nm-paper":
                method = MergeCounter(NM_PAPER_THRESHOLD)
            table[name][ratio], report = restored_accuracy(setup, ratio, method)
            keeps[ratio] = tuple(layer.channels_after for layer in report.layers)
            if name == "nm-paper":
                merged[ratio] = method.merged
            if name == "lbyl":
                lambda2.update({(ratio, layer.name): layer.lambda2 for layer in report.layers})
        say(f"{ratio:.0%}: " + ", ".join(f"{m} {table[m][ratio]:.2f}" for m in TABLE_METHODS))
    return dict(table=table, lambda2=lambda2, keeps=keeps, nm_merged=merged)


def layer_by_layer_accuracy(setup: LenetSetup, ratio: float, method) -> float:
    """Top-1 (%) when ip1 is restored first and ip2 then by a second ``lbyl.restore`` of the
    result: ip2 is ranked and restored from its weights as ip1's delivery edited them."""
    model = setup.model
    for name in LAYERS:
        model, _ = lbyl.restore(model, setup.images[:1], ratio, method, layers=[name])
    return evaluate(model, setup.images, setup.labels, batch_size=2000)


def _variants(setup: LenetSetup) -> list[tuple[str, str, dict]]:
    """(label, column, {ratio: top-1}) of each variant: one detail of the protocol changed."""
    rows = []

    def study(label, column, method=None, kept=None, layer_by_layer=False, **options):
        accs = {}
        for ratio in LENET_RATIOS:
            chosen = method(ratio) if method else table_method(column, ratio)
            if layer_by_layer:
                accs[ratio] = layer_by_layer_accuracy(setup, ratio, chosen)
                continue
            chosen_kept = {"kept": kept(ratio)} if kept is not None else {}
            accs[ratio] = restored_accuracy(setup, None if kept else ratio, chosen, **options, **chosen_kept)[0]
        rows.append((label, column, accs))

    for column in ("prune", "lbyl-paper"):
        study("released protocol (reference)", column)
        study("rank by the norm of w alone (bias not appended)", column, criterion=weights_only_l2)
        study("ip2 ranked and restored from its edited weights (restore ip1, then ip2)", column, layer_by_layer=True)
        if column == "lbyl-paper":  # prune delivers nothing: the order cannot change it
            study("order=\"sequential\" (ip2's delivery from its edited weights, ranking from the original)",
                  column, order="sequential")  # fmt: skip
        study("keep int(c*(1-r)) in floats (59/19 at 80 %)", column, kept=lambda r: float_keep(setup.model, r))
    lam = lambda r: LENET_PUBLISHED[r]["lambda2"]  # noqa: E731
    study("ridge without the intercept", "lbyl-paper", lambda r: ReleasedRidge(lam(r), intercept=False))
    study("ridge on w only (no bias column)", "lbyl-paper", lambda r: ReleasedRidge(lam(r), with_bias=False))
    default = "lbyl.LBYL() (the default)"
    study(default, "lbyl", lambda r: lbyl.LBYL())
    study(f"{default} without the variance correction (mean correction only)", "lbyl",
          lambda r: lbyl.LBYL(variance_correction=False))  # fmt: skip
    study(f"{default} without either correction", "lbyl",
          lambda r: lbyl.LBYL(mean_correction=False, variance_correction=False))  # fmt: skip
    study(f"{default} with input_stats declared: FashionMNIST's pixel mean 0.2860 and std 0.3530 "
          "through the (x - 0.5) / 0.5 preprocessing", "lbyl", lambda r: lbyl.LBYL(),
          input_stats=FASHION_MNIST_INPUT_STATS)  # fmt: skip
    study("released protocol (reference)", "nm-paper")
    study("no cosine threshold", "nm-paper", lambda r: lbyl.paper.NeuronMerging())
    study("rank by the norm of w alone (bias not appended)", "nm-paper", criterion=weights_only_l2)
    return rows


def _sensitivity(setup: LenetSetup) -> dict:
    """Exact LBYL with lambda1 = 1 and one fixed lambda2 in both layers (uses the test set: reference only)."""
    return {
        lam2: {r: restored_accuracy(setup, r, lbyl.LBYL(lambda1=EXACT_LAMBDA1, lambda2=lam2))[0] for r in LENET_RATIOS}
        for lam2 in SENSITIVITY_LAMBDA2
    }


def _shortcuts(setup: LenetSetup) -> dict:
    """``lbyl.restore(model, x, r, name)`` with shortcut strings: the method objects at their defaults."""
    return {name: {r: restored_accuracy(setup, r, name)[0] for r in LENET_RATIOS} for name in ("nm-paper", "lbyl")}


def run_lenet(setup: LenetSetup, *, variants: bool = True, library: bool = True, log=None) -> dict:
    """Compute the table, the lambda2 choices and (optionally) the variant study.

    Returns a dict with ``unpruned``, ``table[method][ratio]``, ``lambda2[(ratio, layer)]``,
    ``keeps``, ``nm_merged``, ``variants`` (list of ``(label, method, {ratio: acc})``),
    ``sensitivity``, ``library`` (the shortcut strings) and ``seconds``.
    """
    started = time.perf_counter()
    say = log or (lambda message: None)
    result: dict = {"unpruned": evaluate(setup.model, setup.images, setup.labels, batch_size=2000)}
    say(f"unpruned: {result['unpruned']:.2f}")
    result.update(_table(setup, say))
    if variants:
        result["variants"] = _variants(setup)
        result["sensitivity"] = _sensitivity(setup)
        say("variant study done")
    if library:
        result["library"] = _shortcuts(setup)
        say("shortcut strings done")
    result["seconds"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------
# Command line


def _print_table(result: dict) -> None:
    pub = LENET_PUBLISHED
    print(f"unpruned {result['unpruned']:.2f} (published {LENET_UNPRUNED:.2f})")
    print("ratio  LBYL pub  lbyl-paper   NM pub  nm-paper      nm  prune pub   prune    lbyl")
    t = result["table"]
    for r in LENET_RATIOS:
        print(
            f"{r:>5.0%}  {pub[r]['lbyl']:8.2f}  {t['lbyl-paper'][r]:10.2f}  {pub[r]['nm']:7.2f}  {t['nm-paper'][r]:8.2f}"
            f"  {t['nm'][r]:6.2f}  {pub[r]['prune']:9.2f}  {t['prune'][r]:6.2f}  {t['lbyl'][r]:6.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    from .lenet_report import render_lenet_markdown

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reproduce_lenet",
        description="Reproduce the published LeNet-300-100 / FashionMNIST table with the authors' checkpoint.",
    )
    parser.add_argument("--assets-root", default=None, help="shared assets folder (default: $LBYL_ASSETS or ../shared/assets)")
    parser.add_argument(
        "--fashion-mnist", default=None,
        help="folder with the FashionMNIST idx files (default: $LBYL_FASHION_MNIST or /usr/share/datasets/fashion-mnist)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="write the Markdown report here (e.g. docs/reproduction.md)")
    parser.add_argument("--quick", action="store_true", help="only the main table (no variant study, no shortcut strings)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: the model is tiny, and extra threads only slow it down on a busy machine)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        setup = load_lenet_setup(args.assets_root, args.fashion_mnist)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = run_lenet(setup, variants=not args.quick, library=not args.quick, log=lambda m: print(m, file=sys.stderr))
    _print_table(result)
    if args.out:
        command = "python -m benchmarks.reproduce_lenet " + " ".join(argv if argv is not None else sys.argv[1:])
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_lenet_markdown(result, setup, command.rstrip()))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
