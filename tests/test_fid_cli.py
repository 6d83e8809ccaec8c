"""`distill fid` on the mixture: what its results file is keyed on, the old results file, the input it refuses
(one line, nothing written), the W&B run it logs into; `load_stats`' checks of reference statistics; the device
`init_from_env` picks."""

import csv
import hashlib
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from distill.cli import main
from distill.errors import DistillError
from distill.metrics import load_stats, save_stats

OLD_FIELDS = ["path", "step", "model", "fid", "samples", "extractor", "seconds"]  # distill <= this change


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    """A 10-step mixture run with checkpoints at steps 5 and 10 and an offline W&B run."""
    run_dir = tmp_path_factory.mktemp("gmm") / "run"
    r = run_cli("fit", "--config", "configs/gmm.yaml", f"run.dir={run_dir}", "trainer.max_steps=10",
                "trainer.checkpoint_every_steps=5", "logging.wandb=offline", "logging.progress_bar=false",
                "eval.fid_every_steps=0", "logging.samples_every_steps=0", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.fixture
def run(gmm_run, tmp_path):
    """A private copy of the run: each test writes its own fid_results.csv."""
    return shutil.copytree(gmm_run, tmp_path / "run")


def _ref(path, mu, sigma) -> str:
    save_stats(path, {"mu": np.asarray(mu, float), "sigma": np.asarray(sigma, float), "n": 100,
                      "extractor_id": "raw-2"})
    return str(path)


@pytest.fixture
def refs(tmp_path):
    return (_ref(tmp_path / "a.npz", [0.1, -0.2], [[2.0, 0.1], [0.1, 1.5]]),
            _ref(tmp_path / "b.npz", [0.5, 0.2], [[1.0, 0.0], [0.0, 1.5]]))


def fid(capsys, *args) -> tuple[int, str, str]:
    """`distill fid ARGS` in this process (W&B off): (status, stdout, stderr)."""
    capsys.readouterr()
    code = main(["fid", *args, "--no-wandb"])
    out, err = capsys.readouterr()
    return code, out, err


def results(run) -> tuple[list[str], list[dict]]:
    with open(run / "checkpoints" / "fid_results.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# 1. the results file is keyed on everything that changes the number


@pytest.mark.slow
def test_results_are_keyed_on_reference_content_seed_and_protocol(run, refs, capsys, tmp_path):
    ref_a, ref_b = refs
    code, out, _ = fid(capsys, str(run), "--ref", ref_a, "--num-samples", "50")
    assert code == 0 and "skipping" not in out
    header, rows = results(run)
    for column in ("ref", "ref_sha", "seed", "teacher_steps", "guidance"):
        assert column in header, column
    with np.load(ref_a) as f:
        sha = hashlib.sha256(f["mu"].astype(np.float64).tobytes() + f["sigma"].astype(np.float64).tobytes())
    assert [(r["step"], r["ref"], r["ref_sha"], r["seed"]) for r in rows] == [
        ("5", ref_a, sha.hexdigest()[:12], "0"), ("10", ref_a, sha.hexdigest()[:12], "0")]

    # another reference: computed again, not reported as done
    code, out, _ = fid(capsys, str(run), "--ref", ref_b, "--num-samples", "50")
    assert code == 0 and "skipping" not in out
    _, rows = results(run)
    assert len(rows) == 4 and rows[2]["fid"] != rows[0]["fid"] and rows[2]["ref_sha"] != rows[0]["ref_sha"]

    # another seed: computed again
    code, out, _ = fid(capsys, str(run), "--ref", ref_a, "--num-samples", "50", "--seed", "1")
    assert code == 0 and "skipping" not in out
    _, rows = results(run)
    assert [r["seed"] for r in rows] == ["0", "0", "0", "0", "1", "1"]

    # the same statistics under another name: the content decides, so nothing to do
    same = shutil.copy(ref_a, tmp_path / "renamed.npz")
    code, out, _ = fid(capsys, str(run), "--ref", str(same), "--num-samples", "50")
    assert code == 0 and out.count("skipping") == 2
    assert len(results(run)[1]) == 6

    # the teacher: its steps are part of the key, the guidance scale is written
    for steps, skipped in (("2", 0), ("3", 0), ("2", 1)):
        code, out, _ = fid(capsys, str(run), "--ref", ref_a, "--num-samples", "50", "--teacher-steps", steps)
        assert code == 0 and out.count("skipping") == skipped
    teacher = [r for r in results(run)[1] if r["model"].startswith("teacher")]
    assert [(r["model"], r["teacher_steps"], r["guidance"]) for r in teacher] == [
        ("teacher-2step", "2", "1.0"), ("teacher-3step", "3", "1.0")]


@pytest.mark.slow
def test_a_results_file_with_the_old_header_is_rewritten_and_its_rows_never_match(run, refs, capsys):
    ref_a, _ = refs
    ckpt = run / "checkpoints" / "step=0000005.ckpt"
    old = {"path": str(ckpt), "step": "5", "model": "ema-1step", "fid": "123.0", "samples": "50",
           "extractor": "raw-2", "seconds": "0.1"}
    with open(run / "checkpoints" / "fid_results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=OLD_FIELDS)
        w.writeheader()
        w.writerow(old)
    code, out, _ = fid(capsys, str(run), "--ref", ref_a, "--num-samples", "50")
    assert code == 0 and "skipping" not in out  # the old row does not say which reference or seed: computed again
    header, rows = results(run)
    assert header[:len(OLD_FIELDS)] == OLD_FIELDS and "ref_sha" in header and "seed" in header
    assert {k: rows[0][k] for k in OLD_FIELDS} == old
    assert rows[0]["ref_sha"] == rows[0]["seed"] == rows[0]["ref"] == ""
    assert [(r["step"], r["seed"]) for r in rows[1:]] == [("5", "0"), ("10", "0")]
    assert "123.000" in out  # the printed table still shows the old row


# --------------------------------------------------------------------------------------------------------------
# 2, 5, 7. input refused with one line, nothing written


@pytest.mark.slow
@pytest.mark.parametrize("args, named", [
    (["--teacher-steps", "0"], "--teacher-steps 0"),
    (["--teacher-steps", "-3"], "--teacher-steps -3"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--num-samples", "1"], "--num-samples 1"),
    (["--features-path", "data/classifiers/digits/classifier.pt"], "--features-path"),
    (["--inception-weights", "weights.pth"], "--inception-weights"),
    (["--device", "tpu"], "--device"),
])
def test_bad_numbers_and_options_are_refused_in_one_line(run, refs, capsys, args, named):
    code, _, err = fid(capsys, str(run), "--ref", refs[0], "--num-samples", "50", *args)
    assert code == 2
    line = _one_line(err)
    assert line.startswith("distill fid: error: ") and named in line and "expected" in line
    if args[0] in ("--teacher-steps", "--batch-size"):
        assert "expected an integer >= 1" in line
    assert not (run / "checkpoints" / "fid_results.csv").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused(run, refs, capsys):
    code, _, err = fid(capsys, str(run), "--ref", refs[0], "--num-samples", "50", "--device", "cuda")
    assert code == 2
    line = _one_line(err)
    assert "--device cuda" in line and "no CUDA device" in line and "expected cpu or auto" in line
    assert not (run / "checkpoints" / "fid_results.csv").exists()


# --------------------------------------------------------------------------------------------------------------
# 3. reference statistics that no extractor made


@pytest.mark.slow
def test_placeholder_reference_statistics_are_refused_by_the_cli(run, tmp_path):
    placeholder = tmp_path / "edm-style.npz"
    np.savez(placeholder, mu=np.zeros(2), sigma=np.eye(2))  # what a stub or a failed stats job leaves
    r = run_cli("fid", str(run), "--ref", str(placeholder), "--num-samples", "50", "--no-wandb", timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    line = _one_line(r.stderr)
    assert str(placeholder) in line and "placeholder" in line and "expected" in line
    assert not (run / "checkpoints" / "fid_results.csv").exists()


def _check_refused(path, match, **kwargs):
    with pytest.raises(DistillError) as info:
        load_stats(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and "expected" in message and "\n" not in message
    assert match in message, message


def test_load_stats_refuses_placeholders_and_matrices_that_are_no_covariance(tmp_path):
    d = 4
    np.savez(tmp_path / "placeholder.npz", mu=np.zeros(d), sigma=np.eye(d))
    _check_refused(tmp_path / "placeholder.npz", "placeholder")
    _check_refused(tmp_path / "placeholder.npz", "placeholder", expected_extractor_id="raw-4", num_features=d)
    asym = np.eye(d) + np.triu(np.ones((d, d)), 1)
    np.savez(tmp_path / "asym.npz", mu=np.ones(d), sigma=asym)
    _check_refused(tmp_path / "asym.npz", "not symmetric")
    indefinite = np.diag([1.0, 1.0, 1.0, -0.5])
    np.savez(tmp_path / "indefinite.npz", mu=np.ones(d), sigma=indefinite)
    _check_refused(tmp_path / "indefinite.npz", "negative eigenvalue")
    nan = np.eye(d)
    nan[1, 2] = np.nan
    np.savez(tmp_path / "nan.npz", mu=np.ones(d), sigma=nan)
    _check_refused(tmp_path / "nan.npz", "non-finite")
    # an EDM-style placeholder of another dimension: the size check names both sizes
    np.savez(tmp_path / "edm2048.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    _check_refused(tmp_path / "edm2048.npz", "2048 features", expected_extractor_id="digits-cnn:e93ff327ea53",
                   num_features=64)


def test_load_stats_accepts_real_covariances(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)) * 10  # 3 samples in 5-d: singular, round-off eigenvalues of either sign
    save_stats(tmp_path / "singular.npz", {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False), "n": 3,
                                           "extractor_id": "raw-5"})
    assert load_stats(tmp_path / "singular.npz", "raw-5", 5)["n"] == 3
    # a zero mean with a covariance that is not the identity is a real (centred) distribution
    save_stats(tmp_path / "centred.npz", {"mu": np.zeros(2), "sigma": 2.0 * np.eye(2), "n": 10,
                                          "extractor_id": "raw-2"})
    assert load_stats(tmp_path / "centred.npz", "raw-2", 2)["n"] == 10
    # float32 statistics (EDM stores float64, others may not): symmetric up to round-off is symmetric
    sigma = (np.cov(rng.standard_normal((50, 5)), rowvar=False)).astype(np.float32)
    sigma[0, 1] *= 1 + 1e-6
    np.savez(tmp_path / "f32.npz", mu=np.ones(5, np.float32), sigma=sigma)
    load_stats(tmp_path / "f32.npz")


def test_reference_hash_is_of_mu_and_sigma_only(tmp_path):
    a = _ref(tmp_path / "a.npz", [0.1, -0.2], [[2.0, 0.1], [0.1, 1.5]])
    np.savez(tmp_path / "b.npz", mu=np.array([0.1, -0.2]), sigma=np.array([[2.0, 0.1], [0.1, 1.5]]), n=7)
    c = _ref(tmp_path / "c.npz", [0.1, -0.2], [[2.0, 0.1], [0.1, 1.6]])
    sha = load_stats(a)["sha"]
    assert len(sha) == 12 and int(sha, 16) >= 0
    assert load_stats(tmp_path / "b.npz")["sha"] == sha and load_stats(c)["sha"] != sha


# --------------------------------------------------------------------------------------------------------------
# 5. the device under torchrun / srun


@pytest.fixture
def fake_launch(monkeypatch):
    """WORLD_SIZE 2, LOCAL_RANK 1, CUDA visible; records the backend instead of starting a process group."""
    from distill import distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: seen.setdefault("set_device", device))
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: seen.setdefault("backend", backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    return seen


def test_init_from_env_honours_an_explicit_cpu_device(fake_launch):
    from distill.distributed import init_from_env

    assert init_from_env("cpu") == (1, 2, torch.device("cpu"))
    assert fake_launch == {"backend": "gloo"}


def test_init_from_env_auto_takes_the_local_gpu(fake_launch):
    from distill.distributed import init_from_env

    assert init_from_env("auto") == (1, 2, torch.device("cuda:1"))
    assert fake_launch == {"backend": "nccl", "set_device": torch.device("cuda:1")}


# --------------------------------------------------------------------------------------------------------------
# 8. W&B: the run's own W&B run


@pytest.mark.slow
def test_fid_logs_into_the_runs_own_wandb_run(run, refs):
    run_id = (run / "wandb_id.txt").read_text().strip()
    before = sorted((run / "wandb").glob("offline-run-*"))
    assert len(before) == 1 and before[0].name.endswith(f"-{run_id}")
    r = run_cli("fid", str(run), "--ref", refs[0], "--num-samples", "50", timeout=300)  # W&B offline (conftest)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert all(p.name.endswith(f"-{run_id}") for p in runs), runs  # no second run id
    (new,) = set(runs) - set(before)
    blob = b"".join(p.read_bytes() for p in new.glob("run-*.wandb"))
    assert f"run-{run_id}.wandb" in [p.name for p in new.glob("run-*.wandb")]
    for key in (b"fid/ema-1step", b"trainer/global_step", b"fid/results"):
        assert key in blob, key
