"""The DMD LightningModule (DMD2 reference form, DESIGN §1): manual optimisation, two time scales, EMA.

`training_step` reads like the algorithm:
  1. sample z and generate x = G(z)
  2. draw (t, eps) for the DMD expectation
  3. teacher and fake-score predictions at x_t, no grad
  4. DMD gradient and generator update (every `ttur` steps)
  5. fake-score update on the detached samples (every step)
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from distill.config import FitConfig
from distill.losses import denoising_loss, dmd_grad, dmd_loss
from distill.plots import grid_image, scatter_image
from distill.schedules import vp_schedule
from distill.teachers import (
    MLP,
    Denoiser,
    GaussianMixture,
    GaussianMixtureDenoiser,
    OneStepGenerator,
    ema_update,
    load_diffusers_teacher,
    trainable_copy,
)


def gmm_teacher(cfg: FitConfig) -> GaussianMixtureDenoiser:
    """The exact mixture teacher on a DDPM linear-beta VP schedule with T = teacher.num_timesteps."""
    from diffusers import DDPMScheduler

    t = cfg.teacher
    schedule = vp_schedule(DDPMScheduler(num_train_timesteps=t.num_timesteps).alphas_cumprod)
    return GaussianMixtureDenoiser(GaussianMixture.ring(t.gmm_modes, t.gmm_radius, t.gmm_std), schedule)


def build_networks(cfg: FitConfig) -> tuple[nn.Module, Denoiser, OneStepGenerator]:
    """(teacher, fake score, generator). Diffusers teachers: both copies start from the teacher's weights;
    the mixture teacher: fresh MLPs (there are no weights to copy)."""
    if cfg.teacher.kind == "diffusers":
        teacher = load_diffusers_teacher(cfg.teacher.path)
        fake = trainable_copy(teacher)
        generator = OneStepGenerator(trainable_copy(teacher), cfg.generator.t_init)
        return teacher, fake, generator
    teacher = gmm_teacher(cfg)
    d, T = teacher.mixture.dim, teacher.T
    g, f = cfg.generator, cfg.fake_score
    # The generator predicts x0 directly (at t_init = T-1, alpha ~ 0.006 would amplify an eps output 150x), as
    # z + MLP(z): it starts from N(0, I) rather than from a point.
    gen_net = Denoiser(MLP(d, T, g.mlp_hidden, g.mlp_depth, skip=True), teacher.schedule, "sample")
    fake = Denoiser(MLP(d, T, f.mlp_hidden, f.mlp_depth), teacher.schedule, "epsilon")
    return teacher, fake, OneStepGenerator(gen_net, g.t_init)


class DMDModule(L.LightningModule):
    def __init__(self, cfg: FitConfig):
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False
        self.teacher, self.fake_score, self.generator = build_networks(cfg)
        self.teacher.requires_grad_(False).eval()
        self.ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        T = self.teacher.T
        # DMD2: t uniform over the integer indices [0.02 T, 0.98 T]
        self.t_lo, self.t_hi = int(cfg.estimator.t_min * T), min(int(cfg.estimator.t_max * T), T - 1)
        self.step = 0  # completed training steps (not optimiser calls)
        self.max_steps = cfg.trainer.max_steps
        self.progress_postfix: dict[str, float] = {}
        self._acc: dict[str, list[float]] = {}

    # ---------------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        kw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay)
        opt_g = torch.optim.AdamW(self.generator.parameters(), lr=o.lr_generator, **kw)
        opt_f = torch.optim.AdamW(self.fake_score.parameters(), lr=o.lr_fake_score, **kw)
        return [opt_g, opt_f]

    @property
    def conditional(self) -> bool:
        return getattr(self.teacher, "num_classes", None) is not None

    def _update(self, opt, loss: Tensor, params) -> Tensor:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = [p for p in params if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        opt.step()
        return norm

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x_real, labels = batch
        labels = labels if self.conditional else None
        opt_g, opt_f = self.optimizers()
        N = x_real.shape[0]
        update_generator = self.step % self.cfg.optim.ttur == 0
        metrics: dict[str, float] = {}

        # 1. sample z and generate x = G(z) (with grad only when the generator is updated this step)
        rng = self._step_generator()
        z = torch.randn(x_real.shape, generator=rng, device=self.device)
        with torch.set_grad_enabled(update_generator):
            x = self.generator(z, labels)  # (N, C, H, W) or (N, d)

        if update_generator:
            # 2. draw (t, eps): the DMD2 baseline, t ~ U{t_lo..t_hi}, one draw per sample
            t = torch.randint(self.t_lo, self.t_hi + 1, (N,), generator=rng, device=self.device)
            eps = torch.randn(x.shape, generator=rng, device=self.device)
            # 3. teacher and fake-score predictions at x_t, no grad through either
            with torch.no_grad():
                x_t = self.teacher.schedule.add_noise(x.detach(), eps, t)
                mu_real = self.teacher(x_t, t, labels, guidance_scale=self.cfg.teacher.guidance_scale)
                mu_fake = self.fake_score(x_t, t, labels)
                g = dmd_grad(x.detach(), mu_real, mu_fake)
            # 4. DMD gradient and generator update: d loss / dx = g / numel
            loss_g = dmd_loss(x, g).mean()
            metrics["grad_norm/generator"] = float(self._update(opt_g, loss_g, self.generator.parameters()))
            self._ema_update()
            metrics["loss/generator_dm"] = loss_g.item()

        # 5. fake-score update: the teacher's denoising loss on G's (detached) samples, t over the full range
        x0 = x.detach()
        t_f = torch.randint(0, self.teacher.T, (N,), generator=rng, device=self.device)
        x_t = self.teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=rng, device=self.device), t_f)
        x0_hat = self.fake_score(x_t, t_f, labels)
        loss_f = denoising_loss(x0_hat, x0, self.fake_score.loss_weight(t_f, x0)).mean()
        metrics["grad_norm/fake_score"] = float(self._update(opt_f, loss_f, self.fake_score.parameters()))
        metrics["loss/fake_score"] = loss_f.item()

        self.step += 1
        self.accumulate(metrics)

    def _step_generator(self) -> torch.Generator:
        """The step's noise comes from (seed, rank, step) alone: ranks draw different noise, and a resumed run
        draws exactly what the uninterrupted run would have, with no RNG state to carry."""
        seed = np.random.SeedSequence([self.cfg.trainer.seed, self.global_rank, self.step]).generate_state(1)[0]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def _ema_update(self) -> None:
        ema_update(self.ema, self.generator, self.cfg.generator.ema_decay, self.step // self.cfg.optim.ttur)

    # ---------------------------------------------------------------------------------------------------------
    # Logging: running means over the window, written to every logger with step = training step.

    def accumulate(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._acc.setdefault(k, []).append(float(v))

    def on_train_batch_start(self, batch, batch_idx) -> int | None:
        return -1 if self.step >= self.max_steps else None  # -1 ends the (endless) epoch, and with it the fit

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.step % self.cfg.trainer.log_every_steps == 0 or self.step >= self.max_steps:
            means = {k: sum(v) / len(v) for k, v in self._acc.items() if v}
            self._acc.clear()
            if "time/step_seconds" in means:
                means["time/samples_per_second"] = self.cfg.data.batch_size / means["time/step_seconds"]
            means["train/step"] = self.step
            for logger in self.loggers:
                logger.log_metrics(means, step=self.step)
            self.progress_postfix = {k.split("/")[-1]: v for k, v in means.items() if k.startswith("loss/")}
        if self.step >= self.max_steps:
            self.trainer.should_stop = True

    # ---------------------------------------------------------------------------------------------------------
    # Samples for the grid callback (own generator: never touches the training RNG).

    @torch.no_grad()
    def sample_image(self):
        gen = torch.Generator().manual_seed(self.cfg.trainer.seed + 12345)
        was_training = self.ema.training
        self.ema.eval()
        try:
            if isinstance(self.teacher, GaussianMixtureDenoiser):
                z = torch.randn(2000, self.teacher.mixture.dim, generator=gen).to(self.device)
                ref, _ = self.teacher.mixture.sample(2000, generator=gen)
                return scatter_image(self.ema(z), ref, title=f"EMA generator, step {self.step}")
            cols = self.cfg.logging.samples_per_class
            from distill.teachers import sample_shape_of

            shape = sample_shape_of(self.teacher)
            if self.conditional:
                rows = self.teacher.num_classes
                labels = torch.arange(rows).repeat_interleave(cols).to(self.device)
            else:
                rows, labels = cols, None
            z = torch.randn(rows * cols, *shape, generator=gen).to(self.device)
            return grid_image(self.ema(z, labels), nrow=cols)
        finally:
            self.ema.train(was_training)

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints: G, EMA, fake score (not the frozen teacher), optimisers (Lightning) and the step. No RNG state:
    # every step's noise is a function of (seed, rank, step).

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}
        checkpoint["distill"] = {"step": self.step}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The teacher is frozen and reloaded from its folder; put it back so strict loading sees every key.
        for k, v in self.teacher.state_dict().items():
            checkpoint["state_dict"][f"teacher.{k}"] = v
        self.step = int(checkpoint["distill"]["step"])
        if self.step >= self.max_steps:
            self.max_steps = self.step  # nothing left to do; the fit loop stops after setup
