"""The CARV estimator inside the DMD module: the baseline is the DMD2 path number for number, every estimator
is unbiased for the same expectation, chunking changes nothing, and the choice of K follows variance and cost."""

import pytest
import torch

from distill.carv.accounting import choose_k
from distill.carv.controller import KController, weighted_mean
from distill.config import FitConfig, load_config
from distill.losses import dmd_grad
from distill.module import DMDModule

GMM = "configs/gmm.yaml"


def _module(*overrides: str) -> DMDModule:
    torch.manual_seed(0)
    return DMDModule(load_config(FitConfig, GMM, list(overrides)))


def _x(N=64, seed=1):
    return torch.randn(N, 2, generator=torch.Generator().manual_seed(seed)) * 2


def test_baseline_reproduces_the_dmd2_path_exactly():
    m = _module()
    x = _x()
    N = x.shape[0]
    # what the module does (K = 1, uniform, iid)
    rng = torch.Generator().manual_seed(7)
    t, w = m._draw_timesteps(N, 1, rng)
    eps = torch.randn((N * 1, *x.shape[1:]), generator=rng)
    with torch.no_grad():
        ours = weighted_mean(m._integrand(x, None, t, eps), w)
    # the DMD2 reference: t ~ U{int(0.02 T)..int(0.98 T)}, one draw per sample
    rng = torch.Generator().manual_seed(7)
    T = m.teacher.T
    t_ref = torch.randint(int(0.02 * T), int(0.98 * T) + 1, (N,), generator=rng)
    eps_ref = torch.randn(x.shape, generator=rng)
    with torch.no_grad():
        x_t = m.teacher.schedule.add_noise(x, eps_ref, t_ref)
        ref = dmd_grad(x, m.teacher(x_t, t_ref), m.fake_score(x_t, t_ref))
    assert torch.equal(t.flatten(), t_ref)
    assert torch.equal(ours, ref)


def test_chunked_inner_calls_match_one_call():
    m = _module("estimator.K=8")
    x = _x(16)
    rng = torch.Generator().manual_seed(3)
    t, _ = m._draw_timesteps(16, 8, rng)
    eps = torch.randn(16 * 8, 2, generator=rng)
    with torch.no_grad():
        whole = m._integrand(x, None, t, eps)
        m.cfg.estimator.chunk_size = 5  # 128 draws in calls of 5 (the last one short)
        chunked = m._integrand(x, None, t, eps)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    # draw k of sample n is row n*K + k: the integrand of (x_n, t_nk, eps_nk)
    with torch.no_grad():
        x_t = m.teacher.schedule.add_noise(x[3:4], eps[3 * 8 + 5: 3 * 8 + 6], t[3, 5:6])
        direct = dmd_grad(x[3:4], m.teacher(x_t, t[3, 5:6]), m.fake_score(x_t, t[3, 5:6]))
    torch.testing.assert_close(whole[3, 5], direct[0], rtol=1e-6, atol=1e-6)


# Four generator samples, each repeated R times: every row of a batch is one independent hierarchical estimate for
# its point (the K draws of a row are the only randomness), so their spread gives the standard error directly.
POINTS = torch.tensor([[2.0, 0.5], [-1.0, 1.5], [1.0, -3.0], [0.3, -0.4]])


def _shifted_fake_score(m: DMDModule):
    """A closed-form fake score off the teacher: the exact denoiser of the same ring with radius 2.6 instead of 2.
    Its integrand is large at small t and vanishes at large t (so a proposal learnt from it is far from p) and has
    light tails (so a few thousand draws pin the mean down)."""
    from distill.teachers import GaussianMixture, GaussianMixtureDenoiser

    t = m.cfg.teacher
    return GaussianMixtureDenoiser(GaussianMixture.ring(t.gmm_modes, 1.3 * t.gmm_radius, t.gmm_std),
                                   m.teacher.schedule)


@pytest.fixture(scope="module")
def exact_dmd_gradient():
    """E_{t~p, eps}[g(x, t, eps)] at POINTS for the shifted fake score, by the sum over every index t of p's support
    (p is uniform there) of an average over M = 32 eps draws per index: (estimate (P, d), its standard error (P, d),
    the per-draw variance of the baseline's g (P, d))."""
    m = _module()
    m.fake_score = _shifted_fake_score(m)
    support = m.sampler.support
    P, Ts, M = POINTS.shape[0], support.numel(), 32
    assert torch.allclose(m.sampler.p[support], torch.full((Ts,), 1.0 / Ts, dtype=torch.float64))
    t = support.repeat(M).expand(P, -1).contiguous()  # (P, M*Ts): draw j of point i is at index support[j % Ts]
    eps = torch.randn(P * M * Ts, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        g = m._integrand(POINTS, None, t, eps).double().view(P, M, Ts, 2)
    mean = g.mean(1).mean(1)  # (1/Ts) Σ_t mean_eps g
    se = (g.var(1).sum(1) / M).sqrt() / Ts  # the per-index means are independent, each with variance Var(g|t)/M
    return mean, se, g.reshape(P, M * Ts, 2).var(1)


@pytest.mark.parametrize("stratify", ["none", "per_sample", "batch"])
def test_importance_weighted_estimate_is_unbiased_with_a_proposal_far_from_p(stratify, exact_dmd_gradient):
    """The module's hierarchical estimate (its `_draw_timesteps`, `_integrand`, and the (1/K) Σ_k ω g of the
    training step, docs/method.md §4) with an adaptive proposal q learnt from the integrand's own records, so that
    ω = p/q spans about 0.3 to 8: its mean over 256 independent rows per point equals the exact E_{t~p}[g] within 4
    standard errors of their difference, on all 8 coordinates (a false alarm has probability below 8 × 6.3e-5 =
    5e-4). Dropping ω (the mean under q, not p) is tens of standard errors off: checked on the same draws, so the
    test keeps its power. Under `batch` stratification the rows are negatively correlated, and their spread
    overstates the standard error (the bound is conservative)."""
    exact, exact_se, base_var = exact_dmd_gradient
    K, R = 16, 256
    m = _module(f"estimator.K={K}", "estimator.proposal=adaptive", f"estimator.stratify={stratify}",
                "estimator.adaptive_warmup=1", "estimator.adaptive_floor=0")
    m.fake_score = _shifted_fake_score(m)
    # learn q from earlier draws of the integrand (never the ones it will weight)
    rng = torch.Generator().manual_seed(5)
    x = POINTS.repeat_interleave(64, 0)
    t, _ = m._draw_timesteps(x.shape[0], K, rng)
    eps = torch.randn(t.numel(), 2, generator=rng)
    with torch.no_grad():
        m.sampler.record(t, m._integrand(x, None, t, eps).pow(2).sum(-1))
    m.sampler.update()
    support = m.sampler.support
    w_table = m.sampler.p[support] / m.sampler.q[support]
    assert w_table.min() < 0.5 and w_table.max() > 5  # a proposal far from p

    x = POINTS.repeat_interleave(R, 0)  # (P*R, 2): rows i*R .. i*R+R-1 estimate at point i
    N, P = x.shape[0], POINTS.shape[0]
    t, w = m._draw_timesteps(N, K, rng)
    eps = torch.randn((N * K, 2), generator=rng)
    with torch.no_grad():
        g = m._integrand(x, None, t, eps)  # (N, K, 2)
        g_bar = weighted_mean(g, w).double().view(P, R, 2)
    z = (g_bar.mean(1) - exact) / (g_bar.var(1) / R + exact_se ** 2).sqrt()
    assert z.abs().max() < 4.0, z
    unweighted = g.double().mean(1).view(P, R, 2)  # the estimate without ω: biased towards q
    z_unweighted = (unweighted.mean(1) - exact) / (unweighted.var(1) / R + exact_se ** 2).sqrt()
    assert z_unweighted.abs().max() > 15, z_unweighted
    # and the estimate is less noisy than one baseline draw (K = 1, q = p), by a margin far beyond noise
    assert g_bar.var(1).sum() < 0.5 * base_var.sum()


def _observed(c: KController, sigma_b2: float, sigma_w2: float, times: int = 2) -> KController:
    for _ in range(times):  # the same estimate twice: σ_b²'s standard error is known, and 0
        c.observe(sigma_b2, sigma_w2)
    return c


def test_k_controller_follows_variance_and_cost():
    c = _observed(KController(K=1, auto=True, k_max=32), 1.0, 0.01)  # variance is not in the inner draws
    assert c.choose(N=64, c_u=1.0, c_i=1.0) == 1
    c = _observed(KController(K=1, auto=True, k_max=32), 1.0, 100.0)  # K* = sqrt(100 * 4 / 1) = 20, at most
    assert [c.choose(N=64, c_u=4.0, c_i=1.0) for _ in range(6)] == [2, 4, 8, 16, 20, 20]  # doubling per choice
    c.sigma_b2, c.sigma_b2_sq, c.sigma_w2 = 1e6, 1e12, 1e-6  # the inner draws stop mattering: K comes down,
    assert [c.choose(N=64, c_u=4.0, c_i=1.0) for _ in range(6)] == [10, 5, 3, 2, 1, 1]  # halving at most
    c = _observed(KController(K=1, auto=True, k_max=32, max_draws=640), 1.0, 100.0)  # memory bound: N K <= 640
    assert [c.choose(N=64, c_u=4.0, c_i=1.0) for _ in range(5)] == [2, 4, 8, 10, 10]


def test_k_auto_chooses_at_the_posterior_mean_of_sigma_b2():
    # one estimate gives no standard error: K holds
    c = KController(K=1, auto=True, k_max=32)
    c.observe(sigma_b2=1.0, sigma_w2=100.0)
    assert c.sigma_b2_posterior() is None and c.choose(N=64, c_u=4.0, c_i=1.0) == 1
    # the standard error of the EMA, from the raw estimates' spread, against the EMA's spread over 4,000 repeats
    # of 12 iid estimates x ~ N(1, 0.5²): the mean of the reported SE² matches the EMA's variance
    gen = torch.Generator().manual_seed(0)
    emas, se2 = [], []
    for _ in range(4000):
        c = KController(K=1, auto=True, k_max=32)
        for x in (1.0 + 0.5 * torch.randn(12, generator=gen, dtype=torch.float64)).tolist():
            c.observe(x, 100.0)
        emas.append(c.sigma_b2)
        se2.append(c.sigma_b2_se() ** 2)
    emas, se2 = torch.tensor(emas, dtype=torch.float64), torch.tensor(se2, dtype=torch.float64)
    var = float(emas.var())  # the EMA's variance, and the standard error of that sample variance (normal: 2σ⁴/(n-1))
    assert abs(float(se2.mean()) - var) < 4 * (var * (2 / (len(emas) - 1)) ** 0.5 + float(se2.std()) / len(emas) ** 0.5)
    # the posterior mean of a normal truncated at 0, against numerical integration of its density
    for raw in [(0.05, -0.3, 0.3, -0.2, 0.1), (-3.0, -3.1, -2.9), (5.0, 5.1, 4.9), (0.4, 0.1, 0.7)]:
        c = KController(K=1, auto=True, k_max=32)
        for x in raw:
            c.observe(x, 4.0)
        m, s = c.sigma_b2, c.sigma_b2_se()
        grid = torch.linspace(0, max(m, 0) + 12 * s, 200_001, dtype=torch.float64)
        log_density = -0.5 * ((grid - m) / s) ** 2
        density = torch.exp(log_density - log_density.max())  # far below 0 the density is tiny: rescaled
        expected = torch.trapezoid(grid * density, grid) / torch.trapezoid(density, grid)
        assert c.sigma_b2_posterior() == pytest.approx(float(expected), rel=1e-5)
    # unresolved: raw σ_b² estimates around 0 (the fake score is still the teacher's copy). The EMA clamped at 0
    # would send K to k_max; the posterior mean keeps it where a σ_b² of the size the noise allows puts it
    noisy = KController(K=1, auto=True, k_max=32)
    for x in (0.05, -0.3, 0.3, -0.2, 0.1):
        noisy.observe(x, 4.0)
    assert noisy.sigma_b2 < 0.02 and noisy.sigma_b2_posterior() > 0.08
    assert choose_k(*noisy.model(), 4.0, 1.0, 32) > 30  # K* = sqrt(4 * 4 / 0.016) = 31.6 from the EMA
    assert noisy.target(N=64, c_u=4.0, c_i=1.0) == choose_k(*noisy.model(noisy.sigma_b2_posterior()), 4.0, 1.0, 32) < 16
    # resolved: the posterior mean is the EMA
    sure = KController(K=1, auto=True, k_max=32)
    for x in (5.0, 5.1, 4.9):
        sure.observe(x, 4.0)
    assert sure.sigma_b2_posterior() == sure.sigma_b2
    # and it is checkpointed: a resumed controller chooses the same
    resumed = KController(K=1, auto=True, k_max=32)
    resumed.load_state_dict(noisy.state_dict())
    assert resumed.sigma_b2_posterior() == noisy.sigma_b2_posterior()
    fixed = KController(K=4, auto=False, k_max=32)
    fixed.observe(1.0, 1e6)
    assert fixed.choose(64, 1.0, 1.0) == 4


def test_split_half_diagnostic_leaves_training_untouched_and_measures_variance():
    m = _module("estimator.diagnostic_every=1", "estimator.diagnostic_K=4")
    m.costs = m.measure_costs(8)
    x_z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    x = m.generator(x_z)
    before = [p.detach().clone() for p in m.generator.parameters()]
    out = m._split_half_diagnostic(x, None)
    assert all(p.grad is None for p in m.generator.parameters())  # autograd.grad, not .backward
    assert all(torch.equal(a, b) for a, b in zip(before, m.generator.parameters()))
    assert out["carv/sigma_w2"] > 0 and {"carv/k_star", "carv/ecm", "carv/ecm_oracle"} <= out.keys()
    # logged figures read as what they are: the raw estimates as measured, the smoothed ones clamped at 0
    assert out["carv/sigma_w2_raw"] == out["carv/sigma_w2"] and out["carv/sigma_b2"] >= 0
    sb2, sw2 = out["carv/sigma_b2"], out["carv/sigma_w2"]
    c_u, c_i = m.costs["upstream_flops"], m.costs["inner_flops"]
    # k_star's value: K* = sqrt(σ_w² c_u / (σ_b² c_i)) (docs/method.md §5), put in the range K auto chooses from
    expected = min(max((sw2 * c_u / (sb2 * c_i)) ** 0.5, 1.0), m.cfg.estimator.k_max) if sb2 > 0 else \
        float(m.cfg.estimator.k_max)
    assert out["carv/k_star"] == pytest.approx(expected, rel=1e-9)
    # the oracle ECM's value, not only its Cauchy–Schwarz bound >= 1 (docs/method.md §5)
    oracle = (sb2 + sw2) * (c_u + c_i) / ((sb2 * c_u) ** 0.5 + (sw2 * c_i) ** 0.5) ** 2
    assert out["carv/ecm_oracle"] == pytest.approx(oracle, rel=1e-9)


@pytest.mark.slow
def test_carv_state_is_checkpointed_and_resumed(tmp_path):
    from conftest import run_cli

    args = ["fit", "--config", GMM, f"run.dir={tmp_path / 'run'}", "logging.wandb=disabled",
            "logging.progress_bar=false", "logging.samples_every_steps=0", "optim.ttur=1", "estimator.K=auto",
            "estimator.proposal=adaptive", "estimator.adaptive_warmup=10", "estimator.adaptive_refresh_every=10",
            "estimator.diagnostic_every=5", "estimator.auto_every=10", "trainer.checkpoint_every_steps=30",
            "trainer.log_every_steps=10"]
    r = run_cli(*args, "trainer.max_steps=30", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["distill"]
    assert state["g_steps"] == 30 and state["sampler"]["n_updates"] == 30 and state["sampler"]["n_refreshes"] == 3
    assert state["k_control"]["n_observed"] == 6 and state["k_control"]["K"] >= 1
    assert state["costs"]["upstream_flops"] > 0 and state["costs"]["inner_flops"] > 0
    q_saved = state["sampler"]["q"]
    assert not torch.allclose(q_saved, state["sampler"]["p"])

    from distill.module import DMDModule

    m = DMDModule(load_config(FitConfig, tmp_path / "run" / "config.yaml"))
    m.on_load_checkpoint(ckpt)
    assert torch.equal(m.sampler.q, q_saved) and m.k_control.K == state["k_control"]["K"] and m.g_steps == 30

    r = run_cli(*args, "trainer.max_steps=40", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["distill"]
    assert state["g_steps"] == 40 and state["sampler"]["n_updates"] == 40 and state["sampler"]["n_refreshes"] == 4
    import csv

    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]
    assert all(r["carv/sigma_w2"] != "" for r in rows) and all(float(r["carv/K"]) >= 1 for r in rows)
