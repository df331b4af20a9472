"""Small models with known structure for the engine tests."""
import torch
import torch.nn as nn


def conv_bn_relu_conv(channels=6, out=5, activation=None, dtype=torch.float64, seed=0):
    """Conv -> BN -> activation -> Conv, float64 so exactness tests measure the method, not rounding."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        activation if activation is not None else nn.ReLU(),
        nn.Conv2d(channels, out, 3, padding=1),
    ).to(dtype)
    return model.eval()


def set_bn(bn, gamma, beta, mean, var):
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


def duplicated_filters_model(seed=0, activation=None, gamma=None, var=None):
    """Channels 3,4,5 are positive multiples of channels 0,1,2 (smaller norm, so L2 prunes them)
    with their own BN gamma and variance, and BN biases chosen so the copies are exact after ReLU."""
    model = conv_bn_relu_conv(6, activation=activation, seed=seed)
    conv, bn = model[0], model[1]
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)
    base = torch.randn(3, 3, 3, 3, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.5, 0.3, 0.7], dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([base, scale[:, None, None, None] * base]))
    gamma = 0.5 + rand(6) if gamma is None else torch.as_tensor(gamma, dtype=torch.float64)
    var = 0.2 + rand(6) if var is None else torch.as_tensor(var, dtype=torch.float64)
    mean = rand(6) - 0.5
    g = gamma / torch.sqrt(var + bn.eps)
    b_kept = rand(3) - 0.5  # BN bias (beta - g * mean) of the kept channels
    # z_j = (c g_j / g_k) z_k exactly when b_j = (c g_j / g_k) b_k
    b_pruned = scale * g[3:] / g[:3] * b_kept
    b = torch.cat([b_kept, b_pruned])
    set_bn(bn, gamma, b + g * mean, mean, var)
    return model
