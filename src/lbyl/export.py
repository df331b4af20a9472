"""Export a (restored) model for deployment: ONNX or TorchScript.

A restored model is an ordinary ``nn.Module`` with fewer channels, so the
exported file runs anywhere the format runs, without lbyl. ONNX needs the
optional extra ``pip install 'lbyl[export]'`` (``onnx``; ``onnxruntime`` to
check the file). TorchScript needs nothing beyond PyTorch, which marks
``torch.jit`` as deprecated but still supports it.

Both formats keep the batch dimension free: the example input fixes every
other dimension.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .counting import eval_mode

__all__ = ["FORMATS", "export_model", "run_exported", "max_difference"]

FORMATS = ("onnx", "torchscript")
#: ONNX operator set written by :func:`export_model` (supported by onnxruntime >= 1.14)
OPSET = 17


def _as_inputs(example_input) -> tuple[torch.Tensor, ...]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input and all(isinstance(x, torch.Tensor) for x in example_input):
        return tuple(example_input)
    raise TypeError(
        "example_input must be a tensor (or a tuple of tensors) shaped like one input batch, "
        f"e.g. torch.randn(1, 3, 32, 32); got {type(example_input).__name__}"
    )


@contextlib.contextmanager
def _quiet_torch_deprecations():
    """TorchScript and the TorchScript-based ONNX exporter warn that they are deprecated; the files they write are fine."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*(TorchScript|torch\.jit).*")
        yield


def _require_onnx():
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError(
            "ONNX export needs the 'onnx' package: pip install 'lbyl[export]' (or: pip install onnx onnxruntime)"
        ) from None


def export_model(
    model: nn.Module, example_input, path: str | os.PathLike, format: str = "onnx", *, opset: int = OPSET
) -> Path:
    """Write ``model`` to ``path`` as ``format`` (``"onnx"`` or ``"torchscript"``); returns the path.

    ``example_input`` is one input batch (a tensor or a tuple of tensors); only its
    shape and dtype matter, and the batch dimension stays free in the export. The
    model is exported in eval mode (BatchNorm uses its running statistics); its own
    mode is left as it was. ONNX inputs are named ``input`` (``input0``, ``input1``,
    ... for several) and the output ``output``.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if format == "onnx":
        _require_onnx()
    inputs = _as_inputs(example_input)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"export path {path} is a directory; give a file name such as {path / ('model.' + _suffix(format))}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        try:
            with torch.no_grad():
                model(*inputs)
        except Exception as error:
            shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
            raise ValueError(
                f"the model cannot run on an example input of shape {shapes}: {error}. "
                "Pass an input shaped like one real batch for this model."
            ) from error
        with _quiet_torch_deprecations():
            if format == "onnx":
                names = ["input"] if len(inputs) == 1 else [f"input{i}" for i in range(len(inputs))]
                axes = {name: {0: "batch"} for name in names}
                axes["output"] = {0: "batch"}
                torch.onnx.export(
                    model, inputs, str(path), dynamo=False, input_names=names, output_names=["output"],
                    dynamic_axes=axes, opset_version=opset,
                )  # fmt: skip
            else:
                with torch.no_grad():
                    traced = torch.jit.trace(model, inputs, check_trace=False)
                torch.jit.save(traced, str(path))
    return path


def _suffix(format: str) -> str:
    return "onnx" if format == "onnx" else "pt"


def _format_of(path: Path) -> str:
    return "onnx" if path.suffix.lower() == ".onnx" else "torchscript"


def run_exported(path: str | os.PathLike, example_input, format: str | None = None) -> torch.Tensor:
    """Run an exported file on ``example_input`` (ONNX with onnxruntime on CPU; TorchScript with torch.jit)."""
    path = Path(path)
    format = format or _format_of(path)
    inputs = _as_inputs(example_input)
    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("running an ONNX file needs onnxruntime: pip install 'lbyl[export]'") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), inputs)}
        return torch.from_numpy(session.run(None, feeds)[0])
    if format == "torchscript":
        with _quiet_torch_deprecations():
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(*(x.cpu() for x in inputs))
    raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")


def max_difference(model: nn.Module, path: str | os.PathLike, example_input, format: str | None = None) -> float:
    """Largest absolute difference between the exported file's output and the model's (eval mode)."""
    inputs = _as_inputs(example_input)
    with eval_mode(model), torch.no_grad():
        expected = model(*inputs).detach().cpu()
    actual = run_exported(path, inputs, format)
    if actual.shape != expected.shape:
        raise ValueError(f"the exported model's output has shape {tuple(actual.shape)}, PyTorch's {tuple(expected.shape)}")
    return float((actual.to(expected.dtype) - expected).abs().max()) if expected.numel() else 0.0
