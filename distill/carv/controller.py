"""Choosing K from measured variance and cost (docs/method.md §5): the integer argmin of variance x cost,
(σ_b² + v(K))(c_u + K c_i), from EMA-smoothed estimates, clamped to [1, k_max] and a memory bound. v(K) is the
within-sample variance of the estimator in use: σ_w²/K for iid draws, a/K + b/K³ fitted from a stratified
measurement when the sampler stratifies; σ_b² includes a multi-step student's spread over its steps."""

from __future__ import annotations

import math

from torch import Tensor

from distill.carv.accounting import choose_k, within_model


MAX_STEP = 2  # K auto changes K by at most this factor per choice


def weighted_mean(y: Tensor, w: Tensor) -> Tensor:
    """ḡ_n = (1/K) Σ_k ω(t_nk) · y_nk for y (N, K, ...) and w (N, K): the hierarchical estimate (docs/method.md §4)."""
    w = w.to(y.dtype).view(*w.shape, *([1] * (y.dim() - 2)))
    return (w * y).mean(dim=1)


class KController:
    """EMA of the split-half (σ_b², σ_w²), of the stratified σ_w,strat²(K_s) and of a multi-step student's
    across-step term; `choose` re-picks K (only when `auto`)."""

    OPTIONAL = ("sigma_w2_strat", "sigma_b2_steps")

    def __init__(self, K: int, auto: bool, k_max: int, max_draws: int = 0, ema: float = 0.8, strat_K: int = 2):
        self.K = int(K)
        self.auto = auto
        self.k_max = int(k_max)
        self.max_draws = int(max_draws)
        self.ema = float(ema)
        self.strat_K = int(strat_K)  # K_s, the draws per set of the stratified measurement
        self.sigma_b2: float | None = None
        self.sigma_w2: float | None = None
        self.sigma_w2_strat: float | None = None  # σ_w,strat²(K_s); None: iid draws (nothing measured)
        self.sigma_b2_steps: float | None = None  # N_global · Var_k(E[Ĝ | k]); None: a one-step student
        self.n_observed = 0

    def _fold(self, old: float | None, new: float) -> float:
        return new if old is None else self.ema * old + (1 - self.ema) * new

    def observe(self, sigma_b2: float, sigma_w2: float, sigma_w2_strat: float | None = None,
                sigma_b2_steps: float | None = None) -> None:
        """Fold one set of estimates into the EMA (they may be negative from noise: kept as measured here);
        non-finite optional terms (not measured this time) are skipped."""
        if not (math.isfinite(sigma_b2) and math.isfinite(sigma_w2)):
            return
        self.sigma_b2, self.sigma_w2 = self._fold(self.sigma_b2, sigma_b2), self._fold(self.sigma_w2, sigma_w2)
        for name, value in zip(self.OPTIONAL, (sigma_w2_strat, sigma_b2_steps)):
            if value is not None and math.isfinite(value):
                setattr(self, name, self._fold(getattr(self, name), value))
        self.n_observed += 1

    def model(self) -> tuple[float, float, float]:
        """(σ_b² with the across-step term, a, b) of Var·Cost = (σ_b² + a/K + b/K³)(c_u + K c_i), clamped at 0."""
        sigma_b2 = max(self.sigma_b2, 0.0) + max(self.sigma_b2_steps or 0.0, 0.0)
        a, b = within_model(max(self.sigma_w2, 0.0), self.sigma_w2_strat, self.strat_K)
        return sigma_b2, a, b

    def _k_max(self, N: int) -> int:
        """k_max, and N·K <= max_draws when a memory bound is set."""
        return max(1, min(self.k_max, self.max_draws // max(N, 1))) if self.max_draws else self.k_max

    def target(self, N: int, c_u: float, c_i: float) -> int:
        """The K minimising Var·Cost under `model()`, in [1, k_max] and N·K <= max_draws."""
        return choose_k(*self.model(), c_u, c_i, k_max=self._k_max(N))

    def choose(self, N: int, c_u: float, c_i: float) -> int:
        """`target`, moved at most a factor of 2 per choice (MAX_STEP): early estimates are noisy, and one of them
        must not send K from 1 to k_max at once."""
        if not self.auto or self.sigma_b2 is None:
            return self.K
        self.K = min(max(self.target(N, c_u, c_i), math.ceil(self.K / MAX_STEP)), self.K * MAX_STEP, self._k_max(N))
        return self.K

    def state_dict(self) -> dict:
        return {"K": self.K, "sigma_b2": self.sigma_b2, "sigma_w2": self.sigma_w2,
                "sigma_w2_strat": self.sigma_w2_strat, "sigma_b2_steps": self.sigma_b2_steps,
                "n_observed": self.n_observed}

    def load_state_dict(self, state: dict) -> None:
        self.K = int(state["K"])
        self.sigma_b2, self.sigma_w2 = state["sigma_b2"], state["sigma_w2"]
        for name in self.OPTIONAL:  # absent from checkpoints written before they were measured
            setattr(self, name, state.get(name))
        self.n_observed = int(state["n_observed"])
