"""Lightning callbacks and loggers. Callbacks observe: they never change the training trajectory
(sampling uses its own torch.Generator and the EMA weights under no_grad).

The modules they observe expose `step` (completed training steps), `max_steps` and `sample_image()`.
"""

from __future__ import annotations

import csv
import os
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
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


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
        trainer.save_checkpoint(path)
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
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                header = next(csv.reader(fh), None)
            if header:
                self._keys = header

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
        row = {"step": step, **{k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}}
        new = [k for k in row if k not in self._keys]
        if new or not self.path.is_file():
            self._keys = ["step"] + sorted(set(self._keys[1:]) | set(new))
            self._rewrite(self._rows() + [row])
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
