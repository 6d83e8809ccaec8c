"""The commands that make a run's inputs, end to end from the CLI: `distill teacher` trains a tiny teacher on the
digits shards and saves a diffusers folder that `from_pretrained` loads (the EMA weights) and that `distill fit`
takes as teacher.path; `distill classifier` trains the digits classifier and writes a weights file that
`--features-path` accepts."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import REPO


def test_distill_teacher_saves_its_ema_as_a_diffusers_folder_that_fit_uses(tmp_path, digits_shards, capsys):
    """4 steps of `distill teacher` (a UNet of 8 and 16 channels, batch 16): the folder holds unet/ and scheduler/
    in the save_pretrained layout, UNet2DModel.from_pretrained gives exactly the EMA weights of the run's last
    checkpoint (which differ from the raw weights: the EMA is what is saved), the scheduler is the training one
    (eps prediction, no sample clipping), and `distill fit` trains 2 steps with it as teacher.path."""
    from diffusers import DDPMScheduler, UNet2DModel

    from distill.cli import main
    from distill.teachers import load_diffusers_teacher, sample_shape_of

    run_dir = tmp_path / "teacher-run"
    assert main(["teacher", "--config", str(REPO / "configs" / "teacher-digits.yaml"), f"run.dir={run_dir}",
                 f"data.path={digits_shards}", "trainer.max_steps=4", "unet.block_out_channels=[8,16]",
                 "sample_steps=2", "data.batch_size=16", "optim.warmup_steps=1", "trainer.log_every_steps=2",
                 "logging.wandb=disabled", "logging.progress_bar=false"]) == 0
    out = run_dir / "teacher"
    assert f"teacher saved to {out}" in capsys.readouterr().out
    for name in ("unet/config.json", "scheduler/scheduler_config.json", "samples.png", "train_config.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "distill.json").read_text())["step"] == 4

    unet = UNet2DModel.from_pretrained(out / "unet")
    assert unet.config.num_class_embeds == 11 and tuple(unet.config.block_out_channels) == (8, 16)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["distill"]["step"] == 4
    ema = {k[len("ema.net.unet."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.net.unet.")}
    raw = {k[len("denoiser.net.unet."):]: v for k, v in ckpt["state_dict"].items()
           if k.startswith("denoiser.net.unet.")}
    saved = unet.state_dict()
    assert saved.keys() == ema.keys() == raw.keys()
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.prediction_type == "epsilon" and sched.config.clip_sample is False
    D = load_diffusers_teacher(out)
    assert D.num_classes == 10 and sample_shape_of(D) == (1, 8, 8) and D.T == 1000

    fit_dir = tmp_path / "fit"
    assert main(["fit", "--config", str(REPO / "configs" / "digits.yaml"), f"run.dir={fit_dir}",
                 f"teacher.path={out}", f"data.path={digits_shards}", "trainer.max_steps=2", "data.batch_size=8",
                 "optim.ttur=1", "eval.fid_every_steps=0", "logging.samples_every_steps=0",
                 "logging.proposal_plot_every_steps=0", "logging.wandb=disabled", "logging.progress_bar=false"]) == 0
    fitted = torch.load(fit_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert fitted["distill"]["step"] == 2 and f"path: {out}" in fitted["distill"]["config"]
    fake = {k[len("fake_score."):]: v for k, v in fitted["state_dict"].items() if k.startswith("fake_score.")}
    assert fake.keys() == {f"net.unet.{k}" for k in saved}  # the fake score is a copy of this teacher's UNet


def test_distill_classifier_writes_weights_that_features_path_accepts(tmp_path, digits_shards, capsys):
    """`distill classifier --steps 20 --seed 3` passes its options through (classifier.json records them), and the
    classifier.pt it writes is accepted by `distill stats --features-path`, whose statistics carry the extractor id
    of that file (not the shipped classifier's)."""
    from distill.cli import main
    from distill.metrics import build_extractor

    out = tmp_path / "cls"
    assert main(["classifier", "--data", str(digits_shards), "--out", str(out), "--steps", "20", "--seed", "3"]) == 0
    info = json.loads((out / "classifier.json").read_text())
    assert info["train_steps"] == 20 and info["seed"] == 3
    assert f"features {info['extractor_id']}" in capsys.readouterr().out
    ref = tmp_path / "ref.npz"
    assert main(["stats", "--data", str(digits_shards), "--features-path", str(out / "classifier.pt"), "--out",
                 str(ref), "--max-samples", "200"]) == 0
    with np.load(ref) as f:
        assert str(f["extractor_id"]) == info["extractor_id"] != build_extractor("digits").extractor_id
        assert int(f["n"]) == 200 and f["mu"].shape == (64,)
