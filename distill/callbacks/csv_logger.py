"""A CSV logger that survives resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

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
