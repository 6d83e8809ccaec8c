"""DDP that is provably the same computation: two CPU processes (gloo)."""

import csv

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, run_cli
from distill.carv import TimestepSampler
from distill.carv.controller import weighted_mean
from distill.losses import dmd_loss

GMM = str(REPO / "configs" / "gmm.yaml")


def _draws(m, N: int, K: int):
    """A fixed global batch: z (N, 2), t and w (N, K), eps (N*K, 2), the same in every process."""
    g = torch.Generator().manual_seed(123)
    z = torch.randn(N, 2, generator=g)
    t, w = m.sampler.sample(N, K, generator=g)
    eps = torch.randn(N * K, 2, generator=g)
    return z, t, w, eps


def _grad(m, z, t, w, eps, wrap=None):
    gen = wrap if wrap is not None else m.generator
    x = gen(z)
    with torch.no_grad():
        g_bar = weighted_mean(m._integrand(x.detach(), None, t, eps), w)
    dmd_loss(x, g_bar).mean().backward()
    return torch.cat([p.grad.flatten() for p in m.generator.parameters()])


def _module():
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    torch.manual_seed(0)
    cfg = load_config(FitConfig, GMM, ["estimator.K=4", "estimator.proposal=adaptive"])
    m = DMDModule(cfg)
    m.fake_score.net.net[-1].bias.data += 0.3  # move the fake score off anything symmetric
    return m


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to race for with other tests
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    m = _module()
    z, t, w, eps = _draws(m, 64, 4)
    half = slice(rank * 32, (rank + 1) * 32)
    ddp = torch.nn.parallel.DistributedDataParallel(m.generator)
    grad = _grad(m, z[half], t[half], w[half], eps[rank * 128:(rank + 1) * 128], wrap=ddp)
    if rank == 0:
        torch.save(grad, out)
    dist.destroy_process_group()


def test_all_reduced_gradient_equals_the_single_process_gradient_on_the_whole_batch(tmp_path):
    out = str(tmp_path / "ddp_grad.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ddp_grad = torch.load(out)
    m = _module()
    z, t, w, eps = _draws(m, 64, 4)
    single = _grad(m, z, t, w, eps)
    assert single.abs().max() > 0
    torch.testing.assert_close(ddp_grad, single, rtol=1e-5, atol=1e-7)


def test_global_strata_of_the_ranks_together_form_one_stratification():
    """p uniform over exactly M = world * N * K indices: each stratum of the global batch maps to one index, so the
    ranks' draws together must hit every index exactly once."""
    N, K, world = 5, 3, 2
    M = world * N * K
    sampler = TimestepSampler(torch.full((M,), 1.0 / M), stratify="global")
    ts = []
    for rank in range(world):
        gen = torch.Generator().manual_seed(99)  # the same state on every rank
        t, w = sampler.sample(N, K, generator=gen, rank=rank, world_size=world)
        assert torch.equal(w, torch.ones(N, K))
        ts.append(t.flatten())
    assert sorted(torch.cat(ts).tolist()) == list(range(M))
    assert not torch.equal(ts[0], ts[1])  # each rank its own slice


@pytest.mark.slow
def test_lightning_ddp_two_processes_keep_the_same_proposal_and_k(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli("fit", "--config", GMM, f"run.dir={run_dir}", "trainer.max_steps=120", "trainer.accelerator=cpu",
                "trainer.devices=2", "logging.progress_bar=false", "logging.samples_every_steps=0",
                "eval.fid_every_steps=60", "eval.variance_every_steps=60", "estimator.K=auto",
                "estimator.proposal=adaptive", "estimator.stratify=global", "estimator.adaptive_warmup=5",
                "estimator.adaptive_refresh_every=5", "estimator.diagnostic_every=5", "estimator.auto_every=10",
                "optim.ttur=1", "trainer.log_every_steps=10", "logging.wandb=disabled", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MEMBER: 2/2" in r.stderr + r.stdout
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(row["step"]) for row in rows] == list(range(10, 121, 10))
    agree = [row["carv/ranks_agree"] for row in rows if row.get("carv/ranks_agree")]
    assert agree and all(float(a) == 1.0 for a in agree)  # q and K compared across ranks every 10 updates
    assert any(row.get("fid/ema") for row in rows)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["distill"]["step"] == 120 and ckpt["distill"]["sampler"]["n_refreshes"] >= 20
