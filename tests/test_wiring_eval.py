"""Wiring around the DMD step (issue 11): the in-loop FID is the number `distill fid` gives, the teacher call uses the
guided prediction when `teacher.guidance_scale` is set, an EDM teacher is loaded with its preconditioning and trains,
a run resumed on the UNet path ends bit-identical to the uninterrupted one, and the Trainer writes checkpoints
through distill's atomic checkpoint IO. Each test checks what a one-line slip in the wiring would change."""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path

import pytest
import torch

from conftest import REPO

DIGITS = str(REPO / "configs" / "digits.yaml")
GMM = str(REPO / "configs" / "gmm.yaml")
QUIET = ["logging.progress_bar=false", "logging.proposal_plot_every_steps=0", "eval.variance_every_steps=0",
         "logging.wandb=disabled", "logging.samples_every_steps=0"]


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _unet_fit_args(run_dir: Path, teacher: Path, shards: Path, *extra: str) -> list[str]:
    """`distill fit` on the digits config with a tiny UNet teacher: batch 8, two time scales of 2."""
    return ["fit", "--config", DIGITS, f"run.dir={run_dir}", f"teacher.path={teacher}", f"data.path={shards}",
            *QUIET, "data.batch_size=8", "optim.ttur=2", "eval.fid_every_steps=0", *extra]


# --------------------------------------------------------------------------------------------------------------
# 1. The in-loop FID is `distill fid`'s number; 2. classifier-free guidance reaches the teacher call. One short
# guided run serves both (the FID evaluates the one-step generator, which guidance does not enter).


@pytest.fixture(scope="module")
def guided_run(tiny_teacher, digits_shards, tmp_path_factory) -> Path:
    """`distill fit`, 2 steps on the tiny UNet teacher with teacher.guidance_scale = 3, trainer.seed = 1, and the
    FID monitor at step 2 with its defaults (1000 samples, digits features, reference statistics of data.path's
    train split)."""
    from distill.cli import main

    run_dir = tmp_path_factory.mktemp("guided") / "run"
    assert main(_unet_fit_args(run_dir, tiny_teacher, digits_shards, "teacher.guidance_scale=3.0",
                               "trainer.seed=1", "trainer.max_steps=2", "optim.ttur=1", "eval.fid_every_steps=2",
                               "trainer.log_every_steps=2")) == 0
    return run_dir


def test_in_loop_fid_equals_distill_fid_on_the_same_checkpoint(guided_run, digits_shards, tmp_path, capsys):
    """fid/ema that `distill fit` logs at step 2, and `distill fid` on the step-2 checkpoint with its defaults
    (1000 samples, noise seed 0 whatever trainer.seed the run trained with, the run's digits extractor) against
    `distill stats` of the train split the monitor uses as its default reference, are the same number: the W&B
    curve and the evaluation command measure one thing. FIDMonitor goes through torchmetrics (one-pass
    covariance, eigvals of S1 S2, a float32 result), `distill fid` through distill.metrics.frechet_distance
    (float64, eigh): on identical samples they agree to about 1e-8 relative here, so rel 1e-5 is a tight bound.
    A real side that loses the n mu mu^T term of its second-moment sum (distill/callbacks/monitors.py) moves
    fid/ema by thousands; evaluation noise seeded by trainer.seed instead of the protocol's seed by hundreds."""
    from distill.cli import main

    (row,) = _rows(guided_run)
    assert int(row["step"]) == 2 and float(row["fid/num_samples"]) == 1000
    ref, out = tmp_path / "ref.npz", tmp_path / "fid.json"
    assert main(["stats", "--data", str(digits_shards), "--out", str(ref)]) == 0
    assert main(["fid", str(guided_run / "checkpoints" / "last.ckpt"), "--ref", str(ref), "--json", str(out),
                 "--no-wandb"]) == 0
    capsys.readouterr()
    (result,) = json.loads(out.read_text())
    assert result["step"] == 2 and result["samples"] == 1000 and result["seed"] == 0
    assert float(row["fid/ema"]) == pytest.approx(result["fid"], rel=1e-5)


def _x0_from_unet(unet, schedule, x_t, t, labels):
    """An eps-prediction UNet's x0 = (x_t - sigma eps_hat) / alpha, straight from the UNet (docs/method.md §1)."""
    a, s = schedule.coefficients(t, x_t)
    eps = unet(x_t, t, class_labels=labels).sample
    return (x_t - s * eps) / a


def test_guided_training_uses_uncond_plus_s_times_cond_minus_uncond(guided_run):
    """The guided run trained (finite losses); its checkpoint's module evaluates the DMD integrand
    (docs/method.md §3) with mu_real = D_u + 3 (D_c - D_u), checked against the raw UNet called separately with
    the labels and with the null label, and the fake score unguided. K = 2 draws per sample, so labels repeated
    in the wrong order would show too."""
    from distill.evaluate import load_checkpoint_module

    (row,) = _rows(guided_run)
    assert float(row["loss/fake_score"]) > 0 and torch.isfinite(torch.tensor(float(row["loss/generator_dm"])))
    m, _ = load_checkpoint_module(guided_run / "checkpoints" / "last.ckpt")
    assert m.cfg.teacher.guidance_scale == 3.0
    g = torch.Generator().manual_seed(0)
    N, K = 3, 2
    x = torch.randn(N, 1, 8, 8, generator=g)
    labels = torch.tensor([1, 4, 9])
    t = torch.randint(20, 980, (N, K), generator=g)
    eps = torch.randn(N * K, 1, 8, 8, generator=g)
    with torch.no_grad():
        ours = m._integrand(x, labels, t, eps)  # (N, K, 1, 8, 8)
        unet, sched = m.teacher.net.unet, m.teacher.schedule
        for n in range(N):
            for k in range(K):
                tk, lab = t[n, k:k + 1], labels[n:n + 1]
                a, s = sched.coefficients(tk, x[n:n + 1])
                x_t = a * x[n:n + 1] + s * eps[n * K + k:n * K + k + 1]
                cond = _x0_from_unet(unet, sched, x_t, tk, lab)
                uncond = _x0_from_unet(unet, sched, x_t, tk, torch.full_like(lab, 10))
                mu_real = uncond + 3.0 * (cond - uncond)
                mu_fake = m.fake_score(x_t, tk, lab)
                expected = (mu_fake - mu_real) / (x[n:n + 1] - mu_real).abs().mean()
                torch.testing.assert_close(ours[n, k], expected[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# 3. An EDM teacher: loaded with its preconditioning and sigma_data, trained for a few steps.


@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory) -> Path:
    """A random class-conditional UNet2DModel (8x8, eps outputs) beside diffusers' EDMEulerScheduler with a
    sigma_data of 0.8 (not the default 0.5, so that it must be read from the folder)."""
    from diffusers import EDMEulerScheduler

    from distill.teachers import build_unet

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("edm_teacher")
    build_unet((1, 8, 8), 10, [16, 32], 1, False).save_pretrained(out / "unet")
    EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.8, num_train_timesteps=1000,
                      prediction_type="epsilon").save_pretrained(out / "scheduler")
    return out


def test_an_edm_teacher_is_preconditioned_as_diffusers_and_trains(tmp_path, edm_teacher, digits_shards):
    """Karras et al. 2022, Table 1 (docs/method.md §1): D = c_skip x + c_out F(c_in x, c_noise) with the folder's
    sigma_data, equal to diffusers' EDMEulerScheduler preconditioning; the generator starts from sigma_{t_init} z
    (§2); then `distill fit` with that teacher runs 2 steps with finite losses and moves the generator."""
    from diffusers import EDMEulerScheduler

    from distill.cli import main
    from distill.evaluate import load_checkpoint_module
    from distill.teachers import load_diffusers_teacher

    D = load_diffusers_teacher(edm_teacher)
    assert D.schedule.kind == "edm" and D.sigma_data == 0.8 and D.T == 1000
    sched = EDMEulerScheduler.from_pretrained(edm_teacher / "scheduler")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g) * 5
    t = torch.tensor([3, 500, 999])
    labels = torch.tensor([0, 5, 9])
    sigma = D.schedule.sigma[t].float().view(-1, 1, 1, 1)
    assert float(sigma[0]) < 0.01 and float(sigma[-1]) == pytest.approx(80.0)  # index 0: sigma_min, T-1: sigma_max
    with torch.no_grad():
        raw = D.net.unet(sched.precondition_inputs(x, sigma), sched.precondition_noise(sigma.flatten()),
                         class_labels=labels).sample
        torch.testing.assert_close(D(x, t, labels), sched.precondition_outputs(x, raw, sigma), rtol=1e-4, atol=1e-5)

    run_dir = tmp_path / "run"
    assert main(_unet_fit_args(run_dir, edm_teacher, digits_shards, "generator.t_init=null", "trainer.max_steps=2",
                               "optim.ttur=1", "trainer.log_every_steps=1", "optim.lr_generator=1e-3")) == 0
    rows = _rows(run_dir)
    for r in rows:
        for key in ("loss/generator_dm", "loss/fake_score", "grad_norm/generator"):
            assert torch.isfinite(torch.tensor(float(r[key]))), (key, r[key])
    ckpt = _load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["distill"]["step"] == 2 and len(rows) == 2 and "health/nonfinite_steps" not in rows[-1]
    sd = ckpt["state_dict"]
    teacher = load_diffusers_teacher(edm_teacher).state_dict()
    gen = {k[len("generator.denoiser."):]: v for k, v in sd.items() if k.startswith("generator.denoiser.")}
    assert gen.keys() == teacher.keys()
    assert any(not torch.equal(gen[k], teacher[k]) for k in gen)  # the generator was updated from the teacher copy
    m, _ = load_checkpoint_module(run_dir / "checkpoints" / "last.ckpt")
    z = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():  # G(z) = D(sigma_max z, T - 1): pure noise at the scale of the last index
        torch.testing.assert_close(m.ema(z, labels), m.ema.denoiser(80.0 * z, torch.full((3,), 999), labels),
                                   rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# 4. Exact resume on the UNet path.


def _same(a, b) -> bool:
    """Equal bit for bit: tensors, and lists or dicts of them."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _assert_same_checkpoint(a: dict, b: dict) -> None:
    assert a["distill"]["step"] == b["distill"]["step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert _same(a["state_dict"][k], b["state_dict"][k]), k
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) == 2
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        assert _same(oa["state"], ob["state"])  # AdamW moments and step counts
    sa, sb = a["distill"]["sampler"], b["distill"]["sampler"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert _same(sa[key], sb[key]), key
    assert a["distill"]["k_control"] == b["distill"]["k_control"]
    assert a["distill"]["g_steps"] == b["distill"]["g_steps"]


def test_a_resumed_unet_run_ends_bit_identical_to_the_uninterrupted_one(tmp_path, tiny_teacher, digits_shards):
    """4 steps in one go against 2 steps, then the same command with max_steps 4 (it resumes from the step-2
    checkpoint): generator, EMA, fake score, both AdamW states, the adaptive proposal's tables and K are equal bit
    for bit, because every random number of a step is a function of (seed, rank, step) and the checkpoint holds
    the rest."""
    from distill.cli import main

    common = ["estimator.K=2", "estimator.proposal=adaptive", "estimator.adaptive_warmup=1",
              "estimator.adaptive_refresh_every=1", "trainer.checkpoint_every_steps=2", "trainer.log_every_steps=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_unet_fit_args(one, tiny_teacher, digits_shards, *common, "trainer.max_steps=4")) == 0
    assert main(_unet_fit_args(two, tiny_teacher, digits_shards, *common, "trainer.max_steps=2")) == 0
    assert _load(two / "checkpoints" / "last.ckpt")["distill"]["step"] == 2
    assert main(_unet_fit_args(two, tiny_teacher, digits_shards, *common, "trainer.max_steps=4")) == 0
    a, b = _load(one / "checkpoints" / "last.ckpt"), _load(two / "checkpoints" / "last.ckpt")
    assert a["distill"]["step"] == 4
    assert not torch.equal(a["distill"]["sampler"]["q"], a["distill"]["sampler"]["p"])  # the proposal has moved
    _assert_same_checkpoint(a, b)
    assert [r["loss/fake_score"] for r in _rows(one)] == [r["loss/fake_score"] for r in _rows(two)]


# --------------------------------------------------------------------------------------------------------------
# 5. The Trainer writes checkpoints through distill's atomic checkpoint IO.


def test_a_full_disk_in_a_real_run_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    """`distill fit` (mixture teacher) with checkpoints at steps 5 and 10, and the disk full at the second write:
    the Trainer writes through AtomicCheckpointIO (distill/callbacks/checkpoints.py), so the command stops with
    status 2 and one line naming the checkpoint, the step-5 checkpoint stays intact under its name and as
    last.ckpt, no temporary file is left, and the same command then resumes from step 5 and finishes. (Lightning's
    own checkpoint IO would let the OSError escape as a traceback.)"""
    from distill.cli import main

    real_save = torch.save
    writes = []

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "distill" in obj:
            writes.append(obj["distill"]["step"])
            if obj["distill"]["step"] == 10:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    args = ["fit", "--config", GMM, f"run.dir={run_dir}", *QUIET, "eval.fid_every_steps=0", "trainer.max_steps=10",
            "trainer.checkpoint_every_steps=5", "trainer.log_every_steps=5"]
    capsys.readouterr()
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "disk full while writing checkpoint" in err[0] and "step=0000010.ckpt" in err[0], err
    assert writes == [5, 10]
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=0000005.ckpt"]  # no partial file
    assert (ckpts / "last.ckpt").resolve().name == "step=0000005.ckpt"
    assert _load(ckpts / "step=0000005.ckpt")["distill"]["step"] == 5
    monkeypatch.setattr(torch, "save", real_save)
    assert main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert _load(ckpts / "last.ckpt")["distill"]["step"] == 10


def test_a_kill_right_after_a_checkpoint_loses_no_metrics_row(tmp_path, monkeypatch):
    """A run killed right after the checkpoint of step 10 is written (a logging step): the same command resumes
    from step 10, and metrics.csv must hold one row per logged step, 5, 10, 15, whichever of the row and the
    checkpoint the run writes first. The kill is an exception raised once the checkpoint file is in place, which
    leaves the files as a SIGKILL at that moment would."""
    from distill.callbacks import AtomicCheckpointIO, list_checkpoints
    from distill.cli import main

    class Killed(BaseException):
        pass

    real_save = AtomicCheckpointIO.save_checkpoint

    def save_then_die(self, checkpoint, path, storage_options=None):
        real_save(self, checkpoint, path, storage_options)
        if checkpoint["distill"]["step"] == 10:
            raise Killed

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_die)
    run_dir = tmp_path / "run"
    args = ["fit", "--config", GMM, f"run.dir={run_dir}", *QUIET, "eval.fid_every_steps=0", "trainer.max_steps=15",
            "trainer.checkpoint_every_steps=10", "trainer.log_every_steps=5"]
    with pytest.raises(Killed):
        main(args)
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step=0000010.ckpt"]
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", real_save)
    assert main(args) == 0
    assert [int(r["step"]) for r in _rows(run_dir)] == [5, 10, 15]
