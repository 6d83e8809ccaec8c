"""The run directory's layout: where checkpoints live and how they are named, and the evaluation protocol's noise
seed. Imports nothing heavy (no Lightning, no torch), so the CLI, the SLURM submitter, evaluation and the callbacks
share one definition."""

from __future__ import annotations

from pathlib import Path

CKPT_PREFIX = "step="
CKPT_GLOB = f"{CKPT_PREFIX}*.ckpt"
# The noise seed of the FID protocol: `distill fid --seed`'s default and the in-loop FID's (FIDMonitor), the same
# whatever trainer.seed a run trained with, so that fid/ema in W&B is the number `distill fid` gives and runs of
# different training seeds are evaluated on the same noise.
PROTOCOL_SEED = 0


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"{CKPT_PREFIX}{step:07d}.ckpt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files of an interrupted write are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob(CKPT_GLOB) if p.is_file())


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run directory, or None."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None
