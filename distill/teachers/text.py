"""The frozen parts of a latent text-to-image teacher besides its UNet: the text encoder(s), which turn a batch of
prompts into a `Condition` exactly as the diffusers pipelines do, and the VAE, which only decodes latents to images
(for sample grids and evaluation). DMD2 keeps both frozen and runs the text encoder on every batch of prompts; all
losses live in latent space (Yin et al. 2024, "Improved Distribution Matching Distillation", §5 and its reference
code's SD guidance model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.conditions import Condition


class TextEncoder(nn.Module):
    """Prompts -> Condition, as `StableDiffusionPipeline.encode_prompt` (layout "sd": the text encoder's last hidden
    state) or `StableDiffusionXLPipeline.encode_prompt` (layout "sdxl": the penultimate hidden states of both
    encoders side by side, the second encoder's projected pooled output, and the time ids of an uncropped image of
    the target size). The null condition follows the same pipelines: the empty prompt's encoding for "sd", zeros for
    "sdxl" (`force_zeros_for_empty_prompt`)."""

    def __init__(self, tokenizers: Sequence, encoders: Sequence[nn.Module], layout: str, image_size: tuple[int, int]):
        super().__init__()
        if layout not in ("sd", "sdxl"):
            raise ValueError(f"layout {layout!r}; expected sd or sdxl")
        self.tokenizers = list(tokenizers)
        self.encoders = nn.ModuleList(encoders)
        self.layout = layout
        self.image_size = tuple(image_size)

    def _ids(self, tokenizer, prompts: list[str]) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Condition:
        prompts = list(prompts)
        device = next(self.encoders[0].parameters()).device
        if self.layout == "sd":
            tokenizer, encoder = self.tokenizers[0], self.encoders[0]
            text = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt")
            mask = text.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
            return Condition(embeds=encoder(text.input_ids.to(device), attention_mask=mask)[0])
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            out = encoder(self._ids(tokenizer, prompts).to(device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output (CLIPTextModelWithProjection)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        H, W = self.image_size
        time_ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=embeds.dtype, device=device).expand(len(prompts), 6)
        return Condition(embeds=embeds, pooled=pooled, time_ids=time_ids)

    @torch.no_grad()
    def null(self) -> Condition:
        """The null condition, one row."""
        cond = self([""])
        if self.layout == "sdxl":
            return Condition(embeds=torch.zeros_like(cond.embeds), pooled=torch.zeros_like(cond.pooled),
                             time_ids=cond.time_ids)
        return cond


class LatentCodec(nn.Module):
    """The frozen VAE: latents (scaled by the VAE's `scaling_factor`, as the UNet sees them) <-> images in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel (2 ** (levels - 1), as the pipelines compute it)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _unscale(self, latents: Tensor) -> Tensor:
        c = self.vae.config
        mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
        if mean is not None and std is not None:  # SDXL-style per-channel statistics (when the config has them)
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean, device=latents.device).view(shape)
            std = torch.tensor(std, device=latents.device).view(shape)
            return latents * std / c.scaling_factor + mean
        return latents / c.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1], float32."""
        x = self._unscale(latents.float()).to(self.vae.dtype)
        return self.vae.decode(x).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of images in [-1, 1] (a draw from the VAE's posterior)."""
        c = self.vae.config
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample(generator).float()
        mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean, device=latents.device).view(shape)
            std = torch.tensor(std, device=latents.device).view(shape)
            return (latents - mean) * c.scaling_factor / std
        return latents * c.scaling_factor
