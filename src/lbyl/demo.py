"""The built-in demo: prune the bundled FashionMNIST CNN and compare methods.

It needs only the package itself (the checkpoint ships as package data) and
the FashionMNIST test set from the Debian package ``dataset-fashion-mnist``.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import torch

from .data import load_fashion_mnist
from .models.registry import build_model, example_input, load_weights, model_info
from .sweep import format_table, run_sweep, subset, write_outputs

__all__ = [
    "BUNDLED_WEIGHTS", "DEMO_MODEL", "DEMO_WEIGHTS", "DEMO_RATIOS", "FAST_RATIOS", "FAST_LIMIT", "bundled_weights",
    "demo_weights", "load_bundled_model", "load_demo_model", "run_demo",
]  # fmt: skip

DEMO_MODEL = "demo-cnn"
DEMO_WEIGHTS = "demo-cnn-fashion-mnist.safetensors"
DEMO_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
DEMO_METHODS = ("prune", "nm", "lbyl")
FAST_RATIOS = (0.3, 0.6)
FAST_LIMIT = 1000


#: checkpoints that ship inside the package (lbyl/assets/), by registry name; python -m lbyl.train makes them
BUNDLED_WEIGHTS = {
    DEMO_MODEL: DEMO_WEIGHTS,
    "vit-fashion": "vit-fashion-mnist.safetensors",
}


@contextmanager
def bundled_weights(model_name: str = DEMO_MODEL):
    """Path of a checkpoint bundled with the package (extracted to a temporary file if the package is zipped)."""
    if model_name not in BUNDLED_WEIGHTS:
        raise ValueError(f"no checkpoint of {model_name!r} ships with lbyl; bundled: {', '.join(BUNDLED_WEIGHTS)}")
    filename = BUNDLED_WEIGHTS[model_name]
    ref = resources.files("lbyl") / "assets" / filename
    if not ref.is_file():
        raise FileNotFoundError(
            f"the checkpoint {filename} is missing from the lbyl package (lbyl/assets/); reinstall lbyl, or "
            f"regenerate it with 'python -m lbyl.train --model {model_name} --out src/lbyl/assets/{filename}'"
        )
    with resources.as_file(ref) as path:
        yield Path(path)


def demo_weights():
    """Path of the bundled demo checkpoint (a context manager, see :func:`bundled_weights`)."""
    return bundled_weights(DEMO_MODEL)


def load_bundled_model(model_name: str = DEMO_MODEL) -> torch.nn.Module:
    """A model trained by ``python -m lbyl.train`` that ships with lbyl, in eval mode
    (read from safetensors, never unpickled). ``vit-fashion`` needs torchvision."""
    model = build_model(model_name)
    with bundled_weights(model_name) as path:
        load_weights(model, path)
    return model.eval()


def load_demo_model() -> torch.nn.Module:
    """The trained demo CNN, in eval mode (read from safetensors, never unpickled)."""
    return load_bundled_model(DEMO_MODEL)


def default_threads() -> int:
    """Torch threads for the demo: half the cores this process may use, 1 to 4.

    The demo network is small (8 M MACs per image), so extra intra-op threads
    add little, and OpenMP threads that spin while waiting for each other
    cost a lot on a busy machine: on two shared cores one thread ran the
    demo's evaluations twice as fast as two.
    """
    try:
        cores = len(os.sched_getaffinity(0))  # respects taskset
    except AttributeError:  # not available on macOS / Windows
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def run_demo(
    out_dir: str | os.PathLike = "demo-output",
    ratios: Sequence[float] | None = None,
    fast: bool = False,
    limit: int | None = None,
    progress: bool = True,
    stream=None,
) -> list[dict]:
    """Run the demo, print the results table to ``stream`` and write
    ``results.csv``, ``results.md`` and ``accuracy.png`` into ``out_dir``.

    ``fast`` uses two ratios and 1,000 of the test images (a smoke test);
    ``ratios`` and ``limit`` override either mode.
    """
    stream = stream or sys.stdout
    # OMP_NUM_THREADS set by the user wins
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(default_threads())
    ratios = tuple(ratios) if ratios else (FAST_RATIOS if fast else DEMO_RATIOS)
    if limit is None and fast:
        limit = FAST_LIMIT
    threads = torch.get_num_threads()
    started = time.perf_counter()
    info = model_info(DEMO_MODEL)
    model = load_demo_model()
    images, labels = load_fashion_mnist("test")
    images, labels = subset(images, labels, limit)
    print(
        f"lbyl demo: {DEMO_MODEL} on {len(labels):,} FashionMNIST test images; removing "
        f"{', '.join(f'{100 * r:g}%' for r in ratios)} of the channels of every restorable layer "
        f"with {', '.join(DEMO_METHODS)} ({threads} torch thread{'s' if threads != 1 else ''})",
        file=stream,
        flush=True,
    )
    rows = run_sweep(
        model,
        example_input(DEMO_MODEL),
        images,
        labels,
        ratios,
        DEMO_METHODS,
        ("l2",),
        mean=info.mean,
        std=info.std,
        model_name=DEMO_MODEL,
        weights_name=DEMO_WEIGHTS,
        progress=progress,
    )
    title = f"{DEMO_MODEL} on FashionMNIST ({len(labels):,} test images)"
    files, note = write_outputs(rows, out_dir, title)
    print("", file=stream)
    print(format_table(rows), file=stream)
    print("", file=stream)
    print(f"wrote {', '.join(map(str, files))} in {time.perf_counter() - started:.1f} s", file=stream, flush=True)
    if note:
        print(note, file=stream, flush=True)
    return rows
