"""A run directory is bound to its config (distill.train): finished work is not redone, math-changing keys are
refused unless allowed (and then applied and recorded), paths are stored absolute, an earlier attempt's files are
moved aside rather than mixed in, signals stop at a step boundary with a checkpoint and a non-zero status, and
errors found before the start leave nothing behind."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli

GMM = str(REPO / "configs" / "gmm.yaml")
FAST = ["logging.progress_bar=false", "logging.proposal_plot_every_steps=0", "eval.fid_every_steps=0",
        "eval.variance_every_steps=0", "logging.wandb=disabled", "trainer.log_every_steps=5",
        "trainer.checkpoint_every_steps=10"]


def _fit(run_dir, *extra):
    from distill.cli import main

    return main(["fit", "--config", GMM, f"run.dir={run_dir}", *FAST, *extra])


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not p.is_symlink() and "wandb" not in p.parts}


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["distill"]["step"]


def test_a_finished_run_rerun_touches_nothing_and_more_steps_continue(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(run_dir, "trainer.max_steps=20") == 0
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert _fit(run_dir, "trainer.max_steps=20") == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "step 20" in out
    assert _snapshot(run_dir) == before  # not a byte or a timestamp changed
    assert _fit(run_dir, "trainer.max_steps=40") == 0
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 40
    rows = _rows(run_dir)
    assert [int(r["step"]) for r in rows] == list(range(5, 41, 5))
    # training wall time: at least the steps' own time, and carried across the resume (it grows past step 20)
    elapsed = [float(r["time/elapsed_seconds"]) for r in rows]
    assert all(a < b for a, b in zip(elapsed, elapsed[1:])), elapsed
    assert elapsed[3] >= sum(5 * float(r["time/step_seconds"]) for r in rows[:4]) * (1 - 1e-6)


def test_a_copied_finished_run_continues_too(tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    assert _fit(run_dir, "trainer.max_steps=10") == 0
    shutil.copytree(run_dir, tmp_path / "copy", symlinks=True)
    assert _fit(tmp_path / "copy", "trainer.max_steps=20") == 0
    assert _step(tmp_path / "copy" / "checkpoints" / "last.ckpt") == 20


def test_a_changed_math_key_is_refused_unless_allowed_then_applied_and_recorded(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(run_dir, "trainer.max_steps=10", "optim.ttur=1") == 0
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert _fit(run_dir, "trainer.max_steps=20", "optim.ttur=1", "estimator.K=4", "optim.lr_generator=3e-4") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "estimator.K (1 -> 4)" in err and "optim.lr_generator" in err
    assert "--allow-change estimator.K" in err
    assert _snapshot(run_dir) == before  # refused before anything was written

    from distill.cli import main

    code = main(["fit", "--config", GMM, f"run.dir={run_dir}", *FAST, "trainer.max_steps=20", "optim.ttur=1",
                 "estimator.K=4", "optim.lr_generator=3e-4", "--allow-change", "estimator.K,optim.lr_generator"])
    assert code == 0
    # every config the run has had is kept: config.yaml is the one in force, config-step=N.yaml the one before
    assert "K: 4" in (run_dir / "config.yaml").read_text()
    assert "K: 1" in (run_dir / "config-step=0000010.yaml").read_text()
    # and the change is applied: K = 4 draws (the x-space ANOVA needs K >= 2) and the new learning rate
    rows = _rows(run_dir)
    assert {float(r["carv/K"]) for r in rows if int(r["step"]) > 10} == {4.0}
    assert all(r["carv/x_sigma_w2"] not in ("", None) for r in rows if int(r["step"]) > 10)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(3e-4)
    assert ckpt["distill"]["k_control"]["K"] == 4


def test_keys_that_do_not_touch_the_math_change_freely_and_are_recorded(tmp_path):
    run_dir = tmp_path / "run"
    assert _fit(run_dir, "trainer.max_steps=10") == 0
    assert _fit(run_dir, "trainer.max_steps=20", "trainer.log_every_steps=10", "run.name=renamed") == 0
    assert "log_every_steps: 10" in (run_dir / "config.yaml").read_text()
    assert "log_every_steps: 5" in (run_dir / "config-step=0000010.yaml").read_text()


def test_an_empty_run_dir_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _fit("", "trainer.max_steps=5") == 2
    assert "run.dir" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert _fit(str(tmp_path), "trainer.max_steps=5") == 2  # the current folder by name
    assert list(tmp_path.iterdir()) == []


def test_the_only_checkpoint_broken_says_what_happens_and_a_restart_moves_the_old_files_aside(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _fit(run_dir, "trainer.max_steps=20", "trainer.keep_checkpoints=1", "logging.samples_every_steps=10") == 0
    (only,) = (run_dir / "checkpoints").glob("step=*.ckpt")
    only.write_bytes(only.read_bytes()[:1000])
    capsys.readouterr()
    assert _fit(run_dir, "trainer.max_steps=20", "trainer.keep_checkpoints=1") == 2
    err = capsys.readouterr().err
    assert "no older checkpoint" in err and "step 0" in err and "superseded" in err
    only.rename(tmp_path / "broken.ckpt")
    old_rows = _rows(run_dir)
    assert _fit(run_dir, "trainer.max_steps=20", "trainer.keep_checkpoints=1", "logging.samples_every_steps=10") == 0
    assert "moved" in capsys.readouterr().out
    (moved,) = (run_dir / "superseded").iterdir()
    assert (moved / "samples" / "step_0000020.png").is_file() and (moved / "config.yaml").is_file()
    with open(moved / "metrics.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == old_rows  # the old attempt's metrics, kept whole
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 20


@pytest.mark.slow
def test_paths_are_stored_absolute_and_a_checkpoint_evaluates_from_anywhere(tmp_path, monkeypatch, tiny_teacher,
                                                                            digits_shards):
    from distill.evaluate import load_checkpoint_module

    monkeypatch.chdir(tmp_path)
    rel_teacher, rel_data = os.path.relpath(tiny_teacher), os.path.relpath(digits_shards)
    r = run_cli("fit", "--config", str(REPO / "configs/digits.yaml"), "run.dir=run", f"teacher.path={rel_teacher}",
                f"data.path={rel_data}", "data.batch_size=8", "trainer.max_steps=2", "eval.fid_every_steps=0",
                "logging.wandb=disabled", "logging.progress_bar=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert f"path: {tiny_teacher}" in text and f"# teacher.path as given: {rel_teacher}" in text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    module, step = load_checkpoint_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert step == 2 and str(module.cfg.teacher.path) == str(tiny_teacher)


@pytest.mark.slow
def test_teacher_training_never_writes_into_an_existing_teacher_folder(tmp_path, digits_shards):
    args = ["teacher", "--config", str(REPO / "configs/teacher-digits.yaml"), f"data.path={digits_shards}",
            "trainer.max_steps=2", "unet.block_out_channels=[8,16]", "sample_steps=2", "logging.wandb=disabled",
            "logging.progress_bar=false", "data.batch_size=8"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    r = run_cli(*args, f"run.dir={tmp_path / 'a'}", f"out={existing}")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert [p.name for p in existing.iterdir()] == ["keep.txt"] and not (tmp_path / "a").exists()
    r = run_cli(*args, f"run.dir={tmp_path / 'b'}")  # the default goes into the run directory
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "b" / "teacher" / "unet" / "config.json").is_file()
    assert (REPO / "data/teachers/digits/unet/config.json").is_file()
    r = run_cli(*args, f"run.dir={tmp_path / 'b'}", "trainer.max_steps=3")  # a resume replaces its own output
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(*args, f"run.dir={tmp_path / 'c'}", f"out={existing}", "--overwrite")
    assert r.returncode == 0 and (existing / "unet" / "config.json").is_file()


@pytest.mark.slow
def test_resuming_a_teacher_with_another_number_of_classes_is_one_line(tmp_path, digits_shards):
    from PIL import Image

    from distill.data import write_folder_shards

    src = tmp_path / "imgs"
    for c in range(12):
        (src / f"c{c:02d}").mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=c * 20 + i).save(src / f"c{c:02d}" / f"{i}.png")
    write_folder_shards(src, tmp_path / "twelve", channels=1)
    args = ["teacher", "--config", str(REPO / "configs/teacher-digits.yaml"), f"run.dir={tmp_path / 'run'}",
            "trainer.max_steps=2", "unet.block_out_channels=[8,16]", "sample_steps=2", "logging.wandb=disabled",
            "logging.progress_bar=false", "data.batch_size=8"]
    assert run_cli(*args, f"data.path={digits_shards}").returncode == 0
    r = run_cli(*args, f"data.path={tmp_path / 'twelve'}", "trainer.max_steps=4", "--allow-change", "data.path")
    assert r.returncode == 2 and "other networks" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_wandb_online_without_a_key_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    run_dir = tmp_path / "run"
    assert _fit(run_dir, "trainer.max_steps=5", "logging.wandb=online") == 2
    assert "API key" in capsys.readouterr().err
    assert not run_dir.exists()


@pytest.mark.slow
def test_an_extractor_that_does_not_fit_the_samples_stops_before_anything_is_written(tmp_path, tiny_teacher,
                                                                                    digits_shards):
    r = run_cli("fit", "--config", str(REPO / "configs/digits.yaml"), f"run.dir={tmp_path / 'run'}",
                f"teacher.path={tiny_teacher}", f"data.path={digits_shards}", "eval.features=raw",
                "eval.fid_ref=" + str(_stats_of_other_features(tmp_path)), "trainer.max_steps=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_digits_features_on_16x16_samples_stop_before_anything_is_written(tmp_path):
    """eval.features=digits (an 8x8 classifier) on a 16x16 teacher with eval.fid_ref given: the mismatch used to
    surface at the first evaluation, after config.yaml and samples/ were written; the extractor is now probed with
    the sample shape when the FID monitor is built."""
    import numpy as np
    from diffusers import DDPMScheduler
    from PIL import Image

    from distill.data import write_folder_shards
    from distill.metrics import extractor_for, save_stats
    from distill.teachers import build_unet

    torch.manual_seed(0)
    teacher = tmp_path / "teacher16"
    build_unet((1, 16, 16), 10, [8, 16], 1, False).save_pretrained(teacher / "unet")
    DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(teacher / "scheduler")
    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / "src" / str(c)).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "src" / str(c) / f"{i}.png")
    write_folder_shards(tmp_path / "src", tmp_path / "shards", channels=1)
    ref = tmp_path / "ref-digits.npz"  # statistics of the digits features (made for 8x8 data), as a user would have
    a = rng.standard_normal((64, 64))
    save_stats(ref, {"mu": rng.standard_normal(64), "sigma": a @ a.T / 64 + np.eye(64), "n": 1000,
                     "extractor_id": extractor_for("digits").extractor_id})
    run_dir = tmp_path / "run"
    r = run_cli("fit", "--config", str(REPO / "configs/digits.yaml"), f"run.dir={run_dir}", f"teacher.path={teacher}",
                f"data.path={tmp_path / 'shards'}", "eval.features=digits",
                f"eval.fid_ref={ref}", "eval.fid_every_steps=1", "trainer.max_steps=2",
                "data.batch_size=8", "logging.wandb=offline")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("distill fit: error: digits features") and "(1, 16, 16)" in line and "(1, 8, 8)" in line
    assert not run_dir.exists()  # no config.yaml, samples/, wandb/ or wandb_id.txt


def _stats_of_other_features(tmp_path: Path) -> Path:
    """Reference statistics of 3 raw features: made for other data than 8x8 digits."""
    import numpy as np

    from distill.metrics import save_stats

    out = tmp_path / "other.npz"
    save_stats(out, {"mu": np.ones(3), "sigma": np.eye(3) * 2.0, "n": 10, "extractor_id": "raw-3"})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_at_a_step_with_its_checkpoint_and_a_failure_status(tmp_path, signum, code):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill", "fit", "--config", GMM, f"run.dir={run_dir}", *FAST,
           "trainer.max_steps=100000", "trainer.checkpoint_every_steps=100000", "trainer.log_every_steps=10"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "metrics.csv").is_file() and len(_rows(run_dir)) >= 3):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    stopped = int(err.split("stopped at step ")[1].split()[0])
    assert 30 <= stopped < 100000
    assert _step(run_dir / "checkpoints" / "last.ckpt") == stopped  # that step's checkpoint, off the cadence
    r = run_cli("fit", "--config", GMM, f"run.dir={run_dir}", *FAST, f"trainer.max_steps={stopped + 5}")
    assert r.returncode == 0 and f"(step {stopped})" in r.stdout, r.stderr[-2000:]
