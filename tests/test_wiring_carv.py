"""The CARV estimator wired into the DMD module: what one training step applies and logs, recomputed by hand.

Each test watches the module's own step (its generator, `_draw_timesteps` and `_integrand` are wrapped to keep
what they were given and returned; nothing else changes) and recomputes the result from those draws with the
formulas of docs/method.md written out here: the generator gradient J^T (1/K) Σ_k ω g / numel (§3, §4), the
split-half σ_b², σ_w² from per-draw parameter gradients, one autograd call per draw (§5), the x-space ANOVA (§5),
K* and the ECM figures (§5), the variance callback's equal-compute comparison, and the choice of K by K auto under
either cost measure. A short fit then runs the whole estimator through a real Lightning Trainer.

The training step runs here without a Trainer: `_detach` hands the module its own optimisers, a plain backward and
known costs, and collects what the step gives to the loggers (`accumulate`)."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch

from conftest import REPO
from distill.config import FitConfig, load_config
from distill.module import DMDModule

GMM = str(REPO / "configs" / "gmm.yaml")
QUIET = ["logging.progress_bar=false", "logging.proposal_plot_every_steps=0", "eval.fid_every_steps=0",
         "logging.wandb=disabled", "logging.samples_every_steps=0"]
# c_u / c_i = 4 under FLOPs and 1/4 under wall time: a figure computed with the wrong pair is off by a factor
COSTS = {"upstream_flops": 8.0, "inner_flops": 2.0, "upstream_seconds": 2.0, "inner_seconds": 8.0}


def _module(*overrides: str) -> DMDModule:
    torch.manual_seed(0)
    return DMDModule(load_config(FitConfig, GMM, ["optim.ttur=1", "optim.grad_clip=0", *overrides]))


def _detach(m: DMDModule, costs: dict[str, float]) -> list[dict]:
    """Let `m.training_step` run without a Trainer; returns the list that receives every accumulated metrics dict."""
    optimizers = m.configure_optimizers()
    m.optimizers = lambda: optimizers
    m.manual_backward = lambda loss: loss.backward()
    m.costs = dict(costs)
    logged: list[dict] = []
    m.accumulate = lambda metrics: logged.append(dict(metrics))
    return logged


def _spy(m: DMDModule) -> dict[str, list]:
    """Wrap m's generator, `_draw_timesteps` and `_integrand` so that every call's inputs and outputs are kept."""
    seen: dict[str, list] = {"z": [], "draws": [], "integrand": []}
    forward, draw, integrand = m.generator.forward, m._draw_timesteps, m._integrand

    def forward_spy(z, labels=None, **kw):
        seen["z"].append(z.detach().clone())
        return forward(z, labels, **kw)

    def draw_spy(N, K, rng):
        t, w = draw(N, K, rng)
        seen["draws"].append((t, w))
        return t, w

    def integrand_spy(x, labels, t, eps):
        g = integrand(x, labels, t, eps)
        seen["integrand"].append((x.detach().clone(), t, eps, g))
        return g

    m.generator.forward, m._draw_timesteps, m._integrand = forward_spy, draw_spy, integrand_spy
    return seen


def _step(m: DMDModule, logged: list[dict]) -> dict:
    """One training step; what it logged, merged."""
    n = len(logged)
    m.training_step(None, 0)
    out: dict = {}
    for d in logged[n:]:
        out.update({k: float(v) for k, v in d.items()})
    return out


def _skew_proposal(m: DMDModule) -> None:
    """Give the adaptive proposal a second-moment table that falls 1000-fold over the support (through the
    sampler's public record/update), so that ω = p/q is far from 1 (needs adaptive_warmup = 1)."""
    s = m.sampler
    t = s.support
    s.record(t, torch.exp(-7.0 * (t - s.lo) / (s.hi - s.lo)).double())
    s.update()
    assert not torch.allclose(s.q, s.p)


def _copy(generator: torch.nn.Module) -> torch.nn.Module:
    """A copy of the generator as it is now, without the spy (which would run the original's weights)."""
    c = copy.deepcopy(generator)
    c.__dict__.pop("forward", None)
    return c


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).double()


def _split_half_by_hand(generator, z: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """σ̂_b², σ̂_w² of docs/method.md §5 from per-draw parameter gradients, one autograd call per draw:
    h_nk = J_θG(z_n)^T y_nk / d (the gradient of draw k of sample n, y = ω g), the four half-batch gradients
    G_iA = mean over n in half i and k in half A of h_nk, then
        σ̂_w² = (N K / 8) · ½ Σ_i ‖G_iA − G_iB‖²        σ̂_b² = (N / 4) · ‖Ĝ_1 − Ĝ_2‖² − σ̂_w² / K."""
    x = generator(z)
    N, K = y.shape[:2]
    d = x[0].numel()
    params = list(generator.parameters())
    h = torch.stack([torch.stack([_flat(torch.autograd.grad((x[n] * y[n, k]).sum() / d, params,
                                                            retain_graph=True)) for k in range(K)])
                     for n in range(N)])  # (N, K, P)
    samples, draws = (slice(0, N // 2), slice(N // 2, N)), (slice(0, K // 2), slice(K // 2, K))
    (g1a, g1b), (g2a, g2b) = [[h[i][:, a].mean((0, 1)) for a in draws] for i in samples]
    sigma_w2 = N * K / 8 * 0.5 * (float((g1a - g1b).square().sum()) + float((g2a - g2b).square().sum()))
    sigma_b2 = N / 4 * float(((g1a + g1b) / 2 - (g2a + g2b) / 2).square().sum()) - sigma_w2 / K
    return sigma_b2, sigma_w2


def _anova_by_hand(y: torch.Tensor) -> tuple[float, float]:
    """One-way ANOVA over the K draws of each sample (docs/method.md §5): s_w² = ΣΣ‖y_nk − ȳ_n‖² / (N(K−1)),
    s_m² = Σ‖ȳ_n − ȳ‖² / (N−1), σ̂_b² = s_m² − s_w²/K."""
    y = y.double().flatten(2)
    N, K = y.shape[:2]
    y_n = y.mean(1)
    s_w2 = float((y - y_n[:, None]).square().sum()) / (N * (K - 1))
    s_m2 = float((y_n - y_n.mean(0)).square().sum()) / (N - 1)
    return s_m2 - s_w2 / K, s_w2


def _weights(p: torch.Tensor, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (p / q)[t].float()  # ω(t) = p(t)/q(t) (docs/method.md §6)


def _k_star(sb2: float, sw2: float, c_u: float, c_i: float, k_max: int) -> float:
    """K* = sqrt(σ_w² c_u / (σ_b² c_i)) (docs/method.md §5), clamped to [1, k_max] as logged."""
    raw = math.inf if sb2 <= 0 else math.sqrt(sw2 * c_u / (sb2 * c_i))
    return min(max(raw, 1.0), float(k_max))


# ----------------------------------------------------------------------------------------------------------------
# The generator update


def test_training_step_applies_the_importance_weighted_mean_of_its_own_draws():
    """The generator's gradient after a step (clipping off) is J^T ḡ / numel with ḡ_n = (1/K) Σ_k ω(t_nk) g_nk
    (docs/method.md §3–§4), from the very draws the step made, under a proposal whose weights span far from 1.
    The same draws without ω give a different gradient, so the check sees the weights. And the adaptive
    proposal's table is fed the unweighted ‖g‖² of those draws."""
    m = _module("estimator.K=4", "estimator.proposal=adaptive", "estimator.adaptive_warmup=1",
                "estimator.adaptive_floor=0", "estimator.stratify=per_sample", "data.batch_size=16")
    _skew_proposal(m)
    logged = _detach(m, COSTS)
    before, q = _copy(m.generator), m.sampler.q.clone()
    m2, seen_bins = m.sampler.m2.clone(), m.sampler.seen.clone()
    seen = _spy(m)
    out = _step(m, logged)

    (z,), ((t, w),), ((x_seen, t_seen, eps, g),) = seen["z"], seen["draws"], seen["integrand"]
    K = t.shape[1]
    assert K == 4 and out["carv/K"] == 4 and torch.equal(t_seen, t)
    torch.testing.assert_close(w, _weights(m.sampler.p, q, t))  # the step weights its draws by p/q of its q
    assert w.min() < 0.5 and w.max() > 2  # ... which is far from 1
    x = before(z)
    assert torch.equal(x.detach(), x_seen)  # the integrand saw the step's own samples
    g_bar = (w[:, :, None] * g).sum(1) / K  # (1/K) Σ_k ω g   (N, d)
    params = list(before.parameters())
    expected = torch.autograd.grad((x * g_bar).sum() / x.numel(), params, retain_graph=True)
    unweighted = torch.autograd.grad((x * g.mean(1)).sum() / x.numel(), params)
    for p, e in zip(m.generator.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-8)
    assert (_flat(expected) - _flat(unweighted)).norm() > 0.2 * _flat(expected).norm()
    # the proposal's table learns from the UNWEIGHTED ‖g‖² at the drawn t (docs/method.md §6): per-bin mean folded
    # into the EMA (a bin's first record initialises it)
    s, ema = m.sampler, m.cfg.estimator.adaptive_ema
    bins, sq = s.bin_of(t.flatten()), g.double().square().sum(-1).flatten()
    for b in range(s.bins):
        if (bins == b).any():
            mean = float(sq[bins == b].mean())
            want = ema * float(m2[b]) + (1 - ema) * mean if seen_bins[b] else mean
            assert float(s.m2[b]) == pytest.approx(want, rel=1e-6), b


# ----------------------------------------------------------------------------------------------------------------
# The figures the module logs


def test_logged_variance_and_cost_figures_equal_an_independent_computation():
    """Two steps with the split-half diagnostic (diagnostic_K = 6, training K = 4, an adaptive proposal far from p,
    c_u/c_i = 4 in FLOPs): carv/sigma_b2_raw and carv/sigma_w2_raw equal the split-half formulas applied to per-draw
    parameter gradients of the diagnostic's own draws, weighted by p/q; carv/sigma_b2, carv/sigma_w2 are their EMA
    (weight auto_ema = 0.8 on the old value) clamped at 0; carv/k_star, carv/ecm (K = 4 against K = 1) and
    carv/ecm_oracle follow docs/method.md §5 from those; carv/x_sigma_b2, carv/x_sigma_w2 are the one-way ANOVA of
    the training draws ω g; carv/K and the costs are the configured ones. All to floating-point accuracy."""
    Kd, K = 6, 4
    m = _module(f"estimator.K={K}", "estimator.diagnostic_every=1", f"estimator.diagnostic_K={Kd}",
                "estimator.proposal=adaptive", "estimator.adaptive_warmup=1", "estimator.adaptive_floor=0",
                "data.batch_size=32")
    _skew_proposal(m)
    logged = _detach(m, COSTS)
    seen = _spy(m)
    c_u, c_i, k_max = COSTS["upstream_flops"], COSTS["inner_flops"], m.cfg.estimator.k_max
    smoothed = None
    for step in range(2):
        before, q = _copy(m.generator), m.sampler.q.clone()
        n_calls = len(seen["integrand"])
        out = _step(m, logged)
        (t, w), z = seen["draws"][step], seen["z"][step]
        train_call, diag_call = seen["integrand"][n_calls:]
        # the x-space ANOVA of the training draws ω g (docs/method.md §5)
        xb2, xw2 = _anova_by_hand(w[:, :, None] * train_call[3])
        assert out["carv/x_sigma_b2"] == pytest.approx(xb2, rel=1e-9, abs=1e-9)
        assert out["carv/x_sigma_w2"] == pytest.approx(xw2, rel=1e-9)
        # the split-half diagnostic: Kd fresh draws per sample, weighted by p/q of the current proposal
        _, t_d, _, g_d = diag_call
        assert t_d.shape == (32, Kd)
        raw = _split_half_by_hand(before, z, _weights(m.sampler.p, q, t_d)[:, :, None] * g_d)
        assert out["carv/sigma_b2_raw"] == pytest.approx(raw[0], rel=1e-6, abs=1e-6 * raw[1])
        assert out["carv/sigma_w2_raw"] == pytest.approx(raw[1], rel=1e-6)
        smoothed = raw if smoothed is None else tuple(0.8 * s + 0.2 * r for s, r in zip(smoothed, raw))
        sb2, sw2 = max(smoothed[0], 0.0), max(smoothed[1], 0.0)
        assert out["carv/sigma_b2"] == pytest.approx(sb2, rel=1e-6, abs=1e-6 * sw2)
        assert out["carv/sigma_w2"] == pytest.approx(sw2, rel=1e-6)
        assert out["carv/k_star"] == pytest.approx(_k_star(sb2, sw2, c_u, c_i, k_max), rel=1e-6)
        var_cost = lambda k: (sb2 + sw2 / k) * (c_u + k * c_i)  # noqa: E731  Var·Cost per unit N
        assert out["carv/ecm"] == pytest.approx(var_cost(1) / var_cost(K), rel=1e-6)
        oracle = (sb2 + sw2) * (c_u + c_i) / (math.sqrt(sb2 * c_u) + math.sqrt(sw2 * c_i)) ** 2
        assert out["carv/ecm_oracle"] == pytest.approx(oracle, rel=1e-6)
        assert out["carv/K"] == K and (out["carv/cost_upstream"], out["carv/cost_inner"]) == (c_u, c_i)
    # a case the figures can tell apart: both components positive, K* inside (1, k_max)
    assert sb2 > 0 and 1 < out["carv/k_star"] < k_max


def test_variance_callback_figures_equal_an_independent_computation():
    """variance/* of the GradientVariance callback, with N = 8, 4 draws, K = 4 and an adaptive proposal: σ_b²,
    σ_w²(q) and σ_w²(p) equal the split-half formulas on per-draw parameter gradients of the callback's own draws
    (from q weighted by p/q, then from p), and
        variance/estimator = σ_b²/N + σ_w²(q)/(N K),
        variance/baseline_equal_compute = (σ_b²(p) + σ_w²(p)) / N',  N' = N (c_u + K c_i) / (c_u + c_i),
        variance/ratio = their ratio,
    each component clamped at 0 (docs/method.md §5)."""
    from distill.callbacks import GradientVariance

    K, draws = 4, 4
    m = _module(f"estimator.K={K}", "estimator.proposal=adaptive", "estimator.adaptive_warmup=1",
                "estimator.adaptive_floor=0", "data.batch_size=8")
    _skew_proposal(m)
    logged = _detach(m, COSTS)
    seen = _spy(m)
    m.step = 3
    GradientVariance(every=1, draws=draws).on_train_batch_end(None, m, None, None, 0)
    (out,) = [{k: float(v) for k, v in d.items()} for d in logged]
    (z,), (call_q, call_p) = seen["z"], seen["integrand"]
    N = 8
    assert z.shape[0] == N and call_q[1].shape == call_p[1].shape == (N, draws)
    sb_q, sw_q = _split_half_by_hand(m.generator, z, _weights(m.sampler.p, m.sampler.q, call_q[1])[:, :, None]
                                      * call_q[3])
    sb_p, sw_p = _split_half_by_hand(m.generator, z, call_p[3])  # q = p: ω = 1
    for key, value in (("variance/sigma_b2", sb_q), ("variance/sigma_w2_proposal", sw_q),
                       ("variance/sigma_w2_uniform", sw_p)):
        assert out[key] == pytest.approx(value, rel=1e-6, abs=1e-6 * sw_q), key
    c_u, c_i = COSTS["upstream_flops"], COSTS["inner_flops"]
    var_method = max(sb_q, 0) / N + max(sw_q, 0) / (N * K)
    var_base = (max(sb_p, 0) + max(sw_p, 0)) / (N * (c_u + K * c_i) / (c_u + c_i))
    assert out["variance/estimator"] == pytest.approx(var_method, rel=1e-6)
    assert out["variance/baseline_equal_compute"] == pytest.approx(var_base, rel=1e-6)
    assert out["variance/ratio"] == pytest.approx(var_base / var_method, rel=1e-6)
    assert sw_q != pytest.approx(sw_p, rel=0.01)  # the two σ_w² come from different proposals


# ----------------------------------------------------------------------------------------------------------------
# K auto


@pytest.mark.parametrize("cost", ["flops", "time"])
def test_k_auto_follows_the_measured_figures_and_the_configured_cost(cost):
    """K auto through the module: the split-half diagnostic reports known (σ_b², σ_w²) (auto_ema = 0, so the
    smoothed figures are the latest), every generator update re-picks K, and c_u/c_i = 4 under the configured cost
    measure (1/4 under the other). Then carv/k_star = clamp(sqrt(σ_w²/σ_b² · c_u/c_i), 1, k_max) (docs/method.md
    §5), and the K the next step draws with moves towards the integer optimum at most 2x per choice: it stays 1
    while σ_w² is small next to σ_b² (K* = 0.2), climbs 1, 2, 4, 8, 16 to k_max when σ_w² dominates (K* = 40),
    comes down to 6 when K* = 6, and back to 1. The other cost pair would give K* = 10 and 1.5 there."""
    m = _module("estimator.K=auto", "estimator.diagnostic_every=1", "estimator.auto_every=1",
                "estimator.auto_ema=0", "estimator.k_max=16", f"estimator.cost={cost}", "data.batch_size=8")
    mine, other = ("flops", "seconds") if cost == "flops" else ("seconds", "flops")
    c_u, c_i = 8.0, 2.0
    logged = _detach(m, {f"upstream_{mine}": c_u, f"inner_{mine}": c_i, f"upstream_{other}": c_i,
                         f"inner_{other}": c_u})
    small, large, middle = (1.0, 0.01), (1.0, 400.0), (1.0, 9.0)
    figures = [small] * 3 + [large] * 6 + [middle] * 4 + [small] * 4
    fed = iter(figures)
    m.split_half_estimate = lambda x, labels, sampler, Kd, rng: next(fed)
    outs = [_step(m, logged) for _ in figures]
    used = [int(o["carv/K"]) for o in outs]
    assert used == [1, 1, 1, 1, 2, 4, 8, 16, 16, 16, 8, 6, 6, 6, 3, 2, 1]
    assert all(max(a, b) <= 2 * min(a, b) for a, b in zip(used, used[1:]))
    for o, (sb2, sw2) in zip(outs, figures):
        assert (o["carv/sigma_b2_raw"], o["carv/sigma_w2_raw"]) == (sb2, sw2)
        assert o["carv/k_star"] == pytest.approx(_k_star(sb2, sw2, c_u, c_i, 16), rel=1e-12)
        oracle = (sb2 + sw2) * (c_u + c_i) / (math.sqrt(sb2 * c_u) + math.sqrt(sw2 * c_i)) ** 2
        assert o["carv/ecm_oracle"] == pytest.approx(oracle, rel=1e-12)
        assert (o["carv/cost_upstream"], o["carv/cost_inner"]) == (c_u, c_i)
    assert [o["carv/k_star"] for o in outs[3:13:3]] == [16.0, 16.0, 6.0, 6.0]


def test_k_auto_chooses_at_the_posterior_mean_of_the_measured_sigma_b2():
    """K auto through the module with auto_ema = 0.8: raw σ_b² estimates that scatter around 0 (as early in training,
    when the fake score is still the teacher's copy) and σ_w² = 4. The logged carv/sigma_b2_posterior is the mean of
    N(EMA, SE²) truncated at 0, m + s·φ(m/s)/Φ(m/s), with the standard error from the weighted spread of the raw
    estimates (docs/method.md §5; computed here from the EMA's explicit weights), absent after the first estimate (K
    holds); carv/k_star is the integer argmin of (σ_b² + σ_w²/K)(c_u + K c_i) at it, found by brute force; and K never
    goes where the EMA clamped at 0 (-0.02 to 0.04: K = 19 to 32) would send it."""
    m = _module("estimator.K=auto", "estimator.diagnostic_every=1", "estimator.auto_every=1",
                "estimator.auto_ema=0.8", "estimator.k_max=32", "data.batch_size=8")
    c_u, c_i, sw2, lam = 8.0, 2.0, 4.0, 0.8
    logged = _detach(m, {"upstream_flops": c_u, "inner_flops": c_i, "upstream_seconds": c_u, "inner_seconds": c_i})
    raw = [0.05, -0.3, 0.3, -0.2, 0.1, 0.02, -0.1, 0.15]
    fed = iter([(b, sw2) for b in raw])
    m.split_half_estimate = lambda x, labels, sampler, Kd, rng: next(fed)
    outs = [_step(m, logged) for _ in raw]
    assert "carv/sigma_b2_posterior" not in outs[0] and outs[1]["carv/K"] == 1.0
    from_ema = []
    for n, o in enumerate(outs[1:], start=2):
        w = [lam ** (n - 1)] + [(1 - lam) * lam ** (n - 1 - i) for i in range(1, n)]  # the EMA's weights, sum 1
        mean = sum(wi * x for wi, x in zip(w, raw))
        w2 = sum(wi * wi for wi in w)
        se = math.sqrt(sum(wi * (x - mean) ** 2 for wi, x in zip(w, raw)) * w2 / (1 - w2))
        z = mean / se
        posterior = mean + se * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(-z / math.sqrt(2)))
        assert o["carv/sigma_b2"] == pytest.approx(max(mean, 0.0), abs=1e-12)
        assert o["carv/sigma_b2_posterior"] == pytest.approx(posterior, rel=1e-9)
        best = lambda sb2: min(range(1, 33), key=lambda K: (sb2 + sw2 / K) * (c_u + K * c_i))  # noqa: E731
        assert o["carv/k_star"] == best(posterior) < best(max(mean, 0.0))
        from_ema.append(best(max(mean, 0.0)))
    used = [int(o["carv/K"]) for o in outs]
    assert max(used) <= max(o["carv/k_star"] for o in outs[1:]) < 20 and max(from_ema) == 32, (used, from_ema)


# ----------------------------------------------------------------------------------------------------------------
# A short fit through a real Trainer


@pytest.mark.parametrize("stratify", ["per_sample", "batch"])
def test_a_short_fit_with_reuse_an_adaptive_proposal_and_stratification(stratify, tmp_path, monkeypatch):
    """24 steps of `distill.train.fit` on the mixture teacher with K = 4, the adaptive proposal (rebuilt every 4
    generator updates after 4) and stratification: it finishes, the generator moved, every step drew N×K = 32×4
    (t, ω) with ω = p/q of the q in force at the draw and stratified as configured (the m-th smallest of a stratum
    set lies in the m-th stratum of q's inverse CDF, docs/method.md §7), the proposal moved off p, the weights
    average 1 under q (within 4 standard errors of iid draws: conservative, stratified draws vary less; false alarm
    below 1e-4), and metrics.csv holds finite figures at steps 8, 16, 24 with carv/K = 4."""
    from distill.train import fit

    draws, initial = [], []
    original = DMDModule._draw_timesteps

    def spy(self, N, K, rng):
        if not initial:  # the generator before its first update
            initial.extend(p.detach().clone() for p in self.generator.parameters())
        q = self.sampler.q.clone()
        t, w = original(self, N, K, rng)
        draws.append((self, q, t, w))
        return t, w

    monkeypatch.setattr(DMDModule, "_draw_timesteps", spy)
    run_dir = tmp_path / "run"
    cfg = load_config(FitConfig, GMM, [
        f"run.dir={run_dir}", *QUIET, "trainer.max_steps=24", "optim.ttur=1", "data.batch_size=32",
        "estimator.K=4", "estimator.proposal=adaptive", f"estimator.stratify={stratify}",
        "estimator.adaptive_warmup=4", "estimator.adaptive_refresh_every=4", "estimator.diagnostic_every=4",
        "eval.variance_every_steps=8", "trainer.log_every_steps=8", "trainer.checkpoint_every_steps=24"])
    result = fit(cfg)
    assert result.exit_code == 0 and result.step == 24
    m = draws[-1][0]
    assert any(not torch.allclose(a, b) for a, b in zip(m.generator.parameters(), initial))  # it trained

    assert len(draws) == 24 and all(t.shape == w.shape == (32, 4) for _, _, t, w in draws)
    p = m.sampler.p
    moved = []
    for _, q, t, w in draws:
        torch.testing.assert_close(w, (p / q)[t].float())
        cdf = torch.cumsum(q, 0)
        below = cdf - q  # mass strictly before each index
        if stratify == "per_sample":  # draw k of every sample lies in stratum k of K
            stratum, M = torch.arange(4).expand(32, 4), 4
        else:  # the sorted batch covers its N K strata once each
            t, M = t.flatten().sort().values, 32 * 4
            stratum = torch.arange(M)
        assert (cdf[t] > stratum / M - 1e-12).all() and (below[t] < (stratum + 1) / M + 1e-12).all()
        if not torch.allclose(q, p):
            moved.append(w.double().flatten())
    assert m.sampler.n_refreshes == 6 and len(moved) >= 16  # q rebuilt after update 4, 8, ..., 24
    assert (m.sampler.q - p).abs().sum() > 0.1
    w = torch.cat(moved)
    assert w.std() > 0.05 and abs(float(w.mean()) - 1) < 4 * float(w.std()) / len(w) ** 0.5

    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [8, 16, 24]
    for r in rows:
        assert float(r["carv/K"]) == 4
        for key in ("loss/generator_dm", "grad_norm/generator", "carv/x_sigma_w2", "carv/sigma_w2", "variance/ratio"):
            assert r.get(key) not in (None, ""), key
        assert all(math.isfinite(float(v)) for k, v in r.items() if v not in (None, "")), r


def test_a_diagnostic_that_measures_no_variance_logs_no_ecm_and_training_goes_on(tiny_teacher):
    """A diffusers teacher without guidance: the fake score starts as the teacher's exact copy, so at step 0 every
    draw of g is 0 and the split-half diagnostic measures σ_b² = σ_w² = 0. K* and the ECM are undefined there (0/0):
    the step logs the zero figures, no carv/k_star, carv/ecm or carv/ecm_oracle, keeps K = 1, and goes on."""
    cfg = load_config(FitConfig, str(REPO / "configs" / "digits.yaml"),
                      [f"teacher.path={tiny_teacher}", "data.batch_size=4", "estimator.K=auto", "optim.ttur=1"],
                      read_data=False)
    torch.manual_seed(0)
    m = DMDModule(cfg)
    logged = _detach(m, COSTS)
    out = _step(m, logged)
    assert out["carv/sigma_b2_raw"] == out["carv/sigma_w2_raw"] == 0.0
    assert not {"carv/k_star", "carv/ecm", "carv/ecm_oracle"} & out.keys()
    assert out["carv/K"] == 1 and m.k_control.K == 1 and m.step == 1
