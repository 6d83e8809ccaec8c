"""distill.carv.TimestepSampler: unbiasedness of every proposal x stratification x K, stratification's variance cut,
the adaptive proposal's convergence and predictability, checkpoint round trip, the exact DMD2 baseline, bad input.

Statistical tests use fixed seeds and tolerances of 4 standard errors estimated from the replicates (or derived
bounds, stated where used)."""

from __future__ import annotations

import io
import math
import zlib

import pytest
import torch

from distill.carv import TimestepSampler, dmd_timestep_p

Z = 4.0  # standard errors allowed


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clone(g: torch.Generator) -> torch.Generator:
    c = torch.Generator()
    c.set_state(g.get_state())
    return c


# a non-uniform p with a hole: support [3, 46] minus {20..23}
T_SMALL = 50
_i = torch.arange(T_SMALL, dtype=torch.float64)
P = 1.0 + _i / T_SMALL
P[:3] = 0
P[47:] = 0
P[20:24] = 0
P = P / P.sum()
F = torch.cos(_i / 6.0) + 2.0 * _i / T_SMALL  # integrand f(t); exact E_p[f] = Σ p f
EXACT = float((P * F).sum())


def _fixed_q() -> torch.Tensor:
    """A static proposal q ∝ p·(1 + 5 (t/T)²), plus some mass where p = 0 (drawn with weight 0)."""
    q = P * (1 + 5 * (_i / T_SMALL) ** 2)
    q[21] = 0.01  # inside the hole of p
    return q / q.sum()


def _adaptive(stratify: str) -> TimestepSampler:
    s = TimestepSampler(P, "adaptive", stratify, bins=8, warmup=1, smoothing=0.5, floor=0.05, mix=0.2)
    t = torch.arange(T_SMALL)[P > 0]
    s.record(t, (1 + 3 * t / T_SMALL) ** 2 * (1 + torch.sin(t.double())))  # some non-constant second moment
    s.update()
    return s


def _make(proposal: str, stratify: str) -> TimestepSampler:
    if proposal == "adaptive":
        return _adaptive(stratify)
    return TimestepSampler(P, _fixed_q() if proposal == "fixed" else proposal, stratify)


def _draw(s: TimestepSampler, N: int, K: int, g: torch.Generator, world_size: int) -> tuple[torch.Tensor, ...]:
    """One step's draws over `world_size` simulated ranks (each with a clone of the same generator state)."""
    if world_size == 1:
        return s.sample(N, K, g)
    outs = [s.sample(N, K, _clone(g) if r < world_size - 1 else g, rank=r, world_size=world_size)
            for r in range(world_size)]  # the last rank advances g, as every rank's own generator would
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("stratify,world_size", [("none", 1), ("per_sample", 1), ("batch", 1), ("global", 2),
                                                 ("global", 3)])
@pytest.mark.parametrize("proposal", ["uniform", "adaptive", "fixed"])
def test_every_estimator_is_unbiased_per_outer_sample(proposal, stratify, world_size, K):
    s = _make(proposal, stratify)
    assert proposal == "uniform" or (s.q - s.p).abs().sum() > 0.05  # a proposal that actually differs from p
    N, R = 4, 1200
    g = _gen(zlib.crc32(f"{proposal}-{stratify}-{world_size}-{K}".encode()))
    if stratify in ("none", "per_sample"):  # rows are independent: draw all replicates at once
        t, w = s.sample(R * N, K, g)
    else:
        draws = [_draw(s, N, K, g, world_size) for _ in range(R)]
        t, w = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
    assert t.dtype == torch.long and w.dtype == torch.float32
    assert (s.q[t] > 0).all()  # never a zero-probability index
    torch.testing.assert_close(w.double(), s.p[t] / s.q[t], rtol=1e-6, atol=0)
    g_bar = (w.double() * F[t]).mean(-1).view(R, -1)  # (R, N·world_size): ḡ_n = (1/K) Σ_k ω f(t_nk)
    mean, se = g_bar.mean(0), g_bar.std(0) / math.sqrt(R)
    assert ((mean - EXACT).abs() <= Z * se).all(), (mean - EXACT) / se


@pytest.mark.parametrize("stratify,world_size,N,K", [("per_sample", 1, 3, 5), ("batch", 1, 4, 3),
                                                     ("global", 3, 2, 2)])
def test_strata_cover_the_support_exactly_once(stratify, world_size, N, K):
    """With p uniform over as many indices as there are strata, each stratum maps to one index: the draws of a
    row (per_sample) or of the whole (global) batch are a permutation of the support."""
    M = K if stratify == "per_sample" else N * K * world_size
    p = torch.zeros(M + 4, dtype=torch.float64)
    p[2:M + 2] = 1.0 / M
    s = TimestepSampler(p, "uniform", stratify)
    g = _gen(1)
    for _ in range(20):
        t, _ = _draw(s, N, K, g, world_size)
        rows = t if stratify == "per_sample" else t.reshape(1, -1)
        assert (rows.sort(-1).values == torch.arange(2, rows.shape[1] + 2)).all()


def test_stratified_variance_is_below_iid_variance():
    """Smooth integrand, DMD p over T = 1000. The iid variance of the batch mean is known exactly,
    Var_q(ω f)/(N K); the empirical iid variance must match it, and every stratified variance must lie more than
    4 standard errors below it (SE of a sample variance of R near-normal means: s² sqrt(2/(R-1)))."""
    T, N, K, R = 1000, 4, 4, 2000
    p = dmd_timestep_p(T)
    f = torch.sin(torch.arange(T, dtype=torch.float64) / T * 3.0) + torch.arange(T) / T
    exact_var = float((p * f ** 2).sum() - (p * f).sum() ** 2) / (N * K)

    def var_of_batch_mean(stratify, world_size=1):
        s, g = TimestepSampler(p, "uniform", stratify), _gen(7)
        means = torch.stack([(f[t[:N]] * w[:N].double()).mean()  # rank 0's batch mean: R independent values
                             for t, w in (_draw(s, N, K, g, world_size) for _ in range(R))])
        v = float(means.var())
        return v, v * math.sqrt(2 / (len(means) - 1))

    v_iid, se_iid = var_of_batch_mean("none")
    assert abs(v_iid - exact_var) <= Z * se_iid
    for stratify, ws in (("per_sample", 1), ("batch", 1), ("global", 2)):
        v, se = var_of_batch_mean(stratify, ws)
        assert v + Z * se < exact_var, (stratify, v, exact_var)
    # per-sample strata also cut the variance of each ḡ_n (the quantity the hierarchical estimator averages)
    t, w = TimestepSampler(p, "uniform", "per_sample").sample(R, K, _gen(8))
    v = float((f[t] * w.double()).mean(1).var())
    assert v + Z * v * math.sqrt(2 / (R - 1)) < exact_var * N


def test_adaptive_proposal_converges_to_p_sqrt_m2():
    """Feed noisy records with E[sq_norm | t] = m2(t) at the sampler's own draws. The target (allowing for binning)
    is q_target = (1-mix)·q*_bin + mix·p with q*_bin ∝ p·sqrt(mean of m2 over the bin): p is uniform within a bin
    and q ∝ p there, so draws in a bin are uniform over it and the bin's records average m2 over the bin.

    Bound on TV(q, q_target), derived: sq_norm = m2(t)·E, E ~ U(0.5, 1.5), has CV_b² =
    (13/12)·mean_b(m2²)/mean_b(m2)² − 1 in bin b; each update's bin mean has rel. variance ≤ CV_b² (≥ 1 draw),
    so the EMA has rel. sd ≤ sd_b = CV_b·sqrt((1−ema)/(1+ema)). With |m̂_b/m2_b − 1| ≤ 4 sd_b =: δ in every bin, r_b = sqrt(m̂_b/m2_b)
    is within ε = 1 − sqrt(1 − δ) of 1, each q̂_b/q̂*_b within [(1−ε)/(1+ε), (1+ε)/(1−ε)], and
    TV = ½(1−mix)Σ|q̂_b − q̂*_b| ≤ (1−mix)·ε/(1−ε)."""
    T, bins, ema, mix = 1000, 32, 0.99, 0.1
    p = dmd_timestep_p(T)
    i = torch.arange(T, dtype=torch.float64)
    m2 = (1 + 6 * torch.exp(-(((i - 300) / 80) ** 2))) ** 2
    s = TimestepSampler(p, "adaptive", "none", bins=bins, ema=ema, smoothing=0.0, floor=0.0, mix=mix, warmup=10,
                        refresh_every=10)
    b = s.bin_of(i.long())
    in_p = p > 0
    m2_bin = torch.zeros(bins, dtype=torch.float64).index_add_(0, b[in_p], m2[in_p])
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, b[in_p], torch.ones_like(m2[in_p]))
    m4_bin = torch.zeros(bins, dtype=torch.float64).index_add_(0, b[in_p], m2[in_p] ** 2) / count
    m2_bin = m2_bin / count
    q_star = p * m2_bin[b].sqrt()
    target = (1 - mix) * q_star / q_star.sum() + mix * p

    def tv(a, c):
        return 0.5 * float((a - c).abs().sum())

    tv_before = tv(s.q, target)
    g = _gen(3)
    for _ in range(1000):  # 1000 updates ≫ 1/(1 − ema)
        t, _ = s.sample(16, 4, g)
        s.record(t, m2[t] * (0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64)))
        s.update()
    cv = (13 / 12 * m4_bin / m2_bin ** 2 - 1).sqrt()
    delta = float((Z * cv * math.sqrt((1 - ema) / (1 + ema))).max())
    eps = 1 - math.sqrt(1 - delta)
    bound = (1 - mix) * eps / (1 - eps)
    assert tv_before > 3 * bound  # the test can tell the adaptive proposal from q = p
    assert ((s.m2 / m2_bin - 1).abs() <= delta).all()
    assert tv(s.q, target) <= bound, (tv(s.q, target), bound, tv_before)
    assert float((s.p[in_p] / s.q[in_p]).max()) <= 1 / mix + 1e-12  # defensive mixture: ω ≤ 1/λ


def test_unrecorded_bins_are_neutral_and_floor_and_mixture_bound_the_weights():
    p = dmd_timestep_p(1000)
    s = TimestepSampler(p, "adaptive", bins=10, smoothing=0.0, floor=0.0, warmup=1)
    t = torch.arange(20, 400)  # bins 0..3 only, constant second moment
    s.record(t, torch.full(t.shape, 5.0))
    s.update()
    assert torch.equal(s.m2[:4], torch.full((4,), 5.0, dtype=torch.float64))  # first record initialises, no decay
    torch.testing.assert_close(s.q, p)  # unrecorded bins take the mean of recorded ones: q̂ = p
    s = TimestepSampler(p, "adaptive", bins=10, smoothing=0.0, floor=0.05, mix=0.1, warmup=1)
    s.record(t, torch.where(t < 100, 1e12, 1.0))  # one enormous bin
    s.update()
    in_p = p > 0
    q_hat = (s.q - 0.1 * p) / 0.9
    ratio = q_hat[in_p] / p[in_p]
    assert float(ratio.min() / ratio.max()) >= math.sqrt(0.05) - 1e-12  # m2 floored at 0.05·max, q̂ ∝ sqrt(m2)
    assert float((p[in_p] / s.q[in_p]).max()) <= 1 / 0.1 + 1e-9


def test_proposal_is_built_only_from_records_fed_before_the_last_update():
    a = TimestepSampler(P, "adaptive", "batch", bins=8, warmup=1, refresh_every=1)
    b = TimestepSampler(P, "adaptive", "batch", bins=8, warmup=1, refresh_every=1)
    ga, gb = _gen(5), _gen(5)
    for step in range(4):
        q_before = a.q.clone()
        ta, wa = a.sample(6, 4, ga)
        tb, wb = b.sample(6, 4, gb)
        assert torch.equal(ta, tb) and torch.equal(wa, wb)  # same past records -> same draws and weights
        torch.testing.assert_close(wa.double(), a.p[ta] / q_before[ta], rtol=1e-6, atol=0)
        huge = torch.ones(ta.shape)
        huge[0, 0] = 1e9  # a huge value at one of step s's own draws, only into a
        a.record(ta, huge)
        b.record(tb, torch.ones(tb.shape))
        assert torch.equal(a.q, q_before)  # recording alone never changes q
        ta2, wa2 = a.sample(6, 4, _clone(ga))
        tb2, wb2 = b.sample(6, 4, _clone(gb))
        assert torch.equal(ta2, tb2) and torch.equal(wa2, wb2)  # pending records do not reach sample()
        a.update()
        b.update()
        assert not torch.equal(a.q, q_before)  # they do after update()
        b.load_state_dict(a.state_dict())  # re-align b so that the next step compares like with like


def test_state_dict_round_trip_gives_identical_next_samples():
    kw = dict(bins=16, warmup=3, refresh_every=2)
    s = TimestepSampler(dmd_timestep_p(200), "adaptive", "per_sample", **kw)
    g = _gen(11)
    for step in range(8):
        t, _ = s.sample(4, 4, g)
        s.record(t, (t.double() / 50) ** 2 + 1)
        if step < 7:
            s.update()  # the last step's records stay pending across the round trip
    assert s.n_refreshes >= 2
    buf = io.BytesIO()
    torch.save({"carv": s.state_dict(), "rng": g.get_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    r = TimestepSampler(dmd_timestep_p(200), "adaptive", "per_sample", **kw)
    r.load_state_dict(ckpt["carv"])
    g2 = torch.Generator()
    g2.set_state(ckpt["rng"])
    assert torch.equal(r.q, s.q) and r.n_updates == s.n_updates
    for _ in range(5):
        t1, w1 = s.sample(4, 4, g)
        t2, w2 = r.sample(4, 4, g2)
        assert torch.equal(t1, t2) and torch.equal(w1, w2)
        s.update()
        r.update()
        s.record(t1, t1.double().sqrt())
        r.record(t2, t2.double().sqrt())
    assert torch.equal(r.q, s.q) and torch.equal(r.m2, s.m2)
    with pytest.raises(ValueError, match="p differs"):
        TimestepSampler(dmd_timestep_p(300), "adaptive", **kw).load_state_dict(ckpt["carv"])


@pytest.mark.parametrize("N,K", [(1, 1), (8, 1), (5, 3)])
def test_uniform_none_is_the_dmd2_randint_draw_number_for_number(N, K):
    T = 1000
    lo, hi = int(0.02 * T), min(int(0.98 * T), T - 1)  # distill/module.py: t_lo, t_hi
    s = TimestepSampler(dmd_timestep_p(T), "uniform", "none")
    g, ref = _gen(42), _gen(42)
    t, w = s.sample(N, K, g, device="cpu")
    expected = torch.randint(lo, hi + 1, (N, K), generator=ref, device="cpu")
    assert torch.equal(t, expected) and torch.equal(w, torch.ones(N, K))
    if K == 1:
        assert torch.equal(t[:, 0], torch.randint(lo, hi + 1, (N,), generator=_gen(42)))
    assert torch.equal(g.get_state(), ref.get_state())  # same numbers consumed: later draws line up too


def test_sample_without_a_generator_uses_the_global_rng():
    """generator=None draws from torch's global generator: the same global seed gives the same draws, another seed
    other draws, the draws are exactly those of an explicit generator with that seed, and the global stream
    advances (the next global number is the one after the draws, not the first of the seed)."""
    s = TimestepSampler(P, "uniform", "batch")
    torch.manual_seed(0)
    t0, w0 = s.sample(3, 2)
    after = torch.rand(1)
    torch.manual_seed(0)
    t0_again, w0_again = s.sample(3, 2)
    torch.manual_seed(1)
    t1, _ = s.sample(3, 2)
    assert t0.shape == w0.shape == (3, 2) and (P[t0] > 0).all()
    assert torch.equal(t0, t0_again) and torch.equal(w0, w0_again)
    assert not torch.equal(t0, t1)
    explicit = _gen(0)
    t_explicit, w_explicit = s.sample(3, 2, explicit)
    assert torch.equal(t0, t_explicit) and torch.equal(w0, w_explicit)
    assert torch.equal(after, torch.rand(1, generator=explicit))  # the global stream moved on by the draws
    torch.manual_seed(0)
    assert not torch.equal(after, torch.rand(1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(p=torch.tensor([0.5, -0.1, 0.6])), "p:"),
    (dict(p=torch.ones(2, 3) / 6), "p:"),
    (dict(p=torch.ones(4)), "p:.*sum to 1"),
    (dict(p=torch.tensor([0.5, float("nan"), 0.5])), "p:"),
    (dict(p=P, proposal="importance"), "proposal:"),
    (dict(p=P, proposal=torch.ones(T_SMALL) / T_SMALL * torch.arange(T_SMALL).lt(30) * T_SMALL / 30), "proposal:"),
    (dict(p=P, proposal=torch.ones(T_SMALL + 1) / (T_SMALL + 1)), "proposal:"),
    (dict(p=P, stratify="sobol"), "stratify:"),
    (dict(p=P, mix=0.0), "mix:"),
    (dict(p=P, bins=0), "bins:"),
    (dict(p=P, ema=1.0), "ema:"),
    (dict(p=P, refresh_every=0), "refresh_every:"),
])
def test_bad_construction_raises_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimestepSampler(**kwargs)


def test_bad_calls_raise_naming_the_argument():
    s = TimestepSampler(P, "adaptive", "global", warmup=1)
    with pytest.raises(ValueError, match="rank"):
        s.sample(2, 2, _gen(0), rank=2, world_size=2)
    with pytest.raises(ValueError, match="N, K"):
        s.sample(0, 2)
    with pytest.raises(ValueError, match="sq_norm"):
        s.record(torch.zeros(2, 3, dtype=torch.long), torch.zeros(6))
    with pytest.raises(ValueError, match="sq_norm"):  # refused when recorded, before it can reach the table
        s.record(torch.full((2,), 10), torch.tensor([1.0, float("inf")]))
    s.update()
    assert not s.seen.any()
    # masked (a skipped update): nothing reaches the table, whatever the values
    s.record(torch.full((2,), 10), torch.tensor([1.0, float("inf")]), taken=torch.tensor(False))
    s.update()
    assert not s.seen.any() and not s.m2.any()
