"""The DMD objective (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation"; DMD2,
Yin et al. 2024, "Improved Distribution Matching Distillation") in the reference form of the DMD2 code
(tianweiy/DMD2, main/sd_guidance.py, compute_distribution_matching_loss), and the fake-score denoising loss.

Every function returns unreduced per-sample (or per-draw) values; the caller reduces.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sample_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.dim()))


def dmd_grad(x: Tensor, mu_real: Tensor, mu_fake: Tensor) -> Tensor:
    """Per-draw DMD integrand g = (mu_fake - mu_real) / mean_{c,h,w} |x - mu_real|   (docs/method.md §3).

    x, mu_real, mu_fake: (B, ...) with the first axis indexing draws. The normaliser is per draw; pooling it over
    draws would change the objective. The DMD paper's eq. 7 carries an extra alpha_t factor that the DMD2 code
    drops; we follow the code. Non-finite entries go through `nan_to_num` as in the reference: NaN becomes 0 and
    ±inf the largest finite float, so the loss of such a draw is non-finite and the update is skipped.
    """
    x, mu_real, mu_fake = x.float(), mu_real.float(), mu_fake.float()
    normaliser = (x - mu_real).abs().mean(dim=_sample_dims(x), keepdim=True)  # (B, 1, ...)
    return torch.nan_to_num((mu_fake - mu_real) / normaliser)


def dmd_loss(x: Tensor, g: Tensor) -> Tensor:
    """Surrogate 0.5 * mse(x, stopgrad(x - g)) per sample, (B,): its gradient w.r.t. x is g / numel after .mean()."""
    target = (x - g).detach()
    return 0.5 * ((x.float() - target.float()) ** 2).mean(dim=_sample_dims(x))


def denoising_loss(x0_hat: Tensor, x0: Tensor, weight: Tensor) -> Tensor:
    """weight * mean ||x0_hat - x0||^2 per sample, (B,). With `Denoiser.loss_weight` this is the network's native
    eps-, v- or x0-prediction loss (or EDM's lambda(sigma)-weighted one), the fake score's training objective."""
    per = ((x0_hat.float() - x0.float()) ** 2) * weight.float()
    return per.mean(dim=_sample_dims(x0_hat))


# DMD2's GAN term (Yin et al. 2024, "Improved Distribution Matching Distillation", §4.3, "Surpassing the teacher
# model using a GAN loss and real data"; the reference is tianweiy/DMD2 main/sd_guidance.py, the classifier
# losses): non-saturating logistic losses on the head's logits.
# softplus(x) = log(1 + e^x) is evaluated stably, so large |logits| give finite values and gradients.


def gan_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """softplus(f(fake)) + softplus(-f(real)) per sample, (B,) float32: -log(1 - D(fake)) - log D(real) with
    D = sigmoid(f). Real and fake rows are paired by position (the caller's batch); the means are DMD2's loss."""
    if real_logits.shape != fake_logits.shape:
        raise ValueError(f"real and fake logits must have one shape, got {tuple(real_logits.shape)} and "
                         f"{tuple(fake_logits.shape)}")
    return torch.nn.functional.softplus(fake_logits.float()) + torch.nn.functional.softplus(-real_logits.float())


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """softplus(-f(fake)) per sample, (B,) float32: the non-saturating generator loss -log D(fake)."""
    return torch.nn.functional.softplus(-fake_logits.float())
