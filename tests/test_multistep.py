"""DMD2's full recipe in the module (DMD2 §4.2, §4.4): multi-step students trained by backward simulation, and the
GAN term on the fake score's bottleneck. Backward simulation against the exact mixture teacher and inside a real
fit, the step index shared by the ranks, the upstream cost per step count, exact resume with both on, the metrics,
and the configs that must stop before any work."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import REPO

GMM = str(REPO / "configs" / "gmm.yaml")
DIGITS = str(REPO / "configs" / "digits.yaml")
FOUR = "generator.timesteps=[999,749,499,249]"
QUIET = ["logging.progress_bar=false", "logging.wandb=disabled", "eval.fid_every_steps=0",
         "eval.variance_every_steps=0", "logging.proposal_plot_every_steps=0", "logging.samples_every_steps=0"]


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_backward_simulation_on_the_exact_mixture_teacher():
    """With the exact mixture denoiser as the student's network, step 0's input is the pure noise z (a VP schedule
    at the first timestep) and step k's input is the closed-form posterior mean of step k-1 re-noised to t_k:
    alpha_{t_k} E[x0 | x_{k-1}] + sigma_{t_k} eps_k, with alpha, sigma from the DDPM scheduler's alphas_cumprod."""
    from diffusers import DDPMScheduler

    from distill.config import FitConfig, load_config
    from distill.module import gmm_teacher
    from distill.teachers import Generator

    cfg = load_config(FitConfig, GMM, [])
    exact = gmm_teacher(cfg)
    ts = [999, 749, 499, 249]
    gen = Generator(exact, ts)
    abar = DDPMScheduler(num_train_timesteps=cfg.teacher.num_timesteps).alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 2, generator=g)
    noise = torch.randn(64, 3, 2, generator=g)
    assert torch.equal(gen.input_of_step(z, 0, None, noise), z)
    x = z.double()
    for k in range(1, 4):
        x0 = exact.mixture.posterior_mean(x, *_coefficients(abar, ts[k - 1], 64))
        x = abar[ts[k]].sqrt() * x0 + (1 - abar[ts[k]]).sqrt() * noise[:, k - 1].double()
        torch.testing.assert_close(gen.input_of_step(z, k, None, noise).double(), x, rtol=1e-5, atol=1e-5)
    # the sample is the last step's x0, and the noise really enters: other draws, another sample
    out = gen(z, None, noise=noise)
    torch.testing.assert_close(out.double(), exact.mixture.posterior_mean(x, *_coefficients(abar, 249, 64)),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, gen(z, None, noise=torch.randn(64, 3, 2, generator=g)))


def _coefficients(abar: torch.Tensor, t: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) as (n, 1) columns, as the mixture's closed forms take them."""
    return abar[t].sqrt().expand(n, 1), (1 - abar[t]).sqrt().expand(n, 1)


def test_a_generator_refuses_timesteps_outside_the_teacher_or_out_of_order():
    from distill.config import FitConfig, load_config
    from distill.errors import ConfigError
    from distill.module import gmm_teacher
    from distill.teachers import Generator

    exact = gmm_teacher(load_config(FitConfig, GMM, []))
    for bad in ([1000, 500], [500, 700], [500, 500]):
        with pytest.raises(ConfigError, match="generator.timesteps"):
            Generator(exact, bad)
    assert Generator(exact, None).timesteps == (999,) and Generator(exact, 500).timesteps == (500,)


def test_a_fit_trains_each_student_step_on_its_backward_simulated_input(tmp_path, monkeypatch):
    """In a real fit (a 3-step student on the mixture teacher), every training step runs steps 0 .. k-1 of the
    training generator without grad and step k with grad; step 0's input is the step's z and step j's input is step
    j-1's output re-noised to t_j with the step's own draws (recomputed here from (seed, rank, step)); every k is
    trained."""
    from distill.cli import main
    from distill.teachers import Generator

    import distill.module as module_mod

    calls: list[tuple] = []
    built: list = []
    in_step = [False]  # record inside training_step only (not the cost measurement, samples or evaluation)
    original_step, original_training_step = Generator.step, module_mod.DMDModule.training_step

    def spy(self, x, k, cond=None):
        out = original_step(self, x, k, cond)
        if in_step[0] and self is built[0].generator:
            calls.append((built[0].step, k, torch.is_grad_enabled(), x.detach().clone(), out.detach().clone()))
        return out

    def training_step(self, batch, batch_idx):
        built[:1] = [self]
        in_step[0] = True
        try:
            return original_training_step(self, batch, batch_idx)
        finally:
            in_step[0] = False

    monkeypatch.setattr(Generator, "step", spy)
    monkeypatch.setattr(module_mod.DMDModule, "training_step", training_step)
    ts = [999, 499, 249]
    assert main(["fit", "--config", GMM, f"run.dir={tmp_path / 'run'}", *QUIET, "trainer.max_steps=12",
                 "optim.ttur=1", "data.batch_size=16", f"generator.timesteps=[{','.join(map(str, ts))}]"]) == 0
    module = built[0]
    schedule = module.generator.denoiser.schedule
    by_step: dict[int, list[tuple]] = {}
    for step, k, grad, x, out in calls:
        by_step.setdefault(step, []).append((k, grad, x, out))
    seen = set()
    for step in range(12):
        seq = by_step[step]
        k = seq[-1][0]
        seen.add(k)
        assert [c[0] for c in seq] == list(range(k + 1)) and [c[1] for c in seq] == [False] * k + [True]
        module.step = step  # recompute the step's draws: z, then the re-noising noise, from (seed, rank, step)
        rng = module._step_generator()
        z = torch.randn((16, 2), generator=rng)
        assert torch.equal(seq[0][2], z)
        if k:
            noise = torch.randn((16, k, 2), generator=rng)
            for j in range(1, k + 1):
                t = torch.full((16,), ts[j], dtype=torch.long)
                a, s = schedule.coefficients(t, z)
                torch.testing.assert_close(seq[j][2], a * seq[j - 1][3] + s * noise[:, j - 1])
    assert seen == {0, 1, 2}
    rows = _rows(tmp_path / "run")
    assert all(r["train/student_step"] != "" for r in rows)


def test_every_rank_trains_the_same_student_step_and_draws_its_own_noise(monkeypatch):
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    module = DMDModule(load_config(FitConfig, GMM, [FOUR]))
    ks, zs = {}, {}
    for rank in (0, 1):
        monkeypatch.setattr(DMDModule, "global_rank", property(lambda self, r=rank: r))
        ks[rank], zs[rank] = [], []
        for step in range(40):
            module.step = step
            ks[rank].append(module.student_step())
            zs[rank].append(torch.randn(3, generator=module._step_generator()))
    assert ks[0] == ks[1] and set(ks[0]) == {0, 1, 2, 3}
    assert not any(torch.equal(a, b) for a, b in zip(zs[0], zs[1]))
    one = DMDModule(load_config(FitConfig, GMM, []))
    assert {one.student_step() for one.step in range(10)} == {0}


def test_the_upstream_cost_counts_backward_simulation(tiny_teacher, digits_shards):
    """c_u (FLOPs per sample) of an S-step student = c_u of one step + the mean number of no-grad steps, (S-1)/2,
    times the FLOPs of one generator forward, counted independently here."""
    from distill.carv.measure import count_flops
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    common = [f"teacher.path={tiny_teacher}", f"data.path={digits_shards}"]
    one = DMDModule(load_config(FitConfig, DIGITS, common))
    four = DMDModule(load_config(FitConfig, DIGITS, [*common, FOUR, "generator.t_init=null"]))
    N = 4
    labels = torch.zeros(N, dtype=torch.long)
    c1 = one.measure_costs(N, labels)["upstream_flops"]
    c4 = four.measure_costs(N, labels)["upstream_flops"]
    z = torch.zeros(N, 1, 8, 8)
    with torch.no_grad():
        forward = count_flops(lambda: four.generator.step(z, 0, labels)) / N
    assert forward > 0
    assert c4 == pytest.approx(c1 + 1.5 * forward, rel=1e-9)


def _gan_args(run_dir: Path, tiny_teacher, digits_shards, *extra) -> list[str]:
    return ["fit", "--config", DIGITS, f"run.dir={run_dir}", f"teacher.path={tiny_teacher}",
            f"data.path={digits_shards}", *QUIET, "data.batch_size=4", "optim.ttur=2", "estimator.K=2",
            "trainer.log_every_steps=1", "trainer.checkpoint_every_steps=2", "gan.weight_generator=3e-3",
            "gan.weight_discriminator=1e-2", "generator.t_init=null", "generator.timesteps=[999,499]", *extra]


@pytest.mark.slow
def test_gan_and_multistep_resume_bit_identical_and_log_their_metrics(tiny_teacher, digits_shards, tmp_path):
    """3 steps in one go against 2 steps then the same command with max_steps 3, GAN term and a 2-step student on:
    generator, EMA, fake score, GAN head and both optimisers' states equal bit for bit (real batches, like noise,
    are a function of (seed, rank, step)); the head is in the checkpoint, trained, and its metrics are logged."""
    from distill.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_gan_args(one, tiny_teacher, digits_shards, "trainer.max_steps=3")) == 0
    assert main(_gan_args(two, tiny_teacher, digits_shards, "trainer.max_steps=2")) == 0
    assert main(_gan_args(two, tiny_teacher, digits_shards, "trainer.max_steps=3")) == 0
    a, b = _load(one / "checkpoints" / "last.ckpt"), _load(two / "checkpoints" / "last.ckpt")
    assert a["distill"]["step"] == b["distill"]["step"] == 3
    head = [k for k in a["state_dict"] if k.startswith("gan_head.")]
    assert head and a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):
        for (i, sa), (_, sb) in zip(sorted(oa["state"].items()), sorted(ob["state"].items())):
            for key in sa:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (i, key)
    # the head trains: it moved from its initialisation, and the fake score's optimiser holds its parameters
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    fresh = DMDModule(load_config(FitConfig, DIGITS, _gan_args(one, tiny_teacher, digits_shards)[3:]))
    assert any(not torch.equal(fresh.state_dict()[k], a["state_dict"][k]) for k in head)
    n_fake, n_score = len(fresh.discriminator_params()), len(fresh.trained(fresh.fake_score))
    state = a["optimizer_states"][1]["state"]
    assert len(state) == n_fake > n_score
    # the discriminator loss reached the head: Adam's first moments of its parameters (the last ones of the fake
    # score's optimiser) are not zero (AdamW's decoupled weight decay alone would move the weights, not the moments)
    assert all(state[i]["exp_avg"].abs().sum() > 0 for i in range(n_score, n_fake))
    rows = _rows(one)
    for key in ("loss/gan_generator", "loss/gan_discriminator", "gan/accuracy_real", "gan/accuracy_fake",
                "loss/generator_dm", "loss/fake_score", "train/student_step"):
        assert any(r.get(key) not in (None, "") for r in rows), key
    for r in rows:
        if r.get("gan/accuracy_real"):
            assert 0.0 <= float(r["gan/accuracy_real"]) <= 1.0 and float(r["loss/gan_discriminator"]) > 0


def test_the_gan_term_changes_the_generator_update(tiny_teacher, digits_shards, monkeypatch):
    """The generator's loss with the GAN term on is loss_dm + weight_generator * softplus(-f(G(z))).mean(): one
    generator update with the GAN weights on differs from one without, by the GAN loss's gradient."""
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    common = [f"teacher.path={tiny_teacher}", f"data.path={digits_shards}", "data.batch_size=4"]
    on = DMDModule(load_config(FitConfig, DIGITS, [*common, "gan.weight_generator=1.0",
                                                   "gan.weight_discriminator=1.0"]))
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    labels = torch.arange(4)
    from distill.conditions import Condition
    from distill.losses import gan_generator_loss

    f = on._gan_logits(x, Condition(labels=labels), salt=4)
    assert f.shape == (4,) and f.requires_grad
    (grad,) = torch.autograd.grad(gan_generator_loss(f).mean(), x)
    assert grad.abs().sum() > 0  # the GAN loss reaches the generator's output through the fake score and head


@pytest.mark.parametrize("extra, key", [
    (["generator.timesteps=[499,749]"], "generator.timesteps"),
    (["generator.timesteps=[1500,500]"], "generator.timesteps"),
    (["generator.timesteps=[999,499]", "generator.t_init=500"], "generator.t_init"),
    (["gan.weight_generator=1e-3"], "gan.weight_discriminator"),
    (["gan.weight_generator=-1", "gan.weight_discriminator=1e-2"], "gan.weight_generator"),
    (["fake_score.lora_rank=4"], "fake_score.lora_rank"),  # a UNet2DModel has no peft adapters (found with the GAN)
])
def test_bad_multistep_and_gan_configs_stop_before_work_with_one_line(extra, key, tiny_teacher, digits_shards,
                                                                      tmp_path, capsys):
    from distill.cli import main

    run = tmp_path / "run"
    code = main(["fit", "--config", DIGITS, f"run.dir={run}", f"teacher.path={tiny_teacher}",
                 f"data.path={digits_shards}", *QUIET, *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and key in err, err
    assert not run.exists()


def test_gan_on_the_mixture_teacher_or_without_real_latents_stops_before_work(tiny_pipelines, digit_prompt_shards,
                                                                              tmp_path, capsys):
    from distill.cli import main

    code = main(["fit", "--config", GMM, f"run.dir={tmp_path / 'gmm'}", *QUIET, "gan.weight_generator=1e-3",
                 "gan.weight_discriminator=1e-2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "gan.weight_generator" in err and "bottleneck" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "gmm").exists()
    code = main(["fit", "--config", str(REPO / "configs" / "t2i-digits.yaml"), f"run.dir={tmp_path / 't2i'}",
                 f"teacher.path={tiny_pipelines['sd15']}", f"data.path={digit_prompt_shards}", *QUIET,
                 "gan.weight_generator=1e-3", "gan.weight_discriminator=1e-2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "gan.data" in err and "distill data latents" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "t2i").exists()


@pytest.fixture(scope="module")
def digit_latents(tiny_pipelines, tmp_path_factory) -> Path:
    """Real latents for the GAN term of the tiny SD 1.x pipeline: 16 px digits captioned `a handwritten <digit>`,
    written as caption shards and encoded once by the pipeline's VAE (`distill data latents`)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from distill.data import write_caption_shards, write_latent_shards
    from distill.metrics import DIGIT_WORDS

    base = tmp_path_factory.mktemp("digit_latents")
    src = base / "src"
    src.mkdir()
    digits = load_digits()
    for i in range(40):
        pixels = np.kron(digits.images[i] / 16.0 * 255.0, np.ones((2, 2))).astype(np.uint8)  # 8 -> 16 px
        Image.fromarray(pixels, "L").save(src / f"d{i:03d}.png")
        (src / f"d{i:03d}.txt").write_text(f"a handwritten {DIGIT_WORDS[digits.target[i]]}\n")
    write_caption_shards(src, base / "captions", channels=1, val_fraction=0.1, seed=0, shard_size=16)
    write_latent_shards(tiny_pipelines["sd15"], base / "captions", base / "latents", batch_size=16)
    return base / "latents"


@pytest.mark.slow
def test_a_text_teacher_trains_with_the_gan_on_real_latents_and_a_two_step_student(tiny_pipelines,
                                                                                   digit_prompt_shards,
                                                                                   digit_latents, tmp_path, capsys):
    """The text-to-image wiring of both parts: real latents with their captions through the frozen text encoder,
    a 2-step student, the GAN metrics logged; latents of another VAE are refused in one line before any work."""
    from distill.cli import main

    args = ["fit", "--config", str(REPO / "configs" / "t2i-digits.yaml"), f"teacher.path={tiny_pipelines['sd15']}",
            f"data.path={digit_prompt_shards}", *QUIET, "data.batch_size=4", "optim.ttur=1", "estimator.K=1",
            "trainer.max_steps=2", "trainer.log_every_steps=1", "gan.weight_generator=5e-3",
            "gan.weight_discriminator=1e-2", "generator.timesteps=[999,499]"]
    run = tmp_path / "run"
    assert main([*args, f"run.dir={run}", f"gan.data={digit_latents}"]) == 0
    rows = _rows(run)
    assert all(r["loss/gan_discriminator"] and r["gan/accuracy_fake"] for r in rows)
    assert {r["train/student_step"] for r in rows} <= {"0.0", "1.0"}
    ckpt = _load(run / "checkpoints" / "last.ckpt")
    assert any(k.startswith("gan_head.") for k in ckpt["state_dict"])
    # latents from another VAE are refused before any work
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(digit_latents, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["scaling_factor"] = meta["scaling_factor"] * 2
    (other / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main([*args, f"run.dir={tmp_path / 'bad'}", f"gan.data={other}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "gan.data" in err and "scaling_factor" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_two_process_ddp_fit_with_gan_and_a_two_step_student(tiny_teacher, digits_shards, tmp_path, monkeypatch):
    """Two CPU processes (DDP over gloo), GAN term and a 2-step student: every generator step checks that the ranks
    hold the same proposal, K and student step (`carv/ranks_agree`, which stops the run on a disagreement), and the
    run ends cleanly with the head in its checkpoint."""
    from conftest import run_cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "ddp"
    args = _gan_args(run, tiny_teacher, digits_shards, "trainer.devices=2", "trainer.accelerator=cpu",
                     "estimator.auto_every=1", "optim.ttur=1", "trainer.max_steps=4")
    r = run_cli(*args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(run)
    assert [float(r["carv/ranks_agree"]) for r in rows] == [1.0] * 4
    assert {r["train/student_step"] for r in rows} == {"0.0", "1.0"}  # both steps trained (seed 0 draws both)
    assert any(k.startswith("gan_head.") for k in _load(run / "checkpoints" / "last.ckpt")["state_dict"])
