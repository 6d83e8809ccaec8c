"""DDP that is provably the same computation: two CPU processes (gloo) under Lightning, through `training_step`, and
the data that each rank and DataLoader worker reads.

The two-process runs launch a small driver (`_DRIVER`) the way a user launches `distill fit`: Lightning's ddp
launcher starts the same file again for rank 1. The driver records, on every rank, each step's random inputs and
the whole training state after each step, so that the tests can compare the ranks with each other and with a
single-process computation."""

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, run_cli
from distill.carv import TimestepSampler

GMM = str(REPO / "configs" / "gmm.yaml")


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


# ---------------------------------------------------------------------------------------------------------------
# Data: what distill/data.py promises about ranks and workers.


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    """The digits as ONE training shard (1617 samples): with a single shard, the order in which a (rank, worker)
    stream delivers the samples is set by its shuffle seed alone."""
    from distill.data import write_digits_shards

    out = tmp_path_factory.mktemp("one_shard")
    write_digits_shards(out, val_fraction=0.1, seed=0, shard_size=2000)
    return out


def _worker_streams(path: Path, rank: int, world: int, workers: int, batches: int, monkeypatch) -> list[list]:
    """What (rank, worker) w of `workers` streams, per worker, computed in this process (webdataset reads the
    worker's identity from WORKER / NUM_WORKERS, as inside a DataLoader worker)."""
    from distill.data import ShardDataModule

    streams = []
    for worker in range(workers):
        with monkeypatch.context() as env:
            env.setenv("RANK", str(rank))
            env.setenv("WORLD_SIZE", str(world))
            env.setenv("WORKER", str(worker))
            env.setenv("NUM_WORKERS", str(workers))
            it = iter(ShardDataModule(path, batch_size=16, seed=0, shuffle_buffer=200).train_dataset())
            streams.append([next(it) for _ in range(batches)])
    return streams


def _interleaved(streams: list[list], n: int) -> list:
    """A DataLoader with len(streams) workers hands out batch i from worker i % workers (in order)."""
    return [streams[i % len(streams)][i // len(streams)] for i in range(n)]


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def _check_rank_worker_streams(loaded: dict[int, list], expected: dict[int, list[list]]) -> None:
    """The batches each rank's loader gave are the interleaving of its workers' own streams, and no two of the
    world x workers streams are the same (two (rank, worker) pairs reading the same order would make the global
    batch hold duplicates)."""
    for rank, batches in loaded.items():
        assert _same_batches(batches, _interleaved(expected[rank], len(batches))), f"rank {rank}"
    streams = [s for rank in sorted(expected) for s in expected[rank]]
    for i in range(len(streams)):
        for j in range(i + 1, len(streams)):
            assert not torch.equal(streams[i][0][0], streams[j][0][0]), (i, j)


@pytest.mark.parametrize("shards", ["one_shard", "digits_shards"])
def test_each_rank_and_worker_streams_its_own_reproducible_order(shards, request, monkeypatch):
    """ShardDataModule with data.num_workers = 2 on two ranks (RANK / WORLD_SIZE as a launcher sets them): rank r's
    loader delivers exactly its two workers' streams, each seeded by (seed, rank, worker), and the four streams
    differ. The training stream is resampled with replacement (distill/data.py): there is no epoch in which each
    sample is seen once, so "seeded by (seed, rank, worker), the same seed gives the same batches" is the
    promise to check. One shard: only the shuffle's seed tells the streams apart; four shards (500 samples
    each): the shards' draw order must be the seeded one as well."""
    from distill.data import ShardDataModule

    path = request.getfixturevalue(shards)
    loaded, expected = {}, {}
    for rank in (0, 1):
        with monkeypatch.context() as env:
            env.setenv("RANK", str(rank))
            env.setenv("WORLD_SIZE", "2")
            loader = ShardDataModule(path, batch_size=16, num_workers=2, seed=0,
                                     shuffle_buffer=200).train_dataloader()
            it = iter(loader)
            loaded[rank] = [next(it) for _ in range(4)]
            del it, loader  # stop the persistent workers
        expected[rank] = _worker_streams(path, rank, 2, 2, 2, monkeypatch)
    _check_rank_worker_streams(loaded, expected)


def test_evaluation_split_is_read_once_across_ranks(tmp_path, monkeypatch):
    """iterate_split under two ranks: each rank reads its own shards and together they read every sample exactly
    once; with every_rank, each rank reads the whole split (reference statistics every rank must hold)."""
    from distill.data import iterate_split, list_shards, write_digits_shards

    write_digits_shards(tmp_path, val_fraction=0.1, seed=0, shard_size=50)
    assert len(list_shards(tmp_path, "val")) == 4  # 180 validation samples

    def samples(every_rank: bool = False) -> list[tuple]:
        return sorted((tuple(x.flatten().tolist()), int(y)) for xs, ys in
                      iterate_split(tmp_path, "val", batch_size=32, every_rank=every_rank) for x, y in zip(xs, ys))

    whole = samples()
    assert len(whole) == 180
    per_rank, every = [], []
    for rank in (0, 1):
        with monkeypatch.context() as env:
            env.setenv("RANK", str(rank))
            env.setenv("WORLD_SIZE", "2")
            per_rank.append(samples())
            every.append(samples(every_rank=True))
    assert per_rank[0] and per_rank[1]
    assert sorted(per_rank[0] + per_rank[1]) == whole
    assert every[0] == every[1] == whole


# ---------------------------------------------------------------------------------------------------------------
# Two processes under Lightning DDP.

_DRIVER = r'''
"""distill fit on the 2-D mixture, recording per rank each step's random inputs and the state after each step.
usage: python driver.py OUT_DIR SHARDS_DIR CONFIG [key=value ...]  (Lightning starts it again for rank 1)"""
import os
import sys

import torch

import distill.module as M
from distill.config import FitConfig, load_config
from distill.train import fit

OUT, SHARDS, CONFIG, OVERRIDES = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
NAN_SAMPLE_STEP, INF_LOSS_STEP = 2, 3  # rank 1 only: one NaN sample of G; an infinite loss with a finite gradient
real_step, real_loss, real_train_start = M.DMDModule.training_step, M.dmd_loss, M.DMDModule.on_train_start


def dump(m, drawn=None):
    sd = lambda mod: {k: v.detach().clone() for k, v in mod.state_dict().items()}
    torch.save({"step": m.step, "generator": sd(m.generator), "ema": sd(m.ema), "fake_score": sd(m.fake_score),
                "grad": {name: [None if p.grad is None else p.grad.clone() for p in getattr(m, name).parameters()]
                         for name in ("generator", "fake_score")},
                "opt": [o.state_dict()["state"] for o in m.trainer.optimizers], "sampler": m.sampler.state_dict(),
                "k_control": m.k_control.state_dict(), "g_steps": m.g_steps,
                "health": None if m.health is None else m.health.clone(), "drawn": drawn},
               os.path.join(OUT, f"step-{m.step}-rank{m.global_rank}.pt"))


def training_step(self, batch, batch_idx):
    rank, step = self.global_rank, self.step
    if step == 0:
        dump(self)
    drawn = {"z": [], "t_w": [], "eps": [], "fake_in": []}
    gen_forward, draw, integrand = self.generator.forward, self._draw_timesteps, self._integrand
    fake_forward = self.fake_score.forward

    def generator(z, labels=None, **kw):
        x = gen_forward(z, labels, **kw)
        drawn["z"].append(z.clone())
        if rank == 1 and step == NAN_SAMPLE_STEP:
            blown = torch.ones_like(x)
            blown[0] = float("nan")
            x = x * blown
        return x

    def draws(N, K, rng):
        t, w = draw(N, K, rng)
        drawn["t_w"].append((t.clone(), w.clone()))
        return t, w

    def inner(x, labels, t, eps):
        drawn["eps"].append(eps.clone())
        return integrand(x, labels, t, eps)

    def fake(x_t, t, *args, **kwargs):
        if torch.is_grad_enabled():  # the fake-score update (the integrand's calls run without grad)
            drawn["fake_in"].append((x_t.detach().clone(), t.clone()))
        return fake_forward(x_t, t, *args, **kwargs)

    self.generator.forward, self._draw_timesteps, self._integrand = generator, draws, inner
    self.fake_score.forward = fake
    if rank == 1 and step == INF_LOSS_STEP:
        M.dmd_loss = lambda x, g: real_loss(x, g) + float("inf")
    try:
        real_step(self, batch, batch_idx)
    finally:
        M.dmd_loss = real_loss
        del self.generator.forward, self._draw_timesteps, self._integrand, self.fake_score.forward
    dump(self, drawn)


def on_train_start(self):
    """Inside the DDP process, before the first step: the first batches of a ShardDataModule with two
    DataLoader workers, as `distill teacher` would read them."""
    real_train_start(self)
    if SHARDS != "-" and self.step == 0:
        from distill.data import ShardDataModule

        it = iter(ShardDataModule(SHARDS, batch_size=16, num_workers=2, seed=0, shuffle_buffer=200)
                  .train_dataloader())
        torch.save([next(it) for _ in range(4)], os.path.join(OUT, f"data-rank{self.global_rank}.pt"))
        del it


M.DMDModule.training_step, M.DMDModule.on_train_start = training_step, on_train_start

if __name__ == "__main__":
    result = fit(load_config(FitConfig, CONFIG, OVERRIDES))
    sys.exit(result.exit_code)
'''

# 6 steps, N = 16 per rank, K = 4, the generator updated every step, timesteps stratified over the global batch,
# the adaptive proposal rebuilt after every update, the split-half diagnostic every second update (steps 0, 2, 4),
# the ranks' q and K compared every second update (steps 1, 3, 5), checkpoints every 2 steps, FID every 3 steps.
DDP_ARGS = ["data.batch_size=32", "trainer.devices=2", "trainer.accelerator=cpu", "optim.ttur=1", "estimator.K=4",
            "estimator.stratify=global", "estimator.proposal=adaptive", "estimator.adaptive_warmup=1",
            "estimator.adaptive_refresh_every=1", "estimator.diagnostic_every=2", "estimator.auto_every=2",
            "trainer.checkpoint_every_steps=2", "trainer.keep_checkpoints=5", "trainer.log_every_steps=1",
            "eval.fid_every_steps=3", "eval.fid_num_samples=600", "eval.fid_batch_size=100",
            "eval.variance_every_steps=0", "logging.samples_every_steps=0", "logging.proposal_plot_every_steps=0",
            "logging.progress_bar=false", "logging.wandb=disabled"]
STEPS = 6


def _launch(tmp: Path, name: str, run_dir: Path, max_steps: int, shards: Path | None = None) -> Path:
    """One two-process `fit` through the driver; its dumps go to tmp/name."""
    out = tmp / name
    out.mkdir()
    driver = tmp / "driver.py"
    if not driver.exists():
        driver.write_text(_DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(driver), str(out), str(shards or "-"), GMM, f"run.dir={run_dir}",
                        f"trainer.max_steps={max_steps}", *DDP_ARGS], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MEMBER: 2/2" in r.stderr + r.stdout
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, one_shard):
    """The uninterrupted two-process run: (dumps folder, run directory)."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = _launch(tmp, "uninterrupted", tmp / "run", STEPS, shards=one_shard)
    return out, tmp / "run"


def _dump(out: Path, step: int, rank: int) -> dict:
    return torch.load(out / f"step-{step}-rank{rank}.pt", weights_only=False)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _state(d: dict) -> dict:
    """The training state of a dump: networks, optimiser states, proposal, K controller."""
    s = d["sampler"]
    return {"generator": d["generator"], "ema": d["ema"], "fake_score": d["fake_score"],
            "opt_generator": d["opt"][0], "opt_fake_score": d["opt"][1],
            "proposal": {k: s[k] for k in ("q", "m2", "seen", "pending")}, "k_control": d["k_control"]}


def _single_process_module():
    from distill.config import FitConfig, load_config
    from distill.module import DMDModule

    return DMDModule(load_config(FitConfig, GMM, [*DDP_ARGS, "trainer.max_steps=6"]))


@pytest.mark.slow
def test_lightning_ddp_step_equals_the_single_process_step_on_both_ranks_draws(ddp_run):
    """One training step under two-process Lightning DDP (gloo, through `training_step`) equals the same step
    computed in one process on the concatenation of the two ranks' recorded draws (z, t, w, eps and the fake
    score's (x_t, t)): the all-reduced gradients of G and of the fake score, and G, the fake score and the EMA
    after the updates. The ranks' draws differ (a rank that reused rank 0's noise would halve the global batch)."""
    from distill.carv.controller import weighted_mean
    from distill.losses import denoising_loss, dmd_loss
    from distill.teachers import ema_update

    out, _ = ddp_run
    init, after = _dump(out, 0, 0), [_dump(out, 1, rank) for rank in (0, 1)]
    drawn = [a["drawn"] for a in after]
    assert not torch.equal(drawn[0]["z"][0], drawn[1]["z"][0])
    assert not torch.equal(drawn[0]["eps"][0], drawn[1]["eps"][0])
    assert not torch.equal(drawn[0]["fake_in"][0][1], drawn[1]["fake_in"][0][1])

    m = _single_process_module()
    for part in ("generator", "ema", "fake_score"):
        getattr(m, part).load_state_dict(init[part])
    cat = lambda f: torch.cat([f(d) for d in drawn])  # noqa: E731
    z, t, w, eps = cat(lambda d: d["z"][0]), cat(lambda d: d["t_w"][0][0]), cat(lambda d: d["t_w"][0][1]), \
        cat(lambda d: d["eps"][0])
    x_t, t_f = cat(lambda d: d["fake_in"][0][0]), cat(lambda d: d["fake_in"][0][1])
    assert z.shape == (32, 2) and t.shape == (32, 4) and eps.shape == (128, 2) and t_f.shape == (32,)
    opt_g, opt_f = m.configure_optimizers()
    clip = m.cfg.optim.grad_clip
    # generator update on the whole global batch (docs/method.md §3-§4)
    x = m.generator(z)
    with torch.no_grad():
        g_bar = weighted_mean(m._integrand(x.detach(), None, t, eps), w)
    dmd_loss(x, g_bar).mean().backward()
    torch.nn.utils.clip_grad_norm_(list(m.generator.parameters()), clip)
    opt_g.step()
    ema_update(m.ema, m.generator, m.cfg.generator.ema_decay, 0)
    # fake-score update on the detached samples
    x0 = x.detach()
    denoising_loss(m.fake_score(x_t, t_f), x0, m.fake_score.loss_weight(t_f, x0)).mean().backward()
    torch.nn.utils.clip_grad_norm_(list(m.fake_score.parameters()), clip)
    opt_f.step()

    for a in after:
        # the all-reduced gradients: the same up to float32 rounding of sums in another order (errors ~1e-7 of
        # a tensor's largest entry; a rank reusing another's draws would be off by O(1))
        for part in ("generator", "fake_score"):
            ours = [p.grad for p in getattr(m, part).parameters()]
            assert len(ours) == len(a["grad"][part]) and max(g.abs().max() for g in ours) > 0
            for mine, theirs in zip(ours, a["grad"][part]):
                torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5 * float(mine.abs().max()),
                                           msg=f"grad of {part}")
        # AdamW's first step moves each weight by lr * g / (|g| + 1e-8): where |g| is near 1e-8, a rounding-level
        # difference of g moves the weight by a fraction of lr = 1e-3, hence atol = 1e-4 on the weights
        for part in ("generator", "ema", "fake_score"):
            for k, v in getattr(m, part).state_dict().items():
                torch.testing.assert_close(a[part][k], v, rtol=0, atol=1e-4, msg=f"{part}.{k}")
                assert not torch.equal(a[part][k], init[part][k]), f"{part}.{k} did not move"


@pytest.mark.slow
def test_a_non_finite_update_on_one_rank_is_skipped_on_both(ddp_run):
    """Rank 1 alone meets a non-finite update: at step 2 one NaN sample of G (NaN loss and gradient, generator and
    fake-score updates), at step 3 an infinite generator loss with a finite gradient (only the all-reduced
    `finite` flag tells rank 0). Both ranks skip together and stay bit-identical after every step; a skipped
    update changes no network, optimiser state, proposal statistic or K controller state; the finite updates
    around them do. The run's own check that the ranks hold the same q and K passed at steps 1, 3, 5."""
    out, run_dir = ddp_run
    dumps = {(s, r): _dump(out, s, r) for s in range(STEPS + 1) for r in (0, 1)}
    for s in range(STEPS + 1):
        a, b = dumps[s, 0], dumps[s, 1]
        assert _equal(_state(a), _state(b)), f"the ranks differ after {s} steps"
        assert _equal(a["health"], b["health"])
    state = {s: _state(dumps[s, 0]) for s in range(STEPS + 1)}
    assert _equal(state[3], state[2])  # step 2: both updates skipped
    for part in ("generator", "ema", "opt_generator", "proposal", "k_control"):  # step 3: the generator's skipped
        assert _equal(state[4][part], state[3][part]), part
    for part in ("fake_score", "opt_fake_score"):  # ... the fake score's taken
        assert not _equal(state[4][part], state[3][part]), part
    for before in (1, 4):  # finite steps move every part (the K controller observes at even updates only)
        for part in state[before]:
            if part != "k_control" or before % 2 == 0:
                assert not _equal(state[before + 1][part], state[before][part]), (before, part)
    assert [dumps[s, 0]["health"][0].item() for s in (2, 3, 4, 6)] == [0, 2, 3, 3]
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [float(r["carv/ranks_agree"]) for r in rows if r.get("carv/ranks_agree")] == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_in_loop_fid_of_two_ranks_equals_the_single_process_fid(ddp_run):
    """FIDMonitor under two ranks: each rank generates its share of eval.fid_num_samples and torchmetrics syncs the
    features, so fid/ema and fid/raw_generator logged at step 6 equal the FID that one process computes from
    the step-6 networks on all the samples (the protocol seeds each sample by its index)."""
    from distill.callbacks import FIDMonitor

    out, run_dir = ddp_run
    rows = {int(r["step"]): r for r in csv.DictReader(open(run_dir / "metrics.csv"))}
    assert rows[3]["fid/ema"] and rows[6]["fid/ema"]
    m = _single_process_module()
    final = _dump(out, STEPS, 0)
    for part in ("generator", "ema"):
        getattr(m, part).load_state_dict(final[part])
    m.step = STEPS
    monitor = FIDMonitor(m.cfg, run_dir / "single", m)
    trainer = SimpleNamespace(world_size=1, global_rank=0, save_checkpoint=lambda *a, **k: None)
    monitor.setup(trainer, m, "fit")
    monitor._evaluate(trainer, m)
    for name in ("ema", "raw_generator"):
        single = m._acc[f"fid/{name}"][-1]
        assert single > 0
        assert float(rows[6][f"fid/{name}"]) == pytest.approx(single, rel=1e-6), name


@pytest.mark.slow
def test_shard_streams_of_two_ddp_ranks_with_two_workers_each(ddp_run, one_shard, monkeypatch):
    """Inside the two Lightning DDP processes (which set WORLD_SIZE but not RANK), a ShardDataModule with two
    DataLoader workers gives each rank the interleaving of its own workers' streams, seeded by (seed, rank,
    worker): the workers find their process's rank, and no two of the four streams repeat one another."""
    out, _ = ddp_run
    loaded = {rank: torch.load(out / f"data-rank{rank}.pt", weights_only=False) for rank in (0, 1)}
    expected = {rank: _worker_streams(one_shard, rank, 2, 2, 2, monkeypatch) for rank in (0, 1)}
    _check_rank_worker_streams(loaded, expected)


@pytest.mark.slow
def test_ddp_run_stopped_at_a_checkpoint_resumes_bit_identical(ddp_run, tmp_path):
    """Two processes: 4 steps (checkpoint at step 4), then the same command with max_steps 6 resumes there and ends
    bit-identical to the uninterrupted 6-step run on BOTH ranks (networks, optimiser states, proposal, K
    controller), with the same checkpoint and the same logged metrics from the resumed steps on."""
    out, run_dir = ddp_run
    resumed_dir = tmp_path / "run"
    _launch(tmp_path, "first", resumed_dir, 4)
    second = _launch(tmp_path, "second", resumed_dir, STEPS)
    assert not (second / "step-4-rank0.pt").exists() and (second / "step-5-rank0.pt").exists()  # resumed at 4
    for rank in (0, 1):
        assert _equal(_state(_dump(second, STEPS, rank)), _state(_dump(out, STEPS, rank))), f"rank {rank}"
    a = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(resumed_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["distill"]["step"] == b["distill"]["step"] == STEPS
    assert _equal(a["state_dict"], b["state_dict"])
    assert _equal([o["state"] for o in a["optimizer_states"]], [o["state"] for o in b["optimizer_states"]])
    assert _equal(a["distill"]["sampler"], b["distill"]["sampler"])
    assert a["distill"]["k_control"] == b["distill"]["k_control"]

    def logged(path: Path) -> dict:
        rows = {int(r["step"]): {k: v for k, v in r.items() if v and not k.startswith("time/")}
                for r in csv.DictReader(open(path / "metrics.csv"))}
        for k in [k for k in rows[4] if k.startswith("fid/")]:
            del rows[4][k]  # the first leg ends at step 4 and evaluates there; the uninterrupted run does not
        return rows

    assert logged(resumed_dir) == logged(run_dir)


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
