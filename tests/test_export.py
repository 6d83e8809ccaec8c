"""`distill export`: the exported folder, reloaded by stock diffusers, samples the student. A UNet2DModel run's
export gives, in one LCMScheduler step, the EMA (or --raw) generator G(z, labels) of the checkpoint; a pipeline
export (SD 1.x and SDXL layouts, epsilon and v-prediction) gives the x0 of the student UNet at T-1 on the
pipeline's own prompt embeddings; a multi-step student (generator.timesteps) sampled by stock diffusers with a
seeded torch.Generator equals distill.teachers.Generator on the same draws; a LoRA generator is merged into a plain
UNet; bad input stops with one line and loses nothing."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO

DIGITS = str(REPO / "configs" / "digits.yaml")
QUIET = ["logging.progress_bar=false", "logging.proposal_plot_every_steps=0", "eval.variance_every_steps=0",
         "logging.wandb=disabled", "logging.samples_every_steps=0", "eval.fid_every_steps=0"]
PROMPT = "a handwritten seven"


def export_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`distill export ARGV` in this process: (status, stdout, stderr). Through distill.cli.main once `export` is
    wired there, else through the same parser and error handling."""
    from distill import cli
    from distill.errors import DistillError
    from distill.export import add_export_parser, cmd_export

    if "export" in cli.COMMANDS:
        code = cli.main(["export", *argv])
    else:
        parser = argparse.ArgumentParser(prog="distill")
        add_export_parser(parser.add_subparsers(dest="command", required=True), argparse.RawDescriptionHelpFormatter)
        args = parser.parse_args(["export", *argv])
        try:
            code = cmd_export(args)
        except DistillError as e:
            print(f"distill export: error: {e}", file=sys.stderr)
            code = 2
    out = capsys.readouterr()
    return code, out.out, out.err


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fake_ckpt(path: Path, teacher: Path | None, unet_state: dict, kind: str = "diffusers", step: int = 3,
               **generator) -> Path:
    """A file shaped like a `distill fit` checkpoint: the EMA generator's UNet weights and the run's config."""
    cfg = {"teacher": {"kind": kind, "path": None if teacher is None else str(teacher)},
           "generator": {"init": "teacher", "t_init": None, **generator}}
    sd = {"ema.denoiser.net.unet." + k: v for k, v in unet_state.items()}
    torch.save({"state_dict": sd, "distill": {"config": yaml.safe_dump(cfg), "step": step}}, path)
    return path


def _perturbed(unet, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in unet.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------
# A UNet2DModel teacher: a 2-step `distill fit`, exported, equals the checkpoint's generator.


@pytest.fixture(scope="module")
def unet_run(tiny_teacher, digits_shards, tmp_path_factory) -> Path:
    """2 steps on the tiny class-conditional UNet teacher (t_init 500, the digits config's), a checkpoint at each
    step, a generator learning rate high enough that the EMA and raw generators differ visibly."""
    from distill.cli import main

    run_dir = tmp_path_factory.mktemp("export") / "run"
    assert main(["fit", "--config", DIGITS, f"run.dir={run_dir}", f"teacher.path={tiny_teacher}",
                 f"data.path={digits_shards}", *QUIET, "data.batch_size=8", "optim.ttur=1", "trainer.max_steps=2",
                 "trainer.checkpoint_every_steps=1", "optim.lr_generator=1e-2"]) == 0
    return run_dir


def _lcm_sample(folder: Path, z: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """What a diffusers user runs on the exported folder (docs/export.md), from noise z (drawn from `generator`,
    which then gives the re-noising draws of a multi-step student)."""
    from diffusers import LCMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet")
    scheduler = LCMScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(timesteps=json.loads((folder / "distill.json").read_text())["timesteps"])
    x = z
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=generator).prev_sample
    return x


def test_a_unet_run_exports_a_folder_whose_one_lcm_step_is_the_generator(unet_run, tiny_teacher, tmp_path):
    """The run directory means its newest checkpoint (step 2 of 1, 2); one LCMScheduler step at distill.json's
    timesteps equals the checkpoint module's EMA generator G(z, labels) (default) or its raw generator (--raw),
    which differ from each other far beyond the tolerance."""
    from distill.evaluate import load_checkpoint_module
    from distill.export import export

    info = export(unet_run, tmp_path / "ema", progress=False)
    assert info["step"] == 2 and info["checkpoint"].endswith("step=0000002.ckpt") and info["weights"] == "ema"
    assert info["timesteps"] == [500] and info["prediction_type"] == "epsilon" and info["num_classes"] == 10
    assert info["teacher"] == str(tiny_teacher.resolve()) and info["pipeline"] == "UNet2DModel"
    assert json.loads((tmp_path / "ema" / "distill.json").read_text()) == info
    assert sorted(p.name for p in (tmp_path / "ema").iterdir()) == ["distill.json", "scheduler", "unet"]
    assert not list(tmp_path.glob("*.tmp-*"))
    export(unet_run, tmp_path / "raw", raw=True, progress=False)

    module, step = load_checkpoint_module(unet_run / "checkpoints" / "step=0000002.ckpt")
    assert step == 2
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 3, 5, 7, 9, 1])
    with torch.no_grad():
        G_ema, G_raw = module.ema(z, labels), module.generator(z, labels)
    assert (G_ema - G_raw).abs().max() > 1e-3
    torch.testing.assert_close(_lcm_sample(tmp_path / "ema", z, labels), G_ema, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(_lcm_sample(tmp_path / "raw", z, labels), G_raw, rtol=1e-6, atol=1e-5)


def _student(teacher: Path, seed: int):
    """The teacher as `distill fit` loads it, its UNet's weights perturbed: the denoiser of a trained student."""
    from distill.teachers import load_teacher

    loaded = load_teacher(teacher)
    unet = loaded.denoiser.net.unet.eval()
    unet.load_state_dict(_perturbed(unet, seed))
    return loaded


def _draws(generator: torch.Generator, shape: tuple[int, ...], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws of LCM sampling from one torch.Generator, in its order: the initial noise z, then one randn of the
    sample's shape before each step after the first (LCMScheduler.step re-noises at every step but the last); as
    distill.teachers.Generator takes them: z (N, *shape[1:]), noise (N, steps - 1, *shape[1:])."""
    z = torch.randn(shape, generator=generator)
    noise = [torch.randn(shape, generator=generator) for _ in range(steps - 1)]
    return z, torch.stack(noise, dim=1)


def _assert_the_student(got, denoiser, ts, z, cond, noise) -> None:
    """`got` (an exported sampler's output) equals `Generator(denoiser, ts)` on the same draws, within float32
    round-off of the x0 conversions (measured: <= 1e-6 of the output scale); and the check has power: the draws in
    another order, or one step fewer, are more than 100 tolerances away."""
    from distill.teachers import Generator

    with torch.no_grad():
        student = Generator(denoiser, ts)
        want = student(z, cond, noise=noise)
        other_order = student(z, cond, noise=noise.flip(1))
        three_steps = Generator(denoiser, ts[:-1])(z, cond, noise=noise[:, :-1])
    tol = 1e-5 * want.abs().max().item()
    assert (want - other_order).abs().max() > 100 * tol and (want - three_steps).abs().max() > 100 * tol
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


def test_a_multi_step_unet_export_samples_the_students_steps_with_the_documented_loop(tiny_teacher, tmp_path):
    """generator.timesteps [900, 600, 300, 50] (not starting at T-1, uneven, one small): the documented
    LCMScheduler loop, with z and the re-noising noise drawn from one seeded torch.Generator, equals
    distill.teachers.Generator on the checkpoint's weights with the same draws; c_skip <= 1e-8 at every timestep
    (at 50: timestep_scaling 100). Each step and the order of the draws matter (far beyond the tolerance)."""
    from diffusers import LCMScheduler

    from distill.export import export

    ts = [900, 600, 300, 50]
    loaded = _student(tiny_teacher, seed=7)
    ckpt = _fake_ckpt(tmp_path / "four.ckpt", tiny_teacher, loaded.denoiser.net.unet.state_dict(), timesteps=ts)
    out = tmp_path / "student"
    info = export(ckpt, out, progress=False)
    assert info["timesteps"] == ts and json.loads((out / "distill.json").read_text())["timesteps"] == ts
    assert info["lcm_c_skip"] == pytest.approx(1e-8, rel=1e-6)  # at 50, the smallest timestep: the binding one
    scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    for t in ts:
        assert scheduler.get_scalings_for_boundary_condition_discrete(t)[0] <= 1e-8 * (1 + 1e-6), t

    labels = torch.tensor([0, 3, 5, 7, 9, 1])
    g = torch.Generator().manual_seed(8)
    z = torch.randn(6, 1, 8, 8, generator=g)
    got = _lcm_sample(out, z, labels, generator=g)
    z2, noise = _draws(torch.Generator().manual_seed(8), (6, 1, 8, 8), len(ts))
    assert torch.equal(z, z2)
    _assert_the_student(got, loaded.denoiser, ts, z, labels, noise)


def test_a_multi_step_run_exports_the_checkpoints_generator(tiny_teacher, digits_shards, tmp_path):
    """A one-step `distill fit` with generator.timesteps=[500,250] (the config as fit writes it into the checkpoint):
    distill.json holds the list, and the documented loop on the export equals the checkpoint module's EMA generator
    with the same draws."""
    from distill.cli import main
    from distill.evaluate import load_checkpoint_module
    from distill.export import export

    run_dir = tmp_path / "run"
    assert main(["fit", "--config", DIGITS, f"run.dir={run_dir}", f"teacher.path={tiny_teacher}",
                 f"data.path={digits_shards}", *QUIET, "data.batch_size=8", "optim.ttur=1", "trainer.max_steps=1",
                 "generator.timesteps=[500,250]"]) == 0
    info = export(run_dir, tmp_path / "student", progress=False)
    assert info["timesteps"] == [500, 250] and info["step"] == 1

    module, _ = load_checkpoint_module(run_dir / "checkpoints" / "step=0000001.ckpt")
    labels = torch.tensor([2, 4, 6, 8])
    g = torch.Generator().manual_seed(9)
    z = torch.randn(4, 1, 8, 8, generator=g)
    got = _lcm_sample(tmp_path / "student", z, labels, generator=g)
    _, noise = _draws(torch.Generator().manual_seed(9), (4, 1, 8, 8), 2)
    with torch.no_grad():
        want = module.ema(z, labels, noise=noise)
        one_step = module.ema.step(z, 0, labels)
    tol = 1e-5 * want.abs().max().item()
    assert (want - one_step).abs().max() > 100 * tol
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


# --------------------------------------------------------------------------------------------------------------
# Pipeline teachers: stock StableDiffusion(XL)Pipeline on the exported folder gives the student's x0.


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Tiny pipelines, built once per (layout, prediction type)."""
    from tiny_pipelines import build_pipeline

    made = {}

    def get(kind: str, prediction_type: str = "epsilon") -> Path:
        if (kind, prediction_type) not in made:
            made[kind, prediction_type] = build_pipeline(
                tmp_path_factory.mktemp(f"{kind}-{prediction_type}") / "pipe", kind, prediction_type)
        return made[kind, prediction_type]

    return get


@pytest.mark.parametrize("kind,prediction_type", [("sd15", "epsilon"), ("sd15", "v_prediction"),
                                                  ("sdxl", "epsilon")])
def test_a_pipeline_export_samples_the_students_x0_with_stock_diffusers(pipelines, tmp_path, kind, prediction_type):
    """`Pipeline.from_pretrained(DIR)(prompt, num_inference_steps=1, timesteps=[T-1], guidance_scale=0,
    latents=z)` returns x0 of the student UNet at T-1 on z, computed here from that UNet and the pipeline's own
    prompt encoding (pipe.encode_prompt; SDXL: pooled embeddings and time ids (16, 16, 0, 0, 16, 16)). LCM's c_skip
    at T-1 is below 1e-8. Every other component is the teacher's, byte for byte; output_type="np" gives images."""
    import diffusers
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    from distill.export import export

    teacher = pipelines(kind, prediction_type)
    student = UNet2DConditionModel.from_pretrained(teacher / "unet").eval()
    student.load_state_dict(_perturbed(student, seed=1))
    ckpt = _fake_ckpt(tmp_path / "fake.ckpt", teacher, student.state_dict())
    out = tmp_path / "student"
    info = export(ckpt, out, progress=False)
    assert info["timesteps"] == [999] and info["step"] == 3 and info["prediction_type"] == prediction_type
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    assert info["pipeline"] == cls.__name__ and info["num_classes"] is None

    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert {k: v for k, v in index.items() if k != "scheduler"} == \
        {k: v for k, v in json.loads((teacher / "model_index.json").read_text()).items() if k != "scheduler"}
    theirs, ours = _digest(teacher), _digest(out)
    same = {k: v for k, v in theirs.items() if not k.startswith(("unet/", "scheduler/", "model_index.json"))}
    assert same and {k: ours.get(k) for k in same} == same

    pipe = cls.from_pretrained(out)
    assert isinstance(pipe.scheduler, LCMScheduler)
    c_skip, c_out = pipe.scheduler.get_scalings_for_boundary_condition_discrete(999)
    assert c_skip < 1e-8 and abs(1 - c_out) < 1e-8
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = pipe(PROMPT, num_inference_steps=1, timesteps=info["timesteps"], guidance_scale=0, latents=z,
                   output_type="latent").images
        if kind == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}
        else:
            embeds, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)
            added = None
        raw = student(z, torch.tensor([999]), encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    sched_cls = getattr(diffusers, json.loads((teacher / "scheduler" / "scheduler_config.json").read_text())[
        "_class_name"])  # PNDMScheduler (sd15), EulerDiscreteScheduler (sdxl): the teacher's own schedule
    abar = sched_cls.from_pretrained(teacher / "scheduler").alphas_cumprod[999]
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x0 = (z - s * raw) / a if prediction_type == "epsilon" else a * z - s * raw
    assert x0.abs().max() > 1.0  # not a vacuous comparison
    torch.testing.assert_close(got, x0, rtol=1e-6, atol=1e-5)
    with torch.no_grad():
        images = pipe(PROMPT, num_inference_steps=1, timesteps=info["timesteps"], guidance_scale=0, latents=z,
                      output_type="np").images
    assert images.shape == (1, 16, 16, 1) and images.min() >= 0.0 and images.max() <= 1.0


@pytest.mark.parametrize("kind,prediction_type", [("sd15", "v_prediction"), ("sdxl", "epsilon")])
def test_a_multi_step_pipeline_export_samples_the_student_with_stock_diffusers(pipelines, tmp_path, kind,
                                                                             prediction_type):
    """DMD2's four steps, generator.timesteps [999, 749, 499, 249]: `Pipeline.from_pretrained(DIR)(prompt,
    num_images_per_prompt=2, num_inference_steps=4, timesteps=ts, guidance_scale=0, generator=g,
    output_type="latent")` equals distill.teachers.Generator on the checkpoint's weights and the teacher's own
    encoding of the prompt, with z and the three re-noising draws taken from g in the pipeline's order; the
    scheduler config makes `num_inference_steps=4` alone pick the same list. Each step and the order of the draws
    matter (far beyond the tolerance)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from distill.export import export

    ts = [999, 749, 499, 249]
    teacher = pipelines(kind, prediction_type)
    loaded = _student(teacher, seed=5)
    ckpt = _fake_ckpt(tmp_path / "four.ckpt", teacher, loaded.denoiser.net.unet.state_dict(), timesteps=ts)
    out = tmp_path / "student"
    info = export(ckpt, out, progress=False)
    assert info["timesteps"] == ts and 0 < info["lcm_c_skip"] <= 1e-8 * (1 + 1e-6)

    pipe = (StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline).from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(num_inference_steps=len(ts))
    assert pipe.scheduler.timesteps.tolist() == ts
    with torch.no_grad():
        got = pipe(PROMPT, num_images_per_prompt=2, num_inference_steps=len(ts), timesteps=ts, guidance_scale=0,
                   generator=torch.Generator().manual_seed(6), output_type="latent").images
        z, noise = _draws(torch.Generator().manual_seed(6), (2, 4, 8, 8), len(ts))
        cond = loaded.text([PROMPT, PROMPT])
    _assert_the_student(got, loaded.denoiser, ts, z, cond, noise)


@pytest.mark.parametrize("adapters_only", [False, True])
def test_a_lora_generator_is_merged_into_a_plain_unet(pipelines, tmp_path, adapters_only):
    """A UNet with a peft LoRA adapter (r 4, alpha 8: scaling 2) on the attention projections, a 1x1 convolution
    (proj_in) and 3x3 convolutions (conv1), adapter weights perturbed; its state dict as the EMA generator, either
    whole (base weights perturbed too) or the adapters only (base weights: the teacher's). The exported UNet has the
    plain UNet's keys and gives the adapter model's output."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from distill.export import export

    teacher = pipelines("sd15")
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet").eval()
    plain_keys = set(unet.state_dict())
    if not adapters_only:
        unet.load_state_dict(_perturbed(unet, seed=3))
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                    "conv1"]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    state = unet.state_dict()
    kinds = {type(m).__name__ for n, m in unet.named_modules() if n.endswith(("proj_in", "conv1", "to_q"))}
    assert kinds == {"Linear", "Conv2d"} and any(".lora_A." in k for k in state)  # peft's wrappers and their keys
    if adapters_only:
        state = {k: v for k, v in state.items() if "lora_" in k}
    ckpt = _fake_ckpt(tmp_path / "lora.ckpt", teacher, state, lora_rank=4, lora_alpha=8)
    export(ckpt, tmp_path / "student", progress=False)

    merged = UNet2DConditionModel.from_pretrained(tmp_path / "student" / "unet").eval()
    assert set(merged.state_dict()) == plain_keys
    z = torch.randn(2, 4, 8, 8, generator=g)
    embeds = torch.randn(2, 24, 32, generator=g)
    t = torch.tensor([999, 400])
    with torch.no_grad():
        want = unet(z, t, encoder_hidden_states=embeds).sample
        unet.disable_adapters()
        without = unet(z, t, encoder_hidden_states=embeds).sample
        got = merged(z, t, encoder_hidden_states=embeds).sample
    assert (want - without).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "sigmoid"])
def test_the_lcm_scheduler_has_the_teachers_schedule_and_a_negligible_c_skip(beta_schedule):
    """LCMScheduler's alphas_cumprod equal the teacher's, also for a beta_schedule LCMScheduler lacks (sigmoid:
    its betas are written out); c_skip(t_init) <= 1e-8 at t_init 999 (LCM's own timestep_scaling, 10) and at
    t_init 50 (a larger one); no clipping; the one step adds no noise (LCM's last step returns its x0)."""
    from diffusers import DDPMScheduler

    from distill.export import lcm_scheduler

    teacher = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, clip_sample=True,
                            prediction_type="v_prediction")
    for t_init in (999, 50):
        lcm = lcm_scheduler(dict(teacher.config), teacher.alphas_cumprod, "v_prediction", t_init)
        torch.testing.assert_close(lcm.alphas_cumprod, teacher.alphas_cumprod, rtol=1e-6, atol=0)
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t_init)
        assert c_skip <= 1e-8 * (1 + 1e-6) and c_out == pytest.approx(1.0, abs=1e-8)
        assert lcm.config.timestep_scaling == (10.0 if t_init == 999 else 100.0)
        assert not lcm.config.clip_sample and lcm.config.prediction_type == "v_prediction"
        lcm.set_timesteps(timesteps=[t_init])
        x, out = torch.full((1, 4), 3.0), torch.full((1, 4), 0.5)
        abar = teacher.alphas_cumprod[t_init]
        x0 = abar.sqrt() * x - (1 - abar).sqrt() * out
        torch.testing.assert_close(lcm.step(out, t_init, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                                   x0, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line, nothing lost.


def test_bad_input_stops_with_one_line_naming_it(pipelines, tmp_path, capsys):
    """A missing, unreadable or foreign checkpoint; a teacher folder gone (and a --teacher that is not there); a
    gmm run, an EDM teacher and t_init 0 (nothing LCMScheduler can sample); a --teacher whose UNet does not fit; an
    --out holding files without --overwrite, or holding the checkpoint with it. Each: status 2, one line, nothing
    written; then --overwrite replaces the folder."""
    from diffusers import EDMEulerScheduler, UNet2DConditionModel

    from distill.teachers import build_unet

    teacher = pipelines("sd15")
    edm_teacher = tmp_path / "edm"
    build_unet((1, 8, 8), None, [16, 32], 1, False).save_pretrained(edm_teacher / "unet")
    EDMEulerScheduler().save_pretrained(edm_teacher / "scheduler")
    weights = UNet2DConditionModel.from_pretrained(teacher / "unet").state_dict()
    out = tmp_path / "student"
    capsys.readouterr()  # building the tiny pipeline here may log (transformers: no torchvision): not export's output

    def fails(*argv: str) -> str:
        code, stdout, err = export_cli(capsys, *argv)
        assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, (code, stdout, err)
        return err

    err = fails(str(tmp_path / "nope.ckpt"), "--out", str(out))
    assert "nope.ckpt" in err and "does not exist" in err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert "cannot be loaded" in fails(str(tmp_path / "junk.ckpt"), "--out", str(out))
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    assert "no distill training state" in fails(str(tmp_path / "foreign.ckpt"), "--out", str(out))

    gone = _fake_ckpt(tmp_path / "gone.ckpt", tmp_path / "moved-away", weights)
    err = fails(str(gone), "--out", str(out))
    assert "moved-away" in err and "--teacher FOLDER" in err
    err = fails(str(gone), "--out", str(out), "--teacher", str(tmp_path / "nowhere"))
    assert "--teacher" in err and "nowhere" in err

    gmm = _fake_ckpt(tmp_path / "gmm.ckpt", None, {"net.0.weight": torch.zeros(2, 2)}, kind="gmm")
    err = fails(str(gmm), "--out", str(out))
    assert "gmm" in err and "nothing to export to diffusers" in err
    err = fails(str(_fake_ckpt(tmp_path / "none.ckpt", teacher, {})), "--out", str(out))
    assert "holds no ema.denoiser.net.unet.* weights" in err
    err = fails(str(_fake_ckpt(tmp_path / "edm.ckpt", edm_teacher, {"conv_in.weight": torch.zeros(1)})), "--out",
                str(out))
    assert "EDM" in err and "nothing to export to diffusers" in err
    err = fails(str(_fake_ckpt(tmp_path / "t0.ckpt", teacher, weights, t_init=0)), "--out", str(out))
    assert "generator.t_init 0" in err
    err = fails(str(gone), "--out", str(out), "--teacher", str(pipelines("sdxl")))
    assert "does not fit" in err and "--teacher" in err
    assert not out.exists() and not list(tmp_path.glob("student.tmp-*"))

    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    err = fails(str(gone), "--out", str(out), "--teacher", str(teacher))
    assert "already holds files" in err and "--overwrite" in err and (out / "mine.txt").read_text() == "keep me"
    err = fails(str(gone), "--out", str(tmp_path), "--teacher", str(teacher), "--overwrite")
    assert "would delete" in err and gone.is_file()  # the checkpoint lives in --out: refused

    code, stdout, err = export_cli(capsys, str(gone), "--out", str(out), "--teacher", str(teacher), "--overwrite")
    assert code == 0 and "timesteps=[999]" in stdout and "guidance_scale=0" in stdout, (stdout, err)
    assert not (out / "mine.txt").exists() and (out / "distill.json").is_file()
    assert json.loads((out / "distill.json").read_text())["teacher"] == str(teacher.resolve())


@pytest.mark.parametrize("generator,expected", [
    ({"timesteps": [749, 999]}, "strictly decreasing"),
    ({"timesteps": [999, 499, 499]}, "strictly decreasing"),
    ({"timesteps": [999, 0]}, "in [1, 1000)"),
    ({"timesteps": [1000, 499]}, "in [1, 1000)"),
    ({"timesteps": []}, "non-empty list"),
    ({"timesteps": [999, 499.5]}, "integer"),
    ({"timesteps": 999}, "non-empty list"),
    ({"timesteps": [999, 499], "t_init": 749}, "the first of the timesteps"),
])
def test_bad_timesteps_in_a_checkpoint_are_refused_with_one_line(pipelines, tmp_path, capsys, generator, expected):
    """generator.timesteps out of [1, T), not strictly decreasing, empty, not integers, not a list, or a t_init
    other than its first: status 2, one line naming the checkpoint and the key, nothing written."""
    from diffusers import UNet2DConditionModel

    teacher = pipelines("sd15")
    ckpt = _fake_ckpt(tmp_path / "bad.ckpt", teacher,
                      UNet2DConditionModel.from_pretrained(teacher / "unet").state_dict(), **generator)
    out = tmp_path / "student"
    capsys.readouterr()  # building the tiny pipeline may log (transformers: no torchvision): not export's output
    code, stdout, err = export_cli(capsys, str(ckpt), "--out", str(out))
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1, (code, stdout, err)
    assert str(ckpt) in err and "generator.timesteps" in err and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]


def test_the_one_step_cli_message_and_a_two_step_one(pipelines, tmp_path, capsys):
    """The printed call: num_inference_steps=1 and timesteps=[999] for a run without generator.timesteps, and
    num_inference_steps=2 and timesteps=[999, 499] (distill.json's list) for generator.timesteps [999, 499]."""
    from diffusers import UNet2DConditionModel

    teacher = pipelines("sd15")
    weights = UNet2DConditionModel.from_pretrained(teacher / "unet").state_dict()
    for name, generator, call in [("one", {}, "num_inference_steps=1, timesteps=[999],"),
                                  ("two", {"timesteps": [999, 499]}, "num_inference_steps=2, timesteps=[999, 499],")]:
        ckpt = _fake_ckpt(tmp_path / f"{name}.ckpt", teacher, weights, **generator)
        code, stdout, err = export_cli(capsys, str(ckpt), "--out", str(tmp_path / name))
        assert code == 0 and call in stdout, (stdout, err)
        assert json.loads((tmp_path / name / "distill.json").read_text())["timesteps"] == \
            generator.get("timesteps", [999])


def test_a_failed_export_keeps_the_old_folder_and_leaves_no_temporary(pipelines, tmp_path, monkeypatch):
    """An error while writing (here: the scheduler cannot be saved) leaves --out as it was, and no DIR.tmp-*."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    from distill.export import export

    teacher = pipelines("sd15")
    ckpt = _fake_ckpt(tmp_path / "a.ckpt", teacher,
                      UNet2DConditionModel.from_pretrained(teacher / "unet").state_dict())
    out = tmp_path / "student"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LCMScheduler, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        export(ckpt, out, overwrite=True, progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "student"]


def test_help_explains_every_option():
    from distill.export import add_export_parser

    parser = argparse.ArgumentParser(prog="distill")
    sp = add_export_parser(parser.add_subparsers(dest="command"), argparse.RawDescriptionHelpFormatter)
    text = sp.format_help()
    for option in ("CKPT", "--out", "--overwrite", "--raw", "--teacher", "LCMScheduler", "distill.json",
                   "timesteps"):
        assert option in text, option
    assert all(a.help for a in sp._actions)
