"""The CARV estimator inside the DMD module: the baseline is the DMD2 path number for number, every estimator
is unbiased for the same expectation, chunking changes nothing, and the choice of K follows variance and cost."""

import pytest
import torch

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


def _replicates(m: DMDModule, x: torch.Tensor, K: int, R: int) -> torch.Tensor:
    """R independent hierarchical estimates g_bar for fixed x: (R, N*d)."""
    out = []
    N = x.shape[0]
    for r in range(R):
        rng = torch.Generator().manual_seed(1000 + r)
        t, w = m._draw_timesteps(N, K, rng)
        eps = torch.randn((N * K, *x.shape[1:]), generator=rng)
        with torch.no_grad():
            out.append(weighted_mean(m._integrand(x, None, t, eps), w).flatten())
    return torch.stack(out).double()


@pytest.mark.parametrize("K, proposal, stratify", [
    (4, "uniform", "none"), (16, "adaptive", "none"), (16, "adaptive", "per_sample"), (4, "uniform", "batch"),
])
def test_hierarchical_gradient_has_the_baseline_expectation(K, proposal, stratify):
    """On the exact mixture teacher with a fake score off the teacher (a fresh MLP), every estimator's mean over
    replicates equals the baseline's mean within 4.5 standard errors of their difference, coordinate by
    coordinate (128 coordinates: a false alarm has probability about 1e-3)."""
    base = _module()
    m = _module(f"estimator.K={K}", f"estimator.proposal={proposal}", f"estimator.stratify={stratify}",
                "estimator.adaptive_warmup=1")
    m.fake_score.load_state_dict(base.fake_score.state_dict())
    x = _x(64)
    if proposal == "adaptive":  # learn a proposal from earlier draws (not the ones it will weight)
        for r in range(3):
            rng = torch.Generator().manual_seed(50 + r)
            t, _ = m._draw_timesteps(64, K, rng)
            eps = torch.randn(64 * K, 2, generator=rng)
            with torch.no_grad():
                g = m._integrand(x, None, t, eps)
            m.sampler.record(t, g.pow(2).sum(-1))
            m.sampler.update()
        assert not torch.allclose(m.sampler.q, m.sampler.p)  # the proposal moved off p
    R = 400
    b = _replicates(base, x, 1, R)
    h = _replicates(m, x, K, R)
    diff = h.mean(0) - b.mean(0)
    se = (h.var(0) / R + b.var(0) / R).sqrt()
    z = diff / se.clamp_min(1e-12)
    assert z.abs().max() < 4.5, float(z.abs().max())
    # and the estimate is less noisy than the baseline's (K draws per sample), by a margin far beyond noise
    assert h.var(0).sum() < 0.7 * b.var(0).sum()


def test_k_controller_follows_variance_and_cost():
    c = KController(K=1, auto=True, k_max=32)
    c.observe(sigma_b2=1.0, sigma_w2=0.01)  # variance is not in the inner draws
    assert c.choose(N=64, c_u=1.0, c_i=1.0) == 1
    c = KController(K=1, auto=True, k_max=32)
    c.observe(sigma_b2=1.0, sigma_w2=100.0)  # K* = sqrt(100 * 4 / 1) = 20, reached at most doubling per choice
    assert [c.choose(N=64, c_u=4.0, c_i=1.0) for _ in range(6)] == [2, 4, 8, 16, 20, 20]
    c.observe(sigma_b2=1e6, sigma_w2=1e-6)  # the inner draws stop mattering: K comes down, halving at most
    c.sigma_b2, c.sigma_w2 = 1e6, 1e-6
    assert [c.choose(N=64, c_u=4.0, c_i=1.0) for _ in range(6)] == [10, 5, 3, 2, 1, 1]
    c = KController(K=1, auto=True, k_max=32, max_draws=640)  # memory bound: N K <= 640
    c.observe(1.0, 100.0)
    assert [c.choose(N=64, c_u=4.0, c_i=1.0) for _ in range(5)] == [2, 4, 8, 10, 10]
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
    # logged figures read as what they are: the raw estimates as measured, the smoothed ones clamped at 0, and
    # k_star inside the range K auto can choose from
    assert out["carv/sigma_w2_raw"] == out["carv/sigma_w2"] and out["carv/sigma_b2"] >= 0
    assert 1 <= out["carv/k_star"] <= m.cfg.estimator.k_max
    assert out["carv/ecm_oracle"] >= 1.0


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
