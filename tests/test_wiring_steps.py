"""The training step's wiring, on one process.

- Every random number of a step is a function of (seed, rank, step) (`DMDModule._step_generator`): the ranks draw
  independent samples, so the global batch holds world x N of them (σ_b²/N in docs/method.md §5 counts
  independent outer samples), and strata over the global batch tile the timesteps across ranks (§7).
- An update with a non-finite loss or gradient changes nothing (docs/method.md §3, "Optimisers").

The two-process versions run under Lightning DDP in tests/test_ddp.py."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import REPO
from distill.config import FitConfig, load_config
from distill.module import DMDModule

GMM = str(REPO / "configs" / "gmm.yaml")


def _module(*overrides: str) -> DMDModule:
    torch.manual_seed(0)
    return DMDModule(load_config(FitConfig, GMM, ["data.batch_size=16", "trainer.devices=2", *overrides]))


class _Strategy:
    """What `training_step` asks of a Lightning strategy on one process: the optimisers and the backward pass."""

    def __init__(self, optimizers):
        self._lightning_optimizers = optimizers

    def backward(self, loss, optimizer, *args, **kwargs):
        loss.backward(*args, **kwargs)


def _attach(m: DMDModule, rank: int, world: int = 2) -> DMDModule:
    """Put `m` under a stand-in trainer that says it is global rank `rank` of `world` (no process group)."""
    m.trainer = SimpleNamespace(global_rank=rank, world_size=world, strategy=_Strategy(m.configure_optimizers()))
    return m


def _draws_of_one_step(m: DMDModule, step: int, monkeypatch) -> dict[str, list[torch.Tensor]]:
    """Run `training_step` at `step` and return every random input it used: the generator's z, and (eps, t) of
    each x_t = alpha_t x + sigma_t eps it formed (the N*K DMD draws, then the fake score's N draws)."""
    seen: dict[str, list[torch.Tensor]] = {"z": [], "eps": [], "t": []}
    generator_forward, add_noise = m.generator.forward, m.teacher.schedule.add_noise

    def forward(z, labels=None, **kw):
        seen["z"].append(z.clone())
        return generator_forward(z, labels, **kw)

    def noised(x0, eps, t):
        seen["eps"].append(eps.clone())
        seen["t"].append(t.clone())
        return add_noise(x0, eps, t)

    with monkeypatch.context() as patch:
        patch.setattr(m.generator, "forward", forward)
        patch.setattr(m.teacher.schedule, "add_noise", noised)
        m.step = step
        m.training_step(torch.tensor(step), step)
    assert len(seen["z"]) == 1 and len(seen["eps"]) == 2  # one generator call, DMD draws + fake-score draws
    return seen


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def _disjoint(a: dict, b: dict) -> bool:
    """No random input of one step equals the other's, tensor by tensor (z, each eps, each t)."""
    return not any(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_step_noise_is_a_function_of_seed_rank_and_step(monkeypatch):
    """Rank 1 draws other z, t and eps than rank 0 at the same step (two ranks sharing noise would train on half
    the global batch twice); the same (seed, rank, step) draws exactly the same, in a fresh module too (what exact
    resume relies on)."""
    over = ("optim.ttur=1", "estimator.K=2")
    rank0 = _draws_of_one_step(_attach(_module(*over), rank=0), 3, monkeypatch)
    rank1 = _draws_of_one_step(_attach(_module(*over), rank=1), 3, monkeypatch)
    again = _draws_of_one_step(_attach(_module(*over), rank=0), 3, monkeypatch)
    later = _draws_of_one_step(_attach(_module(*over), rank=0), 4, monkeypatch)
    other_seed = _draws_of_one_step(_attach(_module(*over, "trainer.seed=1"), rank=0), 3, monkeypatch)
    assert rank0["z"][0].shape == (8, 2) and rank0["eps"][0].shape == (16, 2)  # N = 16 / 2 ranks, K = 2
    assert _same(rank0, again)
    assert _disjoint(rank0, rank1)
    assert _disjoint(rank0, later) and _disjoint(rank0, other_seed)


def test_global_strata_of_the_two_ranks_tile_the_timesteps_through_the_step(monkeypatch):
    """estimator.stratify=global through `training_step`: p uniform over exactly M = world*N*K = 64 indices
    [100, 163], so each global stratum is one index and the two ranks' t together hit every index exactly once
    (docs/method.md §7). Fails when a rank takes another rank's slice, or when the ranks' shared draw differs."""
    over = ("optim.ttur=1", "estimator.K=4", "estimator.stratify=global", "estimator.t_min=0.1",
            "estimator.t_max=0.1635")
    ts = []
    for rank in (0, 1):
        m = _attach(_module(*over), rank=rank)
        assert (m.sampler.lo, m.sampler.hi) == (100, 163) and m.batch_per_device == 8
        ts.append(_draws_of_one_step(m, 5, monkeypatch)["t"][0])  # the DMD draws (N*K,)
    assert sorted(torch.cat(ts).tolist()) == list(range(100, 164))


# ---------------------------------------------------------------------------------------------------------------
# A non-finite update changes nothing.


class _Snapshots(L.Callback):
    """The whole training state after every step: networks, optimiser states, proposal and K controller."""

    def __init__(self):
        self.after: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, m, outputs, batch, batch_idx):
        clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731
        opt = [{i: clone(s) for i, s in o.state_dict()["state"].items()} for o in trainer.optimizers]
        sampler = m.sampler.state_dict()
        self.after[m.step] = {
            "generator": clone(m.generator.state_dict()), "ema": clone(m.ema.state_dict()),
            "fake_score": clone(m.fake_score.state_dict()), "opt_generator": opt[0], "opt_fake_score": opt[1],
            "proposal": {k: sampler[k] for k in ("q", "m2", "seen", "pending")},
            "k_control": dict(m.k_control.state_dict()),
            "health": m.health.clone()}


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b


@pytest.fixture(scope="module")
def skipped_at_step_3():
    """A 5-step single-process Lightning fit in which the generator's output at step 3 has one NaN sample (as when
    G blows up on one z): the generator update (NaN loss and gradient) and the fake-score update (NaN loss on that
    sample) of step 3 must both be skipped. The adaptive proposal is rebuilt after every update and the split-half
    diagnostic runs at every update, so that every finite update moves the proposal and the K controller."""
    from distill.synthetic import StepStream

    m = _module("trainer.devices=1", "trainer.max_steps=5", "optim.ttur=1", "estimator.K=4",
                "estimator.proposal=adaptive", "estimator.adaptive_warmup=1", "estimator.adaptive_refresh_every=1",
                "estimator.diagnostic_every=1", "trainer.log_every_steps=100")
    forward = m.generator.forward

    def blows_up_at_step_3(z, labels=None, **kw):
        x = forward(z, labels, **kw)
        if m.step != 3:
            return x
        blown = torch.ones_like(x)
        blown[0] = float("nan")
        return x * blown  # still a function of G's parameters: the gradient is NaN too

    m.generator.forward = blows_up_at_step_3
    snapshots = _Snapshots()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=-1, logger=False,
                        callbacks=[snapshots], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        use_distributed_sampler=False)
    trainer.fit(m, datamodule=StepStream())
    assert m.step == 5
    return snapshots.after


STATE = ("generator", "ema", "fake_score", "opt_generator", "opt_fake_score", "proposal", "k_control")


def test_a_non_finite_update_changes_nothing(skipped_at_step_3):
    """Step 3 (the 4th) is skipped: G, its EMA, the fake score, both optimisers' moments and step counts, the
    proposal q with its second-moment table, and the K controller's variance estimates are exactly as step 2 left
    them; the health counter says two updates were skipped. Fails when the EMA or the proposal statistics are fed
    by a skipped update."""
    after = skipped_at_step_3
    for part in STATE:
        same = _equal(after[4][part], after[3][part])
        assert same, f"{part} changed in a skipped update"
    assert after[4]["health"][0].item() == 2 and after[3]["health"][0].item() == 0


def test_finite_updates_around_the_skipped_one_change_every_part(skipped_at_step_3):
    """The check above is not vacuous: the finite steps before and after the skipped one each change every part
    that the skipped one must not (and training goes on from finite weights)."""
    after = skipped_at_step_3
    for before, later in ((2, 3), (4, 5)):
        for part in STATE:
            same = _equal(after[later][part], after[before][part])
            assert not same, f"{part} unchanged at step {later - 1}"
    assert all(v.isfinite().all() for v in after[5]["generator"].values())
    assert after[5]["health"][0].item() == 2
