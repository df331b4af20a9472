"""Argument checks at the public boundary: each error names the problem and the fix."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}); pass e.g. {name}=0")
    return value


def check_nonnegative(name: str, value, allowed: tuple[str, ...] = ()) -> float | str:
    """A finite number >= 0, or one of the strings in ``allowed``."""
    if isinstance(value, str) and value in allowed:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        extra = "".join(f" or {a!r}" for a in allowed)
        raise ValueError(f"{name} must be a finite number >= 0{extra}, got {value!r}")
    return float(value)


def check_input_stats(input_stats) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, std)`` of the model's input as float64 tensors (numbers or tensors that broadcast
    to one input without its batch dimension), std > 0; None stays None."""
    if input_stats is None:
        return None
    fix = "pass input_stats=(mean, std) of the model's input after your preprocessing, e.g. (0.0, 1.0) or (-0.43, 0.71)"
    if not isinstance(input_stats, (tuple, list)) or len(input_stats) != 2:
        raise ValueError(f"input_stats must be a pair (mean, std), got {input_stats!r}; {fix}")
    try:
        mean, std = (torch.as_tensor(v, dtype=torch.float64).detach().cpu() for v in input_stats)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"input_stats must hold numbers or tensors, got {input_stats!r}; {fix}") from None
    if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all()) and bool((std > 0).all())):
        raise ValueError(f"input_stats needs a finite mean and a finite std > 0, got {input_stats!r}; {fix}")
    return mean, std


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_ratio(ratio, where: str = "ratio") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 <= ratio < 1:
        raise ValueError(f"{where} must be a number in [0, 1) (the fraction of channels to remove), got {ratio!r}")
    return float(ratio)


def check_layers(layers) -> list[str] | str | None:
    """None, ``"all"``, one name or glob pattern, or a sequence of them."""
    if layers is None or isinstance(layers, str):
        return layers
    if isinstance(layers, Sequence) and all(isinstance(x, str) for x in layers):
        return list(layers)
    raise TypeError(
        f"layers must be a layer name (glob patterns allowed), a list of names, 'all' or None; got {layers!r}"
    )


def check_selection(ratio, kept, layers) -> None:
    """Exactly one way of choosing channels: a ratio (float or mapping) or ``kept``."""
    if ratio is None and kept is None:
        raise ValueError("pass ratio= (a fraction in [0, 1) or {layer: ratio}) or kept= ({layer: [channels]})")
    if ratio is not None and kept is not None:
        raise ValueError("pass either ratio= or kept=, not both: kept= already says which channels stay")
    if isinstance(ratio, Mapping):
        if layers is not None:
            raise ValueError(
                "a ratio mapping already names its layers; drop layers= or pass one float ratio with layers="
            )
        for name, value in ratio.items():
            if not isinstance(name, str):
                raise TypeError(f"ratio mapping keys must be layer names (str), got {name!r}")
            check_ratio(value, f"ratio for {name!r}")
    elif ratio is not None:
        check_ratio(ratio)
    if kept is not None:
        if layers is not None:
            raise ValueError("kept= already names its layers; drop layers=")
        if not isinstance(kept, Mapping):
            raise TypeError(f"kept must be a mapping {{layer name: [channel indices]}}, got {type(kept).__name__}")


def as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise TypeError(
        "example_inputs must be a tensor or a tuple of tensors shaped like one real batch, "
        f"e.g. torch.randn(1, 3, 32, 32); got {type(example_inputs).__name__}"
    )


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or infinite.

    A sum is finite only if every entry is, so one reduction (no boolean copy of
    the tensor) settles the usual case; a sum that overflows is checked entry by entry.
    """
    with torch.no_grad():
        return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_model(model) -> None:
    """A module with finite weights and BatchNorms that do not divide by zero."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and not all_finite(tensor):
            raise ValueError(
                f"{name} contains NaN or Inf values; restoration needs finite weights. "
                "Check the checkpoint (it may be corrupt or from a diverged run)."
            )
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            bad = (m.running_var.detach().to(torch.float64) + m.eps <= 0).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"BatchNorm {name} has running_var + eps <= 0 in channels {bad[:8]} (eps={m.eps}), so it divides "
                    "by zero and the model's outputs are not finite. Give that layer a positive eps (PyTorch's "
                    "default is 1e-5) or check the checkpoint."
                )
