"""``lbyl bench speed``: how fast restoration is, how much memory it takes, how fast the result runs.

For each model (random weights; BatchNorm with random affine parameters and
running statistics measured on random inputs, so the statistics are those the
network really produces) and each pruning ratio:

- wall time of :func:`lbyl.restore` (method ``lbyl``) and its split into the
  report's ``timings`` (graph tracing, delivery matrices, surgery); the rest is
  validation, the deep copy and the parameter/MAC counts;
- the delivery matrices of every pruned layer computed by the batched closed
  form (:func:`lbyl.delivery.lbyl_delivery`) and by one least-squares solve per
  pruned neuron (:func:`lbyl.bench.reference.lbyl_delivery_per_neuron`), in the
  same process, alternating: their maximum relative difference
  ``max |A - B| / max |B|`` over layers, and the speed-up;
- peak extra memory of one ``restore`` call, measured in a fresh child process
  as the rise of the resident set size (Linux ``VmHWM`` after resetting it via
  ``/proc/self/clear_refs``; glibc's malloc is told to return freed memory so
  RSS follows live allocations, torch's included);
- CPU latency of the original and the restored model at batch 1 and 32,
  alternating, next to the MAC ratio; the same under ONNX Runtime when
  ``onnxruntime`` is installed (optional).

Results go to ``--out`` as ``speed.json`` (every sample) and ``speed.md``.
Run ``python -m lbyl.bench.speed --help``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from ..api import restore
from ..planning import default_layers, producer_stats
from ..criteria import select_channels
from ..delivery import lbyl_delivery
from ..graph import find_groups
from ..models.registry import build_model, model_info
from .reference import lbyl_delivery_per_neuron
from .speed_report import format_markdown
from .latency import compare_latency, example, median, onnxruntime_module, ort_runner, timed, torch_runner

DEFAULT_MODELS = ("resnet56", "resnet34", "resnet50", "resnet101", "vgg16-bn-imagenet")
DEFAULT_RATIOS = (0.1, 0.3, 0.5)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --- models ----------------------------------------------------------------------------------


def realistic_batchnorm(model: nn.Module, inputs: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and the running statistics ``inputs`` produce.

    ``gamma ~ U(0.5, 1.5)``, ``beta ~ N(0, 0.2^2)``; the running mean and variance
    are then measured in one train-mode pass over ``inputs`` (cumulative average),
    so each layer's statistics describe what it really receives. Returns the
    model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, BATCHNORMS)]
    momenta = [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            if bn.affine:
                bn.weight.copy_(0.5 + torch.rand(n, generator=gen))
                bn.bias.copy_(0.2 * torch.randn(n, generator=gen))
            if bn.track_running_stats:
                bn.reset_running_stats()
                bn.momentum = None
        model.train()
        model(inputs)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    return model.eval()


def benchmark_model(spec: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """A registry model with seeded random weights and realistic BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(spec)
    shape = model_info(spec).input_shape
    calibration = torch.randn((4, *shape), generator=torch.Generator().manual_seed(seed + 1))
    return realistic_batchnorm(model, calibration, seed=seed), shape


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


# --- timing helpers ---------------------------------------------------------------------------


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# --- restoration time ---------------------------------------------------------------------------


def time_restore(model, inputs, ratio, repeats: int, forward_batch: int = 8) -> tuple[dict, nn.Module, object]:
    """Median wall time of ``restore`` and of its report's parts over ``repeats`` calls, each call
    alternating with one no-grad forward pass of the original model at ``forward_batch`` (side by
    side in this process, so both see the same machine state); ``forward_batch=0`` skips it."""
    samples = []
    restored = report = None
    batch = example(tuple(inputs.shape[1:]), forward_batch) if forward_batch else None
    if batch is not None:
        _forward(model, batch)  # warm-up
    for _ in range(repeats):
        restored = report = None
        gc.collect()
        wall, (restored, report) = timed(lambda: restore(model, inputs, ratio, method="lbyl"))
        parts = {k: float(v) for k, v in report.timings.items()}
        parts["other"] = wall - sum(parts.values())
        if batch is not None:
            gc.collect()
            parts["forward"] = timed(lambda: _forward(model, batch))[0]
        samples.append({"wall": wall, **parts})
    keys = samples[0].keys()
    summary = {k: median([s[k] for s in samples]) for k in keys}
    if batch is not None:
        summary["restore_over_forward"] = summary["wall"] / summary["forward"]
    return {"median": summary, "samples": samples, "forward_batch": forward_batch}, restored, report


def _forward(model, batch):
    with torch.no_grad():
        model.eval()(batch)


# --- delivery matrices: batched against per neuron ---------------------------------------------


def layer_problems(model, inputs, ratio):
    """(name, stats, kept, pruned) of every layer ``restore`` prunes by default, from the original weights."""
    groups, _ = find_groups(model, inputs)
    problems = []
    for group in default_layers(groups):
        stats = producer_stats(group)
        kept, pruned = select_channels(stats.filters, ratio)
        problems.append((group.name, stats, kept, pruned))
    return problems


def _sample(pruned: torch.Tensor, count: int | None) -> torch.Tensor:
    """Positions (in ``pruned``) of at most ``count`` evenly spaced pruned neurons; all if ``count`` is None."""
    n = len(pruned)
    if count is None or count >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, count).round().long().unique()


def compare_delivery(
    problems, repeats: int, reference_repeats: int, lambda1=0.0, lambda2=0.0, sample: int | None = None
) -> dict:
    """Time the batched and the per-neuron delivery matrices of all layers, alternating; compare them.

    With ``sample``, the per-neuron reference solves only that many evenly spaced
    neurons per layer and its time is scaled by ``|P| / sample`` per layer (every
    neuron of a layer is one least-squares problem of the same size); the
    comparison then covers the sampled columns.
    """
    samples = [_sample(p, sample) for *_, p in problems]
    scales = [len(p) / max(len(i), 1) for (*_, p), i in zip(problems, samples)]

    def batched():
        return [lbyl_delivery(s, k, p, lambda1, lambda2) for _, s, k, p in problems]

    def per_neuron():
        columns, seconds = [], 0.0
        for (_, s, k, p), i, scale in zip(problems, samples, scales):
            t, result = timed(lambda: lbyl_delivery_per_neuron(s, k, p[i], lambda1, lambda2))
            columns.append(result)
            seconds += t * scale
        return seconds, columns

    fast, slow = [], []
    fast_result = slow_result = None
    for i in range(max(repeats, reference_repeats)):
        if i < repeats:
            seconds, fast_result = timed(batched)
            fast.append(seconds)
        if i < reference_repeats:
            seconds, slow_result = per_neuron()
            slow.append(seconds)
    worst, worst_layer = 0.0, None
    for (name, *_), a, b, i in zip(problems, fast_result, slow_result, samples):
        if b.numel() == 0:
            continue
        scale = b.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        diff = float((a[:, i] - b).abs().max() / scale)
        if diff >= worst:
            worst, worst_layer = diff, name
    return {
        "layers": len(problems),
        "pruned_neurons": sum(len(p) for *_, p in problems),
        "reference_neurons": sum(len(i) for i in samples),
        "batched_s": median(fast),
        "per_neuron_s": median(slow),
        "per_neuron_extrapolated": any(scale != 1 for scale in scales),
        "speedup": median(slow) / median(fast),
        "max_relative_difference": worst,
        "worst_layer": worst_layer,
        "batched_samples": fast,
        "per_neuron_samples": slow,
        "lambda1": lambda1,
        "lambda2": lambda2,
    }


# --- memory (child process) ---------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _memory_child(spec: str, ratio: float, inplace: bool, seed: int) -> dict:
    """Run in a fresh process: peak RSS rise during one ``restore`` call."""
    model, shape = benchmark_model(spec, seed)
    inputs = example(shape)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_bytes("VmRSS")
    restored, _ = restore(model, inputs, ratio, method="lbyl", inplace=inplace)
    peak = _status_bytes("VmHWM")
    return {
        "peak_extra_bytes": peak - before,
        "model_bytes": tensor_bytes(model) if not inplace else None,
        "restored_bytes": tensor_bytes(restored),
        "rss_before_bytes": before,
    }


def measure_memory(spec: str, ratio: float, inplace: bool, seed: int, threads: int) -> dict:
    """Peak extra memory of one ``restore`` call, in a child process (see the module docstring)."""
    env = dict(os.environ)
    # fixed mmap threshold: large blocks are returned to the system when freed, so RSS tracks live memory
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    command = [
        sys.executable, "-m", "lbyl.bench.speed", "--memory-child",
        json.dumps({"spec": spec, "ratio": ratio, "inplace": inplace, "seed": seed, "threads": threads}),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# --- the benchmark ------------------------------------------------------------------------------


def run_model(spec: str, args) -> dict:
    _say(f"{spec}: building (random weights, BatchNorm statistics measured on random inputs)")
    model, shape = benchmark_model(spec, args.seed)
    inputs = example(shape)
    result = {"model": spec, "input_shape": list(shape), "model_bytes": tensor_bytes(model), "ratios": []}
    ort = onnxruntime_module() if not args.no_onnx else None
    with tempfile.TemporaryDirectory() as tmp:
        original_ort = {}
        for ratio in args.ratios:
            row = {"ratio": ratio}
            _say(f"{spec} @ {ratio}: restore x{args.repeats}")
            row["restore"], restored, report = time_restore(model, inputs, ratio, args.repeats, args.forward_batch)
            row["macs_before"], row["macs_after"] = report.macs_before, report.macs_after
            row["params_before"], row["params_after"] = report.params_before, report.params_after
            row["mac_ratio"] = report.macs_after / report.macs_before
            row["restored_bytes"] = tensor_bytes(restored)
            if not args.no_reference:
                _say(f"{spec} @ {ratio}: delivery matrices, batched x{args.repeats}, per neuron x{args.reference_repeats}")
                problems = layer_problems(model, inputs, ratio)
                row["delivery"] = compare_delivery(
                    problems, args.repeats, args.reference_repeats, sample=args.reference_sample
                )
                del problems
            if not args.no_memory:
                _say(f"{spec} @ {ratio}: peak memory (child processes)")
                row["memory"] = {
                    "copy": measure_memory(spec, ratio, False, args.seed, args.threads),
                    "inplace": measure_memory(spec, ratio, True, args.seed, args.threads),
                }
            row["latency"] = {}
            timed = args.latency_ratios is None or ratio in args.latency_ratios
            for batch in args.batches:
                if args.latency_repeats <= 0 or not timed:
                    break
                _say(f"{spec} @ {ratio}: latency at batch {batch} x{args.latency_repeats}")
                x = example(shape, batch)
                runners = {"original": torch_runner(model), "restored": torch_runner(restored)}
                if ort is not None:
                    try:
                        if batch not in original_ort:
                            original_ort[batch] = ort_runner(model, shape, Path(tmp), f"original-{batch}", args.threads)
                        runners["ort_original"] = original_ort[batch]
                        runners["ort_restored"] = ort_runner(restored, shape, Path(tmp), f"restored-{ratio}-{batch}", args.threads)
                    except Exception as error:  # export or session problems: report, keep the torch numbers
                        row.setdefault("onnx_error", f"{type(error).__name__}: {error}")
                times = compare_latency(runners, x, args.latency_repeats)
                entry = {"batch": batch, **{k: v for k, v in times.items()}}
                entry["latency_ratio"] = times["restored"]["median_s"] / times["original"]["median_s"]
                if "ort_restored" in times:
                    entry["ort_latency_ratio"] = times["ort_restored"]["median_s"] / times["ort_original"]["median_s"]
                row["latency"][str(batch)] = entry
            result["ratios"].append(row)
            del restored, report
            gc.collect()
    return result


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- command line -------------------------------------------------------------------------------


def _csv(kind):
    def parse(text):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--models", type=_csv(str), default=list(DEFAULT_MODELS), metavar="M,M,...",
                        help=f"registry models (default {','.join(DEFAULT_MODELS)})")  # fmt: skip
    parser.add_argument("--ratios", type=_csv(float), default=list(DEFAULT_RATIOS), metavar="R,R,...",
                        help="fractions of channels removed (default 0.1,0.3,0.5)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, metavar="N", help="restore and batched-delivery runs (default 5)")
    parser.add_argument("--reference-repeats", type=int, default=3, metavar="N",
                        help="runs of the slow per-neuron reference (default 3)")  # fmt: skip
    parser.add_argument("--reference-sample", type=int, metavar="K",
                        help="per-neuron reference on K evenly spaced neurons per layer, time scaled to all "
                        "(default: every neuron)")  # fmt: skip
    parser.add_argument("--latency-ratios", type=_csv(float), metavar="R,R,...",
                        help="ratios whose restored models are timed (default: all of --ratios)")  # fmt: skip
    parser.add_argument("--latency-repeats", type=int, default=5, metavar="N", help="timed forward calls per model (default 5; 0 skips latency)")
    parser.add_argument("--batches", type=_csv(int), default=[1, 32], metavar="B,B", help="latency batch sizes (default 1,32)")
    parser.add_argument("--forward-batch", type=int, default=8, metavar="B",
                        help="time one forward pass of the original model at this batch beside each restore (default 8; 0 skips)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, metavar="T", help="torch (and ONNX Runtime) threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--no-reference", action="store_true", help="skip the per-neuron comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime even if installed")
    parser.add_argument("--out", default="bench-output/speed", metavar="DIR", help="output folder (default bench-output/speed)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbyl bench speed",
        description="Time lbyl.restore (split by stage), compare batched and per-neuron delivery matrices, "
        "measure peak memory and the CPU latency of original and restored models.",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    return add_arguments(parser)


def run(args, argv_text: str) -> dict:
    torch.set_num_threads(args.threads)
    data = {
        "command": argv_text,
        "machine": machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_start": _load_average(),
        "settings": {k: v for k, v in vars(args).items() if k != "memory_child"},
        "onnxruntime": onnxruntime_module() is not None and not args.no_onnx,
        "models": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.models:
        data["models"].append(run_model(spec, args))
        data["load_end"] = _load_average()
        (out / "speed.json").write_text(json.dumps(data, indent=2) + "\n")  # partial results survive interruptions
        (out / "speed.md").write_text(format_markdown(data))
    _say(f"wrote {out / 'speed.md'} and {out / 'speed.json'}")
    return data


def _passive_threads(argv: list[str]) -> None:
    """Re-run this benchmark with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set.

    With the default policy, torch's OpenMP threads spin at every barrier; on a
    machine whose cores are shared with other jobs a spinning thread waits for
    one that is descheduled, and small kernels get ten times slower (measured:
    ResNet-56 at batch 1 on 2 shared cores, 220 ms instead of 26 ms). The
    policy must be set before torch is loaded, hence the re-run.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        os.execve(sys.executable, [sys.executable, "-m", "lbyl.bench.speed", *argv], env)


def main(argv: list[str] | None = None, passive: bool = False) -> int:
    """Run the benchmark; ``passive=True`` first re-runs the process with ``OMP_WAIT_POLICY=PASSIVE``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if passive:
        _passive_threads(argv)
    args = build_parser().parse_args(argv)
    if args.memory_child:
        job = json.loads(args.memory_child)
        torch.set_num_threads(job["threads"])
        print(json.dumps(_memory_child(job["spec"], job["ratio"], job["inplace"], job["seed"])))
        return 0
    for spec in args.models:
        if model_info(spec) is None:
            raise SystemExit(f"lbyl bench speed: {spec!r} is not a registry model")
    data = run(args, "python -m lbyl.bench.speed " + " ".join(argv))
    print(format_markdown(data))
    return 0


def _to_argv(args: argparse.Namespace) -> list[str]:
    """The command-line arguments that give ``args`` (options left at their default are omitted)."""
    argv = []
    for action in add_arguments(argparse.ArgumentParser())._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        if action.nargs == 0:  # a flag
            argv.append(action.option_strings[0])
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            argv += [action.option_strings[0], text]
    return argv


def register_cli(subparsers):
    """Add ``bench speed`` to the ``lbyl`` command (``subparsers`` from ``add_subparsers``);
    returns the ``bench`` group so that other benchmarks can join it."""
    bench = subparsers.add_parser("bench", help="the speed benchmark (the accuracy benchmarks live in the repository's benchmarks/)", description="Benchmarks of lbyl.")
    kinds = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    speed = kinds.add_parser("speed", help="restore time, memory and latency of restored models",
                             description=build_parser().description)  # fmt: skip
    add_arguments(speed)
    speed.set_defaults(func=lambda args: main(_to_argv(args), passive=True))
    return kinds


if __name__ == "__main__":
    sys.exit(main(passive=True))
