"""Variance and compute accounting for the CARV estimator (docs/method.md §5: variance and cost, online estimates).

σ_b²: variance across outer samples of the per-sample mean E[g | x_n] (trace); σ_w²: mean within-sample variance
of one inner draw (trace). With N outer samples and K inner draws, Var(Ĝ) = σ_b²/N + σ_w²/(N·K).

`anova` and `split_half` return float64 0-d tensors on their inputs' device (no host sync); the scalar formulas
below take and return Python numbers. Both estimators assume the K draws of a sample are exchangeable (iid given
x_n); under stratification s_w²/K overstates the within part of Var(ȳ_n) and σ̂_b² comes out biased low.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

K_CAP = 4096  # optimal_k's answer when variance keeps falling with K and no k_max is given


def anova(y: Tensor) -> tuple[Tensor, Tensor]:
    """One-way ANOVA over the K draws of each of N samples: unbiased (σ̂_b², σ̂_w²), float64 0-d tensors.

    y: (N, K, ...) per-draw values (e.g. ω·g in x-space); trailing dims are flattened and squared norms summed.
    """
    if y.dim() < 2 or y.shape[0] < 2 or y.shape[1] < 2:
        raise ValueError(f"y: expected shape (N, K, ...) with N >= 2 and K >= 2, got {tuple(y.shape)}")
    N, K = y.shape[:2]
    y = y.detach().reshape(N, K, -1).double()  # (N, K, D)
    y_n = y.mean(1)  # (N, D)
    s_w2 = ((y - y_n[:, None]) ** 2).sum() / (N * (K - 1))  # s_w² = ΣΣ‖y_nk − ȳ_n‖²/(N(K−1)) (§5)
    s_m2 = ((y_n - y_n.mean(0)) ** 2).sum() / (N - 1)  # s_m² = Σ‖ȳ_n − ȳ‖²/(N−1), mean σ_b² + σ_w²/K
    return s_m2 - s_w2 / K, s_w2  # σ̂_b² = s_m² − s_w²/K (docs/method.md §5)


def _flat(G) -> Tensor:
    if isinstance(G, Tensor):
        return G.detach().reshape(-1).double()
    return torch.cat([g.detach().reshape(-1).double() for g in G])


def split_half(G1A, G1B, G2A, G2B, N: int, K: int) -> tuple[Tensor, Tensor]:
    """Exact parameter-space (σ̂_b², σ̂_w²) from four half-batch gradients (docs/method.md §5), float64 0-d
    tensors.

    G_iA: the estimator's gradient (mean-normalised like the full one) from the N/2 samples of half i and the K/2
    draws of half A; each a flat tensor or a list of tensors (parameter gradients, same order in all four).
    N and K are the full counts and must be even, so that the halves are equal.
    """
    for name, v in (("N", N), ("K", K)):
        if not (isinstance(v, int) and v >= 2 and v % 2 == 0):
            raise ValueError(f"{name}: expected an even int >= 2 (equal halves), got {v!r}")
    g1a, g1b, g2a, g2b = (_flat(G) for G in (G1A, G1B, G2A, G2B))
    if not g1a.shape == g1b.shape == g2a.shape == g2b.shape:
        raise ValueError("G1A, G1B, G2A, G2B: expected the same number of entries in all four")
    # Var(G_iA − G_iB) = 8σ_w²/(NK): σ̂_w² = (NK/8)·½Σ_i‖G_iA − G_iB‖² (docs/method.md §5)
    sigma_w2 = (N * K / 8) * 0.5 * (((g1a - g1b) ** 2).sum() + ((g2a - g2b) ** 2).sum())
    # Var(Ĝ_1 − Ĝ_2) = 4σ_b²/N + 4σ_w²/(NK): σ̂_b² = (N/4)‖Ĝ_1 − Ĝ_2‖² − σ̂_w²/K (docs/method.md §5)
    sigma_b2 = (N / 4) * ((0.5 * (g1a + g1b) - 0.5 * (g2a + g2b)) ** 2).sum() - sigma_w2 / K
    return sigma_b2, sigma_w2


def variance(sigma_b2: float, sigma_w2: float, N: int, K: int) -> float:
    """Var(Ĝ) = σ_b²/N + σ_w²/(N·K) (docs/method.md §5)."""
    return float(sigma_b2) / N + float(sigma_w2) / (N * K)


def cost(N: int, K: int, c_u: float, c_i: float) -> float:
    """cost = N·(c_u + K·c_i) (docs/method.md §5)."""
    return N * (float(c_u) + K * float(c_i))


def _check_costs(c_u, c_i) -> tuple[float, float]:
    c_u, c_i = float(c_u), float(c_i)
    if not (c_u >= 0 and c_i >= 0 and c_u + c_i > 0 and math.isfinite(c_u + c_i)):
        raise ValueError(f"c_u, c_i: expected finite costs >= 0, not both 0, got {c_u!r}, {c_i!r}")
    return c_u, c_i


def k_star(sigma_b2: float, sigma_w2: float, c_u: float, c_i: float) -> float:
    """Continuous K* = sqrt(σ_w²·c_u / (σ_b²·c_i)) (docs/method.md §5); 0 when σ_w² <= 0, else inf when σ_b² <= 0 or c_i = 0."""
    sigma_b2, sigma_w2 = float(sigma_b2), float(sigma_w2)
    c_u, c_i = _check_costs(c_u, c_i)
    if sigma_w2 <= 0:
        return 0.0
    if sigma_b2 <= 0 or c_i == 0:
        return math.inf
    return math.sqrt(sigma_w2 * c_u / (sigma_b2 * c_i))  # K* (docs/method.md §5)


def _vc(sigma_b2: float, sigma_w2: float, c_u: float, c_i: float, K: int) -> float:
    return (sigma_b2 + sigma_w2 / K) * (c_u + K * c_i)  # Var·Cost per unit N (N cancels)


def optimal_k(sigma_b2: float, sigma_w2: float, c_u: float, c_i: float, k_max: int | None = None) -> int:
    """The integer K in [1, k_max] minimising (σ_b² + σ_w²/K)(c_u + K·c_i), i.e. Var·Cost (docs/method.md §5).

    The objective is convex in K, so the answer is floor or ceil of K*; ties go to the smaller (cheaper) K.
    σ_w² <= 0 gives 1; when Var·Cost keeps falling with K (σ_b² <= 0 < σ_w², or c_i = 0) the answer is k_max, or
    K_CAP without one.
    """
    if k_max is not None and not (isinstance(k_max, int) and k_max >= 1):
        raise ValueError(f"k_max: expected an int >= 1 or None, got {k_max!r}")
    cap = K_CAP if k_max is None else k_max
    sigma_b2, sigma_w2 = float(sigma_b2), float(sigma_w2)
    ks = k_star(sigma_b2, sigma_w2, c_u, c_i)
    c_u, c_i = float(c_u), float(c_i)
    if ks == 0:
        return 1
    if ks >= cap:
        return cap
    lo = min(max(math.floor(ks), 1), cap)
    hi = min(lo + 1, cap)
    return hi if _vc(sigma_b2, sigma_w2, c_u, c_i, hi) < _vc(sigma_b2, sigma_w2, c_u, c_i, lo) else lo


def ecm(var_base: float, cost_base: float, var_method: float, cost_method: float) -> float:
    """Effective compute multiplier ECM = (Var·Cost)_baseline / (Var·Cost)_method (docs/method.md §5)."""
    return float(var_base) * float(cost_base) / (float(var_method) * float(cost_method))


def ecm_oracle(sigma_b2: float, sigma_w2: float, c_u: float, c_i: float) -> float:
    """(σ_b² + σ_w²)(c_u + c_i) / (σ_b·sqrt(c_u) + σ_w·sqrt(c_i))²: the best ECM of the family against K = 1 at the
    continuous K* (docs/method.md §5, (V·C)_min). >= 1 by Cauchy–Schwarz; 1 + c_u/c_i when σ_b² = 0."""
    sigma_b2, sigma_w2 = float(sigma_b2), float(sigma_w2)
    if sigma_b2 < 0 or sigma_w2 < 0 or sigma_b2 + sigma_w2 == 0:
        raise ValueError(f"sigma_b2, sigma_w2: expected >= 0 and not both 0 (clamp noisy estimates at 0 first), "
                         f"got {sigma_b2!r}, {sigma_w2!r}")
    c_u, c_i = _check_costs(c_u, c_i)
    vc_min = (math.sqrt(sigma_b2 * c_u) + math.sqrt(sigma_w2 * c_i)) ** 2  # (V·C)_min (docs/method.md §5)
    return (sigma_b2 + sigma_w2) * (c_u + c_i) / vc_min


def within_model(sigma_w2: float, sigma_w2_strat: float | None, K_s: int | None) -> tuple[float, float]:
    """(a, b) of the within-sample variance of the estimator in use, v(K) = a/K + b/K³ (docs/method.md §5,
    "Stratified draws"): a is the part that falls like iid draws (the ε noise, the spread within a stratum that
    does not shrink), b the part that stratification removes (a smooth integrand over 1-D strata of width 1/K
    keeps a within-stratum variance ∝ 1/K², so its share of the mean of K falls like 1/K³).

    Fitted through v(1) = σ_w² (one draw is one draw, stratified or not) and v(K_s) = σ_w,strat²(K_s)/K_s, the
    measured per-draw-equivalent variance at K_s; clamped to a, b >= 0 (stratification neither adds variance nor
    removes more than all of it). Without a stratified measurement (iid draws), b = 0: v(K) = σ_w²/K."""
    sigma_w2 = max(float(sigma_w2), 0.0)
    if sigma_w2_strat is None or K_s is None or K_s < 2 or not math.isfinite(sigma_w2_strat):
        return sigma_w2, 0.0
    # a + b = σ_w², a/K_s + b/K_s³ = σ_w,strat²/K_s  =>  a (K_s² − 1) = K_s² σ_w,strat² − σ_w²
    a = (K_s**2 * float(sigma_w2_strat) - sigma_w2) / (K_s**2 - 1)
    a = min(max(a, 0.0), sigma_w2)
    return a, sigma_w2 - a


def within_variance(a: float, b: float, K: int) -> float:
    """v(K) = a/K + b/K³: the within-sample variance of one sample's K-draw mean (`within_model`)."""
    return a / K + b / K**3


def choose_k(sigma_b2: float, a: float, b: float, c_u: float, c_i: float, k_max: int) -> int:
    """The integer K in [1, k_max] minimising (σ_b² + v(K))(c_u + K·c_i), v(K) = a/K + b/K³ (`within_model`);
    ties go to the smaller K. With b = 0 this is `optimal_k` (iid draws: v(K) = σ_w²/K), which it calls."""
    if not (isinstance(k_max, int) and k_max >= 1):
        raise ValueError(f"k_max: expected an int >= 1, got {k_max!r}")
    sigma_b2, a, b = max(float(sigma_b2), 0.0), max(float(a), 0.0), max(float(b), 0.0)
    if b == 0:
        return optimal_k(sigma_b2, a, c_u, c_i, k_max=k_max)
    c_u, c_i = _check_costs(c_u, c_i)
    best, best_vc = 1, math.inf
    for K in range(1, min(k_max, K_CAP) + 1):  # not convex in general (two terms): search the integers
        vc = (sigma_b2 + within_variance(a, b, K)) * (c_u + K * c_i)
        if vc < best_vc * (1 - 1e-12):
            best, best_vc = K, vc
    return best
