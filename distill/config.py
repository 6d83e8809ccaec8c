"""Typed configuration: one dataclass per concern, loaded from YAML with `key=value` overrides (OmegaConf).

Every field carries a one-line help text (shown by `distill fit --help`) and every invalid value stops the
command before any work with a `ConfigError` that names the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from distill.errors import ConfigError, DistillError


def _f(default: Any, help: str, expected: str = "") -> Any:
    """A dataclass field with a default and a help line; `expected` words a list field's type errors."""
    metadata = {"help": help, "expected": expected} if expected else {"help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(key, f"expected {expected}, got {value!r}")


def _finite(*values: Any) -> bool:
    """Real numbers, not nan or inf: inf passes `> 0` and nan fails every comparison, so range checks start here."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


# --------------------------------------------------------------------------------------------------------------
# Sections shared by `distill fit` and `distill teacher`.


@dataclass
class RunConfig:
    """Where the run lives."""

    dir: str = _f("runs/digits", "run directory: config.yaml, checkpoints/, samples/, metrics.csv, wandb/")
    name: str = _f("", "run name shown in W&B (default: the run directory's name)")


@dataclass
class DataConfig:
    """Training data: webdataset shards (real data) or none (the exact mixture teacher draws its own)."""

    path: Optional[str] = _f("data/digits", "folder of train-*.tar shards with meta.json: images for a class "
                                            "teacher, prompts (`distill data prompts`) for a text-to-image teacher; "
                                            "null for gmm")
    batch_size: int = _f(64, "global batch size (generator samples per step, summed over devices)")
    num_workers: int = _f(0, "data loader worker processes per device")
    shuffle_buffer: int = _f(1000, "samples held in the shuffle buffer")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        _check(self.num_workers >= 0, "data.num_workers", "an integer >= 0", self.num_workers)
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "an integer >= 1", self.shuffle_buffer)


@dataclass
class TrainerConfig:
    """The Lightning Trainer and the step budget."""

    max_steps: int = _f(1000, "training steps (one generator batch each; counts steps, not optimiser calls)")
    seed: int = _f(0, "global seed (weights, noise, data order)")
    accelerator: str = _f("auto", "cpu | gpu | auto")
    devices: int = _f(1, "devices per node")
    num_nodes: int = _f(1, "nodes")
    strategy: str = _f("auto", "Lightning strategy; auto picks DDP with unused parameters when devices > 1")
    precision: str = _f("32-true", "32-true | bf16-mixed | 16-mixed")
    checkpoint_every_steps: int = _f(200, "write a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = _f(3, "newest checkpoints kept in checkpoints/ (older ones are deleted)")
    log_every_steps: int = _f(10, "log scalars every this many steps")
    deterministic: bool = _f(False, "use deterministic torch algorithms (slower; for exact reproduction)")
    max_nonfinite: int = _f(10, "stop after this many updates in a row with a non-finite loss or gradient (each "
                                "is skipped: no optimiser step, no EMA update)")

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "trainer.max_steps", "an integer >= 1", self.max_steps)
        _check(self.accelerator in ("cpu", "gpu", "cuda", "mps", "auto"), "trainer.accelerator",
               "one of cpu, gpu, cuda, mps, auto", self.accelerator)
        _check(self.devices >= 1, "trainer.devices", "an integer >= 1", self.devices)
        _check(self.num_nodes >= 1, "trainer.num_nodes", "an integer >= 1", self.num_nodes)
        _check(self.precision in ("32-true", "32", "bf16-mixed", "16-mixed", "64-true"), "trainer.precision",
               "one of 32-true, bf16-mixed, 16-mixed, 64-true", self.precision)
        _check(self.checkpoint_every_steps >= 1, "trainer.checkpoint_every_steps", "an integer >= 1",
               self.checkpoint_every_steps)
        _check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", "an integer >= 1", self.keep_checkpoints)
        _check(self.log_every_steps >= 1, "trainer.log_every_steps", "an integer >= 1", self.log_every_steps)
        _check(self.max_nonfinite >= 1, "trainer.max_nonfinite", "an integer >= 1", self.max_nonfinite)
        _check(not (self.strategy.startswith("fsdp") and self.accelerator == "cpu"), "trainer.strategy",
               "a strategy other than fsdp with trainer.accelerator=cpu (Lightning's FSDP needs GPUs)", self.strategy)


@dataclass
class LoggingConfig:
    """What is written while training: W&B, CSV, sample grids, progress bar."""

    wandb: str = _f("offline", "offline (files in the run directory) | online (needs a W&B key) | disabled")
    project: str = _f("distill", "W&B project")
    samples_every_steps: int = _f(100, "write a sample grid PNG every this many steps (0: only at the end)")
    samples_per_class: int = _f(8, "columns of the sample grid (one row per class, or per prompt)")
    sample_prompts: list[str] = _f([], "text-to-image teachers: the prompts of the sample grid's rows (empty: up to "
                                       "10 spread over the prompt set)", "a list of prompts such as ['a cat']")
    proposal_plot_every_steps: int = _f(500, "plot the timestep proposal q(t) to plots/ every this many steps "
                                             "(0: never)")
    progress_bar: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        _check(self.wandb in ("offline", "online", "disabled"), "logging.wandb",
               "one of offline, online, disabled", self.wandb)
        _check(self.samples_every_steps >= 0, "logging.samples_every_steps", "an integer >= 0",
               self.samples_every_steps)
        _check(self.samples_per_class >= 1, "logging.samples_per_class", "an integer >= 1", self.samples_per_class)
        _check(self.proposal_plot_every_steps >= 0, "logging.proposal_plot_every_steps", "an integer >= 0",
               self.proposal_plot_every_steps)


# --------------------------------------------------------------------------------------------------------------
# `distill fit`: DMD distillation.


@dataclass
class TeacherConfig:
    """The frozen teacher: a diffusers UNet folder, a Stable Diffusion pipeline folder, or the exact 2-D mixture."""

    kind: str = _f("diffusers", "diffusers (a UNet2DModel folder, or a StableDiffusion / StableDiffusionXL pipeline "
                                "folder with model_index.json) | gmm (exact Gaussian-mixture denoiser)")
    path: Optional[str] = _f("data/teachers/digits", "teacher folder (unet/ and scheduler/, one model folder, or a "
                                                     "pipeline folder)")
    guidance_scale: float = _f(1.0, "classifier-free guidance scale s of the real score: D_u + s (D_c - D_u), one "
                                    "batched call; 1 = no guidance; the fake score is never guided (DMD2: 1.75 for "
                                    "SD 1.5, 8 for SDXL)")
    dtype: str = _f("auto", "dtype of the frozen parts (teacher UNet, text encoders, VAE): auto (bfloat16 on a GPU, "
                            "float32 on the CPU) | float32 | bfloat16 | float16; the trained copies stay float32")
    gmm_modes: int = _f(8, "gmm: number of equal-weight modes, evenly spaced on a circle")
    gmm_radius: float = _f(2.0, "gmm: radius of that circle")
    gmm_std: float = _f(0.1, "gmm: standard deviation of each mode")
    num_timesteps: int = _f(1000, "gmm: discrete time indices T of its VP (DDPM linear) schedule")

    def __post_init__(self) -> None:
        _check(self.kind in ("diffusers", "gmm"), "teacher.kind", "one of diffusers, gmm", self.kind)
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "teacher.dtype",
               "one of auto, float32, bfloat16, float16", self.dtype)
        _check(_finite(self.guidance_scale) and self.guidance_scale >= 0, "teacher.guidance_scale",
               "a finite number >= 0", self.guidance_scale)
        _check(self.gmm_modes >= 1, "teacher.gmm_modes", "an integer >= 1", self.gmm_modes)
        _check(_finite(self.gmm_radius) and self.gmm_radius > 0, "teacher.gmm_radius", "a finite number > 0",
               self.gmm_radius)
        _check(_finite(self.gmm_std) and self.gmm_std > 0, "teacher.gmm_std", "a finite number > 0", self.gmm_std)
        _check(self.num_timesteps >= 10, "teacher.num_timesteps", "an integer >= 10", self.num_timesteps)


@dataclass
class GeneratorConfig:
    """The student: one step G(z) = D_theta(x_init(z), t_init), or a few steps with re-noising (DMD2 §4.4-4.5)."""

    init: str = _f("teacher", "teacher (copy the teacher's network) | mlp (a fresh MLP, for 2-D teachers)")
    t_init: Optional[int] = _f(None, "time index the one-step generator is evaluated at (default: the last, T-1)")
    timesteps: Optional[list[int]] = _f(
        None, "a multi-step student's time indices, strictly decreasing, e.g. [999, 749, 499, 249] for DMD2's four "
              "steps with T = 1000: each step predicts x0, the next re-noises it with fresh noise; trained by "
              "backward simulation; null: one step at t_init", "a list of strictly decreasing integers >= 0")
    ema_decay: float = _f(0.999, "EMA decay of the generator copy used for samples")
    lora_rank: int = _f(0, "LoRA rank of the generator (peft adapters on attention, feed-forward, convolutions and "
                           "the time-embedding projection; only they train and are saved); 0: a full copy (DMD2: 64 "
                           "for SDXL)")
    lora_alpha: float = _f(8.0, "LoRA alpha (scale alpha / rank; DMD2: 8)")
    gradient_checkpointing: bool = _f(False, "recompute the generator UNet's activations in the backward pass "
                                             "instead of storing them (less memory, more compute)")
    mlp_hidden: int = _f(128, "mlp: hidden width")
    mlp_depth: int = _f(3, "mlp: hidden layers")

    def __post_init__(self) -> None:
        _check(self.init in ("teacher", "mlp"), "generator.init", "one of teacher, mlp", self.init)
        _check(self.lora_rank >= 0, "generator.lora_rank", "an integer >= 0", self.lora_rank)
        _check(_finite(self.lora_alpha) and self.lora_alpha > 0, "generator.lora_alpha", "a finite number > 0",
               self.lora_alpha)
        # the upper bound, the teacher's T, is checked where the teacher is known (distill.teachers.Generator)
        _check(self.t_init is None or self.t_init >= 0, "generator.t_init",
               "an integer >= 0 (or null: the last index, T-1)", self.t_init)
        if self.timesteps is not None:
            ts = list(self.timesteps)
            _check(len(ts) >= 1 and all(isinstance(t, int) and t >= 0 for t in ts), "generator.timesteps",
                   "a non-empty list of integers >= 0 (or null: one step at t_init)", ts)
            _check(all(a > b for a, b in zip(ts, ts[1:])), "generator.timesteps",
                   "strictly decreasing time indices (sampling starts at the first)", ts)
            _check(self.t_init is None or self.t_init == ts[0], "generator.t_init",
                   f"null or the first of generator.timesteps ({ts[0]}) when both are set", self.t_init)
        _check(_finite(self.ema_decay) and 0.0 <= self.ema_decay < 1.0, "generator.ema_decay", "a number in [0, 1)",
               self.ema_decay)
        _check(self.mlp_hidden >= 1, "generator.mlp_hidden", "an integer >= 1", self.mlp_hidden)
        _check(self.mlp_depth >= 1, "generator.mlp_depth", "an integer >= 1", self.mlp_depth)


@dataclass
class GANConfig:
    """DMD2's GAN term (§4.3): a classifier head on the fake score's bottleneck (its UNet mid-block output), on real
    and generated samples noised at t ~ U[0, T) (Diffusion-GAN). Head and fake score share one optimiser."""

    weight_generator: float = _f(0.0, "weight of the generator's loss softplus(-f(fake)); 0: the GAN term is off "
                                      "(DMD2: 3e-3 ImageNet-64, 1e-3 SD 1.5, 5e-3 SDXL)")
    weight_discriminator: float = _f(0.0, "weight of the discriminator loss softplus(f(fake)) + softplus(-f(real)), "
                                          "added to the fake score's loss (DMD2: 1e-2)")
    data: Optional[str] = _f(None, "real data: image shards for a pixel teacher (null: data.path), latent shards "
                                   "for a latent teacher (`distill data latents --teacher PIPELINE --src SHARDS "
                                   "--out DIR`)")

    def __post_init__(self) -> None:
        for key in ("weight_generator", "weight_discriminator"):
            value = getattr(self, key)
            _check(_finite(value) and value >= 0, f"gan.{key}", "a finite number >= 0", value)
        _check((self.weight_generator > 0) == (self.weight_discriminator > 0), "gan.weight_discriminator",
               "both gan weights > 0 (the GAN term on) or both 0 (off): a head that never trains, or one that trains "
               "for nothing, is a mistake", self.weight_discriminator)

    @property
    def on(self) -> bool:
        return self.weight_generator > 0


def _draws_or_auto(value: Any, key: str) -> Any:
    """An integer >= 1 (a quoted "4" too, as OmegaConf converts a quoted "100" for the int keys) or auto."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
        value = int(value)
    _check(value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1), key,
           "an integer >= 1 or auto", value)
    return value


@dataclass
class FakeScoreConfig:
    """The online fake-score network mu_fake, trained on the generator's samples."""

    init: str = _f("teacher", "teacher (copy the teacher's network) | mlp (a fresh MLP, for 2-D teachers)")
    lora_rank: int = _f(0, "LoRA rank of the fake score (only the adapters train and are saved); 0: a full copy "
                           "(DMD2 trains a full copy)")
    lora_alpha: float = _f(8.0, "LoRA alpha (scale alpha / rank)")
    gradient_checkpointing: bool = _f(False, "recompute the fake score UNet's activations in the backward pass "
                                             "instead of storing them (less memory, more compute)")
    mlp_hidden: int = _f(128, "mlp: hidden width")
    mlp_depth: int = _f(3, "mlp: hidden layers")
    K: Any = _f(1, "CARV on the fake-score update: (t, noise) draws per generated sample in its denoising loss "
                   "(1 with uniform/none: DMD2's one draw, t uniform over [0, T)), or auto: chosen like "
                   "estimator.K from the denoising gradient's measured variance split and the costs of a "
                   "generated sample and of a fake-score draw (docs/method.md §9), with the estimator's "
                   "diagnostic_every, diagnostic_K, k_max, max_draws, auto_every and auto_ema")
    proposal: str = _f("uniform", "the denoising loss's timestep proposal: uniform | adaptive (q ∝ p "
                                  "sqrt(E[loss² | t]) from the estimator's adaptive_* settings, counted in "
                                  "fake-score updates; the draws are weighted by p/q, so the objective is unchanged)")
    stratify: str = _f("none", "the denoising loss's draws: none (iid) | per_sample (K strata of q's CDF per sample)")

    def __post_init__(self) -> None:
        _check(self.init in ("teacher", "mlp"), "fake_score.init", "one of teacher, mlp", self.init)
        self.K = _draws_or_auto(self.K, "fake_score.K")
        _check(self.proposal in ("uniform", "adaptive"), "fake_score.proposal", "one of uniform, adaptive",
               self.proposal)
        _check(self.stratify in ("none", "per_sample"), "fake_score.stratify", "one of none, per_sample",
               self.stratify)
        _check(self.lora_rank >= 0, "fake_score.lora_rank", "an integer >= 0", self.lora_rank)
        _check(_finite(self.lora_alpha) and self.lora_alpha > 0, "fake_score.lora_alpha", "a finite number > 0",
               self.lora_alpha)
        _check(self.mlp_hidden >= 1, "fake_score.mlp_hidden", "an integer >= 1", self.mlp_hidden)
        _check(self.mlp_depth >= 1, "fake_score.mlp_depth", "an integer >= 1", self.mlp_depth)


@dataclass
class EstimatorConfig:
    """How the DMD expectation over (t, eps) is estimated: CARV (docs/method.md §4–§7)."""

    K: Any = _f(1, "inner (t, eps) draws per generator sample, an integer >= 1, or auto (chosen from measured "
                   "variance and cost: the within-sample variance of the draws as stratified, a multi-step "
                   "student's spread over its steps); 1 with uniform/none is the DMD2 baseline")
    proposal: str = _f("uniform", "timestep proposal q(t): uniform (q = p) | adaptive (learned, variance-optimal)")
    stratify: str = _f("none", "stratified inverse CDF: none (iid) | per_sample (K strata per sample) | batch "
                               "(N*K strata over the batch) | global (over the global batch in DDP)")
    t_min: float = _f(0.02, "smallest DMD time index, as a fraction of T (DMD2: 0.02)")
    t_max: float = _f(0.98, "largest DMD time index, as a fraction of T (DMD2: 0.98)")
    chunk_size: int = _f(0, "most draws per batched teacher / fake-score call (memory bound; 0: all in one call)")
    adaptive_bins: int = _f(32, "adaptive: bins of the second-moment table over [t_min, t_max]")
    adaptive_ema: float = _f(0.9, "adaptive: EMA weight on a bin's old second moment")
    adaptive_smoothing: float = _f(1.0, "adaptive: Gaussian smoothing across bins (std in bins; 0: none)")
    adaptive_floor: float = _f(0.05, "adaptive: floor of the table, as a fraction of its max")
    adaptive_mix: float = _f(0.1, "adaptive: defensive mixture q = (1 - mix) q_hat + mix p, so w <= 1/mix")
    adaptive_warmup: int = _f(100, "adaptive: generator updates (one every optim.ttur steps) on q = p before the "
                                   "first proposal")
    adaptive_refresh_every: int = _f(50, "adaptive: generator updates (one every optim.ttur steps) between proposal "
                                         "refreshes")
    diagnostic_every: int = _f(0, "exact parameter-space split-half variance estimate every this many generator "
                                  "updates (one every optim.ttur steps); 0: off; K auto needs it and defaults to 50")
    diagnostic_K: int = _f(4, "inner draws used by a diagnostic step (even, >= 2); a stratifying "
                                 "sampler adds two stratified sets of max(4, diagnostic_K / 2) draws")
    k_max: int = _f(32, "K auto: largest K")
    max_draws: int = _f(0, "K auto: most inner draws per device per step, a memory bound (0: none)")
    auto_every: int = _f(50, "K auto: generator updates (one every optim.ttur steps) between choices of K")
    auto_ema: float = _f(0.8, "K auto: EMA weight on old variance estimates")
    cost: str = _f("flops", "K auto: cost measure, flops (reproducible) | time (measured wall time)")

    def __post_init__(self) -> None:
        self.K = _draws_or_auto(self.K, "estimator.K")
        auto = self.K == "auto"
        _check(self.proposal in ("uniform", "adaptive"), "estimator.proposal", "one of uniform, adaptive",
               self.proposal)
        _check(self.stratify in ("none", "per_sample", "batch", "global"), "estimator.stratify",
               "one of none, per_sample, batch, global", self.stratify)
        _check(_finite(self.t_min) and 0.0 <= self.t_min < 1.0, "estimator.t_min", "a fraction in [0, 1)", self.t_min)
        _check(_finite(self.t_max) and self.t_min < self.t_max <= 1.0, "estimator.t_max",
               f"a fraction in ({self.t_min}, 1]", self.t_max)
        _check(self.chunk_size >= 0, "estimator.chunk_size", "an integer >= 0", self.chunk_size)
        _check(self.adaptive_bins >= 1, "estimator.adaptive_bins", "an integer >= 1", self.adaptive_bins)
        _check(_finite(self.adaptive_ema) and 0 <= self.adaptive_ema < 1, "estimator.adaptive_ema",
               "a number in [0, 1)", self.adaptive_ema)
        _check(_finite(self.adaptive_smoothing) and self.adaptive_smoothing >= 0, "estimator.adaptive_smoothing",
               "a finite number >= 0", self.adaptive_smoothing)
        _check(_finite(self.adaptive_floor) and 0 <= self.adaptive_floor <= 1, "estimator.adaptive_floor",
               "a fraction in [0, 1]", self.adaptive_floor)
        _check(_finite(self.adaptive_mix) and 0 < self.adaptive_mix <= 1, "estimator.adaptive_mix",
               "a fraction in (0, 1]", self.adaptive_mix)
        _check(self.adaptive_warmup >= 0, "estimator.adaptive_warmup", "an integer >= 0", self.adaptive_warmup)
        _check(self.adaptive_refresh_every >= 1, "estimator.adaptive_refresh_every", "an integer >= 1",
               self.adaptive_refresh_every)
        _check(self.diagnostic_every >= 0, "estimator.diagnostic_every", "an integer >= 0", self.diagnostic_every)
        _check(self.diagnostic_K >= 2 and self.diagnostic_K % 2 == 0, "estimator.diagnostic_K",
               "an even integer >= 2", self.diagnostic_K)
        _check(self.k_max >= 1, "estimator.k_max", "an integer >= 1", self.k_max)
        _check(self.max_draws >= 0, "estimator.max_draws", "an integer >= 0", self.max_draws)
        _check(self.auto_every >= 1, "estimator.auto_every", "an integer >= 1", self.auto_every)
        _check(_finite(self.auto_ema) and 0 <= self.auto_ema < 1, "estimator.auto_ema", "a number in [0, 1)",
               self.auto_ema)
        _check(self.cost in ("flops", "time"), "estimator.cost", "one of flops, time", self.cost)
        if auto and self.diagnostic_every == 0:
            self.diagnostic_every = 50  # K auto runs on the exact estimates

    @property
    def adaptive_table(self) -> dict:
        """The adaptive proposal's table settings, as TimestepSampler takes them (every sampler built from this
        config: the DMD draws', the fake score's, the bench's)."""
        return dict(bins=self.adaptive_bins, ema=self.adaptive_ema, smoothing=self.adaptive_smoothing,
                    floor=self.adaptive_floor, mix=self.adaptive_mix)

    @property
    def baseline(self) -> bool:
        """The DMD2 reference estimator: one uniform iid draw per sample."""
        return self.K == 1 and self.proposal == "uniform" and self.stratify == "none"


@dataclass
class OptimConfig:
    """AdamW for the generator and the fake score, two time scales."""

    lr_generator: float = _f(2e-5, "generator learning rate")
    lr_fake_score: float = _f(2e-5, "fake-score learning rate")
    betas: list[float] = _f([0.0, 0.999], "AdamW betas (both networks)",
                            "a list of two numbers such as [0.0, 0.999]")
    weight_decay: float = _f(0.01, "AdamW weight decay (both networks)")
    grad_clip: float = _f(10.0, "gradient-norm clip (both networks; 0: off)")
    ttur: int = _f(5, "the generator is updated every ttur steps, the fake score every step (DMD2: 5; SD: 10)")
    warmup_steps: int = _f(0, "linear learning-rate warm-up over this many training steps, both networks (DMD2's "
                              "SD recipe: 500); 0: the full rate from the start")

    def __post_init__(self) -> None:
        _check(_finite(self.lr_generator) and self.lr_generator > 0, "optim.lr_generator", "a finite number > 0",
               self.lr_generator)
        _check(_finite(self.lr_fake_score) and self.lr_fake_score > 0, "optim.lr_fake_score", "a finite number > 0",
               self.lr_fake_score)
        _check(len(self.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in self.betas), "optim.betas",
               "a list of two numbers in [0, 1) such as [0.0, 0.999]", list(self.betas))
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", "a finite number >= 0",
               self.weight_decay)
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip", "a finite number >= 0",
               self.grad_clip)
        _check(self.ttur >= 1, "optim.ttur", "an integer >= 1", self.ttur)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)


@dataclass
class EvalConfig:
    """Evaluation while training: FID of the one-step generator, gradient variance of the estimator."""

    fid_every_steps: int = _f(0, "FID of the EMA (and raw) generator every this many steps, and at the end (0: off)")
    fid_num_samples: int = _f(1000, "generated samples per FID evaluation (split across ranks)")
    fid_batch_size: int = _f(250, "samples per generator / feature-extractor call during FID")
    features: str = _f("digits", "FID features: digits (the shipped classifier) | inception (2048-d pool, weights "
                                 "from inception_weights) | raw (the data itself, for 2-D mixtures)")
    features_path: Optional[str] = _f(None, "weights of the digits classifier (default: the shipped one)")
    inception_weights: Optional[str] = _f(None, "local Inception weights file (or env DISTILL_INCEPTION_WEIGHTS)")
    fid_ref: Optional[str] = _f(None, "reference statistics (.npz from `distill stats`, or EDM-style mu/sigma); "
                                      "default: computed at start from data.path's train split (or the mixture)")
    variance_every_steps: int = _f(0, "gradient variance of the estimator vs the baseline at equal compute, every "
                                      "this many steps (0: off)")
    image_size: Optional[int] = _f(None, "bring evaluated images (decoded, for a latent teacher) to this size by area "
                                         "averaging before the features (the text-to-image digits config: 8, the "
                                         "digits classifier's input); null: as they are")
    prompt_accuracy: bool = _f(False, "with digits features: also the share of samples the digits classifier reads "
                                      "as the digit their prompt names ('a handwritten <zero..nine>'), logged as "
                                      "prompt/accuracy_ema and written by distill fid")

    def __post_init__(self) -> None:
        _check(self.fid_every_steps >= 0, "eval.fid_every_steps", "an integer >= 0", self.fid_every_steps)
        _check(self.fid_num_samples >= 2, "eval.fid_num_samples", "an integer >= 2", self.fid_num_samples)
        _check(self.fid_batch_size >= 1, "eval.fid_batch_size", "an integer >= 1", self.fid_batch_size)
        _check(self.features in ("digits", "inception", "raw"), "eval.features", "one of digits, inception, raw",
               self.features)
        _check(self.variance_every_steps >= 0, "eval.variance_every_steps", "an integer >= 0",
               self.variance_every_steps)
        _check(self.image_size is None or self.image_size >= 1, "eval.image_size", "an integer >= 1 or null",
               self.image_size)
        _check(not self.prompt_accuracy or self.features == "digits", "eval.prompt_accuracy",
               "false unless eval.features is digits (the digits classifier reads the samples)", self.prompt_accuracy)


@dataclass
class FitConfig:
    """`distill fit`: distil a teacher into a one-step generator."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    fake_score: FakeScoreConfig = field(default_factory=FakeScoreConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, read_data: bool = True) -> None:
        """Checks that span sections or touch the file system; `read_data=False` (evaluating a checkpoint, which
        reads no shards) leaves data.path unchecked."""
        t = self.teacher
        if t.kind == "diffusers":
            _check(t.path is not None, "teacher.path", "a teacher folder", t.path)
            _check_dir(t.path, "teacher.path", "a diffusers teacher folder (unet/ and scheduler/, or a Stable "
                       "Diffusion pipeline folder with model_index.json)")
            _check(self.generator.init == "teacher", "generator.init", "teacher for a diffusers teacher",
                   self.generator.init)
            _check(self.fake_score.init == "teacher", "fake_score.init", "teacher for a diffusers teacher",
                   self.fake_score.init)
            _check(not read_data or self.data.path is not None, "data.path", "a shard folder for a diffusers teacher",
                   None)
        else:
            _check(self.generator.init == "mlp", "generator.init", "mlp for the gmm teacher (no weights to copy)",
                   self.generator.init)
            for key, rank in (("generator.lora_rank", self.generator.lora_rank),
                              ("fake_score.lora_rank", self.fake_score.lora_rank)):
                _check(rank == 0, key, "0 for the gmm teacher (LoRA adapts a diffusers UNet)", rank)
            _check(self.fake_score.init == "mlp", "fake_score.init", "mlp for the gmm teacher",
                   self.fake_score.init)
            _check(t.guidance_scale == 1.0, "teacher.guidance_scale", "1.0 (the gmm teacher is unconditional)",
                   t.guidance_scale)
            if self.generator.t_init is not None:
                _check(self.generator.t_init < t.num_timesteps, "generator.t_init",  # T is known here: say so now
                       f"an index in [0, {t.num_timesteps}) of the teacher's {t.num_timesteps} time steps",
                       self.generator.t_init)
            if self.generator.timesteps is not None:
                _check(max(self.generator.timesteps) < t.num_timesteps, "generator.timesteps",
                       f"indices in [0, {t.num_timesteps}) of the teacher's {t.num_timesteps} time steps",
                       self.generator.timesteps)
        if self.gan.on:
            _check(t.kind == "diffusers", "gan.weight_generator", "0 for the gmm teacher: the GAN head reads a UNet's "
                   "bottleneck, which the mixture's networks do not have", self.gan.weight_generator)
            if read_data and self.gan.data is not None:
                _check_dir(self.gan.data, "gan.data", "a folder of real image or latent shards (see `distill data "
                           "--help`)")
        if read_data and self.data.path is not None:
            _check_dir(self.data.path, "data.path", "a folder of train-*.tar shards (see `distill data --help`)")
        _check_devices(self.data.batch_size, self.trainer)
        e = self.estimator
        world = self.trainer.devices * self.trainer.num_nodes
        if e.stratify == "global":
            _check(world > 1, "estimator.stratify", "global only with several devices (trainer.devices x "
                   "trainer.num_nodes > 1); use batch on one device", e.stratify)
        per_device = self.data.batch_size // world
        # fit reads the reference statistics only for the in-loop FID: with it off, a missing file is no error
        if self.eval.fid_every_steps and self.eval.fid_ref is not None and not os.path.isfile(self.eval.fid_ref):
            raise ConfigError("eval.fid_ref", f"file {self.eval.fid_ref!r} does not exist; expected reference "
                              f"statistics from `distill stats` (or an EDM-style npz with mu and sigma)")
        if self.teacher.kind == "gmm" and self.eval.fid_every_steps:
            _check(self.eval.features == "raw", "eval.features", "raw for the 2-D mixture teacher",
                   self.eval.features)
        if self.fake_score.K == "auto" and e.diagnostic_every == 0:
            e.diagnostic_every = 50  # fake_score.K auto runs on the exact estimates too
        if e.diagnostic_every or self.eval.variance_every_steps:
            _check(per_device >= 2 and per_device % 2 == 0, "data.batch_size",
                   f"an even number of samples per device for the split-half diagnostic (got {per_device})",
                   self.data.batch_size)
        if e.max_draws and e.K != "auto":
            _check(per_device * e.K <= e.max_draws, "estimator.max_draws",
                   f">= data.batch_size per device x estimator.K = {per_device * e.K}", e.max_draws)


# --------------------------------------------------------------------------------------------------------------
# `distill teacher`: train the small class-conditional UNet teacher on shards.


@dataclass
class UNetConfig:
    """A diffusers UNet2DModel (kind t2i: a UNet2DConditionModel on the VAE's latents) and its DDPM schedule."""

    block_out_channels: list[int] = _f([32, 64], "channels per resolution level (t2i: multiples of 8)",
                                       "a list of channel counts (integers >= 8) such as [32, 64]")
    layers_per_block: int = _f(1, "ResNet layers per level")
    attention: bool = _f(True, "self-attention in the lowest-resolution level (t2i: transformer blocks with "
                               "cross-attention to the prompt at the first, full-resolution level; the middle block "
                               "has them either way)")
    class_dropout: float = _f(0.1, "probability of replacing the label by the null class (for CFG; unet kind)")
    prediction_type: str = _f("epsilon", "epsilon | v_prediction | sample")
    num_train_timesteps: int = _f(1000, "DDPM time indices T")
    beta_schedule: str = _f("linear", "linear | scaled_linear | squaredcos_cap_v2")

    def __post_init__(self) -> None:
        channels = self.block_out_channels
        _check(len(channels) >= 1 and all(isinstance(c, int) and c >= 8 for c in channels),
               "unet.block_out_channels", "a list of channel counts (integers >= 8) such as [32, 64]",
               list(self.block_out_channels))
        _check(self.layers_per_block >= 1, "unet.layers_per_block", "an integer >= 1", self.layers_per_block)
        _check(_finite(self.class_dropout) and 0 <= self.class_dropout < 1, "unet.class_dropout",
               "a probability in [0, 1)", self.class_dropout)
        _check(self.prediction_type in ("epsilon", "v_prediction", "sample"), "unet.prediction_type",
               "one of epsilon, v_prediction, sample", self.prediction_type)
        _check(self.num_train_timesteps >= 10, "unet.num_train_timesteps", "an integer >= 10",
               self.num_train_timesteps)
        _check(self.beta_schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"), "unet.beta_schedule",
               "one of linear, scaled_linear, squaredcos_cap_v2", self.beta_schedule)


@dataclass
class TeacherOptimConfig:
    """AdamW for the teacher."""

    lr: float = _f(1e-3, "peak learning rate (linear warm-up, then cosine decay)")
    warmup_steps: int = _f(200, "linear warm-up steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "gradient-norm clip (0: off)")
    ema_decay: float = _f(0.999, "EMA decay; the EMA weights are what gets saved")

    def __post_init__(self) -> None:
        _check(_finite(self.lr) and self.lr > 0, "optim.lr", "a finite number > 0", self.lr)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", "a finite number >= 0",
               self.weight_decay)
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, "optim.grad_clip", "a finite number >= 0",
               self.grad_clip)
        _check(_finite(self.ema_decay) and 0.0 <= self.ema_decay < 1.0, "optim.ema_decay", "a number in [0, 1)",
               self.ema_decay)


T2I_TEMPLATES = ["a handwritten {}", "a photo of a handwritten {}", "a handwritten {}, black and white",
                 "a scan of a handwritten {}", "a blurry picture of a handwritten {}", "an image of a handwritten {}"]


@dataclass
class T2IConfig:
    """kind t2i: the images and captions the text-to-image teacher learns from."""

    resolution: int = _f(16, "image size in pixels: the 8x8 digits are upsampled to resolution x resolution")
    upsample: str = _f("nearest", "nearest (average pooling brings the images back to 8x8 exactly, which is how the "
                                  "digits classifier scores them) | bilinear")
    templates: list[str] = _f(T2I_TEMPLATES, "caption templates, one drawn per sample; {} is the digit's word and "
                                             "each holds 'a handwritten {}' exactly once",
                              "a list of caption templates such as ['a handwritten {}']")
    caption_dropout: float = _f(0.1, "probability of replacing a caption by the empty prompt, the null condition of "
                                     "classifier-free guidance (as SD 1.x)")
    attention_head_dim: int = _f(8, "channels per attention head of the UNet's transformer blocks")

    def __post_init__(self) -> None:
        _check(self.resolution >= 8 and self.resolution % 8 == 0, "t2i.resolution", "a multiple of 8 (8, 16, 32, ...)",
               self.resolution)
        _check(self.upsample in ("nearest", "bilinear"), "t2i.upsample", "one of nearest, bilinear", self.upsample)
        _check(len(self.templates) >= 1 and all(isinstance(t, str) and t.count("{}") == 1
                                                and t.count("a handwritten {}") == 1 and "handwritten" not in
                                                t.replace("a handwritten {}", "") for t in self.templates),
               "t2i.templates", "a list of templates, each with 'a handwritten {}' exactly once (and no other {} or "
               "'handwritten')", list(self.templates))
        _check(_finite(self.caption_dropout) and 0 <= self.caption_dropout < 1, "t2i.caption_dropout",
               "a probability in [0, 1)", self.caption_dropout)
        _check(self.attention_head_dim >= 1, "t2i.attention_head_dim", "an integer >= 1", self.attention_head_dim)


@dataclass
class VAEConfig:
    """kind t2i: the AutoencoderKL, trained first (reconstruction + KL), then frozen."""

    block_out_channels: list[int] = _f([16, 32], "channels per level (multiples of 8); latents are resolution / "
                                                 "2^(levels - 1) pixels wide",
                                       "a list of channel counts (multiples of 8) such as [16, 32]")
    latent_channels: int = _f(4, "latent channels (SD: 4)")
    layers_per_block: int = _f(1, "ResNet layers per level")
    steps: int = _f(500, "training steps of the VAE stage (a plain loop, before the UNet; a resumed run reuses "
                          "<run.dir>/vae)")
    batch_size: int = _f(64, "images per VAE step")
    lr: float = _f(1e-3, "AdamW learning rate of the VAE (constant)")
    kl_weight: float = _f(1e-4, "weight of the KL term against the per-pixel reconstruction MSE")

    def __post_init__(self) -> None:
        channels = self.block_out_channels
        _check(len(channels) >= 1 and all(isinstance(c, int) and c >= 8 and c % 8 == 0 for c in channels),
               "vae.block_out_channels", "a list of channel counts (multiples of 8) such as [16, 32]", list(channels))
        _check(self.latent_channels >= 1, "vae.latent_channels", "an integer >= 1", self.latent_channels)
        _check(self.layers_per_block >= 1, "vae.layers_per_block", "an integer >= 1", self.layers_per_block)
        _check(self.steps >= 1, "vae.steps", "an integer >= 1", self.steps)
        _check(self.batch_size >= 1, "vae.batch_size", "an integer >= 1", self.batch_size)
        _check(_finite(self.lr) and self.lr > 0, "vae.lr", "a finite number > 0", self.lr)
        _check(_finite(self.kl_weight) and self.kl_weight >= 0, "vae.kl_weight", "a finite number >= 0",
               self.kl_weight)


@dataclass
class TextConfig:
    """kind t2i: the frozen CLIP text encoder (random weights, seeded) and its word-level CLIP tokenizer."""

    hidden_size: int = _f(32, "width of the text encoder (the UNet's cross-attention width)")
    layers: int = _f(2, "transformer layers")
    heads: int = _f(4, "attention heads (dividing hidden_size)")
    max_length: int = _f(16, "tokens per prompt, start and end tokens included (the tokenizer's model_max_length)")

    def __post_init__(self) -> None:
        _check(self.hidden_size >= 1, "text.hidden_size", "an integer >= 1", self.hidden_size)
        _check(self.layers >= 1, "text.layers", "an integer >= 1", self.layers)
        _check(self.heads >= 1 and self.hidden_size % self.heads == 0, "text.heads",
               f"an integer >= 1 dividing text.hidden_size ({self.hidden_size})", self.heads)
        _check(self.max_length >= 3, "text.max_length", "an integer >= 3", self.max_length)


@dataclass
class TeacherEvalConfig:
    """kind t2i: the prompt accuracy written to <out>/distill.json once training ends."""

    prompt_samples: int = _f(1000, "prompts drawn from the prompt list (with replacement); 0: no evaluation")
    steps: int = _f(25, "DDIM steps per sample")
    guidance_scales: list[float] = _f([1.0, 2.0, 4.0], "classifier-free guidance scales to evaluate at",
                                      "a list of numbers >= 0 such as [1.0, 2.0, 4.0]")
    seed: int = _f(0, "seed of the prompts and the noise (the same for every guidance scale)")

    def __post_init__(self) -> None:
        _check(self.prompt_samples >= 0, "eval.prompt_samples", "an integer >= 0", self.prompt_samples)
        _check(self.steps >= 1, "eval.steps", "an integer >= 1", self.steps)
        _check(len(self.guidance_scales) >= 1 and all(_finite(g) and g >= 0 for g in self.guidance_scales),
               "eval.guidance_scales", "a list of numbers >= 0 such as [1.0, 2.0, 4.0]", list(self.guidance_scales))


@dataclass
class TeacherTrainConfig:
    """`distill teacher`: train a class-conditional diffusers UNet teacher (kind unet) or a latent text-to-image
    Stable Diffusion pipeline (kind t2i) on shards."""

    kind: str = _f("unet", "unet (a class-conditional UNet2DModel on the shards' images) | t2i (a latent "
                           "text-to-image StableDiffusionPipeline: VAE, CLIP text encoder and UNet2DConditionModel, "
                           "on the digits shards upsampled and captioned)")
    out: str = _f("", "folder the trained teacher is saved to (save_pretrained layout); empty: <run.dir>/teacher. "
                      "An existing folder with files is refused unless --overwrite")
    sample_steps: int = _f(50, "DDIM steps for the sample grid saved beside the teacher")
    sample_guidance_scale: float = _f(1.0, "CFG scale for that grid")
    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/teacher-digits"))
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=128))
    unet: UNetConfig = field(default_factory=UNetConfig)
    optim: TeacherOptimConfig = field(default_factory=TeacherOptimConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=2000, checkpoint_every_steps=500))
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(samples_every_steps=1000))
    t2i: T2IConfig = field(default_factory=T2IConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    eval: TeacherEvalConfig = field(default_factory=TeacherEvalConfig)

    def validate(self, read_data: bool = True) -> None:
        _check(self.kind in ("unet", "t2i"), "kind", "one of unet, t2i", self.kind)
        if self.kind == "t2i":
            levels = len(self.vae.block_out_channels) - 1
            _check(self.t2i.resolution % 2 ** levels == 0, "t2i.resolution",
                   f"a multiple of 2^{levels} (the VAE's {levels + 1} levels halve it {levels} times)",
                   self.t2i.resolution)
            head = math.lcm(8, self.t2i.attention_head_dim)
            _check(all(c % head == 0 for c in self.unet.block_out_channels), "unet.block_out_channels",
                   f"multiples of {head} for kind t2i (GroupNorm of 8 groups, attention heads of "
                   f"t2i.attention_head_dim channels)", list(self.unet.block_out_channels))
            _check(self.unet.prediction_type in ("epsilon", "v_prediction"), "unet.prediction_type",
                   "epsilon or v_prediction for kind t2i (what distill loads from a pipeline folder)",
                   self.unet.prediction_type)
        _check(self.data.path is not None, "data.path", "a shard folder", None)
        _check_dir(self.data.path, "data.path", "a folder of train-*.tar shards (see `distill data --help`)")
        _check(self.sample_steps >= 1, "sample_steps", "an integer >= 1", self.sample_steps)
        _check(_finite(self.sample_guidance_scale) and self.sample_guidance_scale >= 0, "sample_guidance_scale",
               "a finite number >= 0", self.sample_guidance_scale)
        _check_devices(self.data.batch_size, self.trainer)


# --------------------------------------------------------------------------------------------------------------
# Loading.

C = TypeVar("C")


def _check_dir(path: str, key: str, expected: str) -> None:
    if not os.path.isdir(path):
        raise ConfigError(key, f"folder {path!r} does not exist; expected {expected}")


def _check_devices(batch_size: int, trainer: TrainerConfig) -> None:
    world = trainer.devices * trainer.num_nodes
    if batch_size % world:
        raise ConfigError("data.batch_size", f"{batch_size} does not divide across {world} devices "
                          f"(trainer.devices x trainer.num_nodes); expected a multiple of {world}")


def all_keys(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted key of a config schema with its dataclass field."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            out.update(all_keys(type(sub), key + "."))
        else:
            out[key] = f
    return out


def describe(schema: type) -> str:
    """One line per key: default and help (for `--help`)."""
    defaults = OmegaConf.structured(schema)
    lines = []
    for key, f in all_keys(schema).items():
        value = OmegaConf.select(defaults, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        lines.append(f"  {key} = {_yaml_scalar(value)}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _unknown_key(schema: type, key: str) -> ConfigError:
    keys = list(all_keys(schema))
    if "." not in key:  # a whole section (or a top-level field) misspelt
        keys = sorted({k.split(".")[0] for k in keys})
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a typo in the last part only: compare against the keys of the same section
        section, _, leaf = key.rpartition(".")
        leaves = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == section]
        close = [f"{section}.{m}" if section else m for m in difflib.get_close_matches(leaf, leaves, n=1)]
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid sections: {sorted({k.split('.')[0] for k in keys})}"
    return ConfigError(key, f"unknown key{hint}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key set twice in one mapping (PyYAML silently keeps the last one)."""

    def __init__(self, stream: str, where: str, prefix: str = ""):
        super().__init__(stream)
        self.where, self.key_prefix = where, prefix
        self.paths: dict[int, str] = {}  # id(mapping node) -> its dotted name + "."; parents are built first

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        prefix = self.paths.get(id(node), self.key_prefix)
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:  # before flatten_mapping: `<<` merges may be overridden
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it with its own message
            self.paths[id(value_node)] = f"{prefix}{key}."
            line = key_node.start_mark.line + 1
            if key in lines:
                at = f" (lines {lines[key]} and {line})" if self.where.startswith("config file") else ""
                raise ConfigError(f"{prefix}{key}", f"set twice in {self.where}{at}; expected each key once")
            lines[key] = line
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, where: str, prefix: str = "") -> Any:
    loader = _StrictLoader(text, where, prefix)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_config_file(path: str | Path) -> dict:
    name = f"config file {str(path)!r}"
    if os.path.isdir(path):
        raise DistillError(f"{name} is a folder; expected a YAML file such as configs/digits.yaml")
    if not os.path.isfile(path):
        raise DistillError(f"{name} not found; expected a YAML file such as configs/digits.yaml")
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DistillError(f"{name} is not UTF-8 text (byte {e.start}); expected a YAML file such as "
                           f"configs/digits.yaml") from None
    except OSError as e:
        raise DistillError(f"{name} cannot be read ({e.strerror}); expected a readable YAML file") from None
    try:
        data = _load_yaml(text, name) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DistillError(f"{name} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise DistillError(f"{name}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _check_shapes(schema: type, layer: dict, prefix: str = "") -> None:
    """A section given a value, or a list field given a scalar: OmegaConf's own errors lose the key or the point."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for name, value in layer.items():
        f = fields.get(name)
        if f is None:
            continue  # an unknown key: the merge names it, with a suggestion
        key = f"{prefix}{name}"
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                first = dataclasses.fields(sub)[0].name
                example = f"{key}.{first}={_yaml_scalar(getattr(sub, first))}"
                raise ConfigError(key, f"expected a section of keys (e.g. {example}), got {value!r}")
            _check_shapes(type(sub), value, key + ".")
        elif str(f.type).startswith("list") and not isinstance(value, list):
            raise ConfigError(key, f"expected {f.metadata['expected']}, got {value!r}")


def load_config(schema: type[C], path: str | Path | None = None, overrides: list[str] = (),
                read_data: bool = True) -> C:
    """Schema defaults <- YAML file <- `key=value` overrides, validated; raises ConfigError/DistillError.
    `read_data=False`: the caller reads no shards (evaluation), so data.path need not exist."""
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        layers.append(_read_config_file(path))
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise DistillError(f"override {item!r}: expected key=value, for example trainer.max_steps=100")
        if key.startswith("+"):
            raise DistillError(f"override {item!r}: '+' is Hydra syntax; write {key[1:]}={value}")
        try:
            parsed = _load_yaml(value, f"override {item!r}", key + ".") if value else ""
        except yaml.YAMLError:
            parsed = value
        layer: dict = {}
        node = layer
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed
        layers.append(layer)
    cfg = base
    for layer in layers:
        _check_shapes(schema, layer)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as e:
            raise _unknown_key(schema, e.full_key or str(e.key)) from None
        except ValidationError as e:
            raise _bad_type(schema, e) from None
        except OmegaConfBaseException as e:
            raise ConfigError(getattr(e, "full_key", "?") or "?", str(e).splitlines()[0]) from None
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(getattr(e, "full_key", "?") or "?", str(e).splitlines()[0]) from None
    obj.validate(read_data)
    return obj


def _bad_type(schema: type, e: ValidationError) -> ConfigError:
    key = re.sub(r"\[\d+\]$", "", e.full_key or "?")  # optim.betas[0]: an item of a list field
    f = all_keys(schema).get(key)
    if f is None:
        return ConfigError(key, str(e).splitlines()[0])
    if f.metadata.get("expected"):
        return ConfigError(key, f"expected {f.metadata['expected']}, got {_value_of(e)!r}")
    expected = re.sub(r"^Optional\[(.*)\]$", r"\1", str(f.type)).replace("typing.", "")
    if f.type == "bool" or f.type is bool:
        expected = "true or false"
    return ConfigError(key, f"expected {expected}, got {_value_of(e)!r}")


def _value_of(e: ValidationError) -> Any:
    msg = str(e).splitlines()[0]
    # OmegaConf: "Value 'abc' of type 'str' could not be converted to Integer" / "Value 'x' is not a valid bool"
    m = re.match(r"Value '(.*?)'( of type| is not)", msg)
    return m.group(1) if m else msg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (what `config.yaml` in the run directory holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    """Write `config.yaml` atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
    return path
