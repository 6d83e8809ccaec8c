"""Train the small class-conditional diffusers teacher (`distill teacher`, kind unet): DDPM with the network's
native loss (eps-, v- or x0-MSE; Ho et al. 2020, eq. 14 for eps), label dropout for classifier-free guidance, EMA
weights saved with `save_pretrained` (unet/ and scheduler/). The latent text-to-image kind (t2i) lives in
distill.pretrain_t2i and shares `TeacherTraining` with it."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor

from distill.conditions import Condition
from distill.config import TeacherTrainConfig, to_yaml
from distill.plots import grid_image
from distill.schedules import from_x0, vp_schedule
from distill.teachers import Denoiser, UNetAdapter, build_unet, ddim_sample, ema_update


class TeacherTraining(L.LightningModule):
    """What both kinds of `distill teacher` share: AdamW on `self.denoiser` with linear warm-up and cosine decay,
    gradient clipping, the EMA copy `self.ema` updated after every optimiser step, per-step random numbers as a
    function of (seed, rank, step), the metric window and the step bookkeeping. (A base class for two modules:
    the alternative is 70 identical lines in two files that must never drift apart, since resume relies on them.)
    Subclasses set `denoiser` and `ema` and implement `training_step`, `sample_image` and `save_teacher`."""

    def __init__(self, cfg: TeacherTrainConfig):
        super().__init__()
        self.cfg = cfg
        self.max_steps = cfg.trainer.max_steps
        self.progress_postfix: dict[str, float] = {}
        self._acc: list[float] = []

    @property
    def step(self) -> int:
        return self.global_step

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = torch.optim.AdamW(self.denoiser.parameters(), lr=o.lr, weight_decay=o.weight_decay)

        def lr_factor(step: int) -> float:  # linear warm-up, then cosine decay to 0 at max_steps
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            frac = (step - o.warmup_steps) / max(1, self.max_steps - o.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _step_generator(self) -> torch.Generator:
        seed = np.random.SeedSequence([self.cfg.trainer.seed, self.global_rank, self.global_step]).generate_state(1)[0]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.cfg.optim.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.optim.grad_clip, gradient_clip_algorithm="norm")

    def on_train_batch_start(self, batch, batch_idx) -> int | None:
        return -1 if self.step >= self.max_steps else None

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # The EMA follows every optimiser step here, not in on_train_batch_end: Lightning runs the callbacks'
        # on_train_batch_end (StepCheckpoint) before the module's, so a checkpoint written there would miss the
        # step's EMA update, and a resumed run would lose it. global_step counts this step only once the hook
        # returns, hence + 1 (the step number the update had before).
        ema_update(self.ema, self.denoiser, self.cfg.optim.ema_decay, self.global_step + 1)

    def flush_due(self) -> bool:
        return self.step % self.cfg.trainer.log_every_steps == 0 or self.step >= self.max_steps

    def flush_metrics(self) -> None:
        """The window's mean loss and the learning rate, to every logger (distill.train's FlushMetrics calls this
        before the step's checkpoint is written)."""
        if not self._acc:
            return
        metrics = {"loss/denoising": sum(self._acc) / len(self._acc),
                   "optim/lr": self.lr_schedulers().get_last_lr()[0], "train/step": self.step}
        self._acc.clear()
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.step)
        self.progress_postfix = {"loss": metrics["loss/denoising"]}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.flush_due():
            self.flush_metrics()  # a no-op after FlushMetrics
        if self.step >= self.max_steps:
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["distill"] = {"step": self.step, "config": to_yaml(self.cfg)}


class TeacherModule(TeacherTraining):
    """kind unet: a class-conditional UNet2DModel trained on the shards' images."""

    def __init__(self, cfg: TeacherTrainConfig, sample_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg)
        from diffusers import DDPMScheduler

        u = cfg.unet
        self.sample_shape = tuple(sample_shape)
        self.scheduler = DDPMScheduler(num_train_timesteps=u.num_train_timesteps, beta_schedule=u.beta_schedule,
                                       prediction_type=u.prediction_type, clip_sample=False)
        unet = build_unet(self.sample_shape, num_classes, list(u.block_out_channels), u.layers_per_block, u.attention)
        self.denoiser = Denoiser(UNetAdapter(unet), vp_schedule(self.scheduler.alphas_cumprod), u.prediction_type,
                                 num_classes=num_classes)
        self.ema = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        self.num_classes = num_classes

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        rng = self._step_generator()
        N = x0.shape[0]
        drop = torch.rand(N, generator=rng, device=self.device) < self.cfg.unet.class_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)  # null label for CFG
        t = torch.randint(0, self.denoiser.T, (N,), generator=rng, device=self.device)
        eps = torch.randn(x0.shape, generator=rng, device=self.device)
        x_t = self.denoiser.schedule.add_noise(x0, eps, t)
        a, s = self.denoiser.schedule.coefficients(t, x0)
        target = from_x0(x0, x_t, a, s, self.cfg.unet.prediction_type)  # eps, v or x0
        raw = self.denoiser.net(x_t, t, Condition(labels=labels))  # the adapters take a Condition
        loss = torch.nn.functional.mse_loss(raw.float(), target.float())
        self._acc.append(loss.item())
        return loss

    @torch.no_grad()
    def sample_image(self, steps: int | None = None, guidance_scale: float | None = None, cols: int = 10):
        """DDIM samples of the EMA teacher: one row per class."""
        gen = torch.Generator().manual_seed(self.cfg.trainer.seed + 12345)
        labels = torch.arange(self.num_classes).repeat_interleave(cols).to(self.device)
        z = torch.randn(len(labels), *self.sample_shape, generator=gen).to(self.device)
        x = ddim_sample(self.ema, z, labels, steps=steps or self.cfg.sample_steps,
                        guidance_scale=self.cfg.sample_guidance_scale if guidance_scale is None else guidance_scale)
        return grid_image(x, nrow=cols)

    def save_teacher(self, out: str | Path, extra: dict | None = None) -> Path:
        """EMA weights and the scheduler in the diffusers layout: out/unet, out/scheduler."""
        out = Path(out)
        self.ema.net.unet.save_pretrained(out / "unet")
        self.scheduler.save_pretrained(out / "scheduler")
        (out / "distill.json").write_text(json.dumps({"step": self.step, **(extra or {})}, indent=2) + "\n")
        (out / "train_config.yaml").write_text(to_yaml(self.cfg))
        return out
