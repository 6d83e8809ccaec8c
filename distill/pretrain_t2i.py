"""The shipped latent text-to-image teacher (`distill teacher`, kind t2i): a tiny Stable Diffusion 1.x pipeline
trained here on scikit-learn's digits, so that stock `diffusers.StableDiffusionPipeline.from_pretrained` loads and
samples it and `distill fit` distils it.

The recipe, as in latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", §3):
1. Data: the 8x8 digits of the shards, upsampled to `t2i.resolution`; each image gets a caption from a template
   drawn per sample ("a photo of a handwritten seven"), or the empty prompt with probability `t2i.caption_dropout`
   (the null condition of classifier-free guidance, Ho & Salimans 2022, as SD 1.x trains it).
2. VAE stage (a plain loop, before the UNet): an AutoencoderKL trained on reconstruction MSE plus a small KL term,
   then frozen; its `scaling_factor` is 1 / std of the training latents, so that scaled latents have unit
   variance (LDM's `scale_by_std`, CompVis/latent-diffusion ldm/models/diffusion/ddpm.py). It is saved to
   <run.dir>/vae, and a resumed or restarted run reuses it rather than training it again.
3. Text: a frozen CLIPTextModel with seeded random weights and a word-level CLIPTokenizer whose vocab.json and
   merges.txt are written here (every template word is one token, built by full-word merges; every other text
   still tokenizes, by characters). Random weights suffice: the digit's word is its own token, so its embedding
   differs between digits, and the UNet's cross-attention learns to read it.
4. UNet stage (Lightning, checkpointed and resumed like every `distill teacher` run): a UNet2DConditionModel on the
   scaled latents with the DDPM loss (Ho et al. 2020, eq. 14) of its prediction type, on a scaled-linear DDPM
   schedule with `clip_sample: false`; its EMA weights are what is saved.

Every random number of a UNet step (the batch, the templates, the dropped captions, the VAE posterior draw, t and
eps) is a function of (seed, rank, step): the digits are held in memory (1,617 images of 64 pixels) and each step
draws its batch from its own generator, so a resumed run continues exactly as the uninterrupted one would.

`prompt_accuracy` scores images against their prompts with the shipped digits classifier (the images brought to
8x8 by average pooling); `teacher_prompt_accuracy` samples a pipeline folder with DDIM and scores it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.config import TeacherTrainConfig, to_yaml
from distill.errors import DataError, DistillError
from distill.metrics import DIGIT_WORDS, digit_of_prompt
from distill.plots import grid_image
from distill.pretrain import TeacherTraining
from distill.schedules import from_x0, vp_schedule
from distill.teachers import Denoiser, TextUNetAdapter, ddim_sample
from distill.teachers.text import TextEncoder

# SD 1.x's schedule (scheduler_config.json of stable-diffusion-v1-5): scaled_linear betas from 0.00085 to 0.012
SD_BETA_START, SD_BETA_END = 0.00085, 0.012
_NORM_GROUPS = 8  # GroupNorm groups of the VAE and the UNet (channels are multiples of 8)


# --------------------------------------------------------------------------------------------------------------
# Captions and the tokenizer.


def prompt_list(templates: Sequence[str]) -> list[str]:
    """Every template with every digit's word, template by template: the prompt set the distillation reads
    (data/prompts/t2i-digits.txt)."""
    return [t.format(word) for t in templates for word in DIGIT_WORDS]


def digit_of(prompt: str) -> int:
    """The digit a prompt names with the words `a handwritten <word>` (the first such phrase)."""
    digit = digit_of_prompt(prompt)
    if digit is None:
        raise DistillError(f"prompt {prompt!r} names no digit; expected the words 'a handwritten <word>' with <word> "
                           f"one of {', '.join(DIGIT_WORDS)}")
    return digit


def _words(text: str) -> list[str]:
    """CLIP's pre-tokenisation of lowercase text into words and punctuation (what gets a token each)."""
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def _byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: the 256 symbols byte-level BPE starts from (openai/CLIP
    clip/simple_tokenizer.py, bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str | Path, templates: Sequence[str], max_length: int):
    """A word-level CLIPTokenizer over the templates' words and the digit words, from vocab.json and merges.txt
    written to `folder`. Each word w gets the chain of merges w[0] w[1] -> w[:2], w[:2] w[2] -> w[:3], ... ending in
    `w</w>`; longer words' chains rank first, so that a shorter word's merges ("a n" of "and") never split a
    longer word ("handwritten") before its own chain completes. The 256 byte symbols (and their end-of-word
    forms) stay in the vocabulary, so any text tokenizes, by characters where it is not a known word."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for p in prompt_list(templates) for w in _words(p)}, key=lambda w: (-len(w), w))
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        token = parts[0]
        for part in parts[1:]:
            merges.append(f"{token} {part}")
            token += part
            vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    # the paths positionally: transformers 5.x ignores the vocab_file= / merges_file= keywords
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    longest = max(len(tokenizer(p).input_ids) for p in prompt_list(templates))
    if longest > max_length:
        raise DistillError(f"config key 'text.max_length': a caption takes {longest} tokens (start and end "
                           f"included); expected text.max_length >= {longest}")
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# The components.


def build_text_encoder(vocab_size: int, cfg: TeacherTrainConfig):
    """A CLIPTextModel of cfg.text's size with random weights (seeded by the caller), frozen."""
    from transformers import CLIPTextConfig, CLIPTextModel

    t = cfg.text
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=4 * t.hidden_size,
                            num_hidden_layers=t.layers, num_attention_heads=t.heads,
                            max_position_embeddings=t.max_length, projection_dim=t.hidden_size,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(config).requires_grad_(False).eval()


def build_vae(cfg: TeacherTrainConfig, channels: int):
    from diffusers import AutoencoderKL

    v = cfg.vae
    levels = len(v.block_out_channels)
    return AutoencoderKL(in_channels=channels, out_channels=channels, latent_channels=v.latent_channels,
                         block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         norm_num_groups=_NORM_GROUPS, sample_size=cfg.t2i.resolution, scaling_factor=1.0)


def latent_shape(cfg: TeacherTrainConfig) -> tuple[int, int, int]:
    side = cfg.t2i.resolution // 2 ** (len(cfg.vae.block_out_channels) - 1)
    return cfg.vae.latent_channels, side, side  # (C, h, w)


def build_cond_unet(cfg: TeacherTrainConfig):
    """A UNet2DConditionModel on the latents, cross-attending to the text encoder's last hidden state in its middle
    block and, with unet.attention, at the first level (the latents' full resolution, where the layout of the digit
    is decided; tests/tiny_pipelines.py's layout). Measured on 2 CPU cores at batch 64, (32, 64) channels: 0.25 s
    a step (0.31 s with transformer blocks at every level); with them at the lowest level instead (0.20 s) the
    teacher followed its prompts less (prompt accuracy 0.90 at guidance 2 after 2,500 steps)."""
    from diffusers import UNet2DConditionModel

    u, channels = cfg.unet, list(cfg.unet.block_out_channels)
    C, h, _ = latent_shape(cfg)
    down = ["CrossAttnDownBlock2D" if u.attention else "DownBlock2D"] + ["DownBlock2D"] * (len(channels) - 1)
    up = [b.replace("Down", "Up") for b in reversed(down)]
    # diffusers' `attention_head_dim` of UNet2DConditionModel is the number of heads (a naming slip it keeps for
    # compatibility, see its docstring); heads of t2i.attention_head_dim channels each are asked for that way
    heads = tuple(max(1, c // cfg.t2i.attention_head_dim) for c in channels)
    return UNet2DConditionModel(sample_size=h, in_channels=C, out_channels=C, block_out_channels=tuple(channels),
                                layers_per_block=u.layers_per_block, down_block_types=tuple(down),
                                up_block_types=tuple(up), norm_num_groups=_NORM_GROUPS,
                                cross_attention_dim=cfg.text.hidden_size, attention_head_dim=heads)


def build_scheduler(cfg: TeacherTrainConfig):
    from diffusers import DDPMScheduler

    u = cfg.unet
    return DDPMScheduler(num_train_timesteps=u.num_train_timesteps, beta_schedule=u.beta_schedule,
                         beta_start=SD_BETA_START, beta_end=SD_BETA_END, prediction_type=u.prediction_type,
                         clip_sample=False, steps_offset=1)  # steps_offset 1 as SD 1.x (diffusers warns otherwise)


def upsample(images: Tensor, resolution: int, mode: str) -> Tensor:
    """(N, C, 8, 8) digits in [-1, 1] -> (N, C, resolution, resolution)."""
    if mode == "nearest":
        return F.interpolate(images, size=(resolution, resolution), mode="nearest")
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)


def to_digits_size(images: Tensor) -> Tensor:
    """Images (N, C, H, W) with H, W multiples of 8 -> (N, C, 8, 8) by average pooling (exactly the digit again
    for a nearest upsampling)."""
    H, W = images.shape[-2:]
    if H % 8 or W % 8:
        raise DistillError(f"images of {H}x{W} pixels cannot be pooled to the digits classifier's 8x8; expected "
                           f"multiples of 8")
    return F.avg_pool2d(images, kernel_size=(H // 8, W // 8))


def load_digits(path: str | Path, split: str = "train") -> tuple[Tensor, Tensor]:
    """Every image and label of a split of the digits shards: (N, 1, 8, 8) in [-1, 1], (N,)."""
    from distill.data import iterate_split, read_meta

    meta = read_meta(path)
    classes = [str(c) for c in meta.get("classes", [])]
    shape = (int(meta["channels"]), *map(int, meta["resolution"]))
    if classes != [str(d) for d in range(10)] or shape != (1, 8, 8):
        raise DataError(f"data.path {str(path)!r} holds {len(classes)} classes {classes[:12]} of shape {shape}; kind "
                        f"t2i captions the digits: expected the shards of `distill data digits` (classes 0..9, "
                        f"1x8x8)")
    batches = list(iterate_split(path, split, batch_size=1024, every_rank=True))
    images = torch.cat([b[0] for b in batches])  # (N, 1, 8, 8)
    labels = torch.cat([b[1] for b in batches])  # (N,)
    return images, labels


# --------------------------------------------------------------------------------------------------------------
# 2. The VAE stage.


def vae_loss(vae, x: Tensor, kl_weight: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel reconstruction MSE + kl_weight * KL(q(z|x) || N(0, I)) per pixel (LDM's VAE objective without its
    perceptual and adversarial terms, both summed per image there, so that kl_weight means what it means there).
    Returns (loss, mse, kl per pixel), each a scalar."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    mse = F.mse_loss(recon, x)
    kl = posterior.kl().mean() / x[0].numel()  # .kl() sums over the latent's elements
    return mse + kl_weight * kl, mse, kl


def train_vae(vae, images: Tensor, cfg: TeacherTrainConfig, progress: bool = True) -> list[float]:
    """Train `vae` in place on `images` (N, C, R, R) for cfg.vae.steps steps of random batches (seeded by
    trainer.seed); returns the loss every 50 steps."""
    from tqdm.auto import tqdm

    v = cfg.vae
    gen = torch.Generator().manual_seed(cfg.trainer.seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=v.lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(v.steps), desc="distill teacher: vae", unit="step", dynamic_ncols=True, disable=not progress)
    for step in bar:
        x = images[torch.randint(len(images), (v.batch_size,), generator=gen)]
        loss, mse, kl = vae_loss(vae, x, v.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == v.steps - 1:
            losses.append(round(loss.item(), 6))
            bar.set_postfix({"mse": f"{mse.item():.4g}", "kl": f"{kl.item():.3g}"}, refresh=False)
    return losses


@torch.no_grad()
def latent_std(vae, images: Tensor, seed: int, batch_size: int = 512) -> float:
    """Std of posterior draws of the latents of `images`, over every element (LDM's scale_by_std)."""
    gen = torch.Generator().manual_seed(seed)
    draws = [vae.encode(images[i:i + batch_size]).latent_dist.sample(gen) for i in range(0, len(images), batch_size)]
    return torch.cat(draws).double().std().item()


@torch.no_grad()
def reconstruction_accuracy(vae, images8: Tensor, labels: Tensor, cfg: TeacherTrainConfig,
                            classifier=None) -> dict:
    """The digits classifier's accuracy on VAE reconstructions (posterior means, decoded) of 8x8 digits brought to
    t2i.resolution and back to 8x8, beside its accuracy on the digits themselves, and the reconstruction MSE."""
    from distill.metrics import accuracy, load_digits_classifier

    classifier = classifier or load_digits_classifier()
    x = upsample(images8, cfg.t2i.resolution, cfg.t2i.upsample)
    recon = torch.cat([vae.decode(vae.encode(x[i:i + 512]).latent_dist.mode()).sample.clamp(-1, 1)
                       for i in range(0, len(x), 512)])
    return {"reconstruction_accuracy": accuracy(classifier, to_digits_size(recon), labels),
            "original_accuracy": accuracy(classifier, images8, labels),
            "reconstruction_mse": F.mse_loss(recon, x).item(), "images": len(labels)}


def vae_recipe(cfg: TeacherTrainConfig) -> dict:
    """What the VAE stage depends on: a saved VAE is reused only by a run with the same recipe. The text sections
    belong to it because the VAE's initial weights are drawn after the text encoder's, from the same seeded
    stream."""
    recipe = {"vae": dataclasses.asdict(cfg.vae), "resolution": cfg.t2i.resolution, "upsample": cfg.t2i.upsample,
              "templates": list(cfg.t2i.templates), "text": dataclasses.asdict(cfg.text), "data": str(cfg.data.path),
              "seed": cfg.trainer.seed}
    return json.loads(json.dumps(recipe))


def prepare_vae(module: T2ITeacherModule, run_dir: Path, cfg: TeacherTrainConfig, progress: bool = True) -> dict:
    """Stage 2: train the VAE, or reuse <run.dir>/vae when an earlier attempt of the same recipe saved it; load
    it into the module with its scaling factor. A VAE of another recipe is moved to <run.dir>/superseded/. Returns
    what the stage measured (its wall time, the scaling factor, the reconstruction accuracy)."""
    from diffusers import AutoencoderKL

    folder = run_dir / "vae"
    info_file = folder / "distill_vae.json"
    recipe = vae_recipe(cfg)
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text())
        except ValueError:  # a broken file: the VAE beside it counts as another recipe's
            info = {}
        if isinstance(info, dict) and info.get("recipe") == recipe:
            vae = AutoencoderKL.from_pretrained(folder)
            module.set_vae(vae, vae.config.scaling_factor)
            print(f"vae: reusing {folder} (trained in {info['seconds']:.1f} s; scaling factor "
                  f"{vae.config.scaling_factor:.4f})", flush=True)
            return info
    if folder.exists():
        dest = run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), dest / "vae")
        print(f"vae: {folder} was trained with another recipe; moved it to {dest / 'vae'}", flush=True)
    t0 = time.perf_counter()
    vae = copy.deepcopy(module.vae)  # the seeded initial weights
    x = upsample(module.images, cfg.t2i.resolution, cfg.t2i.upsample)
    losses = train_vae(vae, x, cfg, progress)
    vae.requires_grad_(False).eval()
    std = latent_std(vae, x, cfg.trainer.seed)
    vae.register_to_config(scaling_factor=1.0 / std)
    seconds = time.perf_counter() - t0
    val_images, val_labels = load_digits(cfg.data.path, "val")
    info = {"recipe": recipe, "seconds": round(seconds, 1), "latent_std": std, "scaling_factor": 1.0 / std,
            "losses_every_50_steps": losses,
            "val": reconstruction_accuracy(vae, val_images, val_labels, cfg)}
    tmp = Path(tempfile.mkdtemp(prefix=".vae-", dir=run_dir))
    vae.save_pretrained(tmp)
    (tmp / "distill_vae.json").write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, folder)
    module.set_vae(vae, 1.0 / std)
    v = info["val"]
    print(f"vae: {cfg.vae.steps} steps in {seconds:.1f} s; scaling factor {1.0 / std:.4f} (latent std {std:.4f}); "
          f"digits classifier on {v['images']} val reconstructions: {v['reconstruction_accuracy']:.4f} (on the "
          f"originals {v['original_accuracy']:.4f}); saved to {folder}", flush=True)
    return info


# --------------------------------------------------------------------------------------------------------------
# 4. The UNet stage.


class T2ITeacherModule(TeacherTraining):
    """kind t2i: the UNet2DConditionModel trained on the frozen VAE's scaled latents, conditioned on the frozen text
    encoder's last hidden state, with the VAE, the text encoder and the scaling factor in the checkpoint."""

    def __init__(self, cfg: TeacherTrainConfig, images: Tensor, labels: Tensor):
        super().__init__(cfg)
        if cfg.data.batch_size > len(images):  # each step draws its batch without replacement
            raise DataError(f"data.batch_size {cfg.data.batch_size} exceeds the {len(images)} training images of "
                            f"{cfg.data.path!r}; expected at most {len(images)}")
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer = write_tokenizer(tmp, cfg.t2i.templates, cfg.text.max_length)
        R = cfg.t2i.resolution
        self.text = TextEncoder([self.tokenizer], [build_text_encoder(len(self.tokenizer), cfg)], "sd", (R, R))
        self.vae = build_vae(cfg, images.shape[1]).requires_grad_(False).eval()
        self.register_buffer("scaling_factor", torch.tensor(1.0))  # set by the VAE stage, restored by a resume
        self.scheduler = build_scheduler(cfg)
        u = cfg.unet
        self.denoiser = Denoiser(TextUNetAdapter(build_cond_unet(cfg)), vp_schedule(self.scheduler.alphas_cumprod),
                                 u.prediction_type, null=self.text.null())  # the empty prompt's encoding (SD 1.x)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        self.register_buffer("images", images, persistent=False)  # (N, 1, 8, 8) in [-1, 1]
        self.register_buffer("labels", labels, persistent=False)  # (N,)
        self.latent_shape = latent_shape(cfg)

    def set_vae(self, vae, scaling_factor: float) -> None:
        self.vae.load_state_dict(vae.state_dict())
        self.scaling_factor.fill_(float(scaling_factor))

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.vae, self.text, self.ema):  # Lightning sets every submodule to train mode
            frozen.eval()
        return self

    def captions(self, labels: Tensor, rng: torch.Generator) -> list[str]:
        """A template per sample and, with probability t2i.caption_dropout, the empty prompt instead."""
        t = self.cfg.t2i
        N = labels.shape[0]
        template = torch.randint(len(t.templates), (N,), generator=rng, device=self.device).tolist()
        drop = (torch.rand(N, generator=rng, device=self.device) < t.caption_dropout).tolist()
        return ["" if d else t.templates[k].format(DIGIT_WORDS[y])
                for k, d, y in zip(template, drop, labels.tolist())]

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        rng = self._step_generator()  # a function of (seed, rank, step)
        N = self.cfg.data.batch_size // self.trainer.world_size
        # 1. a batch of digits, upsampled, and their captions
        idx = torch.randperm(len(self.images), generator=rng, device=self.device)[:N]
        x = upsample(self.images[idx], self.cfg.t2i.resolution, self.cfg.t2i.upsample)  # (N, 1, R, R)
        cond = self.text(self.captions(self.labels[idx], rng))
        # 2. scaled latents: a draw from the frozen VAE's posterior
        with torch.no_grad():
            z0 = self.vae.encode(x).latent_dist.sample(rng) * self.scaling_factor  # (N, C, h, w)
        # 3. the DDPM loss of the network's prediction type
        t = torch.randint(0, self.denoiser.T, (N,), generator=rng, device=self.device)
        eps = torch.randn(z0.shape, generator=rng, device=self.device)
        z_t = self.denoiser.schedule.add_noise(z0, eps, t)
        a, s = self.denoiser.schedule.coefficients(t, z0)
        target = from_x0(z0, z_t, a, s, self.cfg.unet.prediction_type)  # eps or v
        raw = self.denoiser.net(z_t, t, cond)
        loss = F.mse_loss(raw.float(), target.float())
        self._acc.append(loss.item())
        return loss

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1, 1)

    @torch.no_grad()
    def sample_image(self, steps: int | None = None, guidance_scale: float | None = None, cols: int | None = None):
        """DDIM samples of the EMA teacher: one row per digit, prompt `t2i.templates[0]`, written beside its row."""
        cols = cols or self.cfg.logging.samples_per_class
        prompts = [self.cfg.t2i.templates[0].format(w) for w in DIGIT_WORDS]
        gen = torch.Generator().manual_seed(self.cfg.trainer.seed + 12345)
        z = torch.randn(len(prompts) * cols, *self.latent_shape, generator=gen).to(self.device)
        cond = self.text([p for p in prompts for _ in range(cols)])
        scale = self.cfg.sample_guidance_scale if guidance_scale is None else guidance_scale
        latents = ddim_sample(self.ema, z, cond, steps=steps or self.cfg.sample_steps, guidance_scale=scale)
        return grid_image(self.decode(latents), nrow=cols, row_labels=prompts)

    def pipeline(self):
        """The EMA teacher as a StableDiffusionPipeline (SD 1.x layout, no safety checker)."""
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its image-processor classes say that torchvision is missing: unused here
        try:
            from diffusers import StableDiffusionPipeline
        finally:
            hf_logging.set_verbosity(level)
        self.vae.register_to_config(scaling_factor=float(self.scaling_factor))
        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text.encoders[0], tokenizer=self.tokenizer,
                                       unet=self.ema.net.unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def save_teacher(self, out: str | Path, extra: dict | None = None) -> Path:
        """The pipeline folder (save_pretrained), the tokenizer's vocab.json and merges.txt beside it (what
        transformers 4.x's CLIPTokenizer reads), prompts.txt, distill.json and train_config.yaml: written to a
        temporary folder beside `out`, then put in its place."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            self.pipeline().save_pretrained(tmp)
            write_tokenizer(tmp / "tokenizer", self.cfg.t2i.templates, self.cfg.text.max_length)
            (tmp / "prompts.txt").write_text("".join(p + "\n" for p in prompt_list(self.cfg.t2i.templates)))
            write_json(tmp / "distill.json", {"step": self.step, **(extra or {})})
            (tmp / "train_config.yaml").write_text(to_yaml(_relative_paths(self.cfg)))
            _replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def finish(cfg: TeacherTrainConfig, run_dir: Path, module: T2ITeacherModule, result, extra: dict,
           vae_info: dict | None) -> None:
    """The end of a finished run (rank 0): save the pipeline, then measure its prompt accuracy from the saved
    folder, loaded as `distill fit` loads it, and write it, the stages' wall times and the sample grid beside the
    weights."""
    from distill.plots import save_atomic

    vae_file = run_dir / "vae" / "distill_vae.json"
    if vae_info is None and vae_file.is_file():  # a resumed run: what the VAE stage measured when it ran
        vae_info = json.loads(vae_file.read_text())
    if vae_info is not None:
        vae_info = {k: v for k, v in vae_info.items() if k != "recipe"}
    saved = module.save_teacher(cfg.out, extra={**extra, "image_size": cfg.t2i.resolution, "vae": vae_info})
    save_atomic(module.sample_image(), saved / "samples.png")
    print(f"\ndone: {result.step - result.start_step} UNet steps in {result.seconds:.1f} s (now at step "
          f"{result.step}); teacher saved to {saved} (a StableDiffusionPipeline folder of {cfg.t2i.resolution} px "
          f"images; samples.png with {cfg.sample_steps} DDIM steps at guidance {cfg.sample_guidance_scale:g})",
          flush=True)
    e = cfg.eval
    if not e.prompt_samples:
        return
    t0 = time.perf_counter()
    acc = teacher_prompt_accuracy(saved, prompt_list(cfg.t2i.templates), e.prompt_samples, e.steps,
                                  e.guidance_scales, e.seed, progress=cfg.logging.progress_bar)
    acc["protocol"]["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(saved / "distill.json", {**json.loads((saved / "distill.json").read_text()), "prompt_accuracy": acc})
    for scale in e.guidance_scales:
        a = acc[f"{scale:g}"]
        print(f"prompt accuracy at guidance {scale:g}: {a['accuracy']:.4f} +- {a['stderr']:.4f} ({a['n']} prompts, "
              f"DDIM {e.steps} steps; {acc['protocol']['seconds']:.0f} s for all scales)", flush=True)


def _relative_paths(cfg: TeacherTrainConfig) -> TeacherTrainConfig:
    """The config with run.dir, data.path and out relative to the working directory when they lie under it: the
    recipe shipped beside the weights then names no folder of the machine that trained it."""
    def rel(path):
        p = Path(path).resolve()
        return str(p.relative_to(Path.cwd())) if path and p.is_relative_to(Path.cwd()) else path

    return dataclasses.replace(cfg, out=rel(cfg.out), run=dataclasses.replace(cfg.run, dir=rel(cfg.run.dir)),
                               data=dataclasses.replace(cfg.data, path=rel(cfg.data.path)))


def _replace_folder(new: Path, out: Path) -> None:
    """Put folder `new` at `out`; an existing `out` (the caller checked that it may go) is removed once `new` is
    in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------
# Prompt accuracy.


@torch.no_grad()
def prompt_accuracy(images: Tensor, prompts: Sequence[str], classifier=None, batch_size: int = 512) -> dict:
    """How often the shipped digits classifier reads each image as the digit its prompt names (`a handwritten
    <word>`): images (N, 1, H, W) in [-1, 1], brought to 8x8 by average pooling. Returns {"accuracy", "stderr"
    (binomial, sqrt(p (1 - p) / N)), "n"}."""
    from distill.metrics import accuracy, load_digits_classifier

    if len(images) != len(prompts) or len(prompts) == 0:
        raise DistillError(f"prompt accuracy: {len(images)} images for {len(prompts)} prompts; expected one image "
                           f"per prompt, at least one")
    classifier = classifier or load_digits_classifier()
    digits = torch.tensor([digit_of(p) for p in prompts])
    p = accuracy(classifier, to_digits_size(images.float().cpu()), digits, batch_size)
    return {"accuracy": p, "stderr": math.sqrt(p * (1 - p) / len(prompts)), "n": len(prompts)}


@torch.no_grad()
def sample_teacher(teacher, prompts: Sequence[str], noise: Tensor, steps: int, guidance_scale: float,
                   batch_size: int = 250, progress: bool = False) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] of a loaded text-to-image teacher (distill.teachers.Teacher): DDIM with
    `steps` steps from `noise` (N, C, h, w) latents, guided by `guidance_scale`, decoded by its VAE."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"sampling (guidance {guidance_scale:g})",
                  disable=not progress, leave=False):
        cond = teacher.text(list(prompts[i:i + batch_size]))
        latents = ddim_sample(teacher.denoiser, noise[i:i + batch_size], cond, steps=steps,
                              guidance_scale=guidance_scale)
        out.append(teacher.codec.decode(latents).cpu())
    return torch.cat(out)


def teacher_prompt_accuracy(path: str | Path, prompts: Sequence[str], n: int, steps: int = 25,
                            guidance_scales: Sequence[float] = (1.0, 2.0, 4.0), seed: int = 0,
                            batch_size: int = 250, progress: bool = True) -> dict:
    """Prompt accuracy of the pipeline folder `path` at each guidance scale: `n` prompts drawn with replacement
    from `prompts`, the same prompts and noise for every scale (seeded by `seed`), DDIM with `steps` steps.
    Returns {"protocol": {...}, "<scale>": prompt_accuracy(...), ...}."""
    from distill.metrics import load_digits_classifier
    from distill.teachers import load_teacher

    teacher = load_teacher(path)
    unet_config = teacher.denoiser.net.unet.config
    gen = torch.Generator().manual_seed(seed)
    drawn = [prompts[i] for i in torch.randint(len(prompts), (n,), generator=gen).tolist()]
    size = unet_config.sample_size
    noise = torch.randn(n, unet_config.in_channels, size, size, generator=gen)
    classifier = load_digits_classifier()
    result: dict = {"protocol": {"prompts": n, "drawn_from": len(prompts), "sampler": f"ddim {steps} steps",
                                 "seed": seed, "scored_by": "data/classifiers/digits on 8x8 average-pooled images"}}
    for scale in guidance_scales:
        images = sample_teacher(teacher, drawn, noise, steps, scale, batch_size, progress)
        result[f"{scale:g}"] = prompt_accuracy(images, drawn, classifier)
    return result
