"""The training step's schedule through a real Trainer: the fake score is updated every step and the generator every
`optim.ttur` steps (DMD2's two time scales), the EMA follows the generator with its warm-up, and every step draws
new noise. Each test checks what a one-line slip in the wiring would change (see tests/mutants.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO

GMM = str(REPO / "configs" / "gmm.yaml")
QUIET = ["logging.progress_bar=false", "logging.proposal_plot_every_steps=0", "eval.fid_every_steps=0",
         "eval.variance_every_steps=0", "logging.wandb=disabled", "logging.samples_every_steps=0",
         "estimator.diagnostic_every=0"]


def test_generator_every_ttur_steps_and_fake_score_every_step(tmp_path):
    """7 steps with ttur = 3: the generator's AdamW has stepped at steps 0, 3, 6 (3 times), the fake score's 7
    times; and the EMA has moved off the generator's initial weights."""
    from distill.config import FitConfig, load_config
    from distill.train import fit

    cfg = load_config(FitConfig, GMM, [f"run.dir={tmp_path / 'run'}", *QUIET, "trainer.max_steps=7", "optim.ttur=3",
                                       "trainer.checkpoint_every_steps=7", "trainer.log_every_steps=7"])
    assert fit(cfg).exit_code == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    gen_steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    fake_steps = {float(s["step"]) for s in ckpt["optimizer_states"][1]["state"].values()}
    assert gen_steps == {3.0} and fake_steps == {7.0}
    sd = ckpt["state_dict"]
    ema = {k[len("ema."):]: v for k, v in sd.items() if k.startswith("ema.")}
    gen = {k[len("generator."):]: v for k, v in sd.items() if k.startswith("generator.")}
    assert ema.keys() == gen.keys() and ema
    assert any(not torch.equal(ema[k], gen[k]) for k in ema)  # an EMA, not a copy


def test_ema_update_follows_the_warm_up_formula():
    """ema <- ema + (1 - d)(model - ema), d = min(decay, (1 + step) / (10 + step)): at step 0, d = 0.1, so the EMA
    moves 90% of the way; late in training d = decay. A skipped update (taken = False) moves nothing."""
    from distill.teachers import ema_update

    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.zero_()
    ema_update(ema, model, 0.999, 0)
    assert all(torch.allclose(p, torch.full_like(p, 0.9)) for p in ema.parameters())
    ema_update(ema, model, 0.999, 10**6)  # d = decay: 0.9 + 0.001 * 0.1
    assert all(torch.allclose(p, torch.full_like(p, 0.9 + 1e-4)) for p in ema.parameters())
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.999, 5, taken=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.parameters()))


def test_every_step_draws_new_noise_and_the_same_step_the_same():
    """The step's generator depends on (seed, rank, step): two steps differ, the same step repeats exactly (what
    makes a resumed run draw what the uninterrupted run would have)."""
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    m = DMDModule(load_config(FitConfig, GMM, []))
    draws = []
    for step in (0, 1, 0):
        m.step = step
        draws.append(torch.randn(8, generator=m._step_generator()))
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[0], draws[2])


def test_health_counters_survive_a_checkpoint_round_trip():
    """The skipped-update counters (total, in a row, step of the last one) are saved and restored: after a resume
    `health/last_nonfinite_step` still names the step (it used to read 0)."""
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    cfg = load_config(FitConfig, GMM, [])
    m = DMDModule(cfg)
    m.health = torch.tensor([5.0, 2.0, 2.0, 17.0], dtype=torch.float64)
    ckpt = {"state_dict": dict(m.state_dict())}
    m.on_save_checkpoint(ckpt)
    other = DMDModule(cfg)
    other.on_load_checkpoint(ckpt)
    assert other.health.tolist() == [5.0, 2.0, 2.0, 17.0]
    assert other.check_health() == {"health/nonfinite_steps": 5.0, "health/last_nonfinite_step": 17.0}


def test_learning_rate_warms_up_linearly_then_holds(tmp_path):
    """optim.warmup_steps = 4: step s trains at (s + 1) / 4 of each configured rate, so a run stopped after 2 steps
    checkpoints half the rates, and one of 6 steps the full rates (the rate is a function of the step: a resumed
    run takes the same)."""
    from distill.config import FitConfig, load_config
    from distill.train import fit

    def rates(steps: int) -> list[float]:
        run = tmp_path / f"run{steps}"
        cfg = load_config(FitConfig, GMM, [f"run.dir={run}", *QUIET, f"trainer.max_steps={steps}", "optim.ttur=1",
                                           "optim.warmup_steps=4", "optim.lr_generator=1e-3",
                                           "optim.lr_fake_score=3e-3", f"trainer.checkpoint_every_steps={steps}"])
        assert fit(cfg).exit_code == 0
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        return [s["param_groups"][0]["lr"] for s in ckpt["optimizer_states"]]

    assert rates(2) == pytest.approx([0.5e-3, 1.5e-3], rel=1e-12)
    assert rates(6) == pytest.approx([1e-3, 3e-3], rel=1e-12)
