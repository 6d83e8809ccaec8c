"""K auto models the estimator in use (docs/method.md §5, "Stratified draws" and "Multi-step students"): the
within-sample variance of stratified draws, measured as they are drawn, falls faster than iid draws' σ_w²/K, and a
multi-step student's spread over its steps counts beside σ_b². Statistical checks take their tolerance from the
standard error of the repeated estimate."""

import math

import pytest
import torch

from distill.carv import TimestepSampler, dmd_timestep_p, optimal_k
from distill.carv.accounting import choose_k, within_model, within_variance
from distill.carv.controller import KController
from distill.carv.diagnostics import split_half_estimate, stratified_within_estimate
from distill.config import FitConfig, load_config
from distill.losses import dmd_loss
from distill.module import DMDModule

GMM = "configs/gmm.yaml"
T = 1000


def test_the_within_model_goes_through_its_two_measurements_and_clamps():
    a, b, K_s = 3.0, 5.0, 4
    got = within_model(a + b, K_s * within_variance(a, b, K_s), K_s)  # v(1) = a + b, σ_w,strat² = K_s v(K_s)
    assert got == pytest.approx((a, b), rel=1e-12)
    assert within_model(8.0, None, None) == (8.0, 0.0)  # iid draws: v(K) = σ_w²/K
    assert within_model(8.0, 20.0, 4) == (8.0, 0.0)  # "stratified" noisier than iid: read as iid, not worse
    assert within_model(8.0, 0.0, 4) == (0.0, 8.0)  # faster than 1/K³: all of it is the stratified part
    assert within_model(8.0, math.nan, 4) == (8.0, 0.0)


def test_choose_k_is_the_integer_argmin_and_optimal_k_for_iid_draws():
    for sb2, a, b, cu, ci in [(1.0, 50.0, 0.0, 3.0, 1.0), (0.5, 2.0, 40.0, 5.0, 1.0), (2.0, 1.0, 100.0, 1.0, 1.0),
                              (0.0, 1.0, 1.0, 1.0, 1.0), (1.0, 0.0, 0.0, 1.0, 1.0)]:
        brute = min(range(1, 65), key=lambda K: ((sb2 + a / K + b / K**3) * (cu + K * ci), K))
        assert choose_k(sb2, a, b, cu, ci, k_max=64) == brute
    assert choose_k(1.0, 50.0, 0.0, 3.0, 1.0, k_max=64) == optimal_k(1.0, 50.0, 3.0, 1.0, k_max=64)
    # stratification removes the t part faster than 1/K: fewer draws reach the same variance, and an iid model
    # of the same per-draw variance over-spends (here 12 draws where 3 do)
    assert choose_k(0.2, 1.0, 30.0, 4.0, 1.0, k_max=64) < optimal_k(0.2, 31.0, 4.0, 1.0, k_max=64)


def _exact_v(sampler: TimestepSampler, K: int, c: float, J: int = 4000) -> float:
    """v_x(K) of g = t/T + c ε under per-sample strata on the discrete support: (1/K²) Σ_k Var(t/T | stratum k)
    + c²/K, each stratum's law from a fine grid of u (the stratified inverse CDF, t = F⁻¹(u))."""
    support = sampler.support
    cdf = torch.arange(1, support.numel() + 1, dtype=torch.float64) / support.numel()  # q = p, uniform
    total = 0.0
    for k in range(K):
        u = (k + (torch.arange(J, dtype=torch.float64) + 0.5) / J) / K
        t = support[torch.searchsorted(cdf, u, right=True).clamp(max=support.numel() - 1)].double() / T
        total += float(t.var(unbiased=False))
    return total / K**2 + c**2 / K


@pytest.mark.parametrize("stratify", ["per_sample", "none"])
def test_the_stratified_within_estimate_is_unbiased_for_the_draws_in_use(stratify):
    # x is the parameter itself (one coordinate per sample), so the parameter-space figure is the x-space one:
    # E[σ̂_w,strat²(K_s)] = K_s v_x(K_s), exactly computable for g = t/T + c ε
    sampler = TimestepSampler(dmd_timestep_p(T, 0.02, 0.98), stratify=stratify)
    N, K_s, c, B = 256, 4, 0.05, 40
    x = torch.zeros(N, 1, requires_grad=True)

    def integrand(x_, t, eps):
        return (t.double() / T).float()[..., None] + c * eps.view(*t.shape, 1)

    est = torch.tensor([stratified_within_estimate(x, [x], integrand, dmd_loss, sampler, K_s,
                                                   torch.Generator().manual_seed(s)) for s in range(B)])
    se = float(est.std() / B**0.5)
    iid = _exact_v(sampler, 1, c)  # one draw: K_s v(K_s) for iid draws
    expected = K_s * _exact_v(sampler, K_s, c) if stratify == "per_sample" else iid
    assert abs(float(est.mean()) - expected) < 4 * se, (float(est.mean()), expected, se)
    if stratify == "per_sample":  # and far below iid: the t part falls by ~1/K_s² = 1/16
        assert float(est.mean()) + 4 * se < 0.25 * iid


def test_the_controller_counts_strata_and_the_spread_over_student_steps():
    c = KController(K=1, auto=True, k_max=64, strat_K=4)
    c.observe(sigma_b2=0.2, sigma_w2=31.0)
    iid = c.target(N=64, c_u=4.0, c_i=1.0)
    c.sigma_w2_strat = 4 * within_variance(1.0, 30.0, 4)  # as measured at K_s = 4 by stratified draws
    assert c.model() == pytest.approx((0.2, 1.0, 30.0))
    strat = c.target(N=64, c_u=4.0, c_i=1.0)
    assert strat == choose_k(0.2, 1.0, 30.0, 4.0, 1.0, 64) < iid
    c.sigma_b2_steps = 50.0  # every sample of a step shares k: that spread is not averaged by more draws
    assert c.model()[0] == pytest.approx(50.2)
    assert c.target(N=64, c_u=4.0, c_i=1.0) == choose_k(50.2, 1.0, 30.0, 4.0, 1.0, 64) < strat
    # a checkpoint written before these were measured loads as iid, one-step
    c.load_state_dict({"K": 3, "sigma_b2": 1.0, "sigma_w2": 2.0, "n_observed": 5})
    assert c.sigma_w2_strat is None and c.sigma_b2_steps is None and c.K == 3


def _module(*overrides: str) -> DMDModule:
    torch.manual_seed(0)
    return DMDModule(load_config(FitConfig, GMM, ["estimator.diagnostic_every=1", *overrides]))


def test_the_diagnostic_measures_what_the_sampler_and_the_student_do():
    m = _module("estimator.stratify=per_sample")
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    out = m._split_half_diagnostic(m.generator(z), None)
    assert out["carv/sigma_w2_strat_raw"] > 0 and "carv/sigma_b2_steps_raw" not in out
    assert m.k_control.sigma_w2_strat == out["carv/sigma_w2_strat_raw"] and m.k_control.strat_K == 4
    out = _module()._split_half_diagnostic(m.generator(z), None)  # iid draws: nothing more to measure
    assert "carv/sigma_w2_strat_raw" not in out and "carv/sigma_b2_steps_raw" not in out


def test_the_across_step_term_estimates_the_spread_of_the_mean_gradient_over_student_steps():
    # The module's diagnostic on a student whose steps are known: x_n = θ + z_n with z_n ~ N(δ_k, I) at step k
    # (two steps, δ_0 = 0, δ_1 = δ) and integrand g = x + c ε, so the mean gradient over θ (D coordinates) is
    # (θ + δ_k)/D: V_k = |δ|²/(4 D²), σ_b² = 1/D. The diagnostic's N V_k (halves at independent steps, minus the
    # same-step σ_b², doubled) must match N V_k within its standard error over repeats.
    m = _module("generator.timesteps=[600,300]")
    N, D, c = 64, 4, 0.5
    theta = torch.zeros(D, requires_grad=True)
    delta = torch.tensor([1.0, -0.5, 0.5, 0.0]) * 2
    integrand = lambda x, t, eps: x.repeat_interleave(t.shape[1], 0).view(*t.shape, D) + c * eps.view(*t.shape, D)  # noqa: E731
    m.split_half_estimate = lambda x, cond, sampler, Kd, rng: split_half_estimate(  # noqa: E731
        x, [theta], integrand, dmd_loss, sampler, Kd, rng)

    def at_step(k: int, gen: torch.Generator) -> torch.Tensor:
        return theta + torch.randn(N, D, generator=gen) + k * delta

    est = []
    for r in range(300):
        gen = torch.Generator().manual_seed(r)
        k = int(torch.randint(0, 2, (1,), generator=gen))
        other = lambda g: at_step(int(torch.randint(0, 2, (1,), generator=g)), g)  # noqa: E731
        m.step = r
        est.append(m._split_half_diagnostic(at_step(k, gen), None, other)["carv/sigma_b2_steps_raw"])
    est = torch.tensor(est, dtype=torch.float64)
    se = float(est.std() / len(est) ** 0.5)
    truth = N * float(delta.square().sum()) / (4 * D**2)
    assert truth > 8 * se  # the measurement resolves the spread
    assert abs(float(est.mean()) - truth) < 4 * se, (float(est.mean()), truth, se)
