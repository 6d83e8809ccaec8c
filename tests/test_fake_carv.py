"""CARV on the fake-score update (docs/method.md §9, "The fake score's loss"): K draws per sample from a proposal
q, weighted by p/q, estimate DMD2's denoising loss without bias; the default is DMD2's draw; the proposal's state
is checkpointed and a resumed run ends where an uninterrupted one does."""

import pytest
import torch

from distill.config import ConfigError, FitConfig, load_config
from distill.losses import denoising_loss
from distill.module import DMDModule

GMM = "configs/gmm.yaml"


def _module(*overrides: str) -> DMDModule:
    torch.manual_seed(0)
    return DMDModule(load_config(FitConfig, GMM, list(overrides)))


def test_the_default_is_dmd2s_one_uniform_draw():
    assert _module().fake_sampler is None  # the training step keeps DMD2's randint(0, T) path
    assert _module("fake_score.K=2").fake_sampler is not None
    for bad in ("fake_score.K=0", "fake_score.proposal=learned", "fake_score.stratify=global"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            _module(bad)


class _SkewedInT(torch.nn.Module):
    """The fake score with its prediction scaled by 1 + 4 t/T: its loss grows steeply with t."""

    def __init__(self, base, T: int):
        super().__init__()
        self.base, self.T = base, T

    def forward(self, x_t, t, cond=None):
        return self.base(x_t, t, cond) * (1 + 4 * t.float() / self.T)[:, None] + 3 * (t.float() / self.T)[:, None]

    def loss_weight(self, t, x0):
        return self.base.loss_weight(t, x0)


@torch.no_grad()
def test_weighted_stratified_draws_estimate_dmd2s_loss_without_bias():
    m = _module("fake_score.K=4", "fake_score.stratify=per_sample")
    T = m.teacher.T
    m.fake_score = _SkewedInT(m.fake_score, T)  # a loss that grows with t: a proposal that favours large t matters
    q = torch.linspace(1.0, 6.0, T, dtype=torch.float64) ** 2  # far from p = 1/T: the weights carry the correction
    m.fake_sampler._set_q(q / q.sum())
    x0 = torch.randn(128, 2, generator=torch.Generator().manual_seed(0)) * 2
    est = torch.tensor([float(m._fake_score_loss(x0, None, torch.Generator().manual_seed(s))[0]) for s in range(200)])
    # DMD2's loss at these x0: every t of [0, T) (p uniform), 8 noise draws each
    gen = torch.Generator().manual_seed(1)
    per_t = []
    for t0 in range(0, T, 50):
        t = torch.arange(t0, min(t0 + 50, T)).repeat_interleave(x0.shape[0] * 8)
        x = x0.repeat(50 * 8, 1)[: t.numel()]
        x_t = m.teacher.schedule.add_noise(x, torch.randn(x.shape, generator=gen), t)
        per_t.append(denoising_loss(m.fake_score(x_t, t), x, m.fake_score.loss_weight(t, x)))
    exact = torch.cat(per_t)
    se = (est.var() / est.numel() + exact.var() / exact.numel()) ** 0.5
    assert abs(float(est.mean() - exact.mean())) < 4 * float(se), (float(est.mean()), float(exact.mean()), float(se))
    # the weights span a factor of 30 here: without them the estimate is biased (the mutant `fake-unweighted`)
    t, w = m.fake_sampler.sample(4096, 1, generator=gen)
    assert float(w.max() / w.min()) > 10


@pytest.mark.slow
def test_an_adaptive_fake_proposal_is_checkpointed_and_a_resumed_run_ends_bit_identical(tmp_path):
    from conftest import run_cli

    common = ["fit", "--config", GMM, "logging.wandb=disabled", "logging.progress_bar=false",
              "logging.samples_every_steps=0", "fake_score.K=3", "fake_score.proposal=adaptive",
              "fake_score.stratify=per_sample", "estimator.adaptive_warmup=4", "estimator.adaptive_refresh_every=4",
              "trainer.checkpoint_every_steps=12", "trainer.log_every_steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = run_cli(*common, f"run.dir={straight}", "trainer.max_steps=24", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for steps in (12, 24):  # stopped at step 12 (a checkpoint), then resumed
        r = run_cli(*common, f"run.dir={resumed}", f"trainer.max_steps={steps}", timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for d in (straight, resumed))
    fake = a["distill"]["fake_sampler"]
    assert fake["n_updates"] == 24 and fake["n_refreshes"] >= 4  # one update per fake-score step
    assert not torch.allclose(fake["q"], fake["p"])  # the proposal moved off p
    other = b["distill"]["fake_sampler"]
    for k, v in fake.items():
        assert torch.equal(v, other[k]) if isinstance(v, torch.Tensor) else v == other[k], k
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
