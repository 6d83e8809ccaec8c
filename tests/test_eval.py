"""Evaluation and monitoring end to end: FID and variance in a short fit, `distill fid` over checkpoints,
`distill stats`, and the errors a user can cause."""

import csv
import json

import numpy as np
import pytest

from conftest import REPO, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref_stats(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    r = run_cli("stats", "--data", str(digits_shards), "--features", "digits", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(out) as f:
        assert f["mu"].shape == (64,) and f["sigma"].shape == (64, 64) and int(f["n"]) == 1617
        assert str(f["extractor_id"]).startswith("digits-cnn:")
    return out


@pytest.fixture(scope="module")
def run_with_eval(tiny_teacher, digits_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    r = run_cli("fit", "--config", "configs/digits.yaml", f"run.dir={run_dir}", f"teacher.path={tiny_teacher}",
                f"data.path={digits_shards}", "data.batch_size=8", "trainer.max_steps=8", "optim.ttur=2",
                "trainer.checkpoint_every_steps=4", "trainer.log_every_steps=4", "logging.samples_every_steps=4",
                "logging.progress_bar=false", "eval.fid_every_steps=4", "eval.fid_num_samples=40",
                "eval.variance_every_steps=4", "estimator.K=2", "estimator.proposal=adaptive",
                "estimator.adaptive_warmup=1", "estimator.adaptive_refresh_every=1",
                "logging.proposal_plot_every_steps=4", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_fit_logs_fid_variance_and_samples_to_csv_and_wandb(run_with_eval):
    run_dir = run_with_eval
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [4, 8]
    for r in rows:
        for key in ("fid/ema", "fid/raw_generator", "variance/estimator", "variance/baseline_equal_compute",
                    "variance/ratio", "carv/K", "carv/x_sigma_w2"):
            assert r[key] not in ("", None), key
        assert float(r["fid/ema"]) > 0 and float(r["fid/num_samples"]) == 40
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == ["proposal_step_0000004.png",
                                                                          "proposal_step_0000008.png"]
    # the offline W&B run holds the same scalars and the images
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    blob = b"".join(p.read_bytes() for p in wandb_run.glob("run-*.wandb"))
    for key in (b"fid/ema", b"variance/ratio", b"loss/generator_dm", b"carv/K"):
        assert key in blob, key
    images = list(wandb_run.glob("files/media/images/**/*.png"))
    assert any(p.parent.name == "samples" for p in images) and any("proposal" in p.name for p in images)


def test_distill_fid_over_a_folder_writes_rows_and_skips_them_next_time(run_with_eval, ref_stats):
    ckpt_dir = run_with_eval / "checkpoints"
    r = run_cli("fid", str(ckpt_dir), "--ref", str(ref_stats), "--num-samples", "50", "--no-wandb", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(ckpt_dir / "fid_results.csv")))
    assert [(r["step"], r["model"], r["samples"]) for r in rows] == [("4", "ema-1step", "50"), ("8", "ema-1step", "50")]
    assert all(float(r["fid"]) > 0 and r["extractor"].startswith("digits-cnn:") for r in rows)
    r = run_cli("fid", str(ckpt_dir), "--ref", str(ref_stats), "--num-samples", "50", "--no-wandb", timeout=300)
    assert r.returncode == 0 and r.stdout.count("skipping") == 2
    assert len(list(csv.DictReader(open(ckpt_dir / "fid_results.csv")))) == 2
    # the teacher on the same protocol, as its own row
    out = run_with_eval / "teacher.json"
    r = run_cli("fid", str(ckpt_dir), "--ref", str(ref_stats), "--num-samples", "50", "--teacher-steps", "4",
                "--json", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text())[0]["model"] == "teacher-4step"


def test_fid_refuses_statistics_of_another_extractor(run_with_eval, tmp_path):
    bad = tmp_path / "raw.npz"
    np.savez(bad, mu=np.zeros(64), sigma=np.eye(64), n=10, extractor_id="raw-64")
    r = run_cli("fid", str(run_with_eval / "checkpoints" / "last.ckpt"), "--ref", str(bad), "--num-samples", "20",
                "--no-wandb", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "raw-64" in r.stderr and "digits-cnn:" in r.stderr


def test_fid_with_missing_inception_weights_is_a_clear_error(run_with_eval, ref_stats, monkeypatch):
    monkeypatch.delenv("DISTILL_INCEPTION_WEIGHTS", raising=False)
    r = run_cli("fid", str(run_with_eval / "checkpoints" / "last.ckpt"), "--ref", str(ref_stats), "--features",
                "inception", "--no-wandb", timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "inception" in r.stderr.lower()


def test_callbacks_observe_and_never_change_training(tmp_path):
    """Same seed, same final weights with every callback on (FID, variance, samples, proposal plots) or off."""
    import torch

    common = ["fit", "--config", "configs/gmm.yaml", "trainer.max_steps=60", "trainer.checkpoint_every_steps=60",
              "logging.progress_bar=false", "estimator.K=4", "estimator.proposal=adaptive",
              "estimator.adaptive_warmup=2", "estimator.adaptive_refresh_every=2", "optim.ttur=2"]
    on = run_cli(*common, f"run.dir={tmp_path / 'on'}", "eval.fid_every_steps=20", "eval.fid_num_samples=200",
                 "eval.variance_every_steps=10", "logging.samples_every_steps=20",
                 "logging.proposal_plot_every_steps=20", "logging.wandb=offline", timeout=300)
    off = run_cli(*common, f"run.dir={tmp_path / 'off'}", "eval.fid_every_steps=0", "eval.variance_every_steps=0",
                  "logging.samples_every_steps=0", "logging.proposal_plot_every_steps=0", "logging.wandb=disabled",
                  timeout=300)
    assert on.returncode == 0 and off.returncode == 0, (on.stderr[-2000:], off.stderr[-2000:])
    a = torch.load(tmp_path / "on" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "off" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert torch.equal(a["distill"]["sampler"]["q"], b["distill"]["sampler"]["q"])
    rows = list(csv.DictReader(open(tmp_path / "on" / "metrics.csv")))
    assert any(r.get("fid/ema") for r in rows) and any(r.get("variance/ratio") for r in rows)


def test_fid_split_across_two_processes_equals_one_process(run_with_eval, ref_stats, tmp_path):
    """torchrun with 2 CPU processes (gloo): each generates its share, the statistics are all-reduced; the same
    samples (noise seeded by sample index, labels by global index) give the same FID."""
    import shutil
    import sys

    ckpt = run_with_eval / "checkpoints" / "step=0000008.ckpt"
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        d.mkdir()
        shutil.copy(ckpt, d / ckpt.name)
    r = run_cli("fid", str(one / ckpt.name), "--ref", str(ref_stats), "--num-samples", "61", "--json",
                str(tmp_path / "one.json"), "--no-wandb", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import os
    import subprocess

    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "distill",
                         "fid", str(two / ckpt.name), "--ref", str(ref_stats), "--num-samples", "61", "--json",
                         str(tmp_path / "two.json"), "--no-wandb"], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r2.returncode == 0, r2.stderr[-2000:]
    (a,), (b,) = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert a["samples"] == b["samples"] == 61
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-6)
    assert "(2 processes)" in r2.stdout


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def moved_teacher_run(tiny_teacher, digits_shards, tmp_path_factory):
    """A run whose teacher folder was moved after training: (run directory, the stored path, where it is now)."""
    import shutil

    base = tmp_path_factory.mktemp("moved")
    old, new = base / "teacher-old", base / "teacher-new"
    shutil.copytree(tiny_teacher, old)
    run_dir = base / "run"
    r = run_cli("fit", "--config", str(REPO / "configs" / "digits.yaml"), f"run.dir={run_dir}",
                "teacher.path=teacher-old", f"data.path={digits_shards}", "data.batch_size=8", "trainer.max_steps=2",
                "logging.wandb=disabled", "logging.progress_bar=false", "eval.fid_every_steps=0",
                "logging.samples_every_steps=0",
                cwd=base, timeout=600)  # a relative teacher.path, as runs made before absolute paths stored it
    assert r.returncode == 0, r.stderr[-3000:]
    old.rename(new)
    return run_dir, old, new


def test_fid_names_a_missing_teacher_folder_and_takes_teacher(moved_teacher_run, ref_stats):
    run_dir, old, new = moved_teacher_run
    ckpt_dir = run_dir / "checkpoints"
    for extra in ([], ["--teacher-steps", "2"]):
        r = run_cli("fid", str(run_dir), "--ref", str(ref_stats), "--num-samples", "20", "--no-wandb", *extra,
                    timeout=300)
        assert r.returncode == 2
        line = _one_line(r.stderr)
        assert "teacher-old" in line and "does not exist" in line and "--teacher" in line, line
        assert not (ckpt_dir / "fid_results.csv").exists()
    r = run_cli("fid", str(run_dir), "--ref", str(ref_stats), "--num-samples", "20", "--no-wandb", "--teacher",
                str(new / "missing"), timeout=300)
    assert r.returncode == 2 and "--teacher" in _one_line(r.stderr) and "missing" in r.stderr
    r = run_cli("fid", str(run_dir), "--ref", str(ref_stats), "--num-samples", "20", "--no-wandb", "--teacher",
                str(new), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("fid", str(run_dir), "--ref", str(ref_stats), "--num-samples", "20", "--no-wandb", "--teacher",
                str(new), "--teacher-steps", "2", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(ckpt_dir / "fid_results.csv")))
    assert [r["model"] for r in rows] == ["ema-1step", "teacher-2step"]
    assert rows[1]["path"] == str(new)  # the teacher's row names the folder it was evaluated from


def test_features_path_is_used_with_the_runs_digits_features(run_with_eval, digits_shards, tmp_path):
    """--features-path without --features: the run's eval.features is digits, so the file given is the one used."""
    import torch

    saved = torch.load(REPO / "data" / "classifiers" / "digits" / "classifier.pt", weights_only=True)
    first = next(iter(saved["state_dict"]))
    saved["state_dict"][first] = saved["state_dict"][first] * 1.01  # other weights, another extractor id
    other = tmp_path / "classifier.pt"
    torch.save(saved, other)
    ref = tmp_path / "ref.npz"
    r = run_cli("stats", "--data", str(digits_shards), "--features-path", str(other), "--out", str(ref),
                "--max-samples", "200", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "rows.json"
    r = run_cli("fid", str(run_with_eval / "checkpoints" / "last.ckpt"), "--ref", str(ref), "--num-samples", "20",
                "--features-path", str(other), "--json", str(out), "--no-wandb", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with np.load(ref) as f:
        assert json.loads(out.read_text())[0]["extractor"] == str(f["extractor_id"]) != "digits-cnn:e93ff327ea53"


def test_bench_with_a_digits_checkpoint_and_the_gmm_config_is_one_line(run_with_eval):
    ckpt = run_with_eval / "checkpoints" / "last.ckpt"
    r = run_cli("bench", "variance", "--config", "configs/gmm.yaml", "--ckpt", str(ckpt), timeout=300)
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert "other networks" in line and str(ckpt) in line and len(line) < 400


@pytest.mark.parametrize("features, flag", [("inception", "--features-path"), ("raw", "--features-path"),
                                            ("digits", "--inception-weights"), ("raw", "--inception-weights")])
def test_stats_refuses_a_weights_flag_its_extractor_does_not_use(digits_shards, tmp_path, capsys, features, flag):
    """`distill stats --features inception --features-path F` used to ignore F silently (and so made statistics
    with weights the user did not ask for): refused in one line naming the flag, nothing written."""
    from distill.cli import main

    out = tmp_path / "ref.npz"
    code = main(["stats", "--data", str(digits_shards), "--out", str(out), "--features", features, flag, "w.pt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("distill stats: error: ") and flag in err[0] and f"features are {features}" in err[0]
    assert not out.exists()


def test_a_checkpoint_loads_after_its_data_folder_is_gone(run_with_eval, tmp_path):
    """Evaluation reads no shards, so a run whose data folder was deleted (or lives on another cluster) still
    loads; before, a placeholder data.path had to be slipped in for the config to validate."""
    import torch

    from distill.evaluate import load_checkpoint_module

    state = torch.load(run_with_eval / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    gone = tmp_path / "shards-gone"
    text = state["distill"]["config"]
    assert "data:\n  path: " in text
    lines = [f"  path: {gone}" if i > 0 and text.splitlines()[i - 1] == "data:" else line
             for i, line in enumerate(text.splitlines())]
    state["distill"]["config"] = "\n".join(lines) + "\n"
    ckpt = tmp_path / "run" / "checkpoints" / "step=0000008.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(state, ckpt)
    module, step = load_checkpoint_module(ckpt)
    assert step == 8 and module.cfg.data.path == str(gone) and not gone.exists()
