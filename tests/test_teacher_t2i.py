"""The shipped latent text-to-image teacher and its recipe (`distill teacher --config configs/teacher-t2i-digits.yaml`,
distill/pretrain_t2i.py): a tiny run gives a folder that stock diffusers loads and samples, the tokenizer gives every
word of every prompt its own token, the captions name their digit exactly once, a resumed run ends bit-identical to
an uninterrupted one without training its VAE again, prompt accuracy scores what it should, and the shipped folder
loads, records a prompt accuracy >= 0.9 at guidance 2 and follows its prompts when sampled."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

from conftest import REPO
from distill.config import T2I_TEMPLATES, TeacherTrainConfig, load_config
from distill.errors import ConfigError, DistillError

CONFIG = REPO / "configs" / "teacher-t2i-digits.yaml"
SHIPPED = REPO / "data" / "teachers" / "t2i-digits"
PROMPTS = REPO / "data" / "prompts" / "t2i-digits.txt"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# a run of seconds: every network a few thousand parameters, two VAE steps
TINY = ["vae.steps=2", "vae.batch_size=8", "vae.block_out_channels=[8,16]", "unet.block_out_channels=[8,16]",
        "text.hidden_size=8", "text.heads=2", "data.batch_size=8", "optim.warmup_steps=1", "sample_steps=1",
        "logging.samples_per_class=2", "eval.prompt_samples=8", "eval.steps=1", "trainer.log_every_steps=2",
        "trainer.checkpoint_every_steps=2", "logging.wandb=disabled", "logging.progress_bar=false"]


def _teacher(run_dir, shards, *overrides) -> int:
    from distill.cli import main

    return main(["teacher", "--config", str(CONFIG), f"run.dir={run_dir}", f"data.path={shards}", *TINY, *overrides])


def _ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _part(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------------------
# The recipe, on a tiny run.


def test_a_tiny_run_saves_a_pipeline_that_stock_diffusers_loads_and_samples(tmp_path, digits_shards, capsys):
    """2 UNet steps: <run.dir>/teacher is a StableDiffusionPipeline folder that stock diffusers loads and samples at
    its default size (16 px, 1 channel); its UNet is the checkpoint's EMA (not the raw weights), its VAE the
    checkpoint's with the scaling factor 1 / (latent std) that the VAE stage measured, its scheduler DDPM with
    scaled-linear betas and no sample clipping; the tokenizer's vocab.json and merges.txt sit beside it and give
    the same ids; distill.json records the prompt accuracy at each guidance scale and the VAE stage; distill's own
    loader takes the folder as an SD 1.x teacher."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from distill.teachers import load_teacher

    run_dir = tmp_path / "run"
    assert _teacher(run_dir, digits_shards, "trainer.max_steps=2") == 0
    out = run_dir / "teacher"
    assert f"teacher saved to {out}" in capsys.readouterr().out

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a handwritten seven", "a photo of a handwritten two"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()

    ckpt = _ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["distill"]["step"] == 2
    saved, ema, raw = pipe.unet.state_dict(), _part(ckpt["state_dict"], "ema.net.unet."), \
        _part(ckpt["state_dict"], "denoiser.net.unet.")
    assert saved.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    vae_info = json.loads((run_dir / "vae" / "distill_vae.json").read_text())
    sf = pipe.vae.config.scaling_factor
    assert sf == pytest.approx(1 / vae_info["latent_std"]) == pytest.approx(ckpt["state_dict"]["scaling_factor"].item())
    vae_ckpt = _part(ckpt["state_dict"], "vae.")
    assert all(torch.equal(v, vae_ckpt[k]) for k, v in pipe.vae.state_dict().items())
    run_vae = AutoencoderKL.from_pretrained(run_dir / "vae")
    assert all(torch.equal(v, vae_ckpt[k]) for k, v in run_vae.state_dict().items())
    sched = pipe.scheduler
    assert isinstance(sched, DDPMScheduler) and sched.config.clip_sample is False
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.prediction_type == "epsilon"

    files = CLIPTokenizer(str(out / "tokenizer" / "vocab.json"), str(out / "tokenizer" / "merges.txt"),
                          model_max_length=pipe.tokenizer.model_max_length)
    assert files("a blurry picture of a handwritten six").input_ids == \
        pipe.tokenizer("a blurry picture of a handwritten six").input_ids
    record = json.loads((out / "distill.json").read_text())
    assert record["step"] == 2 and record["image_size"] == 16 and "val" in record["vae"]
    assert {k: v["n"] for k, v in record["prompt_accuracy"].items() if k != "protocol"} == {"1": 8, "2": 8, "4": 8}
    assert yaml.safe_load((out / "train_config.yaml").read_text())["kind"] == "t2i"
    assert (out / "prompts.txt").read_text() == PROMPTS.read_text()
    teacher = load_teacher(out)
    assert teacher.layout == "sd" and teacher.denoiser.T == 1000 and teacher.codec.scale_factor == 2


@pytest.mark.slow
def test_a_resumed_t2i_run_ends_bit_identical_and_never_retrains_its_vae(tmp_path, digits_shards, monkeypatch, capsys):
    """4 steps in one go against 2 steps, then the same command with max_steps 4: the UNet, its EMA, the VAE, the
    text encoder, the scaling factor, AdamW's state and the learning-rate schedule are equal bit for bit (every
    random number of a step is a function of (seed, rank, step)), and the resumed invocation runs no VAE stage
    (the VAE comes back from the checkpoint). A restart with no checkpoint reuses <run.dir>/vae (the VAE stage
    cannot run: it is made to fail) and gets the same VAE; a changed VAE recipe moves it to superseded/ and trains
    a new one."""
    from distill import pretrain_t2i

    one, two = tmp_path / "one", tmp_path / "two"
    # every step inside the linear warm-up: the cosine decay after it spans trainer.max_steps, so raising max_steps
    # stretches it (by design, for either kind of teacher) and the learning rates of a 2-step run would differ
    warm = "optim.warmup_steps=4"
    assert _teacher(one, digits_shards, "trainer.max_steps=4", warm) == 0
    assert _teacher(two, digits_shards, "trainer.max_steps=2", warm) == 0
    capsys.readouterr()
    assert _teacher(two, digits_shards, "trainer.max_steps=4", warm) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "vae:" not in out
    a, b = _ckpt(one / "checkpoints" / "last.ckpt"), _ckpt(two / "checkpoints" / "last.ckpt")
    assert a["distill"]["step"] == b["distill"]["step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for prefix in ("denoiser.", "ema.", "vae.", "text.", "scaling_factor"):
        assert any(k.startswith(prefix) for k in a["state_dict"]), prefix
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    (sa,), (sb,) = a["optimizer_states"], b["optimizer_states"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert all(torch.equal(sa["state"][i][m], sb["state"][i][m]) for m in sa["state"][i]), i
    assert a["lr_schedulers"] == b["lr_schedulers"]

    def no_vae_training(*args, **kwargs):
        raise AssertionError("the VAE stage ran again")

    for ckpt in (two / "checkpoints").iterdir():
        ckpt.unlink()
    monkeypatch.setattr(pretrain_t2i, "train_vae", no_vae_training)
    assert _teacher(two, digits_shards, "trainer.max_steps=2", warm) == 0
    assert f"vae: reusing {two / 'vae'}" in capsys.readouterr().out
    c = _ckpt(two / "checkpoints" / "last.ckpt")
    vae_a = _part(a["state_dict"], "vae.")
    assert all(torch.equal(v, vae_a[k]) for k, v in _part(c["state_dict"], "vae.").items())
    assert c["state_dict"]["scaling_factor"] == a["state_dict"]["scaling_factor"]

    monkeypatch.undo()
    for ckpt in (two / "checkpoints").iterdir():
        ckpt.unlink()
    assert _teacher(two, digits_shards, "trainer.max_steps=2", warm, "vae.steps=3") == 0
    assert "trained with another recipe" in capsys.readouterr().out
    assert len(list((two / "superseded").glob("*/vae/distill_vae.json"))) == 1
    assert json.loads((two / "vae" / "distill_vae.json").read_text())["recipe"]["vae"]["steps"] == 3


@pytest.mark.parametrize("override, same", [
    ("vae.steps=7", False), ("vae.kl_weight=0.01", False), ("t2i.upsample=bilinear", False),
    ("text.hidden_size=16", False), ("t2i.templates=['a handwritten {}']", False), ("trainer.seed=1", False),
    ("unet.block_out_channels=[16,32]", True), ("optim.lr=0.01", True), ("trainer.max_steps=9", True),
    ("t2i.caption_dropout=0.2", True), ("eval.steps=3", True),
])
def test_the_vae_is_reused_only_by_runs_that_would_train_the_same_vae(override, same, tmp_path):
    """<run.dir>/vae is reused when the recipe saved beside it equals the run's: every key the VAE's training or its
    initial weights depend on (the text sections too: the VAE's weights are drawn after the text encoder's) changes
    the recipe; keys of the UNet stage and of the evaluation do not."""
    from distill.pretrain_t2i import vae_recipe

    base = [f"data.path={tmp_path}"]
    a = vae_recipe(load_config(TeacherTrainConfig, CONFIG, base))
    b = vae_recipe(load_config(TeacherTrainConfig, CONFIG, [*base, override]))
    assert (a == b) == same


# --------------------------------------------------------------------------------------------------------------
# Captions, prompts and the tokenizer.


def test_every_template_names_its_digit_once_and_the_prompt_list_is_every_template_and_word():
    """Each caption template holds `a handwritten {}` exactly once, so each prompt names exactly one digit with the
    words `a handwritten <word>`; data/prompts/t2i-digits.txt is every template with every digit word, the same
    templates as the recipe's config, and each line parses back to its digit."""
    from distill.pretrain_t2i import digit_of, prompt_list

    config_templates = yaml.safe_load(CONFIG.read_text())["t2i"]["templates"]
    assert config_templates == T2I_TEMPLATES and len(T2I_TEMPLATES) >= 3
    lines = PROMPTS.read_text().splitlines()
    assert lines == prompt_list(T2I_TEMPLATES) and len(lines) == 10 * len(T2I_TEMPLATES) == len(set(lines))
    phrase = re.compile(r"\ba handwritten (" + "|".join(WORDS) + r")\b")
    for i, prompt in enumerate(lines):
        found = phrase.findall(prompt)
        assert found == [WORDS[i % 10]], prompt
        assert digit_of(prompt) == i % 10
        assert sum(re.findall(r"[a-z]+", prompt).count(w) for w in WORDS) == 1, prompt  # no second digit word
    with pytest.raises(DistillError, match="names no digit"):
        digit_of("a photo of a seven")


@pytest.mark.parametrize("template", ["a photo of a {}", "a handwritten {} beside a handwritten {}",
                                      "a handwritten digit {}", "a handwritten {}, handwritten"])
def test_a_template_without_exactly_one_digit_phrase_is_refused(template, tmp_path):
    with pytest.raises(ConfigError, match="t2i.templates"):
        load_config(TeacherTrainConfig, CONFIG, [f"data.path={tmp_path}", f"t2i.templates=['{template}']"])


def test_captions_draw_a_template_per_sample_and_drop_to_the_empty_prompt(tmp_path):
    """The UNet stage's captions for 2,000 labels: each non-empty one is a template naming the sample's own digit,
    every template is drawn (each within 5 binomial standard errors of 1/6), the empty prompt (the null condition,
    the encoding the denoiser guides with) takes t2i.caption_dropout of them within 5 standard errors, and the same
    generator state gives the same captions."""
    from distill.pretrain_t2i import T2ITeacherModule, digit_of

    cfg = load_config(TeacherTrainConfig, CONFIG, [f"data.path={tmp_path}", *TINY, "t2i.caption_dropout=0.3"])
    module = T2ITeacherModule(cfg, torch.zeros(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))
    labels = torch.arange(10).repeat(200)
    captions = module.captions(labels, torch.Generator().manual_seed(1))
    assert captions == module.captions(labels, torch.Generator().manual_seed(1))
    n = len(labels)
    empty = sum(c == "" for c in captions)
    assert abs(empty / n - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    kept = [(c, y) for c, y in zip(captions, labels.tolist()) if c]
    assert all(digit_of(c) == y for c, y in kept)
    k = len(T2I_TEMPLATES)
    for t in T2I_TEMPLATES:
        share = sum(c == t.format(WORDS[y]) for c, y in kept) / len(kept)
        assert abs(share - 1 / k) < 5 * math.sqrt((1 / k) * (1 - 1 / k) / len(kept)), t
    null = module.denoiser.null_condition(1).embeds
    assert torch.equal(null, module.text([""]).embeds)
    assert not torch.equal(null, module.text(["a handwritten one"]).embeds)


def test_the_tokenizer_gives_every_word_of_every_prompt_one_token(tmp_path):
    """The word-level CLIPTokenizer, written by the recipe and as shipped: every prompt of the list encodes as
    start, one token per word (punctuation included), end, with no unknown token (CLIP's unknown token is its end
    token) and ids inside the text encoder's vocabulary; the empty prompt (the null condition) is start, end; a word
    outside the templates still encodes, by characters."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    from distill.pretrain_t2i import write_tokenizer

    written = write_tokenizer(tmp_path / "tok", T2I_TEMPLATES, max_length=16)
    shipped = CLIPTokenizer.from_pretrained(SHIPPED / "tokenizer")
    vocab_size = CLIPTextConfig.from_pretrained(SHIPPED / "text_encoder").vocab_size
    for tok in (written, shipped):
        assert len(tok) <= vocab_size
        end = tok.convert_tokens_to_ids("<|endoftext|>")
        for prompt in PROMPTS.read_text().splitlines():
            ids = tok(prompt).input_ids
            expected = ["<|startoftext|>"] + [w + "</w>" for w in re.findall(r"[a-z]+|,", prompt)] + ["<|endoftext|>"]
            assert tok.convert_ids_to_tokens(ids) == expected, prompt
            assert end not in ids[1:-1] and max(ids) < vocab_size
            assert len(ids) <= tok.model_max_length
        assert tok.convert_ids_to_tokens(tok("").input_ids) == ["<|startoftext|>", "<|endoftext|>"]
        assert tok.convert_ids_to_tokens(tok("a handwritten 7").input_ids)[1:-1] == ["a</w>", "handwritten</w>",
                                                                                    "7</w>"]
    assert written.get_vocab() == shipped.get_vocab()


# --------------------------------------------------------------------------------------------------------------
# Prompt accuracy.


def test_prompt_accuracy_reads_the_digit_of_each_prompt(digits_shards):
    """Real digits upsampled (nearest) to 16 px score exactly the classifier's accuracy on the 8x8 originals against
    their own prompts (average pooling undoes the upsampling), and almost nothing against the next digit's; the
    standard error is the binomial one."""
    from distill.metrics import accuracy, load_digits_classifier
    from distill.pretrain_t2i import load_digits, prompt_accuracy, upsample

    images, labels = load_digits(digits_shards, "val")
    x = upsample(images, 16, "nearest")
    own = [T2I_TEMPLATES[i % len(T2I_TEMPLATES)].format(WORDS[y]) for i, y in enumerate(labels.tolist())]
    other = [f"a handwritten {WORDS[(y + 1) % 10]}" for y in labels.tolist()]
    result = prompt_accuracy(x, own)
    p = accuracy(load_digits_classifier(), images, labels)
    assert result["n"] == len(labels) == 180 and result["accuracy"] == p > 0.9
    assert result["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / len(labels)))
    assert prompt_accuracy(x, other)["accuracy"] < 0.05
    with pytest.raises(DistillError, match="one image per prompt"):
        prompt_accuracy(x[:3], own[:2])


# --------------------------------------------------------------------------------------------------------------
# The shipped teacher.


def test_the_shipped_teacher_loads_in_stock_diffusers_and_records_its_recipe_and_accuracy():
    """data/teachers/t2i-digits: a few MB; stock StableDiffusionPipeline loads it with the components the recipe
    promises; distill.json records a prompt accuracy >= 0.9 at guidance 2 on >= 500 prompts (with its binomial
    standard error), the VAE stage's reconstruction accuracy and the stages' wall times; train_config.yaml is
    configs/teacher-t2i-digits.yaml (with the shipped out=)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 8e6, size
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.vae.config.in_channels == 1 and pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 16
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.safety_checker is None

    record = json.loads((SHIPPED / "distill.json").read_text())
    acc = record["prompt_accuracy"]
    assert acc["protocol"]["prompts"] >= 500
    for scale in ("1", "2", "4"):
        p, n = acc[scale]["accuracy"], acc[scale]["n"]
        assert n == acc["protocol"]["prompts"] and acc[scale]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    assert acc["2"]["accuracy"] >= 0.9
    assert record["vae"]["val"]["reconstruction_accuracy"] >= 0.9
    assert record["vae"]["scaling_factor"] == pytest.approx(pipe.vae.config.scaling_factor)
    assert record["vae"]["seconds"] > 0 and record["train_seconds_this_invocation"] > 0
    from distill.train import _flat

    recipe = _flat(yaml.safe_load((SHIPPED / "train_config.yaml").read_text()))
    for key, value in _flat(yaml.safe_load(CONFIG.read_text())).items():
        if key not in ("out", "run.dir"):
            assert recipe[key] == value, key
    assert recipe["out"] == "data/teachers/t2i-digits" and recipe["trainer.max_steps"] == record["step"]


def test_the_shipped_teacher_follows_its_prompts():
    """20 "a handwritten three" and 20 "a handwritten seven" prompts, DDIM 20 steps at guidance 2 through distill's
    loader: the digits classifier reads the prompted digit far more often than chance (0.1): the bound is chance
    plus 5 binomial standard errors of chance at n = 40 (0.34), which a teacher that ignored the prompt would pass
    with probability below 1e-5."""
    from distill.pretrain_t2i import prompt_accuracy, sample_teacher
    from distill.teachers import load_teacher

    teacher = load_teacher(SHIPPED)
    prompts = ["a handwritten three"] * 20 + ["a handwritten seven"] * 20
    config = teacher.denoiser.net.unet.config
    noise = torch.randn(len(prompts), config.in_channels, config.sample_size, config.sample_size,
                        generator=torch.Generator().manual_seed(0))
    result = prompt_accuracy(sample_teacher(teacher, prompts, noise, steps=20, guidance_scale=2.0), prompts)
    chance = 0.1
    assert result["accuracy"] > chance + 5 * math.sqrt(chance * (1 - chance) / len(prompts)), result


# --------------------------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize("override, key, expected", [
    ("kind=sd", "kind", "one of unet, t2i"),
    ("t2i.resolution=12", "t2i.resolution", "a multiple of 8"),
    ("t2i.upsample=bicubic", "t2i.upsample", "one of nearest, bilinear"),
    ("t2i.caption_dropout=1", "t2i.caption_dropout", "a probability in [0, 1)"),
    ("t2i.caption_dropout=nan", "t2i.caption_dropout", "a probability in [0, 1)"),
    ("vae.lr=inf", "vae.lr", "a finite number > 0"),
    ("vae.kl_weight=-1", "vae.kl_weight", "a finite number >= 0"),
    ("vae.block_out_channels=[12,24]", "vae.block_out_channels", "multiples of 8"),
    ("text.heads=3", "text.heads", "dividing text.hidden_size"),
    ("eval.guidance_scales=[1.0,-2.0]", "eval.guidance_scales", "numbers >= 0"),
    ("unet.block_out_channels=[12,24]", "unet.block_out_channels", "multiples of 8"),
    ("unet.prediction_type=sample", "unet.prediction_type", "epsilon or v_prediction"),
    ("t2i.resolution=8", "t2i.resolution", "a multiple of 2^4"),
])
def test_bad_t2i_keys_name_the_key_and_what_was_expected(override, key, expected, tmp_path):
    extra = ["vae.block_out_channels=[8,8,8,8,8]"] if override == "t2i.resolution=8" else []
    with pytest.raises(ConfigError) as e:
        load_config(TeacherTrainConfig, CONFIG, [f"data.path={tmp_path}", override, *extra])
    assert e.value.key == key and expected in str(e.value)


def test_data_that_is_not_the_digits_is_refused_before_anything_is_written(tmp_path):
    from PIL import Image

    from distill.cli import main
    from distill.data import write_folder_shards

    src = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        Image.new("L", (8, 8), color=40).save(src / c / "0.png")
    write_folder_shards(src, tmp_path / "pets", channels=1)
    run_dir = tmp_path / "run"
    with pytest.raises(DistillError, match="kind t2i captions the digits"):
        from distill.train import train_teacher

        train_teacher(load_config(TeacherTrainConfig, CONFIG, [f"data.path={tmp_path / 'pets'}", f"run.dir={run_dir}"]))
    assert not run_dir.exists()
    assert main(["teacher", "--config", str(CONFIG), f"data.path={tmp_path / 'pets'}", f"run.dir={run_dir}"]) == 2
