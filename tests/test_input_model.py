"""The BN-calibrated input model of LBYL (covariance.input_covariance and friends)."""
import pytest
import torch

import lbyl
from lbyl.covariance import input_covariance, nonnegative_least_squares, preactivation_covariance
from lbyl.delivery import BatchNormStats, ProducerStats, lbyl_delivery, scaled_filters

F64 = torch.float64
KEPT, PRUNED = torch.arange(0, 7), torch.arange(7, 10)


def lbyl_solution(stats, input_model, activation="identity", kept=KEPT, pruned=PRUNED):
    """LBYL's solution for one layer with lambdas 0 under ``input_model``."""
    return lbyl.LBYL(input_model=input_model).solve(stats, kept, pruned, activation)


def layer(gen, var, n=10, m=30):
    filters = torch.randn(n, m, generator=gen, dtype=F64)
    bn = BatchNormStats(
        gamma=0.5 + torch.rand(n, generator=gen, dtype=F64),
        beta=torch.randn(n, generator=gen, dtype=F64),
        mean=torch.randn(n, generator=gen, dtype=F64),
        var=var(filters),
        eps=1e-5,
    )
    return ProducerStats(filters=filters, bn=bn)


def test_nonnegative_least_squares_matches_exact_solution_when_feasible():
    gen = torch.Generator().manual_seed(1)
    matrix = torch.randn(12, 5, generator=gen, dtype=F64)
    truth = torch.tensor([0.0, 1.5, 0.0, 0.3, 2.0], dtype=F64)
    found = nonnegative_least_squares(matrix, matrix @ truth, iterations=5000)
    assert torch.allclose(found, truth, atol=1e-6)
    assert (nonnegative_least_squares(matrix, -matrix @ truth.abs()) >= 0).all()


def test_estimate_reproduces_variances_of_the_modelled_form():
    # Sigma = sigma2 I + W^T diag(alpha) W, with one filter orthogonal to the others and alpha 0 there:
    # its variance per squared norm is exactly sigma2, the smallest, so the estimate is exact
    gen = torch.Generator().manual_seed(2)
    filters = torch.randn(10, 30, generator=gen, dtype=F64)
    filters[:, 0] = 0
    filters[0] = 0
    filters[0, 0] = 1.3
    alpha = torch.rand(10, generator=gen, dtype=F64)
    alpha[0] = 0
    sigma = 0.2 * torch.eye(30, dtype=F64) + filters.T @ torch.diag(alpha) @ filters
    var = torch.einsum("im,mn,in->i", filters, sigma, filters)
    stats = ProducerStats(filters=filters, bn=BatchNormStats(torch.ones(10, dtype=F64), torch.zeros(10, dtype=F64),
                                                             torch.zeros(10, dtype=F64), var, 1e-5))
    sigma2, found = input_covariance(stats)
    estimate = sigma2 * torch.eye(30, dtype=F64) + filters.T @ torch.diag(found) @ filters
    assert sigma2 == pytest.approx(0.2)
    assert torch.allclose(torch.einsum("im,mn,in->i", filters, estimate, filters), var, rtol=1e-6)


def test_estimate_is_the_nonnegative_least_squares_optimum():
    gen = torch.Generator().manual_seed(8)
    stats = layer(gen, lambda f: 0.1 + (f**2).sum(1) * torch.rand(f.shape[0], generator=gen, dtype=F64) * 3)
    sigma2, alpha = input_covariance(stats)
    products = stats.filters @ stats.filters.T
    assert sigma2 == pytest.approx(float((stats.bn.var / products.diagonal()).min()))
    gradient = (products**2).T @ ((products**2) @ alpha - (stats.bn.var - sigma2 * products.diagonal()))
    scale = float(gradient.abs().max()) + float(stats.bn.var.max())
    assert (alpha >= 0).all()
    assert (gradient[alpha > 0].abs() < 1e-4 * scale).all()  # KKT: stationary where alpha > 0
    assert (gradient[alpha == 0] > -1e-4 * scale).all()  # and no descent direction where alpha = 0


def test_bn_metric_equals_the_dense_metric():
    gen = torch.Generator().manual_seed(3)
    stats = layer(gen, lambda f: 0.1 + (f**2).sum(1) * torch.rand(f.shape[0], generator=gen, dtype=F64))
    sigma2, alpha = input_covariance(stats)
    dense = sigma2 * torch.eye(stats.filters.shape[1], dtype=F64) + stats.filters.T @ torch.diag(alpha) @ stats.filters
    w, _ = scaled_filters(stats)
    covariance = preactivation_covariance(stats, "bn")  # LBYL's metric for input_model="bn", sliced
    gram, cross = covariance[KEPT][:, KEPT], covariance[KEPT][:, PRUNED]
    assert torch.allclose(gram, w[KEPT] @ dense @ w[KEPT].T)
    assert torch.allclose(cross, w[KEPT] @ dense @ w[PRUNED].T)


def test_white_inputs_give_the_paper_solution():
    # variances proportional to the squared filter norms: the data look white, nothing changes
    gen = torch.Generator().manual_seed(4)
    stats = layer(gen, lambda f: 0.7 * (f**2).sum(1))
    white = lbyl_solution(stats, "white").delivery
    calibrated = lbyl_solution(stats, "bn")
    assert calibrated.space == "bn"
    assert torch.allclose(white, calibrated.delivery, atol=1e-8)
    assert torch.equal(white, lbyl_delivery(stats, KEPT, PRUNED))  # the pure function's white metric


def test_bn_model_minimises_the_error_under_the_estimated_covariance():
    gen = torch.Generator().manual_seed(5)
    stats = layer(gen, lambda f: 0.1 + (f**2).sum(1) * torch.rand(f.shape[0], generator=gen, dtype=F64) * 3)
    sigma2, alpha = input_covariance(stats)
    dense = sigma2 * torch.eye(stats.filters.shape[1], dtype=F64) + stats.filters.T @ torch.diag(alpha) @ stats.filters
    w, _ = scaled_filters(stats)

    def error(delivery):
        residual = w[PRUNED] - delivery.T @ w[KEPT]
        return torch.einsum("pm,mn,pn->", residual, dense, residual)

    solution = lbyl_solution(stats, "bn")
    calibrated, white = solution.delivery, lbyl_solution(stats, "white").delivery
    assert solution.space == "bn"
    # the pure function with the input model's covariance as its metric is the method's solve
    pure = lbyl_delivery(stats, KEPT, PRUNED, covariance=preactivation_covariance(stats, "bn"))
    torch.testing.assert_close(pure, calibrated, rtol=1e-12, atol=1e-12)
    assert error(calibrated) < error(white)
    for _ in range(5):  # and no perturbation does better
        assert error(calibrated) <= error(calibrated + 1e-3 * torch.randn(calibrated.shape, generator=gen, dtype=F64))


def test_without_batchnorm_the_bn_model_falls_back_to_white():
    gen = torch.Generator().manual_seed(6)
    stats = ProducerStats(filters=torch.randn(10, 30, generator=gen, dtype=F64), bias=torch.randn(10, generator=gen, dtype=F64))
    assert input_covariance(stats) is None
    a, b = lbyl_solution(stats, "bn"), lbyl_solution(stats, "white")
    assert a.space == b.space == "white"
    assert torch.equal(a.delivery, b.delivery)
    assert all(torch.equal(a.loss[k], b.loss[k]) for k in ("re", "be", "ae"))
    assert torch.equal(preactivation_covariance(stats, "bn"), preactivation_covariance(stats, "white"))


def test_unknown_input_model_is_refused():
    gen = torch.Generator().manual_seed(7)
    stats = layer(gen, lambda f: (f**2).sum(1))
    with pytest.raises(ValueError, match="input_model"):
        lbyl.LBYL(input_model="pink")
    with pytest.raises(ValueError, match="input_model"):
        preactivation_covariance(stats, "pink")


def test_restore_takes_the_input_model_and_records_it():
    import lbyl
    from lbyl.models.registry import build_model, example_input

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    x = example_input("resnet20")
    white, report_white = lbyl.restore(model, x, 0.5, lbyl.LBYL(input_model="white"))
    bn, report_bn = lbyl.restore(model, x, 0.5, lbyl.LBYL(input_model="bn"))
    assert report_white.settings["input_model"] == "white" and report_bn.settings["input_model"] == "bn"
    assert report_bn.params_after == report_white.params_after
    with torch.no_grad():
        assert not torch.allclose(white(x), bn(x))
    with pytest.raises(ValueError, match="input_model"):
        lbyl.restore(model, x, 0.5, lbyl.LBYL(input_model="pink"))


def test_a_dead_channel_keeps_the_solve_finite():
    # running_var 0 (a channel that never fires) forces sigma2 = 0: the metric may lose rank,
    # the delivery must stay finite and still rebuild what the kept filters can rebuild
    gen = torch.Generator().manual_seed(11)
    stats = layer(gen, lambda f: 0.1 + (f**2).sum(1) * torch.rand(f.shape[0], generator=gen, dtype=F64))
    var = stats.bn.var.clone()
    var[2] = 0.0
    dead = ProducerStats(filters=stats.filters, bn=BatchNormStats(stats.bn.gamma, stats.bn.beta, stats.bn.mean, var, 1e-5))
    sigma2, alpha = input_covariance(dead)
    assert sigma2 == 0.0 and (alpha >= 0).all()
    solution = lbyl_solution(dead, "bn", activation="relu")
    assert torch.isfinite(solution.delivery).all()
    assert all(torch.isfinite(v).all() for v in solution.loss.values())


def test_nonnegative_least_squares_is_unchanged_by_the_thread_count():
    gen = torch.Generator().manual_seed(12)
    matrix = torch.rand(40, 40, generator=gen, dtype=F64)
    target = torch.rand(40, generator=gen, dtype=F64)
    threads = torch.get_num_threads()
    found = nonnegative_least_squares(matrix, target)
    assert torch.get_num_threads() == threads  # library code leaves the global thread count alone
    torch.set_num_threads(1)
    try:
        assert torch.allclose(nonnegative_least_squares(matrix, target), found, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_restore_with_the_bn_input_model_leaves_the_thread_count_alone(monkeypatch):
    """Library code never changes the process-wide torch thread count (not even for its small CPU loops)."""
    from lbyl.models.registry import build_model, example_input

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not 1, so that a library that forced one thread would show
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    try:
        _, report = lbyl.restore(model, example_input("resnet20"), 0.5, lbyl.LBYL(input_model="bn"))
        assert torch.get_num_threads() == 3
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)
    assert calls == []
    assert {r.solve for r in report.layers} >= {"bn"}  # the covariance path (its NNLS loop) really ran
