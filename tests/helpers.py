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


def measure_batchnorms(model, batches):
    """BatchNorm running statistics measured on ``batches`` (what training leaves behind): reset, then
    a cumulative average over the batches in train mode; the model is returned in eval mode."""
    for bn in model.modules():
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            bn.reset_running_stats()
            bn.momentum = None
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model.eval()


def set_bn(bn, gamma, beta, mean, var):
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)


def duplicated_filters_model(seed=0, activation=None, gamma=None):
    """Channels 3,4,5 are positive multiples c*w of channels 0,1,2 (smaller norm, so L2 prunes them)
    with their own BN gamma; running statistics are those the copies would really have
    (mean c*mu, variance c^2 (var + eps) - eps) and beta makes the copies exact after ReLU."""
    model = conv_bn_relu_conv(6, activation=activation, seed=seed)
    conv, bn = model[0], model[1]
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)
    base = torch.randn(3, 3, 3, 3, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.5, 0.3, 0.7], dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([base, scale[:, None, None, None] * base]))
    gamma = 0.5 + rand(6) if gamma is None else torch.as_tensor(gamma, dtype=torch.float64)
    var_kept, mean_kept, beta_kept = 0.2 + rand(3), rand(3) - 0.5, rand(3) - 0.5
    var = torch.cat([var_kept, scale**2 * (var_kept + bn.eps) - bn.eps])
    mean = torch.cat([mean_kept, scale * mean_kept])
    g = gamma / torch.sqrt(var + bn.eps)
    # z_j = S z_k with S = c g_j / g_k; beta_j = S beta_k keeps the BN biases consistent
    beta = torch.cat([beta_kept, scale * g[3:] / g[:3] * beta_kept])
    set_bn(bn, gamma, beta, mean, var)
    return model
