"""The exact Gaussian-mixture teacher: the posterior mean E[x0 | x_t] of an isotropic Gaussian mixture, an oracle
teacher whose score is known in closed form."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill.schedules import Schedule


class GaussianMixture:
    """p(x) = sum_k w_k N(x; m_k, std^2 I)."""

    def __init__(self, means: Tensor, std: float, weights: Tensor | None = None):
        self.means = means.to(torch.float64)  # (M, d)
        self.std = float(std)
        M = means.shape[0]
        self.weights = (torch.full((M,), 1.0 / M, dtype=torch.float64) if weights is None
                        else weights.to(torch.float64) / weights.sum())

    @classmethod
    def ring(cls, modes: int, radius: float, std: float) -> GaussianMixture:
        angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        return cls(torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1), std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples (float32) and their mode indices."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.std * torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return x.float(), k

    def log_prob_t(self, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """log p_t(x_t) of the noised mixture sum_k w_k N(a m_k, (a^2 std^2 + s^2) I). a, s: (B, 1)."""
        var = a * a * self.std ** 2 + s * s  # (B, 1)
        m = self.means.to(x_t)
        sq = ((x_t[:, None, :] - a[:, None, :] * m[None]) ** 2).sum(-1)  # (B, M)
        d = self.dim
        logn = -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        return torch.logsumexp(logn + self.weights.to(x_t).log()[None], dim=1)

    def posterior_mean(self, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """E[x0 | x_t] = sum_k r_k(x_t) [m_k + a std^2 / (a^2 std^2 + s^2) (x_t - a m_k)]  (closed form)."""
        var = a * a * self.std ** 2 + s * s  # (B, 1)
        m = self.means.to(x_t)
        diff = x_t[:, None, :] - a[:, None, :] * m[None]  # (B, M, d)
        logits = -0.5 * (diff ** 2).sum(-1) / var + self.weights.to(x_t).log()[None]  # (B, M)
        r = torch.softmax(logits, dim=1)
        gain = (a * self.std ** 2 / var)[:, :, None]  # (B, 1, 1)
        per_mode = m[None] + gain * diff  # (B, M, d)
        return (r[:, :, None] * per_mode).sum(1)


class GaussianMixtureDenoiser(nn.Module):
    """The exact x0-predictor of a Gaussian mixture under `schedule`, computed in float64."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = None
        self.conditional = False
        self.prediction_type = "sample"

    @property
    def T(self) -> int:
        return self.schedule.T

    def forward(self, x_t: Tensor, t: Tensor, cond=None, guidance_scale: float = 1.0) -> Tensor:
        if guidance_scale != 1.0:
            raise ValueError("the Gaussian-mixture teacher is unconditional; guidance_scale must be 1")
        x64 = x_t.to(torch.float64)
        a, s = self.schedule.coefficients(t, x64)
        return self.mixture.posterior_mean(x64, a, s).to(torch.float32)


