"""`distill submit` and the sbatch templates in slurm/.

The rendering tests need no cluster. The tests marked `slurm` submit real jobs to a running cluster (on this
machine: `bash slurm/local-cluster.sh start`, as root) and are skipped without one: (a) a two-task CPU training job
completes with both ranks, (b) a job sent SIGUSR1 checkpoints, requeues itself and finishes with every step
logged exactly once and one W&B run id, (c) `distill submit --fid` evaluates the run's checkpoints over two tasks.
They take about two minutes, most of it Lightning's DDP start-up and the ~12 s SLURM waits before a requeued job
starts again.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli, srun_argv, submit_cli

# gmm: no data, tiny MLPs. Two CPU ranks (gloo) share the global batch of 256.
GMM = ["--config", "configs/gmm.yaml", "trainer.accelerator=cpu", "logging.samples_every_steps=0",
       "eval.fid_every_steps=0", "eval.variance_every_steps=0", "logging.proposal_plot_every_steps=0",
       "logging.progress_bar=false", "trainer.log_every_steps=50"]
LOG_EVERY = 50
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# --------------------------------------------------------------------------------------------------------------
# Rendering: no cluster needed.


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # config paths as a user types them, from the checkout


def test_dry_run_renders_srun_signal_requeue_and_quoted_overrides(capsys, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    args = [*GMM, f"run.dir={run_dir}", "run.name=it's a run; rm -rf /", "trainer.max_steps=7", "--ntasks-per-node",
            "2", "--time", "00:30:00"]
    code, out, err = submit_cli(capsys, *args, "--dry-run")
    assert code == 0, err
    sbatch = [ln for ln in out.splitlines() if ln.startswith("#SBATCH")]
    for line in ("#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --time=00:30:00", "#SBATCH --signal=SIGUSR1@90", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", f"#SBATCH --output={run_dir}/slurm-%j.out",
                 f"#SBATCH --error={run_dir}/slurm-%j.out"):
        assert line in sbatch, (line, sbatch)
    assert f"cd {REPO}" in out.splitlines()  # where the user submitted from: relative paths in the config hold
    # nothing asked for GPUs, a partition or an account: those lines are left out, not left empty
    assert not [ln for ln in sbatch if re.match(r"#SBATCH --(gpus-per-node|partition|account|dependency)", ln)]
    argv = srun_argv(out)
    assert argv[0] == "srun"
    i = argv.index("-m")
    assert argv[i:i + 3] == ["-m", "distill", "fit"]
    # the job reads a snapshot of the config in the run directory (--dry-run only names it), then the pinned values
    snapshot = argv[argv.index("--config") + 1]
    assert snapshot.startswith(f"{run_dir}/slurm/train-") and snapshot.endswith(".yaml") and snapshot in err
    assert argv[argv.index("--config") + 2:] == ["trainer.accelerator=cpu", "trainer.devices=2",
                                                 "trainer.num_nodes=1", f"run.dir={run_dir}"]
    assert not run_dir.exists()  # --dry-run writes nothing

    # submitted (a fake sbatch): the overrides arrive in the snapshot as they were given, quotes and ';' included
    from distill.config import FitConfig, load_config

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = submit_cli(capsys, *args)
    assert code == 0, err
    (script,) = (run_dir / "slurm").glob("train-*.sbatch")
    argv = srun_argv(script.read_text())
    snapshot = Path(argv[argv.index("--config") + 1])
    assert snapshot.parent == run_dir / "slurm" and snapshot.is_file()
    cfg = load_config(FitConfig, snapshot, argv[argv.index("--config") + 2:])  # what `distill fit` will run
    assert cfg.run.name == "it's a run; rm -rf /"
    assert cfg.trainer.max_steps == 7
    assert (cfg.trainer.devices, cfg.trainer.num_nodes, cfg.run.dir) == (2, 1, str(run_dir))


def test_dry_run_optional_lines_and_gpu_default(capsys, tmp_path):
    code, out, err = submit_cli(capsys, *GMM, f"run.dir={tmp_path / 'r'}", "trainer.accelerator=gpu", "--nodes", "2",
                             "--ntasks-per-node", "4", "--cpus-per-task", "8", "--partition", "gpu", "--account",
                             "proj1", "--job-name", "big", "--after", "123", "--dry-run")
    assert code == 0, err
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                 "#SBATCH --job-name=big", "#SBATCH --dependency=afterok:123"):
        assert line in out.splitlines(), line
    assert not re.search(r"^#SBATCH --time", out, re.M)  # no --time: the partition's default
    assert srun_argv(out)[-3:-1] == ["trainer.devices=4", "trainer.num_nodes=2"]


def test_fid_dry_run(capsys, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step=0000010.ckpt").write_bytes(b"")
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"")
    code, out, err = submit_cli(capsys, "--fid", str(run_dir), "--ref", str(ref), "--num-samples", "500",
                             "--ntasks-per-node", "2", "--dry-run")
    assert code == 0, err
    assert "#SBATCH --ntasks-per-node=2" in out.splitlines()
    assert f"#SBATCH --output={run_dir}/slurm-fid-%j.out" in out.splitlines()
    assert "--signal" not in out  # `distill fid` has no SIGUSR1 handler: the signal would kill it
    argv = srun_argv(out)
    i = argv.index("-m")
    assert argv[i:] == ["-m", "distill", "fid", str(run_dir), "--ref", str(ref), "--num-samples", "500"]
    assert 'WORLD_SIZE="$SLURM_NTASKS" RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID"' in out


@pytest.mark.parametrize("args, message", [
    (["trainer.max_stepz=5"], "trainer.max_stepz"),
    (["data.batch_size=255", "--ntasks-per-node", "2"], "data.batch_size"),
    (["trainer.devices=4", "--ntasks-per-node", "2"], "--ntasks-per-node 2 disagrees with trainer.devices=4"),
    (["--time", "1h"], "--time '1h'"),
    (["--job-name", "bash"], "--job-name 'bash'"),
    (["--ref", "x.npz"], "--ref is for --fid"),
    (["trainer.accelerator=gpu", "--ntasks-per-node", "2", "--gpus-per-node", "1"], "one GPU per task"),
])
def test_bad_input_exits_2_and_writes_nothing(capsys, tmp_path, args, message):
    run_dir = tmp_path / "run"
    code, out, err = submit_cli(capsys, *GMM, f"run.dir={run_dir}", *args)
    assert code == 2
    assert message in err and err.startswith("distill submit: error:"), err
    assert not run_dir.exists()


def test_fid_needs_ref_and_checkpoints(capsys, tmp_path):
    code, _, err = submit_cli(capsys, "--fid", str(tmp_path))
    assert code == 2 and "--ref" in err
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"")
    code, _, err = submit_cli(capsys, "--fid", str(tmp_path), "--ref", str(ref))
    assert code == 2 and "no checkpoints/step=*.ckpt" in err and "--after" in err


def test_render_drops_empty_sbatch_lines_and_refuses_missing_values(tmp_path):
    from distill.errors import DistillError
    from distill.slurm import render

    template = tmp_path / "t.sbatch"
    template.write_text("#SBATCH --partition={{partition}}\n#SBATCH --nodes={{nodes}}\necho {{extra}}x\n")
    assert render(template, partition=None, nodes=2, extra="") == "#SBATCH --nodes=2\necho x\n"
    with pytest.raises(DistillError, match=r"\{\{extra\}\}"):
        render(template, partition="p", nodes=1)


def test_submit_without_sbatch_says_how_to_start_a_cluster(tmp_path, monkeypatch):
    from distill.errors import DistillError
    from distill.slurm import submit

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DistillError, match=r"sbatch was not found.*bash slurm/local-cluster\.sh start"):
        submit("#!/bin/bash\n", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_submit_writes_the_script_and_returns_the_job_id(tmp_path, monkeypatch):
    from distill.slurm import submit

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"  # prints what `sbatch --parsable` prints on a federated cluster: JOBID;CLUSTER
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\necho "4242;cluster"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert submit("#!/bin/bash\necho hi\n", tmp_path / "run") == "4242"
    (script,) = (tmp_path / "run" / "slurm").glob("train-*.sbatch")
    assert script.read_text() == "#!/bin/bash\necho hi\n"
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(script)]


# --------------------------------------------------------------------------------------------------------------
# A real cluster.


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (start a one-node cluster as root: bash slurm/local-cluster.sh start)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"no SLURM controller answers `scontrol ping` ({ping.stdout.strip() or ping.stderr.strip()}); " \
               f"start one: bash slurm/local-cluster.sh start"
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()
    if not cpus or max(int(c.rstrip("+")) for c in cpus) < 2:
        return f"no node with 2 CPUs (sinfo: {cpus}); start the local cluster with SLURM_CPUS=2"
    return None


CLUSTER_PROBLEM = _cluster_problem()
needs_cluster = pytest.mark.skipif(CLUSTER_PROBLEM is not None, reason=f"no SLURM cluster: {CLUSTER_PROBLEM}")


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


def _wait_finished(job_id: str, log: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _job(job_id)
        if job.get("JobState") in FINISHED:
            return job
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} not finished after {timeout:.0f} s ({_job(job_id).get('JobState')}); "
                f"log:\n{_log_tail(log)}")


def _submit_job(*args: str) -> str:
    r = run_cli("submit", *args, timeout=120)
    assert r.returncode == 0, r.stderr
    match = re.search(r"submitted \w+ job (\d+)", r.stdout)
    assert match, r.stdout
    return match.group(1)


def _steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return [int(row["step"]) for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory):
    """A 400-step gmm run, two CPU tasks on the node, checkpoints every 100 steps (the newest two kept)."""
    run_dir = tmp_path_factory.mktemp("slurm") / "run"
    t0 = time.monotonic()
    job_id = _submit_job(*GMM, f"run.dir={run_dir}", "trainer.max_steps=400", "trainer.checkpoint_every_steps=100",
                         "trainer.keep_checkpoints=2", "--ntasks-per-node", "2")
    job = _wait_finished(job_id, run_dir / f"slurm-{job_id}.out", timeout=180)
    print(f"two-task job {job_id}: {job.get('JobState')} in {time.monotonic() - t0:.0f} s")
    return run_dir, job_id, job


@pytest.mark.slurm
@needs_cluster
def test_two_task_job_completes_with_both_ranks(two_task_run):
    run_dir, job_id, job = two_task_run
    log = run_dir / f"slurm-{job_id}.out"
    assert job["JobState"] == "COMPLETED", _log_tail(log)
    text = log.read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in text and "GLOBAL_RANK: 1, MEMBER: 2/2" in text, _log_tail(log)
    assert "done: 400 steps" in text
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == "step=0000400.ckpt"
    assert _steps(run_dir) == list(range(LOG_EVERY, 401, LOG_EVERY))
    assert len(list((run_dir / "slurm").glob("train-*.sbatch"))) == 1


@pytest.mark.slurm
@needs_cluster
def test_sigusr1_checkpoints_requeues_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    max_steps = 3000  # ~30 s of training on two CPU ranks: the signal lands well before the end
    job_id = _submit_job(*GMM, f"run.dir={run_dir}", f"trainer.max_steps={max_steps}",
                         "trainer.checkpoint_every_steps=50", "--ntasks-per-node", "2")
    log = run_dir / f"slurm-{job_id}.out"
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("step=*.ckpt")):
        if time.monotonic() > deadline or _job(job_id).get("JobState") in FINISHED:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} wrote no checkpoint: {_job(job_id).get('JobState')}\n{_log_tail(log)}")
        time.sleep(0.5)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)  # reaches the srun tasks (both ranks)
    deadline = time.monotonic() + 90  # a step, a checkpoint and `scontrol requeue`: seconds, not minutes
    while _job(job_id).get("Restarts", "0") == "0" and _job(job_id).get("JobState") not in FINISHED:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} did not requeue within 90 s of SIGUSR1\n{_log_tail(log)}")
        time.sleep(0.5)

    job = _wait_finished(job_id, log, timeout=240)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED", _log_tail(log)
    assert job["Restarts"] == "1", f"the job did not requeue (finished before the signal?)\n{_log_tail(log)}"
    stopped = re.search(r"stopped at step (\d+), checkpoint written", text)
    assert stopped, _log_tail(log)
    resumed = re.findall(r"resuming from \S+step=(\d+)\.ckpt", text)
    assert resumed and {int(r) for r in resumed} == {int(stopped.group(1))}, _log_tail(log)  # from that step
    assert 0 < int(stopped.group(1)) < max_steps
    assert f"(now at step {max_steps})" in text  # "done: N steps in ... (now at step max_steps)"
    # every logged step exactly once: nothing lost, nothing repeated across the requeue
    assert _steps(run_dir) == list(range(LOG_EVERY, max_steps + 1, LOG_EVERY))
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == f"step={max_steps:07d}.ckpt"
    # one W&B run throughout: the id file is unchanged and both attempts wrote into that run
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue handler stayed out of it


@pytest.mark.slurm
@needs_cluster
def test_submit_fid_evaluates_every_checkpoint(two_task_run, tmp_path):
    import numpy as np

    from distill.metrics import save_stats

    run_dir, _, _ = two_task_run
    ref = tmp_path / "ref.npz"  # the gmm mixture (8 modes on a radius-2 circle) has covariance ~2 I
    save_stats(ref, {"mu": np.zeros(2), "sigma": 2.0 * np.eye(2), "n": 10_000, "extractor_id": "raw-2"})
    job_id = _submit_job("--fid", str(run_dir), "--ref", str(ref), "--num-samples", "1000",
                         "--ntasks-per-node", "2")
    log = run_dir / f"slurm-fid-{job_id}.out"
    job = _wait_finished(job_id, log, timeout=180)
    assert job["JobState"] == "COMPLETED", _log_tail(log)
    assert "(2 processes)" in log.read_text(), _log_tail(log)
    with open(run_dir / "checkpoints" / "fid_results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ckpts = sorted(str(p) for p in (run_dir / "checkpoints").glob("step=*.ckpt"))
    assert sorted(r["path"] for r in rows) == ckpts and len(ckpts) == 2
    assert all(r["samples"] == "1000" and r["extractor"] == "raw-2" and float(r["fid"]) >= 0 for r in rows), rows
