"""Latent text-to-image teachers (issue 12): Stable Diffusion 1.x and SDXL pipeline folders load from disk, the
condition is the pipeline's own prompt encoding, guidance is one batched call of uncond + s (cond - uncond) with the
layout's null condition, the fake score is never guided, and `distill fit` trains, checkpoints and resumes bit for
bit on tiny random pipelines (tests/tiny_pipelines.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO
from tiny_pipelines import build_pipeline

T2I = str(REPO / "configs" / "t2i-digits.yaml")
NO_FID = ["eval.fid_every_steps=0"]  # the config's eval.fid_ref is made by `make data`, which a fresh clone lacks
PROMPTS = ["a handwritten seven", "a handwritten one", "a photo of a handwritten two", "a handwritten zero, ink",
           "a handwritten nine", "three"]


@pytest.fixture(scope="module")
def pipelines(tiny_pipelines, tmp_path_factory) -> dict[str, Path]:
    """The shared tiny SD 1.x and SDXL pipelines, and an SD 1.x one with v-prediction."""
    base = tmp_path_factory.mktemp("pipelines")
    return {**tiny_pipelines, "sd15-v": build_pipeline(base / "sd15-v", "sd15", prediction_type="v_prediction",
                                                       seed=5)}


@pytest.fixture(scope="module")
def prompt_shards(tmp_path_factory) -> Path:
    from distill.data import write_prompt_shards

    base = tmp_path_factory.mktemp("prompts")
    (base / "prompts.txt").write_text("\n".join(PROMPTS * 3) + "\n")
    write_prompt_shards(base / "prompts.txt", base / "shards", val_fraction=0.2, seed=0, shard_size=8)
    return base / "shards"


def _stock(path: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, local_files_only=True)


# --------------------------------------------------------------------------------------------------------------
# The condition and the null condition are the pipeline's own.


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_the_condition_is_the_pipelines_own_prompt_encoding(pipelines, kind):
    """TextEncoder(prompts) equals `encode_prompt` of the stock pipeline (embeddings, and for SDXL the pooled
    embeddings and the time ids the pipeline would add for the UNet's default size); the null condition is the
    empty prompt's encoding for SD 1.x and zeros for SDXL, as the pipelines use for guidance."""
    from distill.teachers import load_teacher

    teacher = load_teacher(pipelines[kind])
    pipe = _stock(pipelines[kind])
    cond = teacher.text(PROMPTS[:3])
    null = teacher.denoiser.null_condition(3)
    if kind == "sd15":
        emb, neg = pipe.encode_prompt(PROMPTS[:3], "cpu", 1, True, negative_prompt=None)
        assert torch.equal(cond.embeds, emb) and cond.pooled is None and cond.time_ids is None
        # the empty prompt, encoded (once, at load, as one row: equal up to the batch size's float rounding)
        torch.testing.assert_close(null.embeds, neg, rtol=1e-5, atol=1e-6)
        assert neg.abs().sum() > 0
    else:
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS[:3], device="cpu", do_classifier_free_guidance=True)
        assert torch.equal(cond.embeds, emb) and torch.equal(cond.pooled, pooled)
        assert torch.equal(null.embeds, neg) and torch.equal(null.pooled, neg_pooled)
        assert null.embeds.abs().sum() == 0 and null.pooled.abs().sum() == 0  # force_zeros_for_empty_prompt
        size = pipe.default_sample_size * pipe.vae_scale_factor
        ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=emb.dtype,
                                     text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        assert torch.equal(cond.time_ids, ids.expand(3, 6)) and torch.equal(null.time_ids, ids.expand(3, 6))


def _x0(unet, schedule, prediction_type, x_t, t, **kw):
    out = unet(x_t, t, **kw).sample
    a = schedule.alpha.to(x_t)[t].view(-1, 1, 1, 1)
    s = schedule.sigma.to(x_t)[t].view(-1, 1, 1, 1)
    return (x_t - s * out) / a if prediction_type == "epsilon" else a * x_t - s * out


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd15-v"])
def test_guidance_is_one_batched_call_of_uncond_plus_s_times_cond_minus_uncond(pipelines, kind):
    """The teacher with teacher.guidance_scale s: x0_u + s (x0_c - x0_u), where x0_c and x0_u come from separate
    UNet calls with the prompt's and the null condition's kwargs, as written in the pipelines (epsilon and
    v-prediction); the guided call is ONE UNet call on 2B inputs. The one-step generator at t_init sees the
    condition, unguided."""
    from distill.teachers import Generator, load_teacher

    teacher = load_teacher(pipelines[kind])
    D = teacher.denoiser
    unet = D.net.unet
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([50, 500, 950])
    cond, null = teacher.text(PROMPTS[3:]), D.null_condition(3)

    def kwargs(c):
        kw = {"encoder_hidden_states": c.embeds}
        if c.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": c.pooled, "time_ids": c.time_ids}
        return kw

    calls = []
    hook = unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            guided = D(x_t, t, cond, guidance_scale=3.0)
            assert calls == [6]  # one batched call over 2B
            x0_c = _x0(unet, D.schedule, D.prediction_type, x_t, t, **kwargs(cond))
            x0_u = _x0(unet, D.schedule, D.prediction_type, x_t, t, **kwargs(null))
            expected = x0_u + 3.0 * (x0_c - x0_u)
            torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-4)
            assert (x0_c - x0_u).abs().max() > 1e-2  # the condition matters, far beyond the tolerance
            generator = Generator(D, None)
            z = torch.randn(3, 4, 8, 8, generator=g)
            T = D.T
            torch.testing.assert_close(generator(z, cond), _x0(unet, D.schedule, D.prediction_type, z,
                                                               torch.full((3,), T - 1), **kwargs(cond)),
                                       rtol=1e-4, atol=1e-4)
    finally:
        hook.remove()


# --------------------------------------------------------------------------------------------------------------
# Bad pipeline folders: one line naming what was found and what is supported.


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_pipeline_folders_stop_with_one_line_naming_the_problem(pipelines, tmp_path):
    from distill.errors import TeacherError
    from distill.teachers import load_teacher

    sd3 = _copy(pipelines["sd15"], tmp_path / "sd3")
    index = json.loads((sd3 / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusion3Pipeline"
    (sd3 / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherError, match=r"StableDiffusion3Pipeline; supported: .*StableDiffusionXLPipeline"):
        load_teacher(sd3)

    no_vae = _copy(pipelines["sdxl"], tmp_path / "no-vae")
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(TeacherError, match=r"lacks vae; expected the components"):
        load_teacher(no_vae)

    mismatch = _copy(pipelines["sd15"], tmp_path / "mismatch")  # a tokenizer with more tokens than its encoder
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(mismatch / "tokenizer")
    tok.add_tokens([f"<extra-{i}>" for i in range(100)])
    tok.save_pretrained(mismatch / "tokenizer")
    with pytest.raises(TeacherError, match=r"tokenizer \(614 tokens.*does not match text_encoder \(514 tokens"):
        load_teacher(mismatch)

    pixel = _copy(pipelines["sd15"], tmp_path / "pixel")  # a pipeline whose unet is not a UNet2DConditionModel
    index = json.loads((pixel / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (pixel / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(TeacherError, match=r"its unet is a UNet2DModel; expected UNet2DConditionModel"):
        load_teacher(pixel)

    with pytest.raises(TeacherError) as info:
        load_teacher(sd3)
    assert "\n" not in str(info.value)  # one line


def test_fit_names_a_bad_pipeline_folder_before_writing_anything(pipelines, prompt_shards, tmp_path, capsys):
    from distill.cli import main

    no_unet = _copy(pipelines["sd15"], tmp_path / "no-unet")
    shutil.rmtree(no_unet / "unet")
    run_dir = tmp_path / "run"
    code = main(["fit", "--config", T2I, f"run.dir={run_dir}", f"teacher.path={no_unet}",
                 f"data.path={prompt_shards}", "eval.fid_every_steps=0"])
    err = capsys.readouterr().err
    assert code != 0 and "lacks unet" in err and len(err.strip().splitlines()) == 1
    assert not run_dir.exists()


# --------------------------------------------------------------------------------------------------------------
# A three-step fit, checkpoints and resume.


def _fit_args(run_dir: Path, teacher: Path, prompts: Path, *extra: str) -> list[str]:
    return ["fit", "--config", T2I, f"run.dir={run_dir}", f"teacher.path={teacher}", f"data.path={prompts}",
            "data.batch_size=4", "optim.ttur=2", "logging.progress_bar=false", "logging.wandb=disabled",
            "logging.samples_per_class=2", "trainer.log_every_steps=1", "trainer.checkpoint_every_steps=2",
            "estimator.K=2", "eval.fid_every_steps=0", *extra]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_three_step_fit_trains_in_latent_space_and_resumes_bit_identical(pipelines, prompt_shards, tmp_path,
                                                                            kind):
    """3 steps in one go against 2 steps then the same command with max_steps 3: generator, EMA and fake score
    equal bit for bit (prompts, like noise, are a function of (seed, rank, step)). The checkpoint holds no frozen
    part (teacher UNet, text encoders, VAE); the sample grid has one row per prompt with the prompt beside it, and
    the logged losses are finite."""
    import csv

    from PIL import Image

    from distill.cli import main

    one, two = tmp_path / "one", tmp_path / "two"
    common = ["logging.samples_every_steps=3", "teacher.guidance_scale=2.0"]
    assert main(_fit_args(one, pipelines[kind], prompt_shards, *common, "trainer.max_steps=3")) == 0
    assert main(_fit_args(two, pipelines[kind], prompt_shards, *common, "trainer.max_steps=2")) == 0
    assert main(_fit_args(two, pipelines[kind], prompt_shards, *common, "trainer.max_steps=3")) == 0
    a, b = _load(one / "checkpoints" / "last.ckpt"), _load(two / "checkpoints" / "last.ckpt")
    assert a["distill"]["step"] == b["distill"]["step"] == 3
    keys = a["state_dict"].keys()
    assert not any(k.startswith(("teacher.", "text.", "codec.")) for k in keys)
    assert any(k.startswith("ema.denoiser.net.unet.") for k in keys)
    assert keys == b["state_dict"].keys()
    for k in keys:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # the generator moved: it is not the teacher any more
    from distill.teachers import load_teacher

    teacher_unet = load_teacher(pipelines[kind]).denoiser.net.unet.state_dict()
    moved = [k for k, v in teacher_unet.items() if not torch.equal(a["state_dict"][f"generator.denoiser.net.unet.{k}"], v)]
    assert moved
    with open(one / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["loss/fake_score"]) == float(r["loss/fake_score"]) for r in rows)  # not NaN
    from distill.data import read_prompts

    grid = Image.open(one / "samples" / "step_0000003.png")
    # one row per prompt (up to 10) of 2 columns of 16 px decoded images, with the prompts written to the right
    rows = min(10, len(read_prompts(prompt_shards)))
    assert grid.height == rows * (16 + 1) * 4 + 4 and grid.width > 2 * (16 + 1) * 4 + 4 + 50


def test_lora_trains_only_the_adapters_saves_only_them_and_resumes_bit_identical(pipelines, prompt_shards, tmp_path):
    """generator.lora_rank and fake_score.lora_rank: the checkpoint holds adapter weights only (keys with lora_)
    for the generator, its EMA and the fake score; after 3 steps (in one go, or 2 then 1 more) the adapters are
    equal bit for bit and have moved, and the base weights of a reloaded module are still the teacher's."""
    from distill.cli import main
    from distill.evaluate import load_checkpoint_module

    lora = ["generator.lora_rank=4", "fake_score.lora_rank=2", "logging.samples_every_steps=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_fit_args(one, pipelines["sd15"], prompt_shards, *lora, "trainer.max_steps=3")) == 0
    assert main(_fit_args(two, pipelines["sd15"], prompt_shards, *lora, "trainer.max_steps=2")) == 0
    assert main(_fit_args(two, pipelines["sd15"], prompt_shards, *lora, "trainer.max_steps=3")) == 0
    a, b = _load(one / "checkpoints" / "last.ckpt"), _load(two / "checkpoints" / "last.ckpt")
    keys = a["state_dict"].keys()
    trained = [k for k in keys if k.startswith(("generator.", "ema.", "fake_score."))]
    assert trained and all("lora_" in k for k in trained)
    assert {k.split(".")[0] for k in trained} == {"generator", "ema", "fake_score"}
    assert keys == b["state_dict"].keys()
    for k in keys:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    lora_b = [k for k in trained if k.startswith("generator.") and "lora_B" in k]
    assert any(a["state_dict"][k].abs().sum() > 0 for k in lora_b)  # B starts at 0: the adapters moved
    assert len(a["optimizer_states"][0]["state"]) == len([k for k in trained if k.startswith("generator.")])

    module, _ = load_checkpoint_module(one / "checkpoints" / "last.ckpt")
    base = module.teacher.net.unet.state_dict()
    for name, value in module.generator.denoiser.net.unet.state_dict().items():
        if "base_layer" in name:
            assert torch.equal(value, base[name.replace("base_layer.", "")]), name


def test_gradient_checkpointing_changes_memory_not_the_result(pipelines, prompt_shards, tmp_path):
    """generator.gradient_checkpointing and fake_score.gradient_checkpointing recompute activations in the
    backward pass: two steps with and without give the same networks (to float rounding), and the switch reaches
    the UNets."""
    from distill.cli import main

    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    quiet = ["logging.samples_every_steps=0", "trainer.max_steps=2", "optim.ttur=1"]
    assert main(_fit_args(plain, pipelines["sd15"], prompt_shards, *quiet)) == 0
    assert main(_fit_args(ckpt, pipelines["sd15"], prompt_shards, *quiet, "generator.gradient_checkpointing=true",
                          "fake_score.gradient_checkpointing=true")) == 0
    a, b = _load(plain / "checkpoints" / "last.ckpt"), _load(ckpt / "checkpoints" / "last.ckpt")
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6)
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    cfg = load_config(FitConfig, T2I, [f"teacher.path={pipelines['sd15']}", f"data.path={prompt_shards}", *NO_FID,
                                       "generator.gradient_checkpointing=true"])
    m = DMDModule(cfg)
    assert m.generator.denoiser.net.unet.is_gradient_checkpointing
    assert not m.fake_score.net.unet.is_gradient_checkpointing


def test_bf16_mixed_precision_with_a_bf16_frozen_teacher_trains_on_the_cpu(pipelines, prompt_shards, tmp_path):
    """trainer.precision=bf16-mixed with teacher.dtype=bfloat16 (the GPU recipe's dtypes, exercised on the CPU):
    the frozen UNet, text encoder and VAE are bf16, the trained copies float32, and two steps give finite losses."""
    import csv

    from distill.cli import main
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    run = tmp_path / "bf16"
    assert main(_fit_args(run, pipelines["sd15"], prompt_shards, "logging.samples_every_steps=2",
                          "trainer.max_steps=2", "optim.ttur=1", "trainer.precision=bf16-mixed",
                          "teacher.dtype=bfloat16")) == 0
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for name in ("loss/generator_dm", "loss/fake_score"):
            assert float(r[name]) == float(r[name]) and abs(float(r[name])) < float("inf"), (name, r[name])
    cfg = load_config(FitConfig, T2I, [f"teacher.path={pipelines['sd15']}", f"data.path={prompt_shards}", *NO_FID,
                                       "teacher.dtype=bfloat16"])
    m = DMDModule(cfg)
    assert m.teacher.net.unet.dtype == torch.bfloat16 and m.codec.vae.dtype == torch.bfloat16
    assert m.text.encoders[0].dtype == torch.bfloat16
    assert m.generator.denoiser.net.unet.dtype == torch.float32 and m.fake_score.net.unet.dtype == torch.float32


@pytest.mark.parametrize("kind,lora", [("sd15", 0), ("sdxl", 4)])
def test_distill_export_of_a_fit_samples_the_students_output_in_stock_diffusers(pipelines, prompt_shards, tmp_path,
                                                                                 kind, lora):
    """`distill fit` (2 steps; a LoRA generator for SDXL), then `distill export`: stock
    `DiffusionPipeline.from_pretrained(DIR)` with one step at distill.json's timesteps and no guidance returns, for
    a given noise, the latents G(z) of the checkpoint's EMA generator."""
    from diffusers import DiffusionPipeline

    from distill.cli import main
    from distill.evaluate import load_checkpoint_module

    run, out = tmp_path / "run", tmp_path / "student"
    assert main(_fit_args(run, pipelines[kind], prompt_shards, "logging.samples_every_steps=0", "trainer.max_steps=2",
                          "optim.ttur=1", "optim.lr_generator=1e-2", f"generator.lora_rank={lora}")) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    timesteps = json.loads((out / "distill.json").read_text())["timesteps"]
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    module, _ = load_checkpoint_module(run / "checkpoints" / "last.ckpt")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = PROMPTS[:2]
    with torch.no_grad():
        latents = pipe(prompts, num_inference_steps=1, timesteps=timesteps, guidance_scale=0, latents=z,
                       output_type="latent").images
        expected = module.ema(z, module.text(prompts))
        teacher_x0 = module.teacher(z, torch.full((2,), timesteps[0]), module.text(prompts))
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert (expected - teacher_x0).abs().max() > 1e-2  # the student moved away from the teacher


# --------------------------------------------------------------------------------------------------------------
# Evaluation of a text-to-image student: FID of decoded images and prompt accuracy, in the loop and by distill fid.


def test_prompt_accuracy_counts_samples_read_as_their_prompts_digit():
    """PromptAccuracy with a classifier that always answers 7: the accuracy is the share of the protocol's samples
    (sample i has prompt i mod P, from `start` on) whose prompt names seven; a prompt without a digit is refused."""
    from distill.errors import DistillError
    from distill.metrics import PromptAccuracy, digit_of_prompt

    class Sevens(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 7), 10).float()

    prompts = ["a handwritten seven", "a photo of a handwritten one", "A Handwritten Seven, ink", "a handwritten two"]
    assert [digit_of_prompt(p) for p in prompts] == [7, 1, 7, 2]
    assert digit_of_prompt("handwritten sevens") is None and digit_of_prompt("a handwritten seventy") is None
    counter = PromptAccuracy(Sevens(), prompts, start=1)
    batches = [torch.zeros(3, 1, 8, 8), torch.zeros(2, 1, 8, 8)]  # samples 1..5: prompts 1, 2, 3, 0, 1
    assert [b.shape[0] for b in counter.observe(batches)] == [3, 2]
    assert (counter.correct, counter.n) == (2, 5)
    with pytest.raises(DistillError, match="'three'"):
        PromptAccuracy(Sevens(), ["a handwritten one", "three"])


def test_in_loop_fid_and_prompt_accuracy_equal_distill_fid_on_the_same_checkpoint(pipelines, digit_prompt_shards,
                                                                                   digits_shards, tmp_path, capsys):
    """A 2-step fit of the tiny SD pipeline with digits FID on decoded images brought to 8x8 (eval.image_size) and
    prompt accuracy: `distill fid` on the step-2 checkpoint gives the same FID and the same accuracy as the
    in-loop fid/ema and prompt/accuracy_ema (one protocol: prompts in turn, noise by sample index)."""
    import csv

    from distill.cli import main
    from distill.metrics import build_extractor, compute_stats, save_stats
    from distill.data import iterate_split

    ref = tmp_path / "ref.npz"
    extractor = build_extractor("digits")
    save_stats(ref, {**compute_stats(extractor, iterate_split(digits_shards, "train", batch_size=256)),
                     "extractor_id": extractor.extractor_id})
    run = tmp_path / "run"
    evaluation = ["eval.fid_every_steps=2", f"eval.fid_ref={ref}", "eval.image_size=8", "eval.prompt_accuracy=true",
                  "eval.fid_num_samples=40", "eval.fid_batch_size=16", "eval.features=digits"]
    assert main(_fit_args(run, pipelines["sd15"], digit_prompt_shards, "logging.samples_every_steps=0",
                          "trainer.max_steps=2", "trainer.log_every_steps=2", *evaluation)) == 0
    with open(run / "metrics.csv", newline="") as fh:
        row = list(csv.DictReader(fh))[-1]
    in_loop_fid, in_loop_acc = float(row["fid/ema"]), float(row["prompt/accuracy_ema"])
    capsys.readouterr()
    assert main(["fid", str(run / "checkpoints" / "step=0000002.ckpt"), "--ref", str(ref), "--num-samples", "40",
                 "--batch-size", "16", "--no-wandb", "--json", str(tmp_path / "fid.json")]) == 0
    result = json.loads((tmp_path / "fid.json").read_text())[0]
    assert result["fid"] == pytest.approx(in_loop_fid, rel=1e-5)
    assert result["prompt_accuracy"] == pytest.approx(in_loop_acc, abs=1e-12)
    assert 0 <= in_loop_acc <= 1 and result["samples"] == 40
    assert "prompt acc" in capsys.readouterr().out


def test_each_step_draws_its_prompts_from_seed_rank_and_step(pipelines, prompt_shards):
    """The prompts of a step are uniform draws from the prompt set by a generator of (seed, rank, step): samples of
    one step get different prompts, the next step others, and the same step the same ones (a resumed run draws what
    the uninterrupted one did)."""
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    cfg = load_config(FitConfig, T2I, [f"teacher.path={pipelines['sd15']}", f"data.path={prompt_shards}", *NO_FID])
    m = DMDModule(cfg)
    seen = {}
    for step in (0, 1, 0):
        m.step = step
        cond = m.sample_condition(8, m._step_generator())
        rows = {tuple(r.flatten().tolist()) for r in cond.embeds}
        assert len(rows) >= 3  # 8 draws from 6 distinct prompts
        if step in seen:
            assert torch.equal(seen[step], cond.embeds)
        seen[step] = cond.embeds
    assert not torch.equal(seen[0], seen[1])


def test_fsdp_on_the_cpu_is_refused_in_one_line(pipelines, prompt_shards):
    """Lightning's FSDP needs GPUs: asked for on the CPU, the config names the key instead of a Lightning traceback."""
    from distill.config import FitConfig, load_config
    from distill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.strategy.*FSDP needs GPUs"):
        load_config(FitConfig, T2I, [f"teacher.path={pipelines['sd15']}", f"data.path={prompt_shards}", *NO_FID,
                                     "trainer.strategy=fsdp", "trainer.accelerator=cpu"])


@pytest.mark.slow
def test_a_two_process_ddp_fit_on_a_tiny_pipeline(pipelines, prompt_shards, tmp_path, monkeypatch):
    """Two CPU processes (DDP over gloo) distil the tiny SDXL pipeline with a LoRA generator for 2 steps: the run
    ends cleanly, its checkpoint holds the adapters and moved them, and it resumes to step 3 under DDP."""
    from conftest import run_cli

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "ddp"
    args = ["fit", "--config", T2I, f"run.dir={run}", f"teacher.path={pipelines['sdxl']}",
            f"data.path={prompt_shards}", "data.batch_size=4", "trainer.devices=2", "trainer.accelerator=cpu",
            "optim.ttur=1", "generator.lora_rank=4", "eval.fid_every_steps=0", "logging.samples_every_steps=0",
            "logging.wandb=disabled", "logging.progress_bar=false", "trainer.log_every_steps=1"]
    r = run_cli(*args, "trainer.max_steps=2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = _load(run / "checkpoints" / "last.ckpt")
    assert ckpt["distill"]["step"] == 2
    lora_b = [v for k, v in ckpt["state_dict"].items() if k.startswith("generator.") and "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    r = run_cli(*args, "trainer.max_steps=3", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _load(run / "checkpoints" / "last.ckpt")["distill"]["step"] == 3
