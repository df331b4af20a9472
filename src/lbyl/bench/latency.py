"""Timing helpers and the CPU latency of original and restored models (PyTorch, ONNX Runtime)."""
from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch


def example(shape: tuple[int, ...], batch: int = 1) -> torch.Tensor:
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))


def median(values):
    return statistics.median(values) if values else None


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def torch_runner(model):
    def run(x):
        with torch.inference_mode():
            model(x)

    return run


def compare_latency(runners: dict, inputs: torch.Tensor, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of each runner on ``inputs``, calls alternating between runners."""
    for _ in range(warmup):
        for run in runners.values():
            run(inputs)
    samples = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            seconds, _ = timed(lambda: run(inputs))
            samples[name].append(seconds)
    return {name: {"median_s": median(s), "samples": s} for name, s in samples.items()}


def onnxruntime_module():
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def ort_runner(model, shape, folder: Path, name: str, threads: int):
    """An ONNX Runtime session for ``model`` (exported with a dynamic batch axis), as a runner."""
    ort = onnxruntime_module()
    path = folder / f"{name}.onnx"
    with warnings_silenced():
        torch.onnx.export(
            model, (example(shape),), str(path), input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # like OMP_WAIT_POLICY=PASSIVE for torch: no spinning threads on shared cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x):
        session.run(None, {"x": x.numpy()})

    return run


@contextlib.contextmanager
def warnings_silenced():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
