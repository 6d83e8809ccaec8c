"""`distill submit` checks that need no cluster: the time limit against the SIGUSR1 warning, GPUs against tasks,
the accelerator a job without GPUs runs on, and the config snapshot the job reads (a fake `sbatch` stands in for
SLURM where a submission must really write its files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import REPO, srun_argv, submit_cli

# gmm: no data, tiny MLPs (the global batch of 256 divides over 1, 2 or 4 tasks)
GMM = ["--config", "configs/gmm.yaml", "trainer.accelerator=cpu"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths as a user types them, from the checkout


@pytest.fixture
def fid_run(tmp_path) -> tuple[Path, Path]:
    """A run directory with one (empty) checkpoint and a reference file: enough for `submit --fid` to render."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step=0000010.ckpt").write_bytes(b"")
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"")
    return run_dir, ref


@pytest.fixture
def fake_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` on PATH that accepts any script as job 4242; returns the file its arguments are written to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args = tmp_path / "sbatch-args"
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {args}\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return args


# --------------------------------------------------------------------------------------------------------------
# 1. --time against the SIGUSR1 warning (#SBATCH --signal=SIGUSR1@90)


@pytest.mark.parametrize("value, seconds", [
    ("30", 30 * 60),                              # MM
    ("5:30", 5 * 60 + 30),                        # MM:SS
    ("01:02:03", 3600 + 2 * 60 + 3),              # HH:MM:SS
    ("2-3", 2 * 86400 + 3 * 3600),                # D-HH
    ("2-03:04", 2 * 86400 + 3 * 3600 + 4 * 60),   # D-HH:MM
    ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5),  # D-HH:MM:SS
    ("90", 90 * 60),                              # minutes, not seconds
    ("0", 0),                                     # SLURM: no time limit
])
def test_time_seconds_parses_every_slurm_format(value, seconds):
    from distill.slurm import time_seconds

    assert time_seconds(value) == seconds


@pytest.mark.parametrize("value", ["1h", "1:2:3:4", "1-", "-5", "1-2:3:4:5", "", "1.5", " 10"])
def test_time_seconds_refuses_other_formats(value):
    from distill.errors import DistillError
    from distill.slurm import time_seconds

    with pytest.raises(DistillError, match=r"--time .*expected a SLURM time limit"):
        time_seconds(value)


@pytest.mark.parametrize("value", ["1", "1:30", "00:01:30", "0-00:01", "0:05"])
def test_time_not_longer_than_the_sigusr1_warning_is_refused(capsys, tmp_path, value):
    run_dir = tmp_path / "run"
    code, out, err = submit_cli(capsys, *GMM, f"run.dir={run_dir}", "--time", value)
    assert code == 2, (out, err)
    assert err.startswith("distill submit: error:") and err.count("\n") == 1, err
    assert f"--time {value!r}" in err and "90 s" in err and "expected a time limit longer than 90 s" in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize("value", ["1:31", "2", "0-00:02", "0"])
def test_time_longer_than_the_warning_or_unlimited_is_accepted(capsys, tmp_path, value):
    code, out, err = submit_cli(capsys, *GMM, f"run.dir={tmp_path / 'run'}", "--time", value, "--dry-run")
    assert code == 0, err
    assert f"#SBATCH --time={value}" in out.splitlines()


def test_time_is_checked_against_the_templates_own_warning(capsys, tmp_path):
    template = tmp_path / "train.sbatch"  # a copied template that asks for the signal 5 minutes ahead
    template.write_text((REPO / "slurm" / "train.sbatch").read_text().replace("SIGUSR1@90", "B:USR1@300"))
    args = [*GMM, f"run.dir={tmp_path / 'run'}", "--template", str(template), "--dry-run"]
    code, _, err = submit_cli(capsys, *args, "--time", "5")
    assert code == 2 and "expected a time limit longer than 300 s" in err, err
    code, _, err = submit_cli(capsys, *args, "--time", "6")
    assert code == 0, err


def test_fid_jobs_have_no_warning_to_outlast(capsys, fid_run):
    run_dir, ref = fid_run
    code, out, err = submit_cli(capsys, "--fid", str(run_dir), "--ref", str(ref), "--time", "1", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --time=1" in out.splitlines()


# --------------------------------------------------------------------------------------------------------------
# 2. one task per GPU


@pytest.mark.parametrize("gpus, tasks", [("4", "2"), ("2", "1")])
def test_more_gpus_than_tasks_is_refused(capsys, tmp_path, gpus, tasks):
    run_dir = tmp_path / "run"
    code, _, err = submit_cli(capsys, *GMM, "trainer.accelerator=auto", f"run.dir={run_dir}", "--gpus-per-node", gpus,
                           "--ntasks-per-node", tasks)
    assert code == 2 and err.count("\n") == 1, err
    assert f"--gpus-per-node {gpus}" in err and f"--ntasks-per-node {tasks}" in err, err
    assert "idle" in err and "expected --gpus-per-node equal to --ntasks-per-node (one task per GPU)" in err, err
    assert not run_dir.exists()


def test_fid_with_more_gpus_than_tasks_is_refused(capsys, fid_run):
    run_dir, ref = fid_run
    code, _, err = submit_cli(capsys, "--fid", str(run_dir), "--ref", str(ref), "--gpus-per-node", "2", "--dry-run")
    assert code == 2 and "--gpus-per-node 2" in err and "one task per GPU" in err, err


def test_as_many_gpus_as_tasks_is_accepted(capsys, tmp_path):
    code, out, err = submit_cli(capsys, *GMM, "trainer.accelerator=auto", f"run.dir={tmp_path / 'run'}",
                             "--gpus-per-node", "2", "--ntasks-per-node", "2", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --gpus-per-node=2" in out.splitlines()


# --------------------------------------------------------------------------------------------------------------
# 3. the accelerator: CPU said out loud, GPUs with accelerator=cpu refused


def test_no_gpus_pins_the_cpu_and_says_so(capsys, tmp_path):
    run_dir = tmp_path / "run"
    # configs/gmm.yaml says trainer.accelerator: auto; without GPUs the job would quietly run on CPUs
    code, out, err = submit_cli(capsys, "--config", "configs/gmm.yaml", f"run.dir={run_dir}", "--ntasks-per-node", "2",
                             "--dry-run")
    assert code == 0, err
    argv = srun_argv(out)
    assert "trainer.accelerator=cpu" in argv[argv.index("--config") + 2:]
    assert not [ln for ln in out.splitlines() if ln.startswith("#SBATCH --gpus")]
    notes = [ln for ln in err.splitlines() if "CPU" in ln]
    assert len(notes) == 1 and "--gpus-per-node N" in notes[0], err


def test_gpus_leave_the_accelerator_to_the_config(capsys, tmp_path):
    code, out, err = submit_cli(capsys, "--config", "configs/gmm.yaml", f"run.dir={tmp_path / 'run'}",
                             "--ntasks-per-node", "2", "--gpus-per-node", "2", "--dry-run")
    assert code == 0, err
    assert not [a for a in srun_argv(out) if a.startswith("trainer.accelerator=")]
    assert "CPU" not in err


def test_gpus_with_accelerator_cpu_are_refused(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = submit_cli(capsys, *GMM, f"run.dir={run_dir}", "--ntasks-per-node", "2", "--gpus-per-node", "2")
    assert code == 2 and err.count("\n") == 1, err
    assert "--gpus-per-node 2" in err and "trainer.accelerator=cpu" in err, err
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------------------------------
# 4. the config snapshot


def test_submit_snapshots_the_config_and_the_job_reads_only_the_snapshot(capsys, tmp_path, fake_sbatch):
    from distill.config import FitConfig, load_config

    config = tmp_path / "my.yaml"
    config.write_text((REPO / "configs" / "gmm.yaml").read_text())
    run_dir = tmp_path / "run"
    overrides = [f"run.dir={run_dir}", "run.name=it's a run; rm -rf /", "trainer.max_steps=7"]
    code, out, err = submit_cli(capsys, "--config", str(config), *overrides, "--ntasks-per-node", "2")
    assert code == 0, err
    (script,) = (run_dir / "slurm").glob("train-*.sbatch")
    argv = srun_argv(script.read_text())
    snapshot = Path(argv[argv.index("--config") + 1])
    # the job reads the snapshot, never the file the user may go on editing; nothing but the pins follows it
    assert snapshot.is_file() and snapshot.parent == run_dir / "slurm" and snapshot.suffix == ".yaml", snapshot
    assert argv[argv.index("--config") + 2:] == ["trainer.accelerator=cpu", "trainer.devices=2",
                                                 "trainer.num_nodes=1", f"run.dir={run_dir}"]
    assert str(snapshot) in out
    assert not list(run_dir.glob("**/.*tmp*"))  # written atomically: no temporary file left
    config.write_text(config.read_text().replace("max_steps: 8000", "max_steps: 1"))  # edited after submitting
    job_cfg = load_config(FitConfig, snapshot)
    assert job_cfg.run.name == "it's a run; rm -rf /"  # quotes and ';' arrive as given
    assert job_cfg.trainer.max_steps == 7
    assert (job_cfg.trainer.accelerator, job_cfg.trainer.devices, job_cfg.run.dir) == ("cpu", 2, str(run_dir))
    # the snapshot is exactly the config the job runs (what `distill fit` would resolve from the same arguments)
    assert job_cfg == load_config(FitConfig, snapshot, argv[argv.index("--config") + 2:])


def test_dry_run_shows_the_snapshot_path_and_writes_nothing(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = submit_cli(capsys, *GMM, f"run.dir={run_dir}", "--dry-run")
    assert code == 0, err
    argv = srun_argv(out)
    snapshot = argv[argv.index("--config") + 1]
    assert snapshot.startswith(f"{run_dir}/slurm/train-") and snapshot.endswith(".yaml"), snapshot
    assert snapshot in err  # said out loud: the file a real submission writes
    assert not run_dir.exists()


def test_a_snapshot_is_never_replaced(tmp_path):
    from distill.errors import DistillError
    from distill.slurm import _write_atomic

    path = tmp_path / "slurm" / "train-x.yaml"
    _write_atomic(path, "first\n", tmp_path, exclusive=True)
    with pytest.raises(DistillError, match="another submission"):
        _write_atomic(path, "second\n", tmp_path, exclusive=True)
    assert path.read_text() == "first\n"
    assert [p.name for p in path.parent.iterdir()] == ["train-x.yaml"]  # no temporary file left behind


@pytest.mark.parametrize("args, message", [
    (["trainer.accelerator=gpu", "--ntasks-per-node", "2", "--gpus-per-node", "0"], "one GPU per task"),
    (["trainer.accelerator=mps"], "trainer.accelerator=mps"),
])
def test_accelerators_that_no_slurm_gpu_layout_fits_are_refused(capsys, tmp_path, args, message):
    run_dir = tmp_path / "run"
    code, _, err = submit_cli(capsys, *GMM, f"run.dir={run_dir}", *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not run_dir.exists()
