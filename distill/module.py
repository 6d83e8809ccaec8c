"""The DMD LightningModule (DMD2 reference form, docs/method.md §3–§4): manual optimisation, two time scales, EMA,
and the CARV hierarchical estimator of the DMD expectation over (t, eps).

`training_step` reads like the algorithm:
  1. sample z and generate x = G(z)                       (the expensive upstream: N samples)
  2. draw K (t, eps) per sample with the CARV sampler        (proposal q, stratified inverse CDF, w = p/q)
  3. teacher and fake-score predictions at all N*K x_t, no grad, batched (chunked)
  4. hierarchical DMD gradient (1/K) sum_k w g and generator update (every `ttur` steps)
  5. fake-score update on the detached samples (every step)
The bookkeeping (proposal statistics, variance estimates, the choice of K) follows the update and only ever
uses what was measured before the draws it will weight.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from distill.carv import TimestepSampler, anova, dmd_timestep_p, ecm, ecm_oracle, k_star
from distill.carv.accounting import within_variance
from distill.carv.controller import KController, weighted_mean
from distill.carv.diagnostics import (draw_loss_variance_estimate, measure_costs, split_half_estimate,
                                      stratified_within_estimate)
from distill.conditions import Condition, as_condition
from distill.config import FitConfig
from distill.distributed import all_mean, is_distributed
from distill.losses import denoising_loss, dmd_grad, dmd_loss, gan_discriminator_loss, gan_generator_loss
from distill.plots import grid_image, scatter_image
from distill.schedules import vp_schedule
from distill.teachers import (
    MLP,
    Denoiser,
    GaussianMixture,
    GaussianMixtureDenoiser,
    Generator,
    Teacher,
    ema_update,
    load_teacher,
    trainable_copy,
)

# frozen parts that are reloaded from the teacher's folder, never stored in a checkpoint
FROZEN_PREFIXES = ("teacher.", "text.", "codec.")


def gmm_teacher(cfg: FitConfig) -> GaussianMixtureDenoiser:
    """The exact mixture teacher on a DDPM linear-beta VP schedule with T = teacher.num_timesteps."""
    from diffusers import DDPMScheduler

    t = cfg.teacher
    schedule = vp_schedule(DDPMScheduler(num_train_timesteps=t.num_timesteps).alphas_cumprod)
    return GaussianMixtureDenoiser(GaussianMixture.ring(t.gmm_modes, t.gmm_radius, t.gmm_std), schedule)


def build_networks(cfg: FitConfig) -> tuple[Teacher, Denoiser, Generator]:
    """(teacher, fake score, generator). Diffusers teachers: both copies start from the teacher's weights (in
    float32; the frozen teacher then takes `teacher.dtype`); the mixture teacher: fresh MLPs (there are no weights
    to copy)."""
    if cfg.teacher.kind == "diffusers":
        teacher = load_teacher(cfg.teacher.path, frozen_dtype(cfg))
        g, f = cfg.generator, cfg.fake_score
        for key, rank in (("generator.lora_rank", g.lora_rank), ("fake_score.lora_rank", f.lora_rank)):
            if rank and not hasattr(teacher.denoiser.net.unet, "add_adapter"):  # diffusers' UNet2DModel has no peft
                from distill.errors import ConfigError

                raise ConfigError(key, f"0 for a {type(teacher.denoiser.net.unet).__name__} teacher (LoRA adapters "
                                  f"need a UNet2DConditionModel: a Stable Diffusion pipeline), got {rank}")
        fake = trainable_copy(teacher.denoiser, f.lora_rank, f.lora_alpha, f.gradient_checkpointing)
        generator = Generator(trainable_copy(teacher.denoiser, g.lora_rank, g.lora_alpha, g.gradient_checkpointing),
                              g.timesteps or g.t_init)
        teacher.denoiser.to(frozen_dtype(cfg))
        return teacher, fake, generator
    mixture = gmm_teacher(cfg)
    d, T = mixture.mixture.dim, mixture.T
    g, f = cfg.generator, cfg.fake_score
    # The generator predicts x0 directly (at t_init = T-1, alpha ~ 0.006 would amplify an eps output 150x), as
    # z + MLP(z): it starts from N(0, I) rather than from a point.
    gen_net = Denoiser(MLP(d, T, g.mlp_hidden, g.mlp_depth, skip=True), mixture.schedule, "sample")
    fake = Denoiser(MLP(d, T, f.mlp_hidden, f.mlp_depth), mixture.schedule, "epsilon")
    return Teacher(mixture, "gmm"), fake, Generator(gen_net, g.timesteps or g.t_init)


def frozen_dtype(cfg: FitConfig) -> torch.dtype:
    """teacher.dtype: auto is bfloat16 where a CUDA device will run the fit, float32 elsewhere."""
    name = cfg.teacher.dtype
    if name == "auto":
        gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto"
                                                               and torch.cuda.is_available())
        name = "bfloat16" if gpu else "float32"
    return getattr(torch, name)


class DMDModule(L.LightningModule):
    FROZEN_PREFIXES = FROZEN_PREFIXES
    def __init__(self, cfg: FitConfig):
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False
        loaded, self.fake_score, self.generator = build_networks(cfg)
        self.teacher = loaded.denoiser.requires_grad_(False).eval()
        self.layout = loaded.layout  # unet, sd, sdxl or gmm
        self.text = loaded.text  # frozen text encoder(s) of a text-to-image teacher, else None
        self.codec = loaded.codec  # its frozen VAE (latents -> images), else None
        self.prompts: list[str] = []  # the prompt set of a text-to-image teacher (data.path), read once
        if self.text is not None:
            from distill.data import read_prompts

            self.prompts = read_prompts(cfg.data.path)
        self.ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        # DMD2's GAN term: a classifier head on the fake score's bottleneck, and the real data it reads
        self.gan_head: nn.Module | None = None
        self.real = None  # distill.data.RealData over gan.data (or data.path): opened by fit, or at first use
        if cfg.gan.on:
            from distill.gan import GANHead

            self.gan_head = GANHead.for_denoiser(self.fake_score, self.sample_shape())
        e = cfg.estimator
        # p: DMD2's t uniform over the integer indices [0.02 T, 0.98 T]; q: the proposal the sampler draws from
        self.sampler = TimestepSampler(
            dmd_timestep_p(self.teacher.T, e.t_min, e.t_max), proposal=e.proposal, stratify=e.stratify,
            warmup=e.adaptive_warmup, refresh_every=e.adaptive_refresh_every, **e.adaptive_table)
        f = cfg.fake_score  # the fake score's own proposal over all T indices (p uniform, as DMD2 draws them)
        self.fake_sampler = None if (f.K == 1 and f.proposal == "uniform" and f.stratify == "none") else \
            TimestepSampler(torch.full((self.teacher.T,), 1.0 / self.teacher.T, dtype=torch.float64),
                            proposal=f.proposal, stratify=f.stratify, warmup=e.adaptive_warmup,
                            refresh_every=e.adaptive_refresh_every, **e.adaptive_table)
        self.k_control = KController(1 if e.K == "auto" else e.K, e.K == "auto", e.k_max, e.max_draws, e.auto_ema,
                                     strat_K=self.strat_K())
        # the fake score's draws per sample: fixed, or chosen by the same accounting (docs/method.md §9)
        self.fake_k = KController(1 if f.K == "auto" else f.K, f.K == "auto", e.k_max, e.max_draws, e.auto_ema,
                                  strat_K=self.strat_K())
        self.costs: dict[str, float] = {}  # c_u, c_i in FLOPs and seconds per sample / per draw
        self.g_steps = 0  # generator updates so far
        # updates skipped for a non-finite loss or gradient, kept on the device (no host sync in a step):
        # [total, in a row now, most in a row since the last check, step of the last one]
        self.health: Tensor | None = None
        self.step = 0  # completed training steps (not optimiser calls)
        self.max_steps = cfg.trainer.max_steps
        self.batch_per_device = cfg.data.batch_size // (cfg.trainer.devices * cfg.trainer.num_nodes)  # N
        self.progress_postfix: dict[str, float] = {}
        self._acc: dict[str, list] = {}

    # ---------------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        # fused: a skipped (non-finite) step is masked on the device through `found_inf`, with no host sync
        kw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay, fused=True)
        opt_g = torch.optim.AdamW(self.trained(self.generator), lr=o.lr_generator, **kw)
        opt_f = torch.optim.AdamW(self.discriminator_params(), lr=o.lr_fake_score, **kw)
        return [opt_g, opt_f]

    def discriminator_params(self) -> list[nn.Parameter]:
        """The fake score's trained weights and the GAN head's: one optimiser (DMD2)."""
        head = list(self.gan_head.parameters()) if self.gan_head is not None else []
        return self.trained(self.fake_score) + head

    @staticmethod
    def trained(network: nn.Module) -> list[nn.Parameter]:
        """What the optimiser updates: every weight of a full copy, the adapters of a LoRA one."""
        return [p for p in network.parameters() if p.requires_grad]

    @property
    def conditional(self) -> bool:
        return self.teacher.conditional

    def sample_condition(self, N: int, rng: torch.Generator, host_rng: torch.Generator | None = None
                         ) -> Condition | None:
        """The step's conditions: class labels uniform over the classes (DMD2), or prompts drawn uniformly from the
        prompt set and encoded by the frozen text encoder(s); None for an unconditional teacher. The prompt indices
        come from a CPU generator of the same (seed, rank, step), since the tokenizer works on the host anyway: no
        device-to-host copy in the step (`host_rng` replaces that generator)."""
        if self.text is not None:
            host_rng = host_rng or self._step_generator(salt=2, device="cpu")
            picks = torch.randint(0, len(self.prompts), (N,), generator=host_rng)
            return self.text([self.prompts[i] for i in picks.tolist()]).to(torch.float32)
        if self.teacher.num_classes is not None:
            return Condition(labels=torch.randint(0, self.teacher.num_classes, (N,), generator=rng,
                                                  device=self.device))
        return None

    def on_train_start(self) -> None:
        # the config is the truth: a resumed run with an allowed change to optim takes it (Lightning restored the
        # optimisers' hyperparameters from the checkpoint)
        o = self.cfg.optim
        for opt, lr in zip(self.trainer.optimizers, (o.lr_generator, o.lr_fake_score)):
            for group in opt.param_groups:
                group.update(lr=lr * self.lr_factor(), betas=tuple(o.betas), weight_decay=o.weight_decay)

    def lr_factor(self, step: int | None = None) -> float:
        """The learning-rate factor of a training step: (step + 1) / optim.warmup_steps during the warm-up, then 1.
        A function of the step alone, so a resumed run takes the same rates."""
        warmup = self.cfg.optim.warmup_steps
        step = self.step if step is None else step
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    def _warm_up(self) -> None:
        if self.cfg.optim.warmup_steps and self.step <= self.cfg.optim.warmup_steps:
            o, factor = self.cfg.optim, self.lr_factor()
            for opt, lr in zip(self.trainer.optimizers, (o.lr_generator, o.lr_fake_score)):
                for group in opt.param_groups:
                    group["lr"] = lr * factor

    def _update(self, opt, loss: Tensor, params) -> tuple[Tensor, Tensor]:
        """Backward, clip, step: (gradient norm, whether the step was taken), both tensors on the device. A
        non-finite loss or gradient on any rank skips the step on every rank: the fused optimiser sees `found_inf`
        and changes nothing (parameters, moments, step count); the caller masks the EMA and the bookkeeping. No
        host synchronisation."""
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        params = [p for p in params if p.grad is not None]
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        finite = torch.stack([loss.detach().float(), norm.detach().float()]).isfinite().all().float()
        if is_distributed():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        optimizer = getattr(opt, "optimizer", opt)  # Lightning's wrapper around the torch optimiser
        optimizer.found_inf = 1.0 - finite
        opt.step()
        return norm.detach(), finite > 0

    def _count_nonfinite(self, taken: list[Tensor]) -> None:
        """Fold this step's update outcomes into the health counters (on the device)."""
        if self.health is None:
            self.health = torch.zeros(4, dtype=torch.float64, device=self.device)
        h = self.health
        skipped = torch.stack([~ok for ok in taken]).to(h.dtype)  # (updates this step,)
        bad = skipped.sum()
        h[0] += bad
        h[1] = torch.where(bad > 0, h[1] + bad, torch.zeros_like(h[1]))
        h[2] = torch.maximum(h[2], h[1])
        h[3] = torch.where(bad > 0, torch.full_like(h[3], self.step), h[3])

    def check_health(self) -> dict[str, float]:
        """Read the health counters (a host sync: called on logging and checkpoint steps only); stop the run when
        `trainer.max_nonfinite` updates in a row were skipped."""
        if self.health is None:
            return {}
        total, now, most, last = self.health.tolist()
        self.health[2] = self.health[1]
        limit = self.cfg.trainer.max_nonfinite
        if most >= limit:
            from distill.errors import DistillError

            raise DistillError(f"{int(most)} updates in a row had a non-finite loss or gradient (the last at step "
                               f"{int(last)}; trainer.max_nonfinite = {limit}); stopped with the last good checkpoint "
                               f"intact in {self.cfg.run.dir}/checkpoints")
        if total == 0:
            return {}
        return {"health/nonfinite_steps": total, "health/last_nonfinite_step": last}

    def _sync_due(self) -> bool:
        """Steps that read device values on the host anyway: logging, checkpoints, the end."""
        t = self.cfg.trainer
        return (self.step % t.log_every_steps == 0 or self.step % t.checkpoint_every_steps == 0
                or self.step >= self.max_steps)

    def training_step(self, batch, batch_idx: int) -> None:
        # the batch is only the step's index: DMD reads no real data, and the GAN term draws its own real batch
        opt_g, opt_f = self.optimizers()
        self._warm_up()
        N = self.batch_per_device
        update_generator = self.step % self.cfg.optim.ttur == 0
        diagnose = update_generator and self._diagnostic_due()  # (before this step's update counts)
        metrics: dict[str, Tensor | float] = {}
        taken = []

        # 1. sample z and the conditions (class labels or prompts, uniform as in DMD2) and generate x = G(z) (with
        #    grad only when the generator is updated this step). Every random number is a function of (seed, rank,
        #    step). A multi-step student trains one step k per training step (the same k on every rank), on the
        #    input that backward simulation reaches: steps 0 .. k-1 without grad, re-noised with fresh noise (DMD2
        #    §4.5); the losses apply to step k's x0.
        rng = self._step_generator()
        z = torch.randn((N, *self.sample_shape()), generator=rng, device=self.device)
        cond = self.sample_condition(N, rng)  # labels, prompt embeddings, or None
        k = self.student_step()
        with torch.set_grad_enabled(update_generator):  # (N, C, H, W) (latents for a latent teacher) or (N, d)
            x = self.generator(z, cond, noise=self._renoise_draws(N, k, rng), until=k)
        if self.generator.steps > 1:
            metrics["train/student_step"] = float(k)

        if update_generator:
            # 2. draw K (t, eps) per sample: t from the proposal q by the stratified inverse CDF, w = p(t)/q(t)
            K = self.k_control.K
            t, w = self._draw_timesteps(N, K, rng)  # (N, K), (N, K)
            eps = torch.randn((N * K, *x.shape[1:]), generator=rng, device=self.device)  # (N*K, ...)
            # 3. teacher and fake-score predictions at all N*K x_t, batched, no grad: the per-draw integrand g
            with torch.no_grad():
                g = self._integrand(x.detach(), cond, t, eps)  # (N, K, ...)
                g_bar = weighted_mean(g, w)  # (1/K) sum_k w g  (docs/method.md §4, hierarchical estimator)
            # 4. DMD gradient and generator update: d loss / dx = g_bar / numel
            loss_g = dmd_loss(x, g_bar).mean()
            if diagnose:
                metrics.update(self._split_half_diagnostic(  # exact parameter-space (σ_b², σ_w², ...)
                    x, cond, lambda gen: self._at_other_step(z, cond, N, gen)))
            metrics["loss/generator_dm"] = loss_g.detach()
            if self.gan_head is not None:  # the generator's GAN loss softplus(-f(G(z))) through the fake score
                loss_gan = gan_generator_loss(self._gan_logits(x, cond, salt=4)).mean()
                metrics["loss/gan_generator"] = loss_gan.detach()
                loss_g = loss_g + self.cfg.gan.weight_generator * loss_gan
            metrics["grad_norm/generator"], stepped = self._update(opt_g, loss_g, self.generator.parameters())
            taken.append(stepped)
            # a skipped (non-finite) update feeds neither the EMA nor the proposal statistics (masked on the device)
            self._ema_update(stepped)
            metrics.update(self._bookkeeping(t, w, g, N, stepped))

        # 5. fake-score update: the teacher's denoising loss on G's (detached) samples, t over the full range
        #    (DMD2: one t per sample; with fake_score.K / proposal / stratify, CARV's estimate of the same loss)
        x0 = x.detach()
        if diagnose and self.fake_k.auto:  # the denoising gradient's variance split, before its update
            metrics.update(self._fake_score_diagnostic(x0, cond))
        if self.fake_sampler is None:
            t_f = torch.randint(0, self.teacher.T, (N,), generator=rng, device=self.device)
            x_t = self.teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=rng, device=self.device), t_f)
            x0_hat = self.fake_score(x_t, t_f, cond)  # never guided (DMD2)
            loss_f = denoising_loss(x0_hat, x0, self.fake_score.loss_weight(t_f, x0)).mean()
            fake_draws = None
        else:
            loss_f, fake_draws = self._fake_score_loss(x0, cond, rng)
            metrics["carv_fake/K"] = float(fake_draws[0].shape[1])
        metrics["loss/fake_score"] = loss_f.detach()
        if self.gan_head is not None:  # the discriminator: softplus(f(fake)) + softplus(-f(real)), same optimiser
            metrics.update(self._discriminator_loss(x0, cond, N))
            loss_f = loss_f + self.cfg.gan.weight_discriminator * metrics["loss/gan_discriminator"]
        metrics["grad_norm/fake_score"], stepped_f = self._update(opt_f, loss_f, self.discriminator_params())
        taken.append(stepped_f)
        if fake_draws is not None:  # the fake proposal's statistics (a skipped update feeds none)
            self.fake_sampler.record(*fake_draws, stepped_f)
            if is_distributed():
                self.fake_sampler.reduce_pending(torch.distributed.all_reduce)
            self.fake_sampler.update()
        self._count_nonfinite(taken)

        self.step += 1
        self.accumulate(metrics)
        if self._sync_due():
            self.accumulate(self.check_health())

    # ---------------------------------------------------------------------------------------------------------
    # Multi-step students and the GAN term.

    def _fake_score_loss(self, x0: Tensor, cond: Condition | Tensor | None,
                         rng: torch.Generator) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """CARV on the fake-score update (docs/method.md §9, "The fake score's loss"): K = fake_score.K draws of
        (t, noise) per generated sample, t from the fake proposal q (stratified per sample when asked), each
        draw's denoising loss weighted by p(t)/q(t): an unbiased estimate of DMD2's loss E_{t ~ U[0, T)}. Returns
        the loss and (t, loss²) per draw (N, K), the statistics of an adaptive q (q ∝ p sqrt(E[loss² | t]))."""
        N, K = x0.shape[0], self.fake_k.K
        t, w = self.fake_sampler.sample(N, K, generator=rng, device=self.device)  # (N, K)
        per = self._fake_draw_losses(x0, cond, t, rng)  # (N, K)
        loss = (w.to(per.dtype) * per).mean()
        return loss, (t, per.detach().pow(2))

    def _fake_draw_losses(self, x0: Tensor, cond: Condition | Tensor | None, t: Tensor,
                          rng: torch.Generator) -> Tensor:
        """Each draw's denoising loss (N, K) of the fake score at x0 re-noised to t (N, K), the noise from rng."""
        N, K = t.shape
        x0_rep = x0.repeat_interleave(K, dim=0)  # sample n's draws are rows n*K .. n*K+K-1
        cond_rep = as_condition(cond).repeat_interleave(K) if cond is not None else None
        t_flat = t.flatten()
        x_t = self.teacher.schedule.add_noise(
            x0_rep, torch.randn(x0_rep.shape, generator=rng, device=self.device), t_flat)
        return denoising_loss(self.fake_score(x_t, t_flat, cond_rep), x0_rep,
                              self.fake_score.loss_weight(t_flat, x0_rep)).view(N, K)

    def _fake_score_diagnostic(self, x0: Tensor, cond: Condition | Tensor | None) -> dict[str, float]:
        """fake_score.K auto: the denoising gradient's (σ_b², σ_w², σ_w,strat²) on this step's samples, folded into
        its controller, with what the accounting makes of them (docs/method.md §9, "Splitting compute between the
        updates"): K*, the ECM of the current K against one draw, and `ttur_equivalent`, the fake-score updates at
        the current K that carry as much gradient information (N / Var summed) as optim.ttur updates at one draw."""
        N = x0.shape[0]
        sigma_b2, sigma_w2, strat = draw_loss_variance_estimate(
            lambda t, w, gen: w.to(x0.dtype) * self._fake_draw_losses(x0, cond, t, gen),
            self.trained(self.fake_score), N, self.fake_sampler, self.strat_K(), self._step_generator(salt=5))
        sigma_b2, sigma_w2, strat = all_mean([sigma_b2, sigma_w2, strat])
        c = self.fake_k
        c.observe(sigma_b2, sigma_w2, strat)
        out = {"carv_fake/sigma_b2_raw": sigma_b2, "carv_fake/sigma_w2_raw": sigma_w2}
        if math.isfinite(strat):
            out["carv_fake/sigma_w2_strat_raw"] = strat
        if c.sigma_b2 is None:
            return out
        sb2, a, b = c.model()
        out["carv_fake/sigma_b2"], out["carv_fake/sigma_w2"] = sb2, max(c.sigma_w2, 0.0)
        posterior = c.sigma_b2_posterior()  # what K is chosen from
        if posterior is not None:
            out["carv_fake/sigma_b2_posterior"] = posterior
        v1, vK = sb2 + within_variance(a, b, 1), sb2 + within_variance(a, b, c.K)
        if "fake_inner_flops" in self.costs and v1 > 0:
            c_u, c_i = self._cost_pair("fake_")
            out["carv_fake/k_star"] = float(c.target(N, c_u, c_i))
            out["carv_fake/ecm"] = ecm(v1, c_u + c_i, vK, c_u + c.K * c_i)
            out["carv_fake/ttur_equivalent"] = self.cfg.optim.ttur * vK / v1
            # the compute of one generator update and the fake-score updates around it (per sample)
            g_u, g_i = self._cost_pair()
            fake = self.cfg.optim.ttur * (c_u + c.K * c_i)
            out["carv_fake/compute_share"] = fake / (fake + g_u + self.k_control.K * g_i)
        return out

    def student_step(self) -> int:
        """The student step k this training step trains: uniform over the generator's steps, drawn from (seed,
        step) alone so that every rank trains the same k (DMD2); 0 for a one-step student (nothing drawn)."""
        S = self.generator.steps
        if S == 1:
            return 0
        shared = self._step_generator(rank_specific=False, salt=3, device="cpu")
        return int(torch.randint(0, S, (1,), generator=shared))

    def _renoise_draws(self, N: int, k: int, rng: torch.Generator) -> Tensor | None:
        """Fresh noise for re-noising steps 0 .. k-1's x0 in backward simulation, (N, k, *shape); None for k = 0."""
        if k == 0:
            return None
        return torch.randn((N, k, *self.sample_shape()), generator=rng, device=self.device)

    def _gan_logits(self, x0: Tensor, cond: Condition | None, salt: int) -> Tensor:
        """f(x0): the head on the fake score's bottleneck at x0 noised at t ~ U[0, T) (its own noise, salted)."""
        from distill.gan import logits

        return logits(self.fake_score, self.gan_head, x0, cond, self._step_generator(salt=salt))

    def _discriminator_loss(self, fake: Tensor, cond: Condition | None, N: int) -> dict[str, Tensor]:
        """The discriminator loss on N real samples (drawn from (seed, rank, step)) and the detached fake ones,
        with its accuracies (real called real: f > 0; fake called fake: f < 0)."""
        real, real_cond = self.real_batch(N)
        f_real = self._gan_logits(real, real_cond, salt=5)
        f_fake = self._gan_logits(fake.detach(), cond, salt=6)
        loss = gan_discriminator_loss(f_real, f_fake).mean()
        return {"loss/gan_discriminator": loss, "gan/accuracy_real": (f_real.detach() > 0).float().mean(),
                "gan/accuracy_fake": (f_fake.detach() < 0).float().mean()}

    def real_batch(self, N: int) -> tuple[Tensor, Condition | None]:
        """N real samples and their conditions (labels, or captions through the frozen text encoder), drawn
        uniformly with replacement by a CPU generator of (seed, rank, step): a resumed run reads the same batch."""
        if self.real is None:
            self.real = self.open_real_data()
        batch = self.real.draw(N, self._step_generator(salt=7, device="cpu"))
        x = batch.x.to(self.device, torch.float32)
        if self.text is not None:
            return x, self.text(list(batch.captions)).to(torch.float32)
        if self.teacher.num_classes is not None:
            return x, Condition(labels=batch.labels.to(self.device))
        return x, None

    def open_real_data(self):
        """The GAN's real data (gan.data, or data.path for a pixel teacher), checked against the teacher: what the
        fake score's input holds (latents for a latent teacher) and the condition it needs."""
        from distill.data import RealData
        from distill.errors import ConfigError

        path = self.cfg.gan.data or (self.cfg.data.path if self.codec is None else None)
        if path is None:
            raise ConfigError("gan.data", "latent shards of real images for the GAN term of a latent teacher "
                              "(`distill data latents --teacher PIPELINE --src SHARDS --out DIR`)")
        real = RealData(path, "train")
        if (real.kind == "latents") != (self.codec is not None):
            expected = "latent shards (`distill data latents`)" if self.codec is not None else "image shards"
            raise ConfigError("gan.data", f"{expected} for this teacher's input; {path!r} holds {real.kind}")
        if real.kind == "latents":  # the same shape from another VAE would pass unnoticed: compare the VAEs
            ours, theirs = self.codec.vae.config.scaling_factor, real.meta.get("scaling_factor")
            if theirs is None or abs(float(theirs) - float(ours)) > 1e-12:
                raise ConfigError("gan.data", f"latents encoded by this teacher's VAE (scaling_factor {ours}); "
                                  f"{path!r} was encoded by {real.meta.get('teacher')!r} (scaling_factor {theirs})")
        shape = tuple(self.sample_shape())
        if tuple(real.sample_shape) != shape:
            what = "latents" if self.codec is not None else "images"
            raise ConfigError("gan.data", f"{what} of shape {shape} (the teacher's input); {path!r} holds "
                              f"{real.kind} of shape {tuple(real.sample_shape)}")
        first = real.get([0])  # what every sample of the folder holds beside its image or latent
        if self.text is not None and first.captions is None:
            raise ConfigError("gan.data", f"latent shards with captions for a text-to-image teacher; {path!r} has none "
                              f"(`distill data latents --src` a caption folder written by `distill data captions`)")
        if self.text is None and self.teacher.num_classes is not None and first.labels is None:
            raise ConfigError("gan.data", f"shards with class labels for a class-conditional teacher; {path!r} has "
                              f"none")
        return real

    # ---------------------------------------------------------------------------------------------------------
    # CARV: draws, the batched integrand, bookkeeping.

    def _draw_timesteps(self, N: int, K: int, rng: torch.Generator) -> tuple[Tensor, Tensor]:
        world, rank = (self.trainer.world_size if self._trainer is not None else 1), self.global_rank
        if self.sampler.stratify == "global":  # every rank draws the same global strata and keeps its slice
            shared = self._step_generator(rank_specific=False)
            return self.sampler.sample(N, K, generator=shared, device=self.device, rank=rank, world_size=world)
        return self.sampler.sample(N, K, generator=rng, device=self.device)

    def _integrand(self, x: Tensor, cond: Condition | Tensor | None, t: Tensor, eps: Tensor) -> Tensor:
        """Per-draw DMD integrand g(x_n, t_nk, eps_nk) for all N*K draws in batched calls of at most
        `estimator.chunk_size` draws (never a Python loop over draws). x: (N, ...), t: (N, K), eps: (N*K, ...)."""
        N, K = t.shape
        x_rep = x.repeat_interleave(K, dim=0)  # (N*K, ...): sample n's draws are rows n*K .. n*K+K-1
        cond_rep = as_condition(cond).repeat_interleave(K) if cond is not None else None
        t_flat = t.reshape(-1)
        chunk = self.cfg.estimator.chunk_size or N * K
        out = []
        for s in range(0, N * K, chunk):
            sl = slice(s, s + chunk)
            c = cond_rep[sl] if cond_rep is not None else None
            x_t = self.teacher.schedule.add_noise(x_rep[sl], eps[sl], t_flat[sl])
            mu_real = self.teacher(x_t, t_flat[sl], c, guidance_scale=self.cfg.teacher.guidance_scale)
            mu_fake = self.fake_score(x_t, t_flat[sl], c)  # the fake score is never guided (DMD2)
            out.append(dmd_grad(x_rep[sl], mu_real, mu_fake))
        return torch.cat(out).view(N, K, *x.shape[1:])

    def _bookkeeping(self, t: Tensor, w: Tensor, g: Tensor, N: int, taken: Tensor) -> dict:
        """Proposal statistics from this step's draws (used only for later steps), x-space ANOVA, choice of K.
        `taken` masks the statistics of a skipped update on the device."""
        metrics: dict = {"carv/K": float(t.shape[1])}
        if self.costs:
            metrics["carv/cost_upstream"], metrics["carv/cost_inner"] = self._cost_pair()
        sq_norm = g.pow(2).flatten(2).sum(-1)  # (N, K): ||g||^2 of the unweighted integrand
        self.sampler.record(t, sq_norm, taken)
        if is_distributed():  # every rank folds the same statistics: the same q everywhere
            self.sampler.reduce_pending(torch.distributed.all_reduce)
        self.sampler.update()
        self.g_steps += 1
        if self.g_steps % self.cfg.estimator.auto_every == 0 and is_distributed():
            metrics["carv/ranks_agree"] = self._check_ranks_agree()
        if t.shape[1] >= 2:  # one-way ANOVA over the K draws of each sample (x-space proxy, free)
            sb2, sw2 = anova(w.view(*w.shape, *([1] * (g.dim() - 2))) * g)
            metrics["carv/x_sigma_b2"], metrics["carv/x_sigma_w2"] = sb2, sw2
        e = self.cfg.estimator
        if self.k_control.auto and self.g_steps % e.auto_every == 0 and self.costs:
            c_u, c_i = self._cost_pair()
            self.k_control.choose(N, c_u, c_i)
        if self.fake_k.auto and self.g_steps % e.auto_every == 0 and "fake_inner_flops" in self.costs:
            self.fake_k.choose(N, *self._cost_pair("fake_"))
        return metrics

    def _check_ranks_agree(self) -> float:
        """1.0 when every rank holds the same proposal q and K (they must: the statistics are all-reduced) and
        trains the same student step; a disagreement is a bug that would bias nothing but silently break the
        accounting (or, for the student step, DMD2's one-step-per-iteration rule), so it stops the run."""
        q = self.sampler.q
        mine = torch.tensor([float((q * torch.arange(q.numel(), dtype=q.dtype)).sum()), float(q.square().sum()),
                             float(self.k_control.K), float(self.student_step()), float(self.fake_k.K)],
                            dtype=torch.float64,
                            device=self.device)
        lo, hi = mine.clone(), mine.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        if not torch.allclose(lo, hi, rtol=1e-12, atol=0):
            raise RuntimeError(f"ranks disagree on the CARV proposal or K at step {self.step}: {lo.tolist()} vs "
                               f"{hi.tolist()}")
        return 1.0

    def _cost_pair(self, prefix: str = "") -> tuple[float, float]:
        """(c_u, c_i) of the DMD gradient, or with prefix `fake_` of the fake score's loss."""
        key = "seconds" if self.cfg.estimator.cost == "time" else "flops"
        return self.costs[f"{prefix}upstream_{key}"], self.costs[f"{prefix}inner_{key}"]

    def _diagnostic_due(self) -> bool:
        every = self.cfg.estimator.diagnostic_every
        return bool(every) and self.g_steps % every == 0

    def split_half_estimate(self, x: Tensor, cond: Condition | Tensor | None, sampler: TimestepSampler, Kd: int,
                            rng: torch.Generator) -> tuple[float, float]:
        """Exact parameter-space (σ_b², σ_w²) of the generator's gradient at x = G(z) (with its graph), from Kd
        iid draws of `sampler`'s current q (distill.carv.diagnostics.split_half_estimate; no state changes)."""
        params = self.trained(self.generator)
        return split_half_estimate(x, params, lambda x_, t, eps: self._integrand(x_, cond, t, eps), dmd_loss,
                                   sampler, Kd, rng)

    def strat_K(self) -> int:
        """K_s, the draws per set of the stratified within-sample measurement: half the diagnostic's draws, at least
        4 (at 2 the fit of v(K) = a/K + b/K³ would extrapolate from two strata)."""
        return max(4, self.cfg.estimator.diagnostic_K // 2)

    def _at_other_step(self, z: Tensor, cond: Condition | Tensor | None, N: int, gen: torch.Generator) -> Tensor:
        """x0 of the same z at a student step k' drawn uniformly and independently (backward simulation, with grad):
        the across-step measurement's second half."""
        k = int(torch.randint(0, self.generator.steps, (1,), generator=gen, device=gen.device))
        return self.generator(z, cond, noise=self._renoise_draws(N, k, gen), until=k)

    def _split_half_diagnostic(self, x: Tensor, cond: Condition | Tensor | None,
                               other_step: Callable[[torch.Generator], Tensor] | None = None) -> dict[str, float]:
        """The diagnostic step, on its own noise, folded into the K controller (docs/method.md §5):
        - the split-half (σ_b², σ_w²) from iid draws of the current q;
        - with a stratifying sampler, σ_w,strat²(K_s) of the draws training makes (`stratified_within_estimate`);
        - for a multi-step student (`other_step(gen)`: the same z at an independent student step k'), the split-half
          σ_b² of the batch whose second half sits at k': X = σ_b² + N·V_k/2, V_k = tr Var_k(E[Ĝ | k]), the spread
          of the mean gradient over the student steps. Every sample of a training step shares its k, so that spread
          does not fall with N: it enters Var·Cost as N_global·V_k = 2·world·(X − σ_b²), beside σ_b²."""
        rng = self._step_generator(salt=1)
        e = self.cfg.estimator
        sigma_b2, sigma_w2 = self.split_half_estimate(x, cond, self.sampler, e.diagnostic_K, rng)
        strat = steps = math.nan
        if self.sampler.stratify != "none":
            params = self.trained(self.generator)
            strat = stratified_within_estimate(x, params, lambda x_, t, eps: self._integrand(x_, cond, t, eps),
                                               dmd_loss, self.sampler, self.strat_K(), rng)
        if other_step is not None and self.generator.steps > 1:
            half = x.shape[0] // 2
            x_mix = torch.cat([x[:half], other_step(rng)[half:]])
            steps = self.split_half_estimate(x_mix, cond, self.sampler, e.diagnostic_K, rng)[0]
        world = self.trainer.world_size if self._trainer is not None else 1
        sigma_b2, sigma_w2, strat, steps = all_mean([sigma_b2, sigma_w2, strat, steps])  # every rank: the same K
        steps = 2 * world * (steps - sigma_b2)
        self.k_control.observe(sigma_b2, sigma_w2, strat, steps)
        # raw: this diagnostic's unbiased estimates (differences, which can go negative from noise);
        # sigma_*: the EMA-smoothed figures K auto works from, clamped at 0
        out = {"carv/sigma_b2_raw": sigma_b2, "carv/sigma_w2_raw": sigma_w2}
        if math.isfinite(strat):
            out["carv/sigma_w2_strat_raw"] = strat
        if math.isfinite(steps):
            out["carv/sigma_b2_steps_raw"] = steps
        c = self.k_control
        if c.sigma_b2 is not None:
            sb2, sw2 = max(c.sigma_b2, 0.0), max(c.sigma_w2, 0.0)
            out["carv/sigma_b2"], out["carv/sigma_w2"] = sb2, sw2
            if c.sigma_w2_strat is not None:
                out["carv/sigma_w2_strat"] = max(c.sigma_w2_strat, 0.0)
            if c.sigma_b2_steps is not None:
                out["carv/sigma_b2_steps"] = max(c.sigma_b2_steps, 0.0)
            posterior = c.sigma_b2_posterior()  # what K auto chooses from
            if posterior is not None:
                out["carv/sigma_b2_posterior"] = posterior
            # no variance at all (a fake score that is still the teacher's exact copy, as at step 0 for a diffusers
            # teacher without guidance, gives g = 0): K* and the ECM are undefined, not figures to log
            if self.costs and sb2 + sw2 > 0:
                c_u, c_i = self._cost_pair()
                K = c.K
                sb_all, a, b = c.model()
                out["carv/k_star"] = float(c.target(x.shape[0], c_u, c_i)) if c.auto else min(
                    max(k_star(sb_all, sw2, c_u, c_i), 1.0), float(c.k_max))
                # the current K against K = 1 (same proposal), per unit of compute (docs/method.md §5, ECM)
                out["carv/ecm"] = ecm(sb_all + sw2, c_u + c_i, sb_all + within_variance(a, b, K), c_u + K * c_i)
                out["carv/ecm_oracle"] = ecm_oracle(sb2, sw2, c_u, c_i)
        return out

    @torch.no_grad()
    def measure_costs(self, N: int, cond: Condition | Tensor | None = None) -> dict[str, float]:
        """c_u (per sample: generator forward + backward, with a multi-step student's backward simulation averaged
        over the step it trains, and the GAN term's pass through the fake score when on) and c_i (teacher, with
        guidance if any, + fake score, per draw), as FLOPs and as wall time (distill.carv.diagnostics.measure_costs)."""
        z, noise, S = self._cost_inputs(N)
        t = torch.full((N,), (self.sampler.lo + self.sampler.hi) // 2, device=self.device, dtype=torch.long)

        def upstream():
            # every student step k once (the training steps draw k uniformly): k no-grad steps of backward
            # simulation, then step k with grad and its backward (through the GAN head too when it is on)
            params = self.trained(self.generator)
            for k in range(S):
                x_in = self.generator.input_of_step(z, k, cond, noise)
                with torch.enable_grad():
                    out = self.generator.step(x_in, k, cond)
                    loss = out.float().pow(2).sum()
                    if self.gan_head is not None:
                        loss = loss + self._gan_logits(out, cond, salt=4).sum()
                    torch.autograd.grad(loss, params, allow_unused=True)

        def inner():
            self.teacher(z, t, cond, guidance_scale=self.cfg.teacher.guidance_scale)
            self.fake_score(z, t, cond)

        return measure_costs(upstream, inner, N * S, N, self.device)  # c_u: per sample, averaged over k

    def _cost_inputs(self, N: int) -> tuple[Tensor, Tensor | None, int]:
        """Zero inputs of the step's shape for the cost measurements: z, the re-noising draws of a multi-step
        student (None for one step) and its step count S."""
        z = torch.zeros((N, *self.sample_shape()), device=self.device)
        S = self.generator.steps
        return z, torch.zeros((N, S - 1, *z.shape[1:]), device=self.device) if S > 1 else None, S

    @torch.no_grad()
    def measure_fake_costs(self, N: int, cond: Condition | Tensor | None = None) -> dict[str, float]:
        """The fake score's loss: c_u (per sample: the generator's no-grad forwards that make x0, averaged over the
        student step) and c_i (per draw: a fake-score forward and backward of the denoising loss), keys fake_*."""
        z, noise, S = self._cost_inputs(N)
        t = torch.full((N,), self.teacher.T // 2, device=self.device, dtype=torch.long)
        params = self.trained(self.fake_score)

        def upstream():
            for k in range(S):
                self.generator.step(self.generator.input_of_step(z, k, cond, noise), k, cond)

        def inner():
            with torch.enable_grad():
                loss = denoising_loss(self.fake_score(z, t, cond), z, self.fake_score.loss_weight(t, z)).sum()
                torch.autograd.grad(loss, params, allow_unused=True)

        costs = measure_costs(upstream, inner, N * S, N, self.device)
        return {f"fake_{k}": v for k, v in costs.items()}

    def sample_shape(self) -> tuple[int, ...]:
        if isinstance(self.teacher, GaussianMixtureDenoiser):
            return (self.teacher.mixture.dim,)
        from distill.teachers import sample_shape_of

        return tuple(sample_shape_of(self.teacher))

    def on_fit_start(self) -> None:
        N = max(1, self.cfg.data.batch_size // max(1, self.trainer.world_size))
        costs = {} if self.costs else self.measure_costs(N, self.cost_condition(N))
        if self.fake_k.auto and "fake_inner_flops" not in self.costs:  # (a run resumed with fake_score.K auto)
            costs.update(self.measure_fake_costs(N, self.cost_condition(N)))
        if costs:
            self.costs.update(zip(costs, all_mean(list(costs.values()))))  # wall times differ across ranks

    def cost_condition(self, N: int) -> Condition | None:
        """A condition of the step's shape for measuring costs (class 0, or the first prompt N times)."""
        if self.text is not None:
            return self.text([self.prompts[0]] * N).to(torch.float32)
        if self.teacher.num_classes is not None:
            return Condition(labels=torch.zeros(N, dtype=torch.long, device=self.device))
        return None

    def _step_generator(self, rank_specific: bool = True, salt: int = 0, device=None) -> torch.Generator:
        """The step's noise comes from (seed, rank, step) alone: ranks draw different noise, and a resumed run
        draws exactly what the uninterrupted run would have, with no RNG state to carry."""
        rank = self.global_rank if rank_specific else 2**31 - 1
        entropy = [self.cfg.trainer.seed, rank, self.step] + ([salt] if salt else [])
        seed = np.random.SeedSequence(entropy).generate_state(1)[0]
        return torch.Generator(device=self.device if device is None else device).manual_seed(int(seed))

    def _ema_update(self, taken: Tensor) -> None:
        ema_update(self.ema, self.generator, self.cfg.generator.ema_decay, self.step // self.cfg.optim.ttur, taken)

    # ---------------------------------------------------------------------------------------------------------
    # Logging: running means over the window, written to every logger with step = training step.

    def accumulate(self, metrics: dict) -> None:
        """Metrics of one step, kept as they come (device tensors stay on the device until `flush_metrics`)."""
        for k, v in metrics.items():
            self._acc.setdefault(k, []).append(v.detach() if torch.is_tensor(v) else float(v))

    def on_train_batch_start(self, batch, batch_idx) -> int | None:
        return -1 if self.step >= self.max_steps else None  # -1 ends the (endless) epoch, and with it the fit

    def flush_metrics(self) -> None:
        """Write the running means of the window to every logger at the current step."""
        # running means over the window; counters and evaluations report their latest value
        means = {k: float(v[-1] if k.startswith(("health/", "fid/", "prompt/", "time/elapsed")) else
                          (torch.stack([torch.as_tensor(x, dtype=torch.float64, device=self.device) for x in v]).mean()
                           if any(torch.is_tensor(x) for x in v) else sum(v) / len(v)))
                 for k, v in self._acc.items() if v}
        self._acc.clear()
        if not means:
            return
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "skipped_samples"):
            means["health/skipped_samples"] = float(dm.skipped_samples)
        if "time/step_seconds" in means:
            means["time/samples_per_second"] = self.cfg.data.batch_size / means["time/step_seconds"]
        means["train/step"] = self.step
        for logger in self.loggers:
            logger.log_metrics(means, step=self.step)
        self.progress_postfix = {k.split("/")[-1]: v for k, v in means.items() if k.startswith("loss/")}

    def flush_due(self) -> bool:
        return self.step % self.cfg.trainer.log_every_steps == 0 or self.step >= self.max_steps

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # distill.train's Trainer flushes earlier (FlushMetrics, before the step's checkpoint is written); this
        # covers a Trainer built without it, and is a no-op after it
        if self.flush_due():
            self.flush_metrics()
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
                return scatter_image(self.ema(z, generator=gen), ref, title=f"EMA generator, step {self.step}")
            cols = self.cfg.logging.samples_per_class
            from distill.teachers import sample_shape_of

            shape = sample_shape_of(self.teacher)
            cond, row_labels = self.grid_conditions(cols)
            rows = len(cond) // cols if cond is not None else cols
            z = torch.randn(rows * cols, *shape, generator=gen).to(self.device)
            x = self.ema(z, cond, generator=gen)  # a multi-step student's re-noising draws: from `gen` too
            return grid_image(self.decode(x), nrow=cols, row_labels=row_labels)
        finally:
            self.ema.train(was_training)

    def grid_conditions(self, cols: int) -> tuple[Condition | None, list[str] | None]:
        """The sample grid's rows: one per class, or one per prompt (up to 10 spread over the prompt set, written
        beside their rows), each repeated `cols` times; None for an unconditional teacher."""
        if self.text is not None:
            prompts = list(self.cfg.logging.sample_prompts)
            if not prompts:
                picks = np.linspace(0, len(self.prompts) - 1, min(10, len(self.prompts))).round().astype(int)
                prompts = [self.prompts[i] for i in np.unique(picks)]
            cond = self.text([p for p in prompts for _ in range(cols)]).to(torch.float32)
            return cond, prompts
        if self.teacher.num_classes is not None:
            labels = torch.arange(self.teacher.num_classes).repeat_interleave(cols).to(self.device)
            return Condition(labels=labels), None
        return None, None

    def protocol_condition(self, indices: Tensor) -> Condition | None:
        """The evaluation protocol's condition of samples `indices`: balanced labels (index mod the classes), or the
        prompts in turn (index mod the prompt set), so that any split of the samples across ranks gives the same set."""
        if self.text is not None:
            return self.text([self.prompts[i % len(self.prompts)] for i in indices.tolist()]).to(torch.float32)
        if self.teacher.num_classes is not None:
            return Condition(labels=(indices % self.teacher.num_classes).to(self.device))
        return None

    def decode(self, x: Tensor) -> Tensor:
        """Samples as images in [-1, 1]: latents through the frozen VAE, pixels as they are."""
        return self.codec.decode(x) if self.codec is not None else x

    def eval_images(self, x: Tensor) -> Tensor:
        """What evaluation reads: decoded samples, brought to eval.image_size by area averaging when it is set."""
        images = self.decode(x)
        size = self.cfg.eval.image_size
        if size is not None and tuple(images.shape[-2:]) != (size, size):
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="area")
        return images

    def eval_shape(self) -> tuple[int, ...]:
        """The shape of one evaluated image (C, H, W), or of one sample of low-dimensional data."""
        shape = tuple(self.sample_shape())
        if len(shape) != 3:
            return shape
        C, H, W = shape
        if self.codec is not None:  # the VAE's images: its output channels, its scale factor
            f = self.codec.scale_factor
            C, H, W = self.codec.vae.config.out_channels, H * f, W * f
        size = self.cfg.eval.image_size
        return (C, H, W) if size is None else (C, size, size)

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints: G, EMA, fake score (not the frozen teacher), optimisers (Lightning) and the step. No RNG state:
    # every step's noise is a function of (seed, rank, step).

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not self.reloaded(k)}
        from distill.config import to_yaml

        checkpoint["distill"] = {"step": self.step, "config": to_yaml(self.cfg), "g_steps": self.g_steps,
                                 "sampler": self.sampler.state_dict(),
                                 **({"fake_sampler": self.fake_sampler.state_dict()} if self.fake_sampler else {}),
                                 "k_control": self.k_control.state_dict(), "fake_k": self.fake_k.state_dict(),
                                 "costs": dict(self.costs),
                                 # [total skipped, in a row now, step of the last one]
                                 "nonfinite": [0, 0, 0] if self.health is None else [int(v) for v in
                                                                                     self.health[[0, 1, 3]].tolist()]}

    def reloaded(self, key: str) -> bool:
        """Whether a state-dict entry comes from the teacher's folder rather than the checkpoint: the frozen teacher,
        text encoders and VAE, and the base weights of a LoRA network (frozen copies of the teacher's; only its
        adapters, keys with `lora_`, are saved)."""
        if key.startswith(FROZEN_PREFIXES):
            return True
        lora = (("generator.", "ema.") if self.cfg.generator.lora_rank else ()) + \
               (("fake_score.",) if self.cfg.fake_score.lora_rank else ())
        return bool(lora) and key.startswith(lora) and "lora_" not in key

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen parts are reloaded from the teacher's folder; put them back so strict loading sees every key.
        for k, v in self.state_dict().items():
            if self.reloaded(k):
                checkpoint["state_dict"].setdefault(k, v)
        state = checkpoint["distill"]
        self.step = int(state["step"])
        if "sampler" in state:
            self.g_steps = int(state["g_steps"])
            self.sampler.load_state_dict(state["sampler"])
            if self.fake_sampler is not None and "fake_sampler" in state:
                self.fake_sampler.load_state_dict(state["fake_sampler"])
            self.k_control.load_state_dict(state["k_control"])
            if self.fake_k.auto and "fake_k" in state:  # (a fixed fake_score.K is the config's)
                self.fake_k.load_state_dict(state["fake_k"])
            self.costs = dict(state["costs"])
            total, in_a_row, *last = state.get("nonfinite", [0, 0])  # older checkpoints kept no last step
            self.health = torch.tensor([total, in_a_row, in_a_row, last[0] if last else 0], dtype=torch.float64,
                                       device=self.device)
            if not self.k_control.auto:  # the config is the truth: an allowed change of estimator.K applies
                self.k_control.K = int(self.cfg.estimator.K)
        if self.step >= self.max_steps:
            self.max_steps = self.step  # nothing left to do; the fit loop stops after setup
