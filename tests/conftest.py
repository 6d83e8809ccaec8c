"""Shared fixtures: digits shards and a tiny random diffusers teacher, built once per session in tmp folders;
W&B and caches pointed at tmp so that tests never write to the home folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("env")
    for var, sub in (("WANDB_DIR", "wandb"), ("WANDB_CACHE_DIR", "wandb-cache"), ("WANDB_CONFIG_DIR", "wandb-config"),
                     ("MPLCONFIGDIR", "mpl")):
        os.environ[var] = str(base / sub)
    os.environ["WANDB_SILENT"] = "true"
    os.environ["WANDB_MODE"] = "offline"
    yield


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    from distill.data import write_digits_shards

    out = tmp_path_factory.mktemp("digits")
    write_digits_shards(out, val_fraction=0.1, seed=0, shard_size=500)
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A random class-conditional UNet2DModel (8x8, 1 channel, 10 classes + null) in the diffusers layout."""
    import torch
    from diffusers import DDPMScheduler

    from distill.teachers import build_unet

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_teacher")
    build_unet((1, 8, 8), 10, [16, 32], 1, False).save_pretrained(out / "unet")
    DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(out / "scheduler")
    return out


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory) -> dict[str, Path]:
    """Tiny random text-to-image pipelines in the SD 1.x ("sd15") and SDXL ("sdxl") layouts (tests/tiny_pipelines.py)."""
    from tiny_pipelines import build_pipeline

    base = tmp_path_factory.mktemp("tiny_pipelines")
    return {kind: build_pipeline(base / kind, kind) for kind in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def digit_prompt_shards(tmp_path_factory) -> Path:
    """Prompt shards of the ten prompts `a handwritten <zero..nine>`."""
    from distill.data import write_prompt_shards
    from distill.metrics import DIGIT_WORDS

    base = tmp_path_factory.mktemp("digit_prompts")
    (base / "prompts.txt").write_text("\n".join(f"a handwritten {w}" for w in DIGIT_WORDS) + "\n")
    write_prompt_shards(base / "prompts.txt", base / "shards", val_fraction=0.1, seed=0, shard_size=8)
    return base / "shards"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m distill ARGS` in a subprocess (as a user would run it)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "distill", *args], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def submit_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`distill submit ARGS` in this process: (status, stdout, stderr)."""
    from distill.cli import main

    code = main(["submit", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def srun_argv(script: str) -> list[str]:
    """The command that srun launches in a rendered script, as the shell will split it (continuation lines
    joined)."""
    import shlex

    body = script.replace("\\\n", " ")
    return shlex.split(next(ln for ln in body.splitlines() if ln.lstrip().startswith("srun ")))
