"""Save a restored model to a folder and load it back, without pickle.

A restored-model folder holds three files:

- ``model.safetensors``: the pruned model's state dict;
- ``plan.json``: how to rebuild the pruned architecture (model spec, input
  shape, the channels each layer kept) plus the method, its settings and
  SHA-256 checksums of the weights;
- ``report.json``: the full restoration report.

:func:`load_restored` builds the original architecture from the spec, removes
the channels the plan did not keep (:func:`lbyl.shrink`), then loads the
weights strictly after checking their checksum.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from .api import shrink
from .report import Report, report_of

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "REPORT_FILE",
    "RestoredFormatError",
    "save_restored",
    "load_restored",
    "read_plan",
    "read_report",
    "sha256_file",
]

FORMAT = "lbyl-restored"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 adds the model class and allows no spec
PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"
REPORT_FILE = "report.json"


class RestoredFormatError(ValueError):
    """A restored-model folder is missing files, corrupt, or from an incompatible format."""


def _version() -> str:
    # looked up at call time so that lbyl/__init__.py may import this module
    import lbyl

    return lbyl.__version__


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _input_shape(spec: str | None, input_shape, report: Report) -> list[int]:
    if input_shape is not None:
        return [int(d) for d in input_shape]
    if report.input_shapes:
        return list(report.input_shapes[0])
    from .models.registry import example_input, model_info

    if spec is None or model_info(spec) is None:
        raise ValueError(f"no input shape is known for model spec {spec!r}; pass input_shape=(1, C, H, W) to save_restored")
    return list(example_input(spec).shape)


def save_restored(
    model: nn.Module,
    out_dir,
    report: Report | None = None,
    spec: str | None = None,
    model_kwargs: Mapping | None = None,
    source_weights: str | os.PathLike | None = None,
    *,
    input_shape=None,
) -> Path:
    """Write ``model.safetensors``, ``plan.json`` and ``report.json`` into ``out_dir``.

    ``model`` is a model returned by :func:`lbyl.restore` (its report is found
    automatically; pass ``report`` for one restored elsewhere). ``spec`` and
    ``model_kwargs`` (optional) rebuild the *unpruned* model with
    ``build_model(spec, **model_kwargs)``, so that ``load_restored(folder)`` needs
    nothing else; without a spec, ``load_restored(folder, model=YourNet())`` rebuilds it
    from a fresh instance of your class. ``source_weights`` (the checkpoint the model
    was restored from) is only hashed, for provenance. Returns the folder.
    The older order ``save_restored(model, report, out_dir, spec, ...)`` is accepted too.
    """
    if isinstance(out_dir, Report):  # save_restored(model, report, out_dir, spec, model_kwargs, source_weights)
        out_dir, report = report, out_dir
    report = report if report is not None else report_of(model)
    if report is None:
        raise ValueError(
            "no report is known for this model: pass the report that lbyl.restore returned, "
            "save_restored(model, folder, report)"
        )
    kwargs = dict(model_kwargs or {})
    try:
        json.dumps(kwargs)
    except TypeError as error:
        raise ValueError(f"model_kwargs must be JSON-serialisable to be stored in the plan: {error}") from None
    shape = _input_shape(spec, input_shape, report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights_path = _write_weights(model, out)
    source = None
    if source_weights is not None:
        source_path = Path(source_weights)
        source = {"file": source_path.name, "sha256": sha256_file(source_path)}
    settings = dict(report.settings)
    plan = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lbyl_version": _version(),
        "torch_version": torch.__version__,
        "model": {"spec": spec, "kwargs": kwargs, "class": type(model).__qualname__},
        "input_shape": shape,
        "method": settings.get("method"),
        "settings": settings,
        "kept": {layer.name: [int(i) for i in layer.kept] for layer in report.layers},
        "source_weights": source,
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(weights_path)},
    }
    report.to_json(out / REPORT_FILE)
    # the plan is written last: a folder without one was not written completely
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n")
    return out


def _write_weights(model: nn.Module, out: Path) -> Path:
    from safetensors.torch import save_file

    # safetensors refuses shared or strided storage: store contiguous CPU copies
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = out / WEIGHTS_FILE
    save_file(state, str(path), metadata={"format": "pt", "lbyl": _version()})
    return path


def read_plan(out_dir: str | os.PathLike) -> dict:
    """Read and validate ``plan.json`` of a restored-model folder."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"restored-model folder not found: {folder}; give the folder that 'lbyl restore --out' wrote"
        )
    path = folder / PLAN_FILE
    if not path.is_file():
        raise RestoredFormatError(
            f"{folder} has no {PLAN_FILE}; it is not a restored-model folder written by lbyl "
            "(or the write did not finish); give the folder that 'lbyl restore --out' wrote"
        )
    try:
        plan = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RestoredFormatError(f"{path} is not valid JSON (corrupt?): {error}") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise RestoredFormatError(f"{path} is not an lbyl plan (missing \"format\": \"{FORMAT}\")")
    version = plan.get("format_version")
    if version not in READABLE_VERSIONS:
        hint = "upgrade lbyl" if isinstance(version, int) and version > FORMAT_VERSION else "re-create it"
        raise RestoredFormatError(
            f"{path} has format version {version!r}, but this lbyl ({_version()}) reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} only; {hint}"
        )
    missing = [k for k in ("model", "input_shape", "kept", "weights") if k not in plan]
    if missing:
        raise RestoredFormatError(f"{path} lacks the entries {missing}")
    return plan


def read_report(out_dir: str | os.PathLike) -> Report:
    """The :class:`Report` stored in a restored-model folder."""
    path = Path(out_dir) / REPORT_FILE
    if not path.is_file():
        raise RestoredFormatError(f"{path} not found")
    try:
        return Report.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as error:
        raise RestoredFormatError(f"{path} is not a valid lbyl report: {error}") from None


def _add_created_biases(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give bias-free Conv/Linear layers the bias that the saved weights have.

    Bias correction may add a bias to a layer that had none (when no
    BatchNorm follows it to absorb the shift); the freshly built model lacks
    it, so it is created here before the strict load.
    """
    modules = dict(model.named_modules())
    for key, value in state.items():
        name, _, leaf = key.rpartition(".")
        module = modules.get(name)
        if leaf == "bias" and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(value, dtype=module.weight.dtype))


def load_restored(out_dir: str | os.PathLike, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a restored model from its folder; returns ``(model in eval mode, plan)``.

    ``model``: a fresh instance of the *unpruned* architecture (e.g. ``MyNet()``, your own
    class); needed when the folder was saved without a registry spec, and it is
    copied, not modified. Raises :class:`RestoredFormatError` (a ``ValueError``) if a
    file is missing or corrupt, the checksum does not match, or the plan's format
    version is not supported; a ``ValueError`` if ``model`` does not match the plan.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(out_dir)
    plan = read_plan(folder)
    weights_path = folder / plan["weights"].get("file", WEIGHTS_FILE)
    if not weights_path.is_file():
        raise RestoredFormatError(f"{weights_path} not found; the restored-model folder is incomplete")
    expected = plan["weights"].get("sha256")
    actual = sha256_file(weights_path)
    if actual != expected:
        raise RestoredFormatError(
            f"checksum mismatch for {weights_path}: plan says {expected}, file has {actual}. "
            "The weights were changed or corrupted after the plan was written; run 'lbyl restore' again."
        )
    built = _unpruned(plan, model)
    # shrink() only traces the graph, so any input of the right shape works
    example = torch.zeros(plan["input_shape"])
    try:
        built = shrink(built, example, plan["kept"], inplace=True)
    except ValueError as error:
        if model is None:
            raise
        raise ValueError(f"model= does not match the saved plan: {error}") from None
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise RestoredFormatError(f"{weights_path} is not a readable safetensors file: {error}") from None
    _add_created_biases(built, state)
    try:
        built.load_state_dict(state, strict=True)
    except RuntimeError as error:
        if model is not None:
            raise ValueError(
                f"model= ({type(model).__qualname__}) does not fit the saved weights: {error}. Pass a fresh "
                "instance of the architecture that was restored, built with the same arguments"
            ) from None
        raise RestoredFormatError(f"{weights_path} does not fit the architecture rebuilt from {PLAN_FILE}: {error}") from None
    built.eval()
    return built, plan


def _unpruned(plan: dict, model: nn.Module | None) -> nn.Module:
    """The unpruned model to shrink: a copy of ``model``, or the one the plan's spec builds."""
    from .models.registry import build_model

    saved_class = plan["model"].get("class")
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model= must be a torch.nn.Module (a fresh instance of your class), got {type(model).__name__}")
        if saved_class is not None and type(model).__qualname__ != saved_class:
            raise ValueError(
                f"model= is an instance of {type(model).__qualname__}, but the folder holds a restored {saved_class}; "
                f"pass a fresh {saved_class}(...)"
            )
        return copy.deepcopy(model).eval()
    spec = plan["model"].get("spec")
    if spec is None:
        raise ValueError(
            f"this folder was saved without a model spec (a {saved_class or 'model'} of your own): pass a fresh "
            f"instance of the unpruned architecture, load_restored(folder, model={saved_class or 'MyNet'}(...))"
        )
    return build_model(spec, **plan["model"].get("kwargs", {})).eval()
