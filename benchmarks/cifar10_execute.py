"""Running the CIFAR-10 benchmark: load a checkpoint, restore it with :func:`lbyl.restore`,
evaluate it, append the row (:func:`execute`) or only hand it back (:func:`measured`, for ``--verify``)."""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

import lbyl
from lbyl.data import evaluate, load_cifar10, load_lossless_samples, normalize
from lbyl.models import build_model, example_input, load_weights, model_info
from lbyl.sweep import result_row, subset

from .cifar10_plan import CHECKPOINTS, Run, fmt
from .cifar10_store import append_layers, append_row


def check_assets(assets: Path, plan: Sequence[Run]) -> None:
    """Raise FileNotFoundError when the test set, the lossless samples or a checkpoint of ``plan`` is absent."""
    needed = [assets / "cifar10-jpeg" / "test_jpg.tar.gz", assets / "cifar-lossless-samples"]
    needed += [assets / CHECKPOINTS[label].path for label in dict.fromkeys(r.label for r in plan)]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        raise FileNotFoundError(f"shared assets missing: {', '.join(absent)} (set --assets-root or LBYL_ASSETS)")


class EvalData:
    """The CIFAR-10 JPEG test set, normalised once, and its evenly spread subsets."""

    def __init__(self, assets: Path):
        info = model_info("resnet20")
        self.mean, self.std = info.mean, info.std
        images, self.labels = load_cifar10("test", root=assets / "cifar10-jpeg", source="jpeg")
        self.images = normalize(images, self.mean, self.std).contiguous(memory_format=torch.channels_last)
        samples, self.sample_labels = load_lossless_samples("cifar10", root=assets / "cifar-lossless-samples")
        self.samples = normalize(samples, self.mean, self.std)
        self._subsets = {}

    def subset(self, n: int):
        if n not in self._subsets:
            self._subsets[n] = subset(self.images, self.labels, n)
        return self._subsets[n]

    def lossless_count(self, model) -> int:
        """How many of the 20 lossless CIFAR-10 samples ``model`` classifies correctly."""
        accuracy = evaluate(model, self.samples, self.sample_labels, batch_size=len(self.sample_labels))
        return round(accuracy * len(self.sample_labels) / 100)


def inference_copy(model):
    """A copy of ``model`` for evaluation only: BatchNorm folded into the convolutions
    (``torch.fx`` conv-BN fusion) in channels-last layout, about twice as fast on CPU.

    Mathematically the same network (logits differ by about 1e-5 in float32);
    the model itself is returned if it cannot be traced.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model.eval())
    except Exception:  # not traceable by torch.fx: evaluate it as it is
        return model
    return fused.to(memory_format=torch.channels_last)


def baseline(model, arch: str, data: EvalData) -> tuple[object, dict]:
    """The unpruned model's evaluation copy and the row fields of its baseline run."""
    size = lbyl.plan(model, example_input(arch), 0.0)  # a dry run that removes nothing: the model's size
    evaluated = inference_copy(model)
    fields = dict(params=int(size.params_before), macs=int(size.macs_before), re=0.0, be=0.0, ae=0.0,
                  lossless=data.lossless_count(evaluated))  # fmt: skip
    return evaluated, fields


def restored(model, arch: str, run: Run, row: dict, data: EvalData, log) -> tuple[object, dict, list[dict]]:
    """``lbyl.restore`` with the run's method object: the evaluation copy, the row fields
    and the per-layer records."""
    started = time.perf_counter()
    result, report = lbyl.restore(
        model, example_input(arch), float(run.ratio), run.method_object(), criterion=run.criterion, seed=run.seed
    )
    seconds = time.perf_counter() - started
    result = inference_copy(result)
    effective = report.settings.get("mean_correction")
    if effective is not None and fmt(bool(effective)) != row["bias_correction"]:
        log(f"warning: {row['key']} ran with mean_correction={effective}")
        row["bias_correction"] = fmt(bool(effective))
    lam2 = [layer.lambda2 for layer in report.layers]
    # the columns every sweep has (lbyl.sweep.FIELDS), as the library computes them; the method's
    # option columns keep the benchmark's own key format (see cifar10_plan.Run)
    shared = result_row(report, run.method_object(), seconds)
    fields = {k: shared[k] for k in ("params", "macs", "re", "be", "ae", "restore_seconds")}
    fields.update(lossless=data.lossless_count(result), layer_lambda2_mean=sum(lam2) / len(lam2) if lam2 else "")
    layers = [
        dict(name=x.name, before=x.channels_before, after=x.channels_after, re=x.re, be=x.be, ae=x.ae, lambda2=x.lambda2)
        for x in report.layers
    ]
    return result, fields, layers


def measure(run: Run, model, data: EvalData, defaults: Mapping, commit: str, batch_size: int, log):
    """Run one benchmark point on the loaded ``model``: its CSV row and its per-layer records
    (None for a baseline). Writes nothing."""
    ckpt = CHECKPOINTS[run.label]
    images, labels = data.subset(run.images)
    row = dict(
        key=run.key(defaults), label=run.label, kind=run.kind, model=ckpt.arch, weights=Path(ckpt.path).name,
        ratio=float(run.ratio), method=run.method, criterion=run.criterion, images=len(labels), seed=run.seed,
        commit=commit, restore_seconds=0.0, **run.resolved(defaults),
    )  # fmt: skip
    layers = None
    if run.kind == "baseline":
        evaluated, fields = baseline(model, ckpt.arch, data)
    else:
        evaluated, fields, layers = restored(model, ckpt.arch, run, row, data, log)
    row.update(fields)
    started = time.perf_counter()
    with torch.inference_mode():
        accuracy = evaluate(evaluated, images, labels, batch_size=batch_size)
    row.update(accuracy=accuracy, eval_seconds=time.perf_counter() - started, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    if run.kind == "baseline":
        log(
            f"{run.label}: lossless samples {row['lossless']}/{len(data.sample_labels)}, "
            f"JPEG test top-1 {accuracy:.2f}% on {len(labels):,} images"
        )
    return row, layers


def measured(
    runs: Sequence[Run],
    assets: Path,
    defaults: Mapping,
    commit: str,
    progress: bool = True,
    batch_size: int = 1000,
    log=print,
) -> Iterator[tuple[Run, dict, list[dict] | None]]:
    """Run ``runs``, one checkpoint in memory at a time, yielding ``(run, row, layers)`` as each ends
    (nothing is written)."""
    if not runs:
        return
    data = EvalData(assets)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), desc="cifar10 bench", unit="run", dynamic_ncols=True)
    loaded: dict[str, object] = {}
    try:
        for r in runs:
            if r.label not in loaded:
                ckpt = CHECKPOINTS[r.label]
                loaded.clear()
                loaded[r.label] = load_weights(build_model(ckpt.arch), assets / ckpt.path, spec=ckpt.arch).eval()
            if bar is not None:
                bar.set_postfix_str(f"{r.label} {r.kind} r={fmt(r.ratio)} {r.method}/{r.criterion or '-'}")
            yield (r, *measure(r, loaded[r.label], data, defaults, commit, batch_size, log))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def execute(
    runs: Sequence[Run],
    out: Path,
    assets: Path,
    defaults: Mapping,
    commit: str,
    progress: bool = True,
    batch_size: int = 1000,
    log=print,
) -> None:
    """Run ``runs`` (already filtered to the missing ones) and append each row (and its layer records)
    as soon as it ends."""
    for _, row, layers in measured(runs, assets, defaults, commit, progress, batch_size, log):
        if layers is not None:
            append_layers(out / "layers.jsonl", row["key"], layers)
        append_row(out / "results.csv", row)
