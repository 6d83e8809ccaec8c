"""CARV on the fake-score update (docs/method.md §9, "The fake score's loss"): K draws per sample from a proposal
q, weighted by p/q, estimate DMD2's denoising loss without bias; the default is DMD2's draw; the proposal's state
is checkpointed and a resumed run ends where an uninterrupted one does. fake_score.K auto measures the denoising
gradient's variance split without bias (tolerance from the standard error of the repeated estimate), chooses K from
it, and resumes its state."""

import csv
import math

import pytest
import torch

from distill.carv import TimestepSampler, dmd_timestep_p
from distill.carv.diagnostics import draw_loss_variance_estimate
from distill.config import ConfigError, FitConfig, load_config
from distill.losses import denoising_loss
from distill.module import DMDModule

GMM = "configs/gmm.yaml"


def _module(*overrides: str) -> DMDModule:
    torch.manual_seed(0)
    return DMDModule(load_config(FitConfig, GMM, list(overrides)))


def test_the_default_is_dmd2s_one_uniform_draw():
    assert _module().fake_sampler is None  # the training step keeps DMD2's randint(0, T) path
    assert _module("fake_score.K=2").fake_sampler is not None
    assert _module("fake_score.K=auto").fake_k.auto
    for bad in ("fake_score.K=0", "fake_score.K=many", "fake_score.proposal=learned", "fake_score.stratify=global"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            _module(bad)


class _SkewedInT(torch.nn.Module):
    """The fake score with its prediction scaled by 1 + 4 t/T: its loss grows steeply with t."""

    def __init__(self, base, T: int):
        super().__init__()
        self.base, self.T = base, T

    def forward(self, x_t, t, cond=None):
        return self.base(x_t, t, cond) * (1 + 4 * t.float() / self.T)[:, None] + 3 * (t.float() / self.T)[:, None]

    def loss_weight(self, t, x0):
        return self.base.loss_weight(t, x0)


@torch.no_grad()
def test_weighted_stratified_draws_estimate_dmd2s_loss_without_bias():
    m = _module("fake_score.K=4", "fake_score.stratify=per_sample")
    T = m.teacher.T
    m.fake_score = _SkewedInT(m.fake_score, T)  # a loss that grows with t: a proposal that favours large t matters
    q = torch.linspace(1.0, 6.0, T, dtype=torch.float64) ** 2  # far from p = 1/T: the weights carry the correction
    m.fake_sampler._set_q(q / q.sum())
    x0 = torch.randn(128, 2, generator=torch.Generator().manual_seed(0)) * 2
    est = torch.tensor([float(m._fake_score_loss(x0, None, torch.Generator().manual_seed(s))[0]) for s in range(200)])
    # DMD2's loss at these x0: every t of [0, T) (p uniform), 8 noise draws each
    gen = torch.Generator().manual_seed(1)
    per_t = []
    for t0 in range(0, T, 50):
        t = torch.arange(t0, min(t0 + 50, T)).repeat_interleave(x0.shape[0] * 8)
        x = x0.repeat(50 * 8, 1)[: t.numel()]
        x_t = m.teacher.schedule.add_noise(x, torch.randn(x.shape, generator=gen), t)
        per_t.append(denoising_loss(m.fake_score(x_t, t), x, m.fake_score.loss_weight(t, x)))
    exact = torch.cat(per_t)
    se = (est.var() / est.numel() + exact.var() / exact.numel()) ** 0.5
    assert abs(float(est.mean() - exact.mean())) < 4 * float(se), (float(est.mean()), float(exact.mean()), float(se))
    # the weights span a factor of 30 here: without them the estimate is biased (the mutant `fake-unweighted`)
    t, w = m.fake_sampler.sample(4096, 1, generator=gen)
    assert float(w.max() / w.min()) > 10


@pytest.mark.slow
@pytest.mark.parametrize("K", ["3", "auto"])
def test_an_adaptive_fake_proposal_is_checkpointed_and_a_resumed_run_ends_bit_identical(tmp_path, K):
    from conftest import run_cli

    # K auto: diagnosed and re-chosen every second step, so choices fall on both sides of the stop at step 12
    auto = ["estimator.diagnostic_every=2", "estimator.auto_every=2", "optim.ttur=1"] if K == "auto" else []
    common = ["fit", "--config", GMM, "logging.wandb=disabled", "logging.progress_bar=false", *auto,
              "logging.samples_every_steps=0", f"fake_score.K={K}", "fake_score.proposal=adaptive",
              "fake_score.stratify=per_sample", "estimator.adaptive_warmup=4", "estimator.adaptive_refresh_every=4",
              "trainer.checkpoint_every_steps=12", "trainer.log_every_steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = run_cli(*common, f"run.dir={straight}", "trainer.max_steps=24", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for steps in (12, 24):  # stopped at step 12 (a checkpoint), then resumed
        r = run_cli(*common, f"run.dir={resumed}", f"trainer.max_steps={steps}", timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for d in (straight, resumed))
    fake = a["distill"]["fake_sampler"]
    assert fake["n_updates"] == 24 and fake["n_refreshes"] >= 4  # one update per fake-score step
    assert not torch.allclose(fake["q"], fake["p"])  # the proposal moved off p
    other = b["distill"]["fake_sampler"]
    for k, v in fake.items():
        assert torch.equal(v, other[k]) if isinstance(v, torch.Tensor) else v == other[k], k
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    if K == "auto":  # the controller's figures and choice resumed, and it moved
        assert a["distill"]["fake_k"] == b["distill"]["fake_k"]
        assert a["distill"]["fake_k"]["n_observed"] == 12 and a["distill"]["fake_k"]["K"] > 1


T = 1000


def _stratum_variance(sampler: TimestepSampler, K: int, J: int = 4000) -> float:
    """(1/K²) Σ_k Var(t/T | stratum k) under per-sample strata of a uniform q (the stratified inverse CDF on a fine
    grid of u), the t part of v(K) for g = x + t/T + c ε."""
    support = sampler.support
    cdf = torch.arange(1, support.numel() + 1, dtype=torch.float64) / support.numel()
    total = 0.0
    for k in range(K):
        u = (k + (torch.arange(J, dtype=torch.float64) + 0.5) / J) / K
        t = support[torch.searchsorted(cdf, u, right=True).clamp(max=support.numel() - 1)].double() / T
        total += float(t.var(unbiased=False))
    return total / K**2


@pytest.mark.parametrize("case", ["iid-uniform", "iid-skewed", "strata-uniform"])
def test_the_denoising_variance_split_is_unbiased(case):
    # a loss whose per-draw gradient is w (x_n + t/T + c ε) for one shared parameter, x_n ~ N(0, s²) fresh each
    # repeat: σ_b² = s², σ_w² = s² Var_q(w) + Var_q(w t/T) + c² E_q[w²], and for strata of a uniform q
    # σ_w,strat²(K_s) = K_s [(1/K_s²) Σ_k Var(t/T | stratum k) + c²/K_s]
    p = dmd_timestep_p(T, 0.02, 0.98)
    q = None
    if case == "iid-skewed":  # q ∝ 1 + 2 t/T on p's support: weights from 0.6 to 1.7 (milder weights keep the
        # estimate's tails light enough for B = 300; at q ∝ (1 + 3 t/T)², weights to 6, 8,000 repeats agree too)
        q = torch.where(p > 0, 1 + 2 * torch.arange(T, dtype=torch.float64) / T, 0.0)
        q = q / q.sum()
    sampler = TimestepSampler(p, proposal="uniform" if q is None else q,
                              stratify="per_sample" if case.startswith("strata") else "none")
    N, K_s, s, c, B = 64, 4, 0.5, 0.3, 300
    theta = torch.zeros(1, requires_grad=True)
    est = []
    for r in range(B):
        gen = torch.Generator().manual_seed(r)
        x = s * torch.randn(N, 1, generator=gen)

        def losses(t, w, g):
            eps = torch.randn(t.shape, generator=g)
            return theta * w.float() * (x + t.float() / T + c * eps)

        est.append(draw_loss_variance_estimate(losses, [theta], N, sampler, K_s, gen))
    est = torch.tensor(est, dtype=torch.float64)  # (B, 3)
    support = sampler.support
    qs = sampler.q[support]
    w = p[support] / qs
    tt = support.double() / T
    var_q = lambda f: float((qs * f**2).sum() - (qs * f).sum() ** 2)  # noqa: E731
    expected = [s**2, s**2 * var_q(w) + var_q(w * tt) + c**2 * float((qs * w**2).sum())]
    for j, want in enumerate(expected):
        m, se = float(est[:, j].mean()), float(est[:, j].std() / B**0.5)
        assert abs(m - want) < 4 * se, (j, m, want, se)
    if case.startswith("strata"):
        want = K_s * (_stratum_variance(sampler, K_s) + c**2 / K_s)
        m, se = float(est[:, 2].mean()), float(est[:, 2].std() / B**0.5)
        assert abs(m - want) < 4 * se, (m, want, se)
        assert m + 4 * se < expected[1]  # stratification removes most of the t part
    else:
        assert torch.isnan(est[:, 2]).all()  # iid draws: nothing beyond σ_w² to model


def test_fake_k_auto_measures_chooses_and_logs(tmp_path):
    # a real fit: every generator update diagnoses the denoising gradient, every second one re-chooses K; the
    # K a step uses is the controller's choice (moved at most 2x per choice toward its target, logged as k_star)
    from conftest import run_cli

    run = tmp_path / "run"
    r = run_cli("fit", "--config", GMM, f"run.dir={run}", "logging.wandb=disabled", "logging.progress_bar=false",
                "logging.samples_every_steps=0", "fake_score.K=auto", "optim.ttur=1", "estimator.diagnostic_every=1",
                "estimator.auto_every=2", "trainer.max_steps=40", "trainer.log_every_steps=1", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    figures = ("carv_fake/sigma_b2", "carv_fake/sigma_w2", "carv_fake/k_star", "carv_fake/ecm",
               "carv_fake/ttur_equivalent", "carv_fake/compute_share")
    assert all(rows[-1][k] not in ("", None) and math.isfinite(float(rows[-1][k])) for k in figures)
    K = [float(r["carv_fake/K"]) for r in rows]
    star = [float(r["carv_fake/k_star"]) for r in rows]
    assert max(K) > 1  # the mixture's denoising gradient varies mostly within samples: K moved off 1
    for i in range(2, len(rows)):
        # a row's step counts updates done: a choice is made when that count is even, before the step's fake-score
        # update (which uses it) and from the figures logged one row earlier (its diagnostic comes after the choice)
        if int(float(rows[i]["step"])) % 2 == 0:
            prev = K[i - 1]
            want = min(max(star[i - 1], math.ceil(prev / 2)), 2 * prev)
            assert K[i] == want, (rows[i]["step"], K[i], want, prev, star[i - 1])
