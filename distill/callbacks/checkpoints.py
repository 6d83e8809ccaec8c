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

from distill.runs import CKPT_PREFIX, checkpoint_path, find_resume_checkpoint, list_checkpoints  # noqa: F401


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


class StopOnSignal(L.Callback):
    """Stop at a step boundary with that step's checkpoint on SIGTERM (scancel, a time limit, a wrapper), SIGINT
    (Ctrl-C) and, under SLURM, SIGUSR1 (`#SBATCH --signal=SIGUSR1@90`, or `scancel --signal=USR1 JOB`): every rank
    finishes its current step, the checkpoint is written to checkpoints/ (where the run resumes from), training
    stops. After SIGUSR1 global rank 0 requeues the job, which resumes with the same step count; after SIGTERM or
    SIGINT the command exits 143 / 130 (distill.train), so a scheduler or wrapper never records success. A second
    Ctrl-C interrupts at once.

    It replaces Lightning's handlers: its SIGTERM handler broadcasts inside the signal handler (a deadlock when the
    ranks sit in different collectives) and ends the fit with status 0 and no checkpoint; its SLURM auto-requeue
    saves hpc_ckpt_N.ckpt mid-step to a file our resume does not read (the Trainer gets
    SLURMEnvironment(auto_requeue=False)). The ranks agree on the stop with one all-reduce of a CPU tensor per
    step (a gloo group beside NCCL on GPUs), so a step never waits on the GPU for it."""

    def __init__(self, checkpoint: StepCheckpoint, requeue: bool = False):
        self.checkpoint = checkpoint
        self.signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if requeue else [])
        self.received = 0  # the signal this rank got (0: none)
        self.stopped_by: int | None = None  # the signal all ranks stopped for
        self.requeued = False
        self._group = None
        self._previous: dict[int, Any] = {}
        # installed now rather than in setup: during the DDP start-up SIGUSR1's default action would kill us
        self._install()

    def _install(self) -> None:
        for signum in self.signals:
            previous = signal.signal(signum, self._handle)
            self._previous.setdefault(signum, previous)

    def restore(self) -> None:
        """Put back the handlers that were there before (also when the fit failed)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the step to end
        self.received = max(self.received, int(signum))  # only a flag: a collective inside a handler can deadlock

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()  # Lightning's signal connector replaced our SIGTERM handler after on_fit_start

    def setup(self, trainer, pl_module, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")  # every rank calls this, in the same order

    def _agreed_signal(self, trainer) -> int:
        import torch.distributed as dist

        if trainer.world_size == 1 or not dist.is_initialized():
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)  # the ranks get the signal at different moments: agree on the step
        if not signum or pl_module.step >= pl_module.max_steps:  # (finished anyway: nothing to stop)
            return
        self.checkpoint._save(trainer, pl_module.step)
        self.stopped_by = signum
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.restore()
        if self.stopped_by != signal.SIGUSR1:
            return
        self.requeued = True
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import WandbLogger

        from distill.slurm import requeue_job

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # before SLURM ends this process; the requeued job resumes the run
        print(f"\nSIGUSR1: stopped at step {pl_module.step}, checkpoint written; requeueing the job", flush=True)
        requeue_job()
