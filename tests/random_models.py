"""Small random architectures described by plain data, for the property-based tests.

A *spec* is a tuple of plain values (so Hypothesis can draw, shrink and print
it); :func:`build` turns it into a model with seeded random weights.

- ``("cnn", in_channels, size, stages, head)``: ``stages`` is a tuple of
  ``("conv", out, bn, pool, bias)`` (Conv -> optional BN -> ReLU -> optional
  max/avg pool; ``bias``: whether the conv has one) and ``("res", out, bn, stride)`` (a basic residual block whose
  shortcut is the identity when ``out`` equals its input channels and stride is
  1, a 1x1 projection otherwise) and ``("cat", out, bn)`` (two Conv -> optional BN branches
  concatenated along channels, then ReLU: ``2 * out`` channels); ``head`` is ``("gap", hidden)`` (global
  average pool) or ``("flatten", hidden)``, with ``hidden`` the width of an
  extra Linear -> ReLU layer (0 for none).
- ``("mlp", in_features, widths, bn)``: Linear -> (BN) -> ReLU layers of
  ``widths``, then a Linear classifier.
"""
from __future__ import annotations

import torch
import torch.nn as nn

NUM_CLASSES = 4


class Residual(nn.Module):
    def __init__(self, c_in, c_out, bn, stride):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not bn)
        self.bn1 = norm(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=not bn)
        self.bn2 = norm(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not bn), norm(c_out))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Concat(nn.Module):
    def __init__(self, c_in, c_out, bn):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.a, self.bn_a = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn), norm(c_out)
        self.b, self.bn_b = nn.Conv2d(c_in, c_out, 1, bias=not bn), norm(c_out)

    def forward(self, x):
        return torch.relu(torch.cat([self.bn_a(self.a(x)), self.bn_b(self.b(x))], dim=1))


def _cnn(in_channels, size, stages, head):
    layers, c, s = [], in_channels, size
    for stage in stages:
        kind, out, bn = stage[:3]
        if kind == "conv":
            pool, bias = stage[3:5]
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=bias)]
            if bn:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            if pool and s >= 2:
                layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
                s //= 2
        elif kind == "cat":
            layers.append(Concat(c, out, bn))
            out = 2 * out
        else:
            stride = stage[3] if s >= 2 else 1
            layers.append(Residual(c, out, bn, stride))
            s = (s + stride - 1) // stride
        c = out
    kind, hidden = head
    if kind == "gap":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = c
    else:
        layers.append(nn.Flatten())
        features = c * s * s
    if hidden:
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, NUM_CLASSES))
    return nn.Sequential(*layers)


def _mlp(in_features, widths, bn):
    layers, f = [], in_features
    for w in widths:
        layers.append(nn.Linear(f, w, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU())
        f = w
    layers.append(nn.Linear(f, NUM_CLASSES))
    return nn.Sequential(*layers)


#: degenerate edits :func:`build` can apply to one random channel each
DAMAGE = ("zero_gamma", "zero_var", "dead_filter", "duplicate_filter")


def _damage(model, kinds, gen):
    def pick(items):
        return items[int(torch.randint(len(items), (1,), generator=gen))]

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        for kind in kinds:
            if kind in ("zero_gamma", "zero_var"):
                if not bns:
                    continue
                bn = pick(bns)
                c = pick(range(bn.num_features))
                (bn.weight if kind == "zero_gamma" else bn.running_var)[c] = 0.0
            else:
                layer = pick(weighted)
                n = layer.weight.shape[0]
                c = pick(range(n))
                if kind == "dead_filter":
                    layer.weight[c] = 0.0
                elif n > 1:
                    layer.weight[c] = layer.weight[(c + 1) % n]


def build(spec, seed=0, dtype=torch.float32, damage=()) -> nn.Module:
    """The model of ``spec`` in eval mode, with random weights and BN statistics drawn from ``seed``.

    ``damage`` lists entries of :data:`DAMAGE`, each applied to one random channel.
    """
    torch.manual_seed(seed)
    model = _cnn(*spec[1:]) if spec[0] == "cnn" else _mlp(*spec[1:])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    _damage(model, damage, gen)
    return model.to(dtype).eval()


def example_input(spec, batch=1, seed=0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, spec[1], spec[2], spec[2]) if spec[0] == "cnn" else (batch, spec[1])
    return torch.randn(shape, generator=gen).to(dtype)
