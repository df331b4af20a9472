"""Element-wise activations and their moments under a Gaussian input (float64, no data).

An :class:`Activation` names the function and holds its parameters (Hardtanh
bounds, a LeakyReLU or PReLU slope, ELU constants, the GELU approximation...).
For ``z ~ N(mu, sigma^2)`` per channel this module gives ``E[f(z)]`` and
``Var[f(z)]``, and for jointly Gaussian pairs with correlation ``rho``
``Cov(f(z_i), f(z_k))``. Everything is vectorised: the arguments are tensors
that broadcast against each other, one entry per channel (or pair).

* Piecewise-polynomial activations (identity, ReLU, Hardtanh / ReLU6 / clamp,
  LeakyReLU / PReLU, Hardsigmoid, Hardswish) have closed forms from the
  truncated-normal moments ``int_a^b x^k phi(x) dx``, k <= 4.
* The others (SiLU, GELU, sigmoid, tanh, softplus, Mish, log-sigmoid; ELU,
  SELU, CELU) use a deterministic rule: Gauss-Legendre with
  :data:`LEGENDRE_NODES` nodes on each piece of ``|x| <= TAIL`` (``z = mu + sigma x``)
  between the points where ``z`` crosses a kink of ``f``, or 0 where a smooth
  ``f`` bends. Gauss-Hermite converges only as ``1/n`` across a kink and
  slowly once ``sigma`` is large against the bend (64 nodes: error 2e-2 on the
  variance of tanh at sigma = 5); the split rule is within 1e-9 everywhere
  (docs/method.md, section 5e).
* The covariance decorrelates the pair (Cholesky), ``z_i = mu_i + sigma_i x``,
  ``z_k = mu_k + sigma_k (rho x + sqrt(1 - rho^2) y)``, integrates ``y`` first
  (the 1-D mean of ``f(z_k)`` given ``x``: closed form, or the 1-D rule) and
  ``x`` by the split rule: a tensor-product rule on ``(x, y)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import lru_cache

import torch
import torch.nn.functional as F

#: every activation kind this module knows
KINDS = (
    "identity", "relu", "hardtanh", "leaky_relu", "prelu", "hardsigmoid", "hardswish",
    "silu", "gelu", "sigmoid", "tanh", "softplus", "mish", "logsigmoid", "elu",
)  # fmt: skip
#: kinds with closed-form moments (piecewise polynomials)
CLOSED_FORM = ("identity", "relu", "hardtanh", "leaky_relu", "prelu", "hardsigmoid", "hardswish")
#: Gauss-Legendre nodes per piece of the quadrature rule
LEGENDRE_NODES = 48
#: the rule integrates ``|x| <= TAIL`` standard deviations (the rest has probability 1.5e-23)
TAIL = 10.0
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805
_PAIRS_PER_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True, eq=False)
class Activation:
    """An element-wise activation: its kind (``name``) and parameters.

    ``lower``/``upper``: Hardtanh bounds (ReLU6 is ``hardtanh(0, 6)``, clamp too);
    ``slope``: the negative slope of LeakyReLU, or PReLU's weight (one value, or
    one per channel); ``alpha``/``scale``/``input_scale``: ELU is
    ``scale * (z if z > 0 else alpha * (exp(input_scale * z) - 1))`` (SELU and
    CELU are ELUs); ``beta``/``threshold``: softplus; ``approximate``: GELU.
    ``module``: the ``nn.PReLU`` that holds per-channel slopes, whose weight is
    pruned with the producer's channels; it is where the activation lives, not
    part of its description (equality and ``str`` ignore it).

    A string equals an activation when it is its name and the activation is
    :func:`as_activation` of it: ``Activation("relu") == "relu"``.
    """

    name: str
    lower: float = -math.inf
    upper: float = math.inf
    slope: tuple[float, ...] = ()
    alpha: float = 1.0
    scale: float = 1.0
    input_scale: float = 1.0
    beta: float = 1.0
    threshold: float = 20.0
    approximate: str = "none"
    module: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.name not in KINDS:
            raise ValueError(f"unknown activation {self.name!r}; known: {', '.join(KINDS)}")
        slope = tuple(float(s) for s in self.slope)
        if self.name in ("leaky_relu", "prelu") and not slope:
            slope = (0.01,) if self.name == "leaky_relu" else (0.25,)
        object.__setattr__(self, "slope", slope)
        for name in ("lower", "upper", "alpha", "scale", "input_scale", "beta", "threshold"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.lower > self.upper:
            raise ValueError(f"hardtanh needs lower <= upper, got {self.lower} > {self.upper}")
        if self.approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {self.approximate!r}")

    def _values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "module")

    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return other == self.name and self._values() == as_activation(other)._values()
        if isinstance(other, Activation):
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)  # equal activations (and their names) hash alike

    def __str__(self) -> str:
        default = Activation(self.name)
        parts = []
        for f in fields(self)[1:-1]:  # neither the name nor the module
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                shown = value
                if f.name == "slope":
                    shown = value[0] if len(value) == 1 else f"<{len(value)} per channel>"
                parts.append(f"{f.name}={shown}")
        return f"{self.name}({', '.join(parts)})" if parts else self.name

    @property
    def per_channel(self) -> bool:
        """True when a parameter differs per channel (a PReLU with one slope per channel)."""
        return len(self.slope) > 1

    def slopes(self, device=None) -> torch.Tensor:
        """The negative slope(s) as float64: a scalar, or one per channel."""
        values = torch.tensor(self.slope or (0.0,), dtype=torch.float64, device=device)
        return values if self.per_channel else values[0]


def as_activation(value) -> Activation:
    """An :class:`Activation` from itself or a name (``"relu6"``, ``"selu"``, ``"swish"`` are aliases)."""
    if isinstance(value, Activation):
        return value
    aliases = {
        "relu6": Activation("hardtanh", 0.0, 6.0), "swish": Activation("silu"),
        "selu": Activation("elu", alpha=_SELU_ALPHA, scale=_SELU_SCALE),
    }  # fmt: skip
    if isinstance(value, str):
        if value in aliases:
            return aliases[value]
        if value == "hardtanh":
            return Activation("hardtanh", -1.0, 1.0)
        return Activation(value)
    raise TypeError(f"an activation must be an Activation or its name, got {type(value).__name__}")


def evaluate(activation, z: torch.Tensor, slope: torch.Tensor | None = None) -> torch.Tensor:
    """``f(z)`` in float64. ``slope``: LeakyReLU/PReLU slopes broadcastable to ``z`` (default: the activation's)."""
    act = as_activation(activation)
    z = z.to(torch.float64)
    name = act.name
    if name == "identity":
        return z
    if name == "relu":
        return z.clamp_min(0)
    if name == "hardtanh":
        return z.clamp(min=act.lower, max=act.upper)
    if name in ("leaky_relu", "prelu"):
        return torch.where(z >= 0, z, _slope(act, slope, z) * z)
    if name == "elu":
        return act.scale * torch.where(z > 0, z, act.alpha * torch.expm1(act.input_scale * z.clamp_max(0)))
    if name == "gelu":
        return F.gelu(z, approximate=act.approximate)
    if name == "softplus":
        return F.softplus(z, act.beta, act.threshold)
    smooth = {"hardsigmoid": F.hardsigmoid, "hardswish": F.hardswish, "silu": F.silu, "sigmoid": torch.sigmoid,
              "tanh": torch.tanh, "mish": F.mish, "logsigmoid": F.logsigmoid}  # fmt: skip
    return smooth[name](z)


def split_points(activation) -> tuple[float, ...]:
    """Where the quadrature rule splits the line: the kinks of ``f`` (where it or its slope
    jumps), or ``0``, where every smooth activation here bends; none for the identity."""
    act = as_activation(activation)
    if act.name == "identity":
        return ()
    if act.name == "hardtanh":
        return tuple(b for b in (act.lower, act.upper) if math.isfinite(b))
    if act.name in ("hardsigmoid", "hardswish"):
        return (-3.0, 3.0)
    if act.name == "softplus":  # torch's softplus turns linear above threshold / beta (a tiny jump)
        return (0.0, act.threshold / act.beta)
    return (0.0,)


def _slope(act: Activation, slope, like: torch.Tensor) -> torch.Tensor:
    return act.slopes(like.device) if slope is None else torch.as_tensor(slope, dtype=torch.float64, device=like.device)


# ---------------------------------------------------------------- closed forms


def _pieces(act: Activation, slope: torch.Tensor) -> list[tuple[float, float, list]]:
    """``f`` as polynomial pieces ``(lo, hi, [c0, c1, c2])`` in ``z`` that cover the line.

    Coefficients may be tensors (per-channel slopes).
    """
    name, inf = act.name, math.inf
    if name == "identity":
        return [(-inf, inf, [0.0, 1.0])]
    if name == "relu":
        return [(-inf, 0.0, [0.0]), (0.0, inf, [0.0, 1.0])]
    if name == "hardtanh":
        a, b = act.lower, act.upper
        pieces = [(-inf, a, [a]), (a, b, [0.0, 1.0]), (b, inf, [b])]
        return [p for p in pieces if p[0] < p[1]]
    if name in ("leaky_relu", "prelu"):
        return [(-inf, 0.0, [0.0, slope]), (0.0, inf, [0.0, 1.0])]
    if name == "hardsigmoid":
        return [(-inf, -3.0, [0.0]), (-3.0, 3.0, [0.5, 1 / 6]), (3.0, inf, [1.0])]
    if name == "hardswish":
        return [(-inf, -3.0, [0.0]), (-3.0, 3.0, [0.0, 0.5, 1 / 6]), (3.0, inf, [0.0, 1.0])]
    raise ValueError(f"{name} has no closed form")


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)


def _truncated_moments(a: torch.Tensor, b: torch.Tensor, order: int) -> list[torch.Tensor]:
    """``M_k = int_a^b x^k phi(x) dx`` for k = 0..order (a, b may be infinite)."""
    # upper tail through the complementary cdf, so far-right pieces keep their digits
    ndtr = torch.special.ndtr
    mass = torch.where(a > 0, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))
    moments = [mass]
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    a0, b0 = torch.where(finite_a, a, 0.0), torch.where(finite_b, b, 0.0)
    pa, pb = torch.where(finite_a, _phi(a0), 0.0), torch.where(finite_b, _phi(b0), 0.0)
    for k in range(1, order + 1):
        previous = moments[k - 2] if k >= 2 else 0.0
        moments.append((k - 1) * previous + a0 ** (k - 1) * pa - b0 ** (k - 1) * pb)
    return moments


def _in_x(coeffs: list, mu: torch.Tensor, sigma: torch.Tensor) -> list:
    """Coefficients of ``p(mu + sigma x)`` in ``x`` from those of ``p(z)``."""
    out = [0.0] * len(coeffs)
    for k, c in enumerate(coeffs):
        for j in range(k + 1):
            out[j] = out[j] + c * math.comb(k, j) * mu ** (k - j) * sigma**j
    return out


def _closed_moments(act, mu, sigma, slope) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E f, Var f)`` of a piecewise polynomial; ``f`` is centred at ``f(mu)`` against cancellation."""
    at_mu = evaluate(act, mu, slope)
    safe = torch.where(sigma > 0, sigma, 1.0)
    first = second = torch.zeros_like(mu)
    for lo, hi, coeffs in _pieces(act, slope):
        q = _in_x(coeffs, mu, safe)
        q[0] = q[0] - at_mu
        square = [0.0] * (2 * len(q) - 1)
        for i, qi in enumerate(q):
            for j, qj in enumerate(q):
                square[i + j] = square[i + j] + qi * qj
        moments = _truncated_moments((lo - mu) / safe, (hi - mu) / safe, len(square) - 1)
        first = first + sum(c * m for c, m in zip(q, moments))
        second = second + sum(c * m for c, m in zip(square, moments))
    constant = sigma <= 0  # a zero-variance channel is the constant f(mu)
    mean = torch.where(constant, at_mu, at_mu + first)
    var = torch.where(constant, 0.0, (second - first**2).clamp_min(0))
    return mean, var


# ---------------------------------------------------------------- quadrature rules


@lru_cache(maxsize=None)
def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of ``int_-1^1 g(u) du`` (Golub-Welsch)."""
    k = torch.arange(1, n, dtype=torch.float64)
    off = k / torch.sqrt(4 * k**2 - 1)
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, 2 * vectors[0] ** 2


def _piecewise_rule(cuts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre on every piece of ``[-TAIL, TAIL]`` between the standardised ``cuts`` (..., B).

    Returns nodes and weights (..., (B + 1) * LEGENDRE_NODES) of ``E[g(x)]``, ``x ~ N(0, 1)``;
    a cut outside the window (or undefined: zero variance) leaves an empty piece.
    """
    cuts = torch.nan_to_num(cuts, nan=0.0, posinf=TAIL, neginf=-TAIL).clamp(-TAIL, TAIL)
    ends = cuts.new_full((*cuts.shape[:-1], 1), TAIL)
    edges = torch.cat([-ends, cuts.sort(dim=-1).values, ends], dim=-1)
    left, right = edges[..., :-1, None], edges[..., 1:, None]
    u, w = (t.to(cuts.device) for t in _gauss_legendre(LEGENDRE_NODES))
    half = (right - left) / 2
    nodes = (left + right) / 2 + half * u
    weights = half * w * _phi(nodes)
    return nodes.flatten(-2), weights.flatten(-2)


def _standardised_cuts(act: Activation, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    points = torch.tensor(split_points(act), dtype=torch.float64, device=mu.device)
    return (points - mu[..., None]) / sigma[..., None]


def _rule(act: Activation, mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D rule for ``f(mu + sigma x)``: Gauss-Legendre split where ``z`` crosses a split point."""
    return _piecewise_rule(_standardised_cuts(act, mu, sigma))


def _quadrature_moments(act, mu, sigma, slope) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = _rule(act, mu, sigma)
    values = evaluate(act, mu[..., None] + sigma[..., None] * nodes, None if slope is None else slope[..., None])
    mean = (weights * values).sum(-1)
    var = (weights * (values - mean[..., None]) ** 2).sum(-1)
    constant = sigma <= 0  # exactly f(mu), without the rule's rounding
    return torch.where(constant, evaluate(act, mu, slope), mean), torch.where(constant, 0.0, var)


# ---------------------------------------------------------------- moments


def _prepare(activation, mu, sigma, slope):
    act = as_activation(activation)
    mu = torch.as_tensor(mu, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=mu.device).abs()
    if act.name in ("leaky_relu", "prelu"):
        slope = _slope(act, slope, mu)
        mu, sigma, slope = torch.broadcast_tensors(mu, sigma, slope)
    else:
        mu, sigma = torch.broadcast_tensors(mu, sigma)
        slope = None
    return act, mu, sigma, slope


def moments(activation, mu, sigma, slope=None, rule: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[f(z)], Var[f(z)])`` for ``z ~ N(mu, sigma^2)``, elementwise over broadcast tensors.

    ``rule="auto"``: the closed form where there is one, else quadrature;
    ``"quadrature"``: always the quadrature rule (to check the closed forms).
    ``slope``: LeakyReLU/PReLU slopes broadcastable to ``mu`` (default: the
    activation's own, one per channel along the last dimension for a PReLU).
    A zero ``sigma`` is the constant ``f(mu)``.
    """
    if rule not in ("auto", "quadrature"):
        raise ValueError(f"rule must be 'auto' or 'quadrature', got {rule!r}")
    act, mu, sigma, slope = _prepare(activation, mu, sigma, slope)
    if rule == "auto" and act.name in CLOSED_FORM:
        return _closed_moments(act, mu, sigma, slope)
    return _quadrature_moments(act, mu, sigma, slope)


def mean(activation, mu, sigma, slope=None, rule: str = "auto") -> torch.Tensor:
    """``E[f(z)]`` for ``z ~ N(mu, sigma^2)`` (see :func:`moments`)."""
    act, mu, sigma, slope = _prepare(activation, mu, sigma, slope)
    if act.name == "identity":
        return mu.clone()
    return moments(act, mu, sigma, slope, rule)[0]


def variance(activation, mu, sigma, slope=None, rule: str = "auto") -> torch.Tensor:
    """``Var[f(z)]`` for ``z ~ N(mu, sigma^2)`` (see :func:`moments`)."""
    return moments(activation, mu, sigma, slope, rule)[1]


def covariance(activation, mu_i, sigma_i, mu_k, sigma_k, rho, slope_i=None, slope_k=None) -> torch.Tensor:
    """``Cov(f(z_i), f(z_k))`` for jointly Gaussian ``z_i ~ N(mu_i, sigma_i^2)``, ``z_k ~ N(mu_k, sigma_k^2)``
    with correlation ``rho``; elementwise over broadcast tensors.

    With ``z_i = mu_i + sigma_i x`` and ``z_k = mu_k + sigma_k (rho x + sqrt(1 - rho^2) y)``
    (``x``, ``y`` independent standard normals), the inner expectation over ``y``
    is the 1-D mean of ``f`` given ``x`` (:func:`moments`: closed form, or its
    rule), and ``x`` by Gauss-Legendre split where ``z_i`` or the conditional
    mean of ``z_k`` crosses a split point (:func:`split_points`).
    ``slope_i``/``slope_k``: LeakyReLU/PReLU slopes of each side
    (default: the activation's, along the last dimension for a PReLU).
    """
    act = as_activation(activation)
    mu_i = torch.as_tensor(mu_i, dtype=torch.float64)
    device = mu_i.device
    args = [mu_i] + [torch.as_tensor(t, dtype=torch.float64, device=device) for t in (sigma_i, mu_k, sigma_k, rho)]
    args[1], args[3], args[4] = args[1].abs(), args[3].abs(), args[4].clamp(-1, 1)
    if act.name == "identity":
        return torch.broadcast_tensors(args[4] * args[1] * args[3], *args)[0].clone()
    linear = act.name in ("leaky_relu", "prelu")
    if linear:
        slopes = [_slope(act, slope_i, mu_i), _slope(act, slope_k, mu_i)]
    else:
        slopes = [torch.zeros((), dtype=torch.float64, device=device)] * 2
    *args, slope_a, slope_b = torch.broadcast_tensors(*args, *slopes)
    shape = args[0].shape
    flat = [t.reshape(-1) for t in (*args, slope_a, slope_b)]
    cuts = len(split_points(act))
    per_pair = (2 * cuts + 1) * LEGENDRE_NODES * (1 if act.name in CLOSED_FORM else (cuts + 1) * LEGENDRE_NODES)
    chunk = max(1, _PAIRS_PER_CHUNK_ELEMENTS // per_pair)
    parts = [
        _pair_covariance(act, *(t[start : start + chunk] for t in flat), linear)
        for start in range(0, flat[0].numel(), chunk)
    ]
    return (torch.cat(parts) if parts else flat[0].new_zeros(0)).reshape(shape)


def _pair_covariance(act, mu_i, sigma_i, mu_k, sigma_k, rho, slope_i, slope_k, linear: bool) -> torch.Tensor:
    """:func:`covariance` on flat tensors (one entry per pair)."""
    slope_i, slope_k = (slope_i, slope_k) if linear else (None, None)
    points = torch.tensor(split_points(act), dtype=torch.float64, device=mu_i.device)
    # where z_k's conditional mean crosses a split point: a sharp bend of the inner mean when |rho| is near 1
    crossing = (points - mu_k[:, None]) / (sigma_k * rho)[:, None]
    nodes, weights = _piecewise_rule(torch.cat([_standardised_cuts(act, mu_i, sigma_i), crossing], dim=1))
    mean_i = moments(act, mu_i, sigma_i, slope_i)[0]
    mean_k = moments(act, mu_k, sigma_k, slope_k)[0]
    f_i = evaluate(act, mu_i[:, None] + sigma_i[:, None] * nodes, None if slope_i is None else slope_i[:, None])
    residual = torch.sqrt((1 - rho**2).clamp_min(0))
    given_x = moments(
        act, mu_k[:, None] + (sigma_k * rho)[:, None] * nodes, (sigma_k * residual)[:, None].expand_as(nodes),
        None if slope_k is None else slope_k[:, None],
    )[0]  # fmt: skip
    return (weights * (f_i - mean_i[:, None]) * (given_x - mean_k[:, None])).sum(-1)


def standardise(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard deviations and correlation matrix of a covariance (zero-variance rows and columns: 0)."""
    std = covariance.diagonal().clamp_min(0).sqrt()
    scale = torch.outer(std, std)
    return std, torch.where(scale > 0, covariance / torch.where(scale > 0, scale, 1.0), 0.0)


def channel_covariance(activation, mean: torch.Tensor, covariance_matrix: torch.Tensor) -> torch.Tensor:
    """Covariance matrix (C x C) of ``f(z)`` for ``z ~ N(mean, covariance_matrix)``, per-channel slopes aligned."""
    act = as_activation(activation)
    mean = mean.to(torch.float64)
    cov = covariance_matrix.to(torch.float64)
    std, rho = standardise(cov)
    slope = act.slopes(mean.device) if act.name in ("leaky_relu", "prelu") else None
    pairs = covariance(act, mean[:, None], std[:, None], mean[None, :], std[None, :], rho,
                       None if slope is None else (slope[:, None] if slope.dim() else slope),
                       None if slope is None else (slope[None, :] if slope.dim() else slope))  # fmt: skip
    pairs = (pairs + pairs.T) / 2
    return pairs.diagonal_scatter(variance(act, mean, std, slope))


#: terms of the Hermite (Mehler) expansion in :func:`hermite_channel_covariance`
HERMITE_TERMS = 24


def hermite_coefficients(activation, mu: torch.Tensor, sigma: torch.Tensor, terms: int = HERMITE_TERMS) -> torch.Tensor:
    """``c_n = E[f(mu + sigma x) h_n(x)]``, ``n = 1..terms``, per channel (C x terms), for the
    orthonormal Hermite polynomials ``h_n = He_n / sqrt(n!)`` of ``x ~ N(0, 1)``.

    Integrated by the split Gauss-Legendre rule of :func:`moments` (exact for the kinks).
    """
    act, mu, sigma, slope = _prepare(activation, mu, sigma, None)
    nodes, weights = _rule(act, mu, sigma)
    values = evaluate(act, mu[..., None] + sigma[..., None] * nodes, None if slope is None else slope[..., None])
    weighted = weights * values
    previous, current = torch.ones_like(nodes), nodes.clone()
    coefficients = []
    for n in range(1, terms + 1):
        coefficients.append((weighted * current).sum(-1))
        previous, current = current, (nodes * current - math.sqrt(n) * previous) / math.sqrt(n + 1)
    return torch.stack(coefficients, dim=-1)


def hermite_channel_covariance(activation, mean: torch.Tensor, covariance_matrix: torch.Tensor,
                               terms: int = HERMITE_TERMS) -> torch.Tensor:  # fmt: skip
    """Covariance matrix of ``f(z)`` for ``z ~ N(mean, covariance_matrix)`` by Mehler's expansion.

    For standardised jointly Gaussian inputs with correlation ``rho``,
    ``Cov(f_i, f_k) = sum_{n >= 1} c_n^(i) c_n^(k) rho^n`` (:func:`hermite_coefficients`).
    The first ``terms`` are summed; the rest, whose weights add up to
    ``r_i = Var f_i - sum_n (c_n^(i))^2``, is taken as ``sqrt(r_i r_k) rho^(terms+1)``
    (exact at ``rho = 1``). The diagonal is the exact variance. Costs ``terms`` products of
    C x C matrices instead of a 2-D quadrature per pair (:func:`channel_covariance`):
    what makes wide layers (a thousand channels) affordable.
    """
    act = as_activation(activation)
    mean = mean.to(torch.float64)
    cov = covariance_matrix.to(torch.float64)
    if act.name == "identity":
        return cov.clone()
    if act.per_channel:  # per-channel slopes: the pairwise rule aligns them
        return channel_covariance(act, mean, cov)
    std, rho = standardise(cov)
    rho = rho.clamp(-1, 1)
    coefficients = hermite_coefficients(act, mean, std, terms)
    var = variance(act, mean, std)
    rest = (var - (coefficients**2).sum(-1)).clamp_min(0).sqrt()
    result = torch.outer(rest, rest)
    for n in reversed(range(terms)):  # Horner in rho, in place: two passes over C x C per term
        result.mul_(rho).addr_(coefficients[:, n], coefficients[:, n])
    result.mul_(rho)
    result = (result + result.T) / 2
    return result.diagonal_scatter(var)


#: nodes of the Gauss-Hermite rule over the log of a scale mixture's shared scale
SCALE_MIXTURE_NODES = 9


@lru_cache(maxsize=8)
def _gauss_hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights (summing to 1) of the ``n``-point rule for ``E g(x)``, ``x ~ N(0, 1)``
    (Golub-Welsch: eigenvalues of the Jacobi matrix of the probabilists' Hermite polynomials)."""
    off = torch.arange(1, n, dtype=torch.float64).sqrt()
    nodes, vectors = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    return nodes, vectors[0] ** 2


def scale_mixture(spread: float, nodes: int = SCALE_MIXTURE_NODES) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared scales ``s^2`` and weights of a log-normal scale with ``E s^2 = 1``.

    ``log s ~ N(-spread^2, spread^2)``; a Gaussian scaled by ``s`` has kurtosis
    ``3 exp(4 spread^2)``. Gauss-Hermite nodes in ``log s``: deterministic.
    """
    if spread == 0:  # one node is exact
        return torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    u, weights = _gauss_hermite(nodes)
    return torch.exp(2 * spread * u - 2 * spread**2), weights
