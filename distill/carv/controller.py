"""Choosing K from measured variance and cost (docs/method.md §5): the integer argmin of variance x cost,
(σ_b² + v(K))(c_u + K c_i), from EMA-smoothed estimates, clamped to [1, k_max] and a memory bound. v(K) is the
within-sample variance of the estimator in use: σ_w²/K for iid draws, a/K + b/K³ fitted from a stratified
measurement when the sampler stratifies; σ_b² includes a multi-step student's spread over its steps.

K is chosen at the posterior mean of σ_b², not its EMA: Var·Cost is linear in σ_b², so the expected Var·Cost under
what is known of σ_b² is least at σ_b²'s expectation. Known: σ_b² >= 0, and the EMA, whose standard error is read
from the spread of the raw estimates it folded. With a flat prior on [0, ∞) and the EMA normal about σ_b², that
expectation is the mean of a normal truncated at 0: the EMA where σ_b² is resolved, about 0.8 standard errors where
the EMA sits near 0 on noise (early in training, when the fake score is still the teacher's copy), where the EMA
clamped at 0 would send K to k_max."""

from __future__ import annotations

import math

import torch
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
        self.sigma_b2_sq: float | None = None  # EMA of the raw σ_b² estimates' squares (their spread)
        self.weight_sq = 1.0  # Σ w_i² of the EMA's weights w_i over the estimates folded so far
        self.n_observed = 0

    def _fold(self, old: float | None, new: float) -> float:
        return new if old is None else self.ema * old + (1 - self.ema) * new

    def observe(self, sigma_b2: float, sigma_w2: float, sigma_w2_strat: float | None = None,
                sigma_b2_steps: float | None = None) -> None:
        """Fold one set of estimates into the EMA (they may be negative from noise: kept as measured here);
        non-finite optional terms (not measured this time) are skipped."""
        if not (math.isfinite(sigma_b2) and math.isfinite(sigma_w2)):
            return
        if self.sigma_b2 is not None:  # the newest weight 1 - ema, the older ones scaled by ema
            self.weight_sq = self.ema ** 2 * self.weight_sq + (1 - self.ema) ** 2
        self.sigma_b2_sq = self._fold(self.sigma_b2_sq, sigma_b2 ** 2)
        self.sigma_b2, self.sigma_w2 = self._fold(self.sigma_b2, sigma_b2), self._fold(self.sigma_w2, sigma_w2)
        for name, value in zip(self.OPTIONAL, (sigma_w2_strat, sigma_b2_steps)):
            if value is not None and math.isfinite(value):
                setattr(self, name, self._fold(getattr(self, name), value))
        self.n_observed += 1

    def sigma_b2_se(self) -> float | None:
        """The standard error of σ_b²'s EMA, from the weighted spread of the raw estimates it folded: for
        independent estimates of variance s² and normalised weights w_i, E[Σ w_i (x_i - x̄)²] = s²(1 - Σw_i²) and
        Var(x̄) = s² Σw_i². None until two estimates are in; 0 with ema 0 (K follows each estimate)."""
        if self.sigma_b2 is None or (self.ema > 0 and self.weight_sq >= 1.0):
            return None
        if self.ema == 0:
            return 0.0
        spread = max(self.sigma_b2_sq - self.sigma_b2 ** 2, 0.0)
        return math.sqrt(spread * self.weight_sq / (1.0 - self.weight_sq))

    def sigma_b2_posterior(self) -> float | None:
        """E[σ_b² | σ_b² >= 0] for σ_b² ~ N(EMA, SE²) truncated at 0: m + s·φ(m/s)/Φ(m/s) (the ratio in logs, so
        that an EMA many errors below 0 gives its limit, about s²/|m|); the EMA clamped at 0 when SE = 0. What K is
        chosen from. None until two estimates."""
        se = self.sigma_b2_se()
        if se is None:
            return None
        m = self.sigma_b2
        if se == 0.0:
            return max(m, 0.0)
        z = torch.tensor(m / se, dtype=torch.float64)
        ratio = torch.exp(-z * z / 2 - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(z))  # φ(z)/Φ(z)
        return max(m + se * float(ratio), 0.0)

    def model(self, sigma_b2: float | None = None) -> tuple[float, float, float]:
        """(σ_b² with the across-step term, a, b) of Var·Cost = (σ_b² + a/K + b/K³)(c_u + K c_i), clamped at 0;
        `sigma_b2` in place of the EMA (the posterior mean `target` chooses from)."""
        sigma_b2 = max(self.sigma_b2 if sigma_b2 is None else sigma_b2, 0.0) + max(self.sigma_b2_steps or 0.0, 0.0)
        a, b = within_model(max(self.sigma_w2, 0.0), self.sigma_w2_strat, self.strat_K)
        return sigma_b2, a, b

    def _k_max(self, N: int) -> int:
        """k_max, and N·K <= max_draws when a memory bound is set."""
        return max(1, min(self.k_max, self.max_draws // max(N, 1))) if self.max_draws else self.k_max

    def target(self, N: int, c_u: float, c_i: float) -> int:
        """The K minimising Var·Cost under the model at σ_b²'s posterior mean (its EMA until that is known), in
        [1, k_max] and N·K <= max_draws."""
        return choose_k(*self.model(self.sigma_b2_posterior()), c_u, c_i, k_max=self._k_max(N))

    def choose(self, N: int, c_u: float, c_i: float) -> int:
        """`target`, moved at most a factor of 2 per choice (MAX_STEP): early estimates are noisy, and one of them
        must not send K from 1 to k_max at once. K holds until two estimates give σ_b²'s standard error."""
        if not self.auto or self.sigma_b2_se() is None:  # (the posterior mean needs the standard error)
            return self.K
        self.K = min(max(self.target(N, c_u, c_i), math.ceil(self.K / MAX_STEP)), self.K * MAX_STEP, self._k_max(N))
        return self.K

    def state_dict(self) -> dict:
        return {"K": self.K, "sigma_b2": self.sigma_b2, "sigma_w2": self.sigma_w2,
                "sigma_w2_strat": self.sigma_w2_strat, "sigma_b2_steps": self.sigma_b2_steps,
                "sigma_b2_sq": self.sigma_b2_sq, "weight_sq": self.weight_sq, "n_observed": self.n_observed}

    def load_state_dict(self, state: dict) -> None:
        self.K = int(state["K"])
        self.sigma_b2, self.sigma_w2 = state["sigma_b2"], state["sigma_w2"]
        for name in self.OPTIONAL:  # absent from checkpoints written before they were measured
            setattr(self, name, state.get(name))
        # absent before the posterior mean: the spread restarts from the EMA as one estimate
        self.sigma_b2_sq = state.get("sigma_b2_sq", None if self.sigma_b2 is None else self.sigma_b2 ** 2)
        self.weight_sq = float(state.get("weight_sq", 1.0))
        self.n_observed = int(state["n_observed"])
