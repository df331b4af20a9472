"""Restoration methods as objects: each owns its options and turns one layer's
statistics and channel choice into a :class:`Solution`.

A method's formula is its ``delivery`` (or, for LBYL, ``solve``); the mean and
variance corrections are options of every method. Strings are shortcuts for
the defaults: ``as_method("lbyl") == LBYL()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .activations import Activation, as_activation
from .correction import activation_variance, expected_activation, mean_shift
from .covariance import INPUT_MODELS, channel_covariance, preactivation_covariance, solve_space
from .delivery import (
    ProducerStats, gcv_lambda2, lbyl_system, nm_delivery, prune_delivery, residual_from_products,
    restoration_loss, scaled_filters, solve_normal_equations,
)  # fmt: skip
from .validation import check_bool, check_choice, check_nonnegative


@dataclass(frozen=True)
class Solution:
    """What a method decided for one layer, computed once and read by surgery and the report.

    ``delivery``: S (|K| x |P|); ``loss``: RE/BE/AE per pruned channel (the paper's
    white-input terms); ``mean_shift``: per pruned channel, the expected input the
    consumers lose (None: no mean correction); ``covariance``: the channels' covariance
    the variance correction predicts with (None: no variance correction); ``channel_means``:
    every channel's expected output, for the variance correction of a consumer without
    BatchNorm (None: none); ``channel_variances``: every channel's variance after the
    activation, for the variance correction of a consumer that reads other layers too; ``space``:
    where LBYL measured the error; ``condition``: of the normal matrix it solved.
    """

    delivery: torch.Tensor
    loss: dict[str, torch.Tensor]
    mean_shift: torch.Tensor | None = None
    covariance: torch.Tensor | None = None
    channel_means: torch.Tensor | None = None
    channel_variances: torch.Tensor | None = None
    space: str = ""
    condition: float | None = None
    lambda2: float = 0.0
    extra: dict = field(default_factory=dict)


class Method:
    """Base of every method. Subclasses set ``name`` and implement :meth:`delivery`.

    ``mean_correction``: add the expected consumer input that pruning removes
    (from the BatchNorm statistics) to the consumer's bias or its BatchNorm's
    running mean. ``variance_correction``: rescale the running variance of the
    BatchNorm after each consumer by the predicted change of its output variance.
    ``activation`` (of :meth:`delivery` and :meth:`solve`): the layer's element-wise
    activation, an :class:`lbyl.activations.Activation` (a name such as ``"relu"`` is
    accepted by :meth:`solve`); it equals its name when it has default parameters.
    """

    name = "custom"
    options: tuple[str, ...] = ("mean_correction", "variance_correction")
    #: the input covariance behind the statistics of a depthwise chain (:mod:`lbyl.depthwise`)
    input_model = "white"
    #: the spread of the scale shared by a position's channels in a depthwise chain (0: Gaussian)
    scale_spread = 0.0

    def __init__(self, *, mean_correction: bool = False, variance_correction: bool = False):
        self.mean_correction = check_bool("mean_correction", mean_correction)
        self.variance_correction = check_bool("variance_correction", variance_correction)

    def delivery(
        self, stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor, activation: Activation
    ) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement delivery(stats, kept, pruned, activation)")

    def solve(
        self, stats: ProducerStats, kept: torch.Tensor, pruned: torch.Tensor, activation: Activation | str
    ) -> Solution:
        activation = as_activation(activation)
        delivery = self.delivery(stats, kept, pruned, activation)
        if not isinstance(delivery, torch.Tensor) or tuple(delivery.shape) != (len(kept), len(pruned)):
            raise ValueError(
                f"method {self.name!r} returned a delivery of shape {tuple(getattr(delivery, 'shape', ()))}; "
                f"it must be a tensor of shape (kept, pruned) = ({len(kept)}, {len(pruned)})"
            )
        delivery = delivery.to(torch.float64)
        return self.finish(stats, kept, pruned, activation, delivery, restoration_loss(stats, kept, pruned, delivery))

    def finish(self, stats, kept, pruned, activation, delivery, loss, *, covariance=None, **details) -> Solution:
        """Add the corrections this method's options ask for to a delivery matrix."""
        removes = len(pruned) > 0  # nothing removed: nothing to correct
        shift = mean_shift(stats, kept, pruned, delivery, activation) if self.mean_correction and removes else None
        means = variances = None
        if self.variance_correction and removes:
            covariance = covariance if covariance is not None else preactivation_covariance(stats, "white")
            if stats.bn is None:  # a consumer without BatchNorm is rescaled about its mean
                means = expected_activation(stats, activation)
            variances = activation_variance(stats, activation)
        else:
            covariance = None
        return Solution(delivery, loss, shift, covariance, channel_means=means, channel_variances=variances, **details)

    @property
    def needs_statistics(self) -> bool:
        """Whether :meth:`solve` reads the data-free moments of layers without BatchNorm."""
        return self.mean_correction or self.variance_correction

    def settings(self) -> dict:
        """The method's name and options, as plain values (for reports and result keys)."""
        return {"method": self.name, **{key: getattr(self, key) for key in self.options}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in list(self.settings().items())[1:])
        return f"{type(self).__module__.replace('lbyl.methods', 'lbyl')}.{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.settings() == other.settings()

    def __hash__(self) -> int:
        return hash(tuple(self.settings().items()))


class Prune(Method):
    """Plain pruning: the pruned channels are dropped, nothing is delivered (S = 0)."""

    name = "prune"

    def delivery(self, stats, kept, pruned, activation):
        return prune_delivery(kept, pruned, device=stats.filters.device)


class NeuronMerging(Method):
    """Neuron Merging with the exact BN factor: each pruned channel goes to its most
    cosine-similar kept channel (:func:`lbyl.delivery.nm_delivery`)."""

    name = "nm"

    def delivery(self, stats, kept, pruned, activation):
        return nm_delivery(stats, kept, pruned)


#: the largest spread of :class:`LBYL`'s scale mixture
MAX_SCALE_SPREAD = 1.0


class LBYL(Method):
    """LBYL in closed form: every pruned channel is rebuilt from all kept ones.

    ``lambda1`` weights the BN-bias term, ``lambda2`` the coefficient penalty
    (``"auto"``: per layer by generalised cross-validation on the weights).
    ``input_model``: ``"propagated"`` (the input covariance of a pointwise producer
    propagated through the layers before it, :mod:`lbyl.statistics`; the paper's white
    input elsewhere), ``"white"`` (the paper's filter distance everywhere) or ``"bn"`` (the
    input covariance estimated from the BatchNorm's running variances); in a depthwise
    chain it is the input covariance behind the hidden channels' correlations. Where the
    kept filters span the input space and a BN and ReLU follow, the error is
    measured after the ReLU (:func:`lbyl.covariance.solve_space`). ``scale_spread``: in a
    depthwise chain, the channels' inputs to their activations are a Gaussian scale mixture,
    a scale shared by the channels of a position with ``log s ~ N(-spread^2, spread^2)``
    (kurtosis ``3 exp(4 spread^2)``: 8.2 at the default 0.5; 0: Gaussian; docs/method.md,
    section 5l). Both corrections are on by default.
    """

    name = "lbyl"
    options = ("lambda1", "lambda2", "input_model", "scale_spread", "mean_correction", "variance_correction")

    def __init__(self, lambda1: float = 0.0, lambda2: float | str = 0.0, input_model: str = "propagated", *,
                 scale_spread: float = 0.5, mean_correction: bool = True, variance_correction: bool = True):  # fmt: skip
        super().__init__(mean_correction=mean_correction, variance_correction=variance_correction)
        self.lambda1 = check_nonnegative("lambda1", lambda1)
        self.lambda2 = check_nonnegative("lambda2", lambda2, allowed=("auto",))
        self.input_model = check_choice("input_model", input_model, INPUT_MODELS)
        self.scale_spread = check_nonnegative("scale_spread", scale_spread)
        if self.scale_spread > MAX_SCALE_SPREAD:  # beyond, the 9-node rule misses the kurtosis by more than 6 %
            raise ValueError(f"scale_spread must be at most {MAX_SCALE_SPREAD} (kurtosis 3 exp(4) = 164), got "
                             f"{scale_spread!r}; 0.35 to 0.7 fit image features, 0 is Gaussian")  # fmt: skip

    def delivery(self, stats, kept, pruned, activation):
        return self.solve(stats, kept, pruned, activation).delivery

    def solve(self, stats, kept, pruned, activation):
        activation = as_activation(activation)
        w, b = scaled_filters(stats)
        gram = w @ w.T  # once: the white metric, the reported RE and the white covariance
        white = gram[kept][:, kept], gram[kept][:, pruned]  # the reported RE is the paper's white-input term
        space = solve_space(stats, w[kept], self.input_model, activation)
        lambda2 = self.lambda2
        if lambda2 == "auto":
            lambda2 = gcv_lambda2(stats, kept, pruned, self.lambda1) if len(pruned) else 0.0
        covariance = None
        if space != "white" or (self.variance_correction and len(pruned)):
            covariance = channel_covariance(stats, self.input_model, space, gram, activation)
        metric = white if space == "white" else (covariance[kept][:, kept], covariance[kept][:, pruned])
        delivery, condition = solve_normal_equations(*lbyl_system(*metric, b, kept, pruned, self.lambda1, lambda2))
        loss = {
            "re": residual_from_products(w, *white, kept, pruned, delivery),
            "be": (b[pruned] - delivery.T @ b[kept]) ** 2,
            "ae": (delivery**2).sum(dim=0),
        }
        return self.finish(stats, kept, pruned, activation, delivery, loss, covariance=covariance,
                           space=space, condition=condition, lambda2=float(lambda2))  # fmt: skip


def shortcuts() -> dict[str, type[Method]]:
    from . import paper

    return {"lbyl": LBYL, "nm": NeuronMerging, "prune": Prune, "lbyl-paper": paper.LBYL, "nm-paper": paper.NeuronMerging}


METHODS = ("prune", "nm", "nm-paper", "lbyl", "lbyl-paper")


def as_method(method) -> Method:
    """A method object from a shortcut string (its defaults) or a method object (itself)."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str) and method in METHODS:
        return shortcuts()[method]()
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(f"method must be a method object, not the class: pass {method.__name__}() instead")
    raise ValueError(
        f"unknown method {method!r}; choose one of {', '.join(METHODS)} or pass a method object such as "
        "lbyl.LBYL(lambda2=0.1)"
    )
