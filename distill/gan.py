"""DMD2's GAN term (Yin et al. 2024, "Improved Distribution Matching Distillation", §4.3, "Surpassing the teacher
model using a GAN loss and real data"; docs/method.md, "GAN head"): a small classifier on the fake score's
bottleneck, the UNet mid-block output, read on real and generated samples noised at t ~ U[0, T) (Diffusion-GAN,
Wang et al. 2023). The losses are in `distill.losses`.

- `bottleneck(denoiser, x_t, t, cond)`: the UNet's mid-block output, the forward stopped there (no up block runs:
  DMD2's "classify mode" of its UNet, tianweiy/DMD2 main/sd_guidance.py).
- `GANHead`: Conv 4x4 stride 2 + GroupNorm + SiLU blocks down to 1x1, then a 1x1 conv to one logit (DMD2's
  `cls_pred_branch`).
- `logits` / `logits_at`: noise x0 to a random (or given) t and classify.

Torch and distill.teachers only: no Lightning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from distill.conditions import Condition, as_condition
from distill.errors import ConfigError
from distill.teachers.denoiser import Denoiser


class _Bottleneck(Exception):
    """Raised by the mid-block hook to stop the UNet's forward; carries the mid-block output."""

    def __init__(self, output: Tensor):
        super().__init__("mid-block output (internal: stops the UNet forward)")
        self.output = output


def _unet(denoiser: Denoiser) -> nn.Module:
    unet = getattr(getattr(denoiser, "net", None), "unet", None)
    if unet is None:
        raise ConfigError("gan.weight_generator", "0 for this teacher: the GAN head reads a UNet's bottleneck (its "
                          "mid-block output), and the Gaussian-mixture teacher's networks (an MLP or the exact "
                          "mixture) have none")
    if getattr(unet, "mid_block", None) is None:
        raise ConfigError("gan.weight_generator", f"0 for this teacher: its {type(unet).__name__} has no mid block "
                          f"(mid_block_type null), and the GAN head reads the mid-block output")
    return unet


def bottleneck(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Condition | Tensor | None = None) -> Tensor:
    """The UNet's mid-block output (B, C, h, w) on x_t at time indices t (B,), under the caller's grad mode.

    The network gets exactly what `Denoiser` gives it (same input scaling, the null condition when `cond` is None,
    the adapter's casts; x_t is cast to the UNet's dtype, so a bf16 UNet returns bf16 features). A forward hook
    on `unet.mid_block` raises with the output, so no up block runs (DMD2's classify mode computes the same
    features in about half a forward); the hook is removed however the forward ends. The graph is kept: gradients
    reach x_t and the UNet's trainable parameters (all of them, or the LoRA adapters), with or without gradient
    checkpointing (diffusers checkpoints inside the blocks, so the hook on the block itself fires once).
    """
    unet = _unet(denoiser)
    cond = as_condition(cond)
    if not denoiser.conditional:
        cond = None
    elif cond is None:
        cond = denoiser.null_condition(x_t.shape[0])
    x_in, t_in = denoiser.net_inputs(x_t, t)

    def stop(module: nn.Module, args, output) -> None:
        raise _Bottleneck(output[0] if isinstance(output, tuple) else output)

    handle = unet.mid_block.register_forward_hook(stop)
    try:
        denoiser.net(x_in.to(unet.dtype), t_in, cond)
    except _Bottleneck as reached:
        return reached.output
    finally:
        handle.remove()
    raise RuntimeError(f"{type(unet).__name__}.forward returned without calling its mid_block")


class GANHead(nn.Module):
    """DMD2's classifier branch (tianweiy/DMD2 main/sd_guidance.py, `cls_pred_branch`) on a (channels, h, w)
    bottleneck: Conv2d 4x4 stride 2 padding 1 + GroupNorm + SiLU blocks, each halving the spatial size (rounding
    down), until it is 1 (a 1x1 bottleneck gets no block), then a 1x1 conv to one channel. For a non-square
    bottleneck the blocks stop when the shorter side is 1 and the logit map is averaged.

    GroupNorm uses gcd(32, channels, channels // 8) groups (at least 1): a divisor of the channels with at least 8
    channels per group. DMD2's 32 groups of 1,280 channels have 40 each; 32 groups of 32 channels would have one,
    and on the last block's 1x1 output a one-element group normalises to 0, a head whose logit is the same
    constant for every input (tests/test_gan.py::test_head_logits_depend_on_the_features)."""

    def __init__(self, channels: int, size: int | tuple[int, int]):
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if channels < 1 or h < 1 or w < 1:
            raise ValueError(f"GANHead needs channels >= 1 and a spatial size >= 1, got {channels} x {h} x {w}")
        self.channels, self.size = channels, (h, w)
        layers: list[nn.Module] = []
        groups = math.gcd(32, channels, max(1, channels // 8))
        while min(h, w) > 1:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1),
                       nn.GroupNorm(groups, channels), nn.SiLU()]
            h, w = h // 2, w // 2  # (n + 2 - 4) // 2 + 1
        layers.append(nn.Conv2d(channels, 1, 1))
        self.net = nn.Sequential(*layers)

    @classmethod
    def for_denoiser(cls, denoiser: Denoiser, sample_shape: tuple[int, ...]) -> GANHead:
        """A head sized for `denoiser`'s bottleneck on inputs of `sample_shape` (C, H, W), read by one probe forward
        (batch 1, no grad) that stops at the mid block: exact for any down-sampling layout and odd sizes, where
        H / 2**(down blocks - 1) from the config is not. The head is on the UNet's device, in float32."""
        unet = _unet(denoiser)
        x = torch.zeros((1, *sample_shape), device=unet.device)
        t = torch.zeros(1, dtype=torch.long, device=unet.device)
        with torch.no_grad():
            _, C, h, w = bottleneck(denoiser, x, t, None).shape
        return cls(C, (h, w)).to(unet.device)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) features -> (B,) logits in float32 (the features are cast to the head's dtype)."""
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ValueError(f"GANHead({self.channels}, {self.size}) expects (B, {self.channels}, h, w) features, "
                             f"got {tuple(features.shape)}")
        dtype = self.net[0].weight.dtype
        return self.net(features.to(dtype)).float().mean(dim=(1, 2, 3))  # (B,)


def logits_at(denoiser: Denoiser, head: GANHead, x0: Tensor, cond: Condition | Tensor | None, t: Tensor,
              eps: Tensor) -> Tensor:
    """f(x_t) = head(bottleneck(x_t, t)) with x_t = alpha_t x0 + sigma_t eps: (B,) float32 logits."""
    x_t = denoiser.schedule.add_noise(x0, eps.to(x0.dtype), t)
    return head(bottleneck(denoiser, x_t, t, cond))


def logits(denoiser: Denoiser, head: GANHead, x0: Tensor, cond: Condition | Tensor | None,
           generator: torch.Generator) -> Tensor:
    """Diffusion-GAN logits (DMD2 §4.3): t ~ U{0, ..., T-1} and eps ~ N(0, I), both drawn from `generator` (t
    first, then eps; on the generator's device, then moved to x0's), then `logits_at`. (B,) float32."""
    B = x0.shape[0]
    t = torch.randint(0, denoiser.T, (B,), generator=generator, device=generator.device).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    return logits_at(denoiser, head, x0, cond, t, eps)
