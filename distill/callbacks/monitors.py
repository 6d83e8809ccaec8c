"""Callbacks that observe training: progress, sample grids, proposal plots, FID, gradient variance, step time.
They never change the training trajectory (their own random numbers, no optimiser state, no .grad). The modules
they observe expose `step` (completed training steps), `max_steps` and `sample_image()`."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from distill.plots import save_atomic

class StepProgressBar(L.Callback):
    """One tqdm bar over training steps (not epochs), with the latest losses."""

    def __init__(self, desc: str = "fit"):
        self.desc = desc
        self.bar = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=pl_module.max_steps, initial=pl_module.step, desc=self.desc, unit="step",
                            dynamic_ncols=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.bar is not None:
            self.bar.update(pl_module.step - self.bar.n)
            post = getattr(pl_module, "progress_postfix", None)
            if post:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in post.items()}, refresh=False)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _publish(trainer, image, path: Path, key: str, step: int) -> None:
    """An image to the run directory (atomically) and to every logger that takes images (W&B)."""
    save_atomic(image, path)
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[image], step=step)


class SampleGrid(L.Callback):
    """Write `pl_module.sample_image()` to samples/step_XXXXXXX.png (and W&B) at the start, every `every` steps
    and at the end."""

    def __init__(self, samples_dir: str | Path, every: int, key: str = "samples/ema"):
        self.samples_dir = Path(samples_dir)
        self.every = every
        self.key = key
        self._last = -1

    def _write(self, trainer, pl_module) -> None:
        step = pl_module.step
        if step == self._last:
            return
        image = pl_module.sample_image()  # every rank runs it (cheap); rank 0 writes
        self._last = step
        if not trainer.is_global_zero:
            return
        _publish(trainer, image, self.samples_dir / f"step_{step:07d}.png", self.key, step)

    def on_train_start(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and pl_module.step % self.every == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


class ProposalPlot(L.Callback):
    """plots/proposal_step_XXXXXXX.png (and W&B `carv/proposal`): q(t) over p(t) and the per-bin second moment of
    the DMD integrand that the adaptive proposal learns from. Every `every` steps and at the end."""

    def __init__(self, plots_dir: str | Path, every: int):
        self.plots_dir = Path(plots_dir)
        self.every = every
        self._last = -1

    def _write(self, trainer, pl_module) -> None:
        step = pl_module.step
        if step == self._last or not trainer.is_global_zero:
            return
        from distill.plots import proposal_image

        s = pl_module.sampler
        image = proposal_image(s.p, s.q, s.m2, s.seen, s.lo, s.hi,
                               title=f"timestep proposal ({s.kind}, {s.stratify}), step {step}")
        self._last = step
        _publish(trainer, image, self.plots_dir / f"proposal_step_{step:07d}.png", "carv/proposal", step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and pl_module.step % self.every == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


class GradientVariance(L.Callback):
    """variance/*: the parameter-space trace variance of the configured estimator and of the DMD2 baseline at equal
    compute, from split-half estimates on the callback's own noise (docs/method.md §5):

        Var_method   = σ_b²/N + σ_w²(q)/(N K)                   (iid draws from the current proposal q)
        Var_baseline = (σ_b² + σ_w²(p)) / N',  N' = N (c_u + K c_i) / (c_u + c_i)   (K = 1, q = p, same compute)

    and their ratio, which is the ECM against the baseline. Stratification lowers Var_method further than this
    iid figure shows (`distill bench variance` measures it directly). Observes only: no .grad, no state changes,
    its own random numbers."""

    def __init__(self, every: int, draws: int = 4):
        self.every = every
        self.draws = draws

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every or pl_module.step % self.every or not pl_module.costs:
            return
        import numpy as np

        from distill.carv import TimestepSampler

        m = pl_module
        N = m.batch_per_device - m.batch_per_device % 2
        seed = np.random.SeedSequence([m.cfg.trainer.seed, m.global_rank, m.step, 2]).generate_state(1)[0]
        rng = torch.Generator(device=m.device).manual_seed(int(seed))
        z = torch.randn((N, *m.sample_shape()), generator=rng, device=m.device)
        cond = m.sample_condition(N, rng, host_rng=torch.Generator().manual_seed(int(seed)))
        with torch.enable_grad():
            x = m.generator(z, cond)
            sb, sw_q = m.split_half_estimate(x, cond, m.sampler, self.draws, rng)
            if m.sampler.kind == "uniform":  # q = p: the same estimate serves both (no extra noise in the ratio)
                sb_p, sw_p = sb, sw_q
            else:
                sb_p, sw_p = m.split_half_estimate(x, cond, TimestepSampler(m.sampler.p), self.draws, rng)
        K = m.k_control.K
        c_u, c_i = m._cost_pair()
        var_method = max(sb, 0.0) / N + max(sw_q, 0.0) / (N * K)
        n_equal = N * (c_u + K * c_i) / (c_u + c_i)
        var_base = (max(sb_p, 0.0) + max(sw_p, 0.0)) / n_equal
        m.accumulate({"variance/estimator": var_method, "variance/baseline_equal_compute": var_base,
                      "variance/ratio": var_base / var_method if var_method > 0 else float("nan"),
                      "variance/sigma_b2": sb, "variance/sigma_w2_proposal": sw_q, "variance/sigma_w2_uniform": sw_p})


class FIDMonitor(L.Callback):
    """fid/ema and fid/raw_generator every `every` steps and at the end: each rank generates its share of the
    samples on the protocol of `distill fid` (noise seeded by sample index with its default seed
    distill.evaluate.PROTOCOL_SEED, not trainer.seed; balanced labels), torchmetrics accumulates the fake features
    and syncs them across ranks; the real side is the reference statistics (from `eval.fid_ref`, or computed once
    at start from the training shards or the mixture). Keeps checkpoints/best.ckpt at the best fid/ema."""

    def __init__(self, cfg, ckpt_dir: str | Path, pl_module):
        """Builds the extractor and the reference statistics now, so that a mismatch (an extractor that does not
        fit the samples, statistics made with other features) stops the command before the run writes anything."""
        import math

        from distill import metrics as M

        self.cfg = cfg
        self.every = cfg.eval.fid_every_steps
        self.ckpt_dir = Path(ckpt_dir)
        self.best = float("inf")
        self.metrics = None
        self._last = -1
        e = cfg.eval
        shape = tuple(pl_module.eval_shape())  # decoded (and resized) images for a latent teacher
        self.extractor = M.extractor_for(e.features, e.features_path, e.inception_weights,
                                         num_features=math.prod(shape)).eval()
        self.extractor.check_input(shape)
        # prompt accuracy: the digits classifier against the digit each evaluation prompt names
        self.prompts = list(pl_module.prompts) if e.prompt_accuracy else None
        if self.prompts is not None:
            if not self.prompts:
                from distill.errors import ConfigError

                raise ConfigError("eval.prompt_accuracy", "true only for a text-to-image teacher (it reads the "
                                  "prompts' digits); this teacher takes no prompts")
            M.prompt_digits(self.prompts)  # every prompt names a digit, or stop now
        if e.fid_ref is None and pl_module.text is not None:
            from distill.errors import ConfigError

            raise ConfigError("eval.fid_ref", "reference statistics (`distill stats`) for a text-to-image teacher: "
                              "data.path holds prompts, not images; or eval.fid_every_steps=0")
        if e.fid_ref is not None:
            self.ref = M.load_stats(e.fid_ref, expected_extractor_id=self.extractor.extractor_id,
                                    num_features=self.extractor.num_features)
        elif cfg.teacher.kind == "gmm":
            x, _ = pl_module.teacher.mixture.sample(10_000, generator=torch.Generator().manual_seed(0))
            self.ref = M.compute_stats(self.extractor, [x])
        else:
            from distill.data import iterate_split

            self.ref = M.compute_stats(self.extractor, iterate_split(cfg.data.path, "train", batch_size=256,
                                                                     every_rank=True))
        self.ref_n = int(self.ref["n"])
        self.extractor_id = self.extractor.extractor_id

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state.get("best", float("inf")))

    def setup(self, trainer, pl_module, stage: str) -> None:
        from distill import metrics as M

        extractor = self.extractor.to(pl_module.device)
        self.metrics = {name: self._metric(M.make_fid_metric(extractor), self.ref, trainer.global_rank,
                                           pl_module.device) for name in ("ema", "raw_generator")}

    @staticmethod
    def _metric(metric, ref: dict, rank: int, device):
        """Real-side states from (mu, sigma, n) on rank 0 only (the states are summed across ranks)."""
        metric = metric.to(device)
        n = max(int(ref["n"]), 2)
        mu = torch.as_tensor(ref["mu"], dtype=torch.float64, device=device)
        sigma = torch.as_tensor(ref["sigma"], dtype=torch.float64, device=device)
        if rank == 0:
            metric.real_features_sum = mu * n
            metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
            metric.real_features_num_samples = torch.tensor(n, device=device)
        return metric

    @torch.no_grad()
    def _evaluate(self, trainer, pl_module) -> None:
        from distill.evaluate import PROTOCOL_SEED, generator_batches

        step = pl_module.step
        if step == self._last or self.metrics is None:
            return
        self._last = step
        e = self.cfg.eval
        world, rank = trainer.world_size, trainer.global_rank
        share = [e.fid_num_samples // world + (r < e.fid_num_samples % world) for r in range(world)]
        start = sum(share[:rank])
        shape = pl_module.sample_shape()
        out = {}
        for name, model in (("ema", pl_module.ema), ("raw_generator", pl_module.generator)):
            metric = self.metrics[name]
            metric.reset()  # keeps the real side (reset_real_features=False)
            batches = generator_batches(model, shape, pl_module.protocol_condition, share[rank], e.fid_batch_size,
                                        PROTOCOL_SEED, pl_module.device, start=start, decode=pl_module.eval_images)
            if self.prompts is not None:
                from distill.metrics import PromptAccuracy

                counter = PromptAccuracy(self.extractor.classifier, self.prompts, start)
                batches = counter.observe(batches)
            for batch in batches:
                metric.update(batch, real=False)
            out[f"fid/{name}"] = float(metric.compute())
            if self.prompts is not None:
                counts = torch.tensor([counter.correct, counter.n], dtype=torch.float64, device=pl_module.device)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(counts)
                out[f"prompt/accuracy_{name}"] = float(counts[0] / counts[1])
        out["fid/num_samples"] = float(e.fid_num_samples)
        pl_module.accumulate(out)
        if out["fid/ema"] < self.best:
            self.best = out["fid/ema"]
            trainer.save_checkpoint(self.ckpt_dir / "best.ckpt", weights_only=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and pl_module.step % self.every == 0:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every and pl_module.step >= pl_module.max_steps:  # not when stopping early for a requeue
            self._evaluate(trainer, pl_module)
            if self._last == pl_module.step:  # logged after the last regular log: write it now
                pl_module.flush_metrics()


class StepTimer(L.Callback):
    """time/step_seconds and time/samples_per_second, averaged over the logging window, and time/elapsed_seconds:
    the wall time of training since step 0, from the start of this process's first step to the end of the logged
    one, everything between steps included (data, callbacks, logging, checkpoints) and start-up excluded, carried
    across resumes in the checkpoint. Time-to-quality curves and benchmarks/overhead.py read it."""

    def __init__(self):
        self._t0 = None
        self._last = None  # perf_counter at the end of the previous step (or the start of the first)
        self.elapsed = 0.0

    def state_dict(self) -> dict:
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self.elapsed = float(state.get("elapsed", 0.0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()
        if self._last is None:
            self._last = self._t0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None and hasattr(pl_module, "accumulate"):
            now = time.perf_counter()
            self.elapsed += now - self._last
            self._last = now
            pl_module.accumulate({"time/step_seconds": now - self._t0, "time/elapsed_seconds": self.elapsed})


class FlushMetrics(L.Callback):
    """Writes the step's metrics row before the step's checkpoint (the callback after this one), so that a kill
    between the two cannot leave a checkpoint whose metrics row was never written: a resume starts after that step
    and would never write it."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if hasattr(pl_module, "flush_due") and pl_module.flush_due():
            pl_module.flush_metrics()
