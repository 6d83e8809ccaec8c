"""Teachers, the networks copied from them, and the samplers (docs/method.md §1-§2).

- `denoiser`: the x0 interface D(x_t, t, cond) with classifier-free guidance and EDM preconditioning, the one-step
  generator, DDIM, the EMA.
- `loading`: UNet2DModel folders and Stable Diffusion (1.x/2.x, XL) pipeline folders.
- `text`: the frozen text encoder(s) and VAE of a latent text-to-image teacher.
- `gmm`: the exact Gaussian-mixture teacher.
"""

from distill.teachers.denoiser import (
    MLP,
    Denoiser,
    Generator,
    TextUNetAdapter,
    UNetAdapter,
    ddim_sample,
    ema_update,
    trainable_copy,
)
from distill.teachers.gmm import GaussianMixture, GaussianMixtureDenoiser
from distill.teachers.loading import (
    Teacher,
    build_unet,
    load_diffusers_teacher,
    load_schedule,
    load_teacher,
    sample_shape_of,
)
from distill.teachers.text import LatentCodec, TextEncoder

__all__ = [
    "MLP", "Denoiser", "GaussianMixture", "GaussianMixtureDenoiser", "Generator", "LatentCodec", "Teacher",
    "TextEncoder", "TextUNetAdapter", "UNetAdapter", "build_unet", "ddim_sample", "ema_update",
    "load_diffusers_teacher", "load_schedule", "load_teacher", "sample_shape_of", "trainable_copy",
]
