"""Choosing K from measured variance and cost (docs/method.md §5): K* = sqrt(σ_w² c_u / (σ_b² c_i)), as the integer
argmin of variance x cost, from EMA-smoothed estimates, clamped to [1, k_max] and a memory bound."""

from __future__ import annotations

import math

from torch import Tensor

from distill.carv.accounting import optimal_k


MAX_STEP = 2  # K auto changes K by at most this factor per choice


def weighted_mean(y: Tensor, w: Tensor) -> Tensor:
    """ḡ_n = (1/K) Σ_k ω(t_nk) · y_nk for y (N, K, ...) and w (N, K): the hierarchical estimate (docs/method.md §4)."""
    w = w.to(y.dtype).view(*w.shape, *([1] * (y.dim() - 2)))
    return (w * y).mean(dim=1)


class KController:
    """EMA of (σ_b², σ_w²) and of the costs; `choose` re-picks K (only when `auto`)."""

    def __init__(self, K: int, auto: bool, k_max: int, max_draws: int = 0, ema: float = 0.8):
        self.K = int(K)
        self.auto = auto
        self.k_max = int(k_max)
        self.max_draws = int(max_draws)
        self.ema = float(ema)
        self.sigma_b2: float | None = None
        self.sigma_w2: float | None = None
        self.n_observed = 0

    def observe(self, sigma_b2: float, sigma_w2: float) -> None:
        """Fold one pair of estimates into the EMA (they may be negative from noise: kept as measured here)."""
        if not (math.isfinite(sigma_b2) and math.isfinite(sigma_w2)):
            return
        if self.sigma_b2 is None:
            self.sigma_b2, self.sigma_w2 = sigma_b2, sigma_w2
        else:
            self.sigma_b2 = self.ema * self.sigma_b2 + (1 - self.ema) * sigma_b2
            self.sigma_w2 = self.ema * self.sigma_w2 + (1 - self.ema) * sigma_w2
        self.n_observed += 1

    def choose(self, N: int, c_u: float, c_i: float) -> int:
        """The integer K minimising (σ_b² + σ_w²/K)(c_u + K c_i), clamped to [1, k_max] and N·K <= max_draws, and
        moved at most a factor of 2 per choice (MAX_STEP): early estimates are noisy, and one of them must not send
        K from 1 to k_max at once."""
        if not self.auto or self.sigma_b2 is None:
            return self.K
        k_max = self.k_max
        if self.max_draws:
            k_max = max(1, min(k_max, self.max_draws // max(N, 1)))
        target = optimal_k(max(self.sigma_b2, 0.0), max(self.sigma_w2, 0.0), c_u, c_i, k_max=k_max)
        self.K = min(max(target, math.ceil(self.K / MAX_STEP)), self.K * MAX_STEP, k_max)
        return self.K

    def state_dict(self) -> dict:
        return {"K": self.K, "sigma_b2": self.sigma_b2, "sigma_w2": self.sigma_w2, "n_observed": self.n_observed}

    def load_state_dict(self, state: dict) -> None:
        self.K = int(state["K"])
        self.sigma_b2, self.sigma_w2 = state["sigma_b2"], state["sigma_w2"]
        self.n_observed = int(state["n_observed"])
