"""Lightning callbacks and loggers. Callbacks observe: they never change the training trajectory
(sampling uses its own torch.Generator and the EMA weights under no_grad).

The modules they observe expose `step` (completed training steps), `max_steps` and `sample_image()`.
"""

from __future__ import annotations

import csv
import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from distill.plots import save_atomic

CKPT_PREFIX = "step="


# --------------------------------------------------------------------------------------------------------------
# Checkpoints.


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, fsync, then rename: a kill mid-write leaves the previous
    checkpoint intact and never a partial file under a checkpoint's name."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        import errno

        from distill.errors import DistillError

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DistillError(f"disk full while writing checkpoint {str(path)!r}; the previous checkpoints are "
                                   f"intact: free space (or set run.dir elsewhere) and run the same command to "
                                   f"resume") from None
            raise DistillError(f"cannot write checkpoint {str(path)!r} ({e.strerror}); expected a writable run "
                               f"directory") from None


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"{CKPT_PREFIX}{step:07d}.ckpt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files of an interrupted write are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob(f"{CKPT_PREFIX}*.ckpt") if p.is_file())


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run directory, or None."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


class StepCheckpoint(L.Callback):
    """Checkpoint every `every` steps and at the end; keep the newest `keep`; point `last.ckpt` at the newest."""

    def __init__(self, ckpt_dir: str | Path, every: int, keep: int):
        self.ckpt_dir = Path(ckpt_dir)
        self.every = every
        self.keep = keep
        self._last_saved = -1

    def _save(self, trainer: L.Trainer, step: int) -> None:
        if step == self._last_saved:
            return
        path = checkpoint_path(self.ckpt_dir, step)
        trainer.save_checkpoint(path, weights_only=False)
        self._last_saved = step
        if trainer.is_global_zero:
            link = self.ckpt_dir / "last.ckpt"
            tmp = self.ckpt_dir / ".last.ckpt.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(path.name, tmp)
            os.replace(tmp, link)
            for old in list_checkpoints(self.ckpt_dir)[: -self.keep]:
                old.unlink()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.step % self.every == 0 or pl_module.step >= pl_module.max_steps:
            self._save(trainer, pl_module.step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module.step)


class RequeueOnSignal(L.Callback):
    """SLURM preemption: on SIGUSR1 (`#SBATCH --signal=SIGUSR1@90`, or `scancel --signal=USR1 JOB`) every rank
    finishes its current step, that step's checkpoint is written to checkpoints/ (where `distill fit` resumes from),
    training stops, and global rank 0 requeues the job; the requeued job resumes with the same step count.

    It replaces Lightning's auto-requeue (the Trainer gets SLURMEnvironment(auto_requeue=False)), whose handler
    saves hpc_ckpt_N.ckpt from inside the signal handler, in the middle of a step, to a file our resume does not
    read, and calls a barrier there that deadlocks DDP when the ranks sit in different collectives."""

    def __init__(self, checkpoint: StepCheckpoint, signum: int = signal.SIGUSR1):
        self.checkpoint = checkpoint
        self.signum = signum
        self.received = False  # this rank got the signal
        self.requested = False  # all ranks stopped for a requeue
        # installed now rather than in setup: during the DDP start-up SIGUSR1's default action would kill us
        self._previous = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True  # only a flag: a collective or a save inside a handler can deadlock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the ranks get the signal at different moments: agree on the step to stop at (one all-reduce per step)
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        if pl_module.step >= pl_module.max_steps:
            return  # finished anyway: nothing to requeue for
        self.checkpoint._save(trainer, pl_module.step)
        self.requested = True
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        signal.signal(self.signum, self._previous)
        if not (self.requested and trainer.is_global_zero):
            return
        from lightning.pytorch.loggers import WandbLogger

        from distill.slurm import requeue_job

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # before SLURM ends this process; the requeued job resumes the run
        print(f"\nSIGUSR1: stopped at step {pl_module.step}, checkpoint written; requeueing the job", flush=True)
        requeue_job()


# --------------------------------------------------------------------------------------------------------------
# Progress and samples.


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
        save_atomic(image, self.samples_dir / f"step_{step:07d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=self.key, images=[image], step=step)

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
        save_atomic(image, self.plots_dir / f"proposal_step_{step:07d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="carv/proposal", images=[image], step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and pl_module.step % self.every == 0:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module)


class GradientVariance(L.Callback):
    """variance/*: the parameter-space trace variance of the configured estimator and of the DMD2 baseline at equal
    compute, from split-half estimates on the callback's own noise (DESIGN §1):

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
        x_real, _ = batch
        N = x_real.shape[0] - x_real.shape[0] % 2
        seed = np.random.SeedSequence([m.cfg.trainer.seed, m.global_rank, m.step, 2]).generate_state(1)[0]
        rng = torch.Generator(device=m.device).manual_seed(int(seed))
        z = torch.randn((N, *x_real.shape[1:]), generator=rng, device=m.device)
        labels = (torch.randint(0, m.teacher.num_classes, (N,), generator=rng, device=m.device)
                  if m.conditional else None)
        with torch.enable_grad():
            x = m.generator(z, labels)
            sb, sw_q = m.split_half_estimate(x, labels, m.sampler, self.draws, rng)
            if m.sampler.kind == "uniform":  # q = p: the same estimate serves both (no extra noise in the ratio)
                sb_p, sw_p = sb, sw_q
            else:
                sb_p, sw_p = m.split_half_estimate(x, labels, TimestepSampler(m.sampler.p), self.draws, rng)
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
    samples (noise seeded by sample index, balanced labels), torchmetrics accumulates the fake features and syncs
    them across ranks; the real side is the reference statistics (from `eval.fid_ref`, or computed once at start
    from the training shards or the mixture). Keeps checkpoints/best.ckpt at the best fid/ema."""

    def __init__(self, cfg, ckpt_dir: str | Path):
        self.cfg = cfg
        self.every = cfg.eval.fid_every_steps
        self.ckpt_dir = Path(ckpt_dir)
        self.best = float("inf")
        self.metrics = None
        self._last = -1

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state.get("best", float("inf")))

    def setup(self, trainer, pl_module, stage: str) -> None:
        import math

        from distill import metrics as M

        e = self.cfg.eval
        shape = pl_module.sample_shape()
        if e.features == "raw":
            extractor = M.build_extractor("raw", num_features=int(math.prod(shape)))
        else:
            extractor = M.build_extractor(e.features, e.inception_weights if e.features == "inception"
                                          else e.features_path)
        extractor = extractor.to(pl_module.device).eval()
        if e.fid_ref is not None:
            ref = M.load_stats(e.fid_ref, expected_extractor_id=extractor.extractor_id)
        elif self.cfg.teacher.kind == "gmm":
            x, _ = pl_module.teacher.mixture.sample(10_000, generator=torch.Generator().manual_seed(0))
            ref = M.compute_stats(extractor, [x.to(pl_module.device)])
        else:
            from distill.data import iterate_split

            ref = M.compute_stats(extractor, iterate_split(self.cfg.data.path, "train", batch_size=256, every_rank=True))
        self.ref_n = int(ref["n"])
        self.metrics = {name: self._metric(M.make_fid_metric(extractor), ref, trainer.global_rank, pl_module.device)
                        for name in ("ema", "raw_generator")}
        self.extractor_id = extractor.extractor_id

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
        from distill.evaluate import generator_batches

        step = pl_module.step
        if step == self._last or self.metrics is None:
            return
        self._last = step
        e = self.cfg.eval
        world, rank = trainer.world_size, trainer.global_rank
        share = [e.fid_num_samples // world + (r < e.fid_num_samples % world) for r in range(world)]
        start = sum(share[:rank])
        shape = pl_module.sample_shape()
        num_classes = getattr(pl_module.teacher, "num_classes", None)
        out = {}
        for name, model in (("ema", pl_module.ema), ("raw_generator", pl_module.generator)):
            metric = self.metrics[name]
            metric.reset()  # keeps the real side (reset_real_features=False)
            for batch in generator_batches(model, shape, num_classes, share[rank], e.fid_batch_size,
                                           self.cfg.trainer.seed, pl_module.device, start=start):
                metric.update(batch, real=False)
            out[f"fid/{name}"] = float(metric.compute())
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
    """time/step_seconds and time/samples_per_second, averaged over the logging window."""

    def __init__(self):
        self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None and hasattr(pl_module, "accumulate"):
            dt = time.perf_counter() - self._t0
            pl_module.accumulate({"time/step_seconds": dt})


# --------------------------------------------------------------------------------------------------------------
# CSV logger that survives resume.


class CSVLogger(Logger):
    """Scalars to `metrics.csv`, one row per logged step. Unlike Lightning's CSVLogger it never deletes an
    existing file: a resumed run appends, after dropping rows past the checkpoint it resumed from
    (`truncate_after`), so the step column has no step lost or repeated."""

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)
        self._keys: list[str] = ["step"]
        self._last_step: int | None = None  # the step of the file's last row, to merge a second call into it
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                header = next(csv.reader(fh), None)
            if header:
                self._keys = header
            rows = self._rows()
            if rows and rows[-1].get("step") not in (None, ""):
                self._last_step = int(rows[-1]["step"])

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def _rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def _rewrite(self, rows: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self._keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Append a row; a second call for the same step as the last row merges into it (one row per step)."""
        row = {"step": step, **{k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self._keys]
        rows = None
        if step is not None and step == self._last_step and self.path.is_file():
            rows = self._rows()
            if rows and rows[-1].get("step") not in (None, "") and int(rows[-1]["step"]) == step:
                merged = {k: v for k, v in rows[-1].items() if v not in (None, "")}
                merged.update(row)
                self._keys = ["step"] + sorted(set(self._keys[1:]) | set(new))
                self._rewrite(rows[:-1] + [merged])
                return
        self._last_step = step
        if new or not self.path.is_file():
            self._keys = ["step"] + sorted(set(self._keys[1:]) | set(new))
            self._rewrite((rows if rows is not None else self._rows()) + [row])
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self._keys).writerow(row)

    @rank_zero_only
    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (they belong to steps that will run again)."""
        rows = self._rows()
        kept = [r for r in rows if r.get("step") not in (None, "") and int(r["step"]) <= step]
        if len(kept) != len(rows):
            self._rewrite(kept)
        self._last_step = int(kept[-1]["step"]) if kept else None
