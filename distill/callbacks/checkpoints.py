"""Checkpoints: atomic writes, every N steps with the newest kept and a `last.ckpt` link, and preemption by SIGUSR1
(checkpoint at a step boundary, then requeue)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

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
