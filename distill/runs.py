"""The run directory's layout: where checkpoints live and how they are named. Imports nothing heavy (no Lightning),
so the SLURM submitter, evaluation and the callbacks share one definition."""

from __future__ import annotations

from pathlib import Path

CKPT_PREFIX = "step="
CKPT_GLOB = f"{CKPT_PREFIX}*.ckpt"


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
