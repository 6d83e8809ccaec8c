"""distill.carv accounting (docs/method.md §5): ANOVA and split-half estimates of σ_b², σ_w² on synthetic nested problems
with known truth, the variance formula, K* against brute force, the ECM oracle, and the cost meters.

Statistical tests use fixed seeds and 4 standard errors estimated from the replicates."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from distill.carv import (anova, cost, count_flops, ecm, ecm_oracle, k_star, optimal_k, split_half, time_call,
                          variance)

Z = 4.0


def _nested(R: int, N: int, K: int, shape: tuple[int, ...], sb: float, sw: float, seed: int) -> torch.Tensor:
    """R replicates of y_nk = m + b_n + e_nk, b ~ N(0, sb² I), e ~ N(0, sw² I): σ_b² = D sb², σ_w² = D sw²."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g, dtype=torch.float64)
    b = sb * torch.randn(R, N, 1, *shape, generator=g, dtype=torch.float64)
    e = sw * torch.randn(R, N, K, *shape, generator=g, dtype=torch.float64)
    return m + b + e  # (R, N, K, *shape)


def _within(estimates: torch.Tensor, truth: float) -> bool:
    se = float(estimates.std()) / math.sqrt(len(estimates))
    return abs(float(estimates.mean()) - truth) <= Z * se


@pytest.mark.parametrize("N,K", [(2, 2), (8, 4), (5, 7)])
def test_anova_is_unbiased_for_sigma_b2_and_sigma_w2(N, K):
    shape, sb, sw, R = (2, 3), 0.7, 1.3, 3000
    D = math.prod(shape)
    y = _nested(R, N, K, shape, sb, sw, seed=N * 100 + K)
    est = torch.stack([torch.stack(anova(y[r])) for r in range(R)])  # (R, 2)
    assert est.dtype == torch.float64 and anova(y[0])[0].dim() == 0
    assert _within(est[:, 0], D * sb ** 2), (est[:, 0].mean(), D * sb ** 2)
    assert _within(est[:, 1], D * sw ** 2), (est[:, 1].mean(), D * sw ** 2)


def test_variance_formula_matches_the_hierarchical_estimator():
    """Var(Ĝ) = σ_b²/N + σ_w²/(NK) (trace) for Ĝ = mean over n and k of y_nk; SE of a mean of squared norms."""
    N, K, shape, sb, sw, R = 6, 5, (4,), 0.9, 2.0, 4000
    y = _nested(R, N, K, shape, sb, sw, seed=1)
    G = y.mean(dim=(1, 2))  # (R, 4)
    sq = ((G - G.mean(0)) ** 2).sum(1) * R / (R - 1)  # unbiased trace-variance contributions
    assert _within(sq, variance(4 * sb ** 2, 4 * sw ** 2, N, K))
    assert cost(N, K, 3.0, 0.5) == N * (3.0 + K * 0.5)


@pytest.mark.parametrize("as_list", [False, True])
def test_split_half_is_unbiased_on_synthetic_per_draw_gradients(as_list):
    """Per-draw parameter gradients g_nk = m + b_n + e_nk; G_iA = mean over half i of the samples and half A of the
    draws (the estimator's own normalisation)."""
    N, K, D, sb, sw, R = 8, 6, 5, 0.6, 1.5, 3000
    y = _nested(R, N, K, (D,), sb, sw, seed=2 + as_list)
    h, k = N // 2, K // 2
    G = {(i, a): y[:, i * h:(i + 1) * h, a * k:(a + 1) * k].mean(dim=(1, 2)) for i in (0, 1) for a in (0, 1)}

    def params(v):  # a flat vector as a list of two "parameter" tensors
        return [v[:2].view(2, 1), v[2:].view(3)] if as_list else v

    est = torch.stack([torch.stack(split_half(*(params(G[key][r]) for key in ((0, 0), (0, 1), (1, 0), (1, 1))),
                                              N=N, K=K)) for r in range(R)])
    assert _within(est[:, 0], D * sb ** 2), (est[:, 0].mean(), D * sb ** 2)
    assert _within(est[:, 1], D * sw ** 2), (est[:, 1].mean(), D * sw ** 2)


def test_bad_accounting_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="y:"):
        anova(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="y:"):
        anova(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="K:"):
        split_half(*[torch.zeros(3)] * 4, N=4, K=3)
    with pytest.raises(ValueError, match="G1A"):
        split_half(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(4), N=4, K=2)
    with pytest.raises(ValueError, match="k_max"):
        optimal_k(1.0, 1.0, 1.0, 1.0, k_max=0)
    with pytest.raises(ValueError, match="c_u, c_i"):
        optimal_k(1.0, 1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="sigma_b2"):
        ecm_oracle(-0.1, 1.0, 1.0, 1.0)


def _random_problems(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 10.0 ** rng.uniform([-4, -4, -2, -2], [2, 4, 2, 2], size=(n, 4))  # σ_b², σ_w², c_u, c_i


def test_optimal_k_is_the_integer_argmin_of_variance_times_cost():
    Ks = np.arange(1, 1001, dtype=np.float64)
    for sb2, sw2, cu, ci in _random_problems(500, seed=0):
        vc = (sb2 + sw2 / Ks) * (cu + Ks * ci)
        best = int(np.argmin(vc)) + 1
        got = optimal_k(sb2, sw2, cu, ci, k_max=1000)
        assert got == best or vc[got - 1] <= vc[best - 1] * (1 + 1e-12), (sb2, sw2, cu, ci, got, best)
    assert optimal_k(0.0, 1.0, 1.0, 1.0, k_max=64) == 64  # no between-sample variance: reuse as far as allowed
    assert optimal_k(-0.5, 1.0, 1.0, 1.0, k_max=64) == 64  # a noisy negative σ̂_b² too
    assert optimal_k(1.0, 0.0, 1.0, 1.0, k_max=64) == 1  # nothing within to average away
    assert optimal_k(1.0, 1e6, 1.0, 1.0, k_max=8) == 8  # clamped
    assert k_star(1.0, 4.0, 2.0, 0.5) == pytest.approx(math.sqrt(4.0 * 2.0 / 0.5))


def test_ecm_oracle_is_at_least_one_and_is_reached_at_the_continuous_k_star():
    N = 16
    for sb2, sw2, cu, ci in _random_problems(500, seed=1):
        oracle = ecm_oracle(sb2, sw2, cu, ci)
        assert oracle >= 1 - 1e-12
        base = (variance(sb2, sw2, N, 1), cost(N, 1, cu, ci))
        ks = k_star(sb2, sw2, cu, ci)
        assert ecm(*base, variance(sb2, sw2, N, ks), cost(N, ks, cu, ci)) == pytest.approx(oracle, rel=1e-9)
        k = optimal_k(sb2, sw2, cu, ci, k_max=10 ** 6)
        at_k = ecm(*base, variance(sb2, sw2, N, k), cost(N, k, cu, ci))
        assert at_k <= oracle * (1 + 1e-12)
        if ks >= 1:  # rounding K* to the better neighbour costs at most B(K − K*)²/K ≤ B/K, B = σ_b² c_i
            vc_star = (math.sqrt(sb2 * cu) + math.sqrt(sw2 * ci)) ** 2
            assert at_k >= oracle * vc_star / (vc_star + sb2 * ci / k) * (1 - 1e-12)
    assert ecm_oracle(0.0, 1.0, 1.5, 1.0) == pytest.approx(2.5)  # reuse alone is bounded by 1 + c_u/c_i


def test_count_flops_counts_a_matmul_and_its_backward():
    lin = torch.nn.Linear(10, 20)
    x = torch.randn(3, 10)
    assert count_flops(lin, x) == 2 * 3 * 10 * 20

    def forward_backward(x):
        lin(x).sum().backward()

    # forward, grad wrt weight, grad wrt input
    assert count_flops(forward_backward, x.requires_grad_(True)) == 3 * (2 * 3 * 10 * 20)
    assert count_flops(lambda: torch.relu(x)) == 0  # elementwise ops are not counted


def test_time_call_returns_the_median_seconds_per_call():
    seconds = time_call(time.sleep, 0.02, repeats=3, warmup=0)
    assert 0.02 <= seconds < 0.5
    calls = []
    time_call(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6
    with pytest.raises(ValueError, match="repeats"):
        time_call(time.sleep, 0.0, repeats=0)
