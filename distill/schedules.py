"""Discrete-index noise schedules (alpha_t, sigma_t) and the eps / v / x0 conversions (docs/method.md §1).

x_t = alpha_t * x0 + sigma_t * eps, t in {0..T-1}, noise increasing with t.
  VP (DDPM):  alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), abar from the diffusers scheduler.
  EDM (VE):   alpha_t = 1, sigma_t on the Karras grid (Karras et al. 2022, eq. 5), reversed so t grows with noise.
Tables are kept in float64; conversions run in the dtype of their inputs (callers pass float32 or float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Schedule:
    """alpha_t, sigma_t for t = 0..T-1, float64."""

    alpha: Tensor  # (T,)
    sigma: Tensor  # (T,)
    kind: str  # "vp" | "edm"

    @property
    def T(self) -> int:
        return self.alpha.numel()

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t, sigma_t gathered at integer indices t (shape (B,)) and shaped to broadcast against `like`."""
        shape = (-1,) + (1,) * (like.dim() - 1)
        a = self.alpha.to(like.device)[t].to(like.dtype).reshape(shape)
        s = self.sigma.to(like.device)[t].to(like.dtype).reshape(shape)
        return a, s

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha_t x0 + sigma_t eps."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps

    def snr(self) -> Tensor:
        return (self.alpha / self.sigma) ** 2


def vp_schedule(alphas_cumprod: Tensor) -> Schedule:
    """VP schedule from a diffusers scheduler's `alphas_cumprod`."""
    abar = alphas_cumprod.to(torch.float64)
    return Schedule(alpha=abar.sqrt(), sigma=(1.0 - abar).sqrt(), kind="vp")


def karras_sigmas(T: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: T sigmas, increasing (index 0 is sigma_min, index T-1 is sigma_max)."""
    ramp = torch.linspace(0, 1, T, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (inv_max + ramp * (inv_min - inv_max)).pow(rho).flip(0)


def edm_schedule(T: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Schedule:
    """EDM (VE) schedule: alpha_t = 1, sigma_t on the Karras grid."""
    sigma = karras_sigmas(T, sigma_min, sigma_max, rho)
    return Schedule(alpha=torch.ones_like(sigma), sigma=sigma, kind="edm")


# --- conversions between the three parameterisations (a = alpha_t, s = sigma_t, broadcastable) --------------


def x0_from_eps(x_t: Tensor, eps: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (x_t - s * eps) / a


def eps_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    return (x_t - a * x0) / s


def v_from_x0(x_t: Tensor, x0: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """v = a eps - s x0 (Salimans & Ho 2022; diffusers' `get_velocity` for VP)."""
    return a * eps_from_x0(x_t, x0, a, s) - s * x0


def x0_from_v(x_t: Tensor, v: Tensor, a: Tensor, s: Tensor) -> Tensor:
    """Inverse of v_from_x0: a x_t - s v = (a^2 + s^2) x0 (= x0 times 1 for VP)."""
    return (a * x_t - s * v) / (a * a + s * s)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_x0(pred: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    """A network's raw output -> x0 prediction."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, pred, a, s)
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, pred, a, s)
    if prediction_type == "sample":
        return pred
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def from_x0(x0: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    """An x0 prediction -> the raw output a network of that type would give."""
    if prediction_type == "epsilon":
        return eps_from_x0(x_t, x0, a, s)
    if prediction_type == "v_prediction":
        return v_from_x0(x_t, x0, a, s)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def x0_loss_weight(a: Tensor, s: Tensor, prediction_type: str) -> Tensor:
    """w with ||raw - raw_target||^2 = w ||x0_hat - x0||^2: the network's own training loss in x0 terms.

    eps: x0_hat - x0 = -(s/a)(eps_hat - eps)  ->  w = a^2/s^2 (the SNR)
    v:   x0_hat - x0 = -s/(a^2+s^2) (v_hat - v) -> w = (a^2+s^2)^2/s^2 (SNR + 1 for VP)
    x0:  w = 1
    """
    if prediction_type == "epsilon":
        return (a / s) ** 2
    if prediction_type == "v_prediction":
        return (a * a + s * s) ** 2 / (s * s)
    if prediction_type == "sample":
        return torch.ones_like(a)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
