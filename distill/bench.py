"""`distill bench variance`: the CARV estimators against the DMD2 baseline at one frozen training state.

For each estimator the generator's parameter gradient is estimated R times (fresh z, t, eps each replicate; the
same z across estimators, common random numbers) and summarised by the trace of its covariance across
replicates, the distance of its mean from the baseline's mean with the standard error of that distance, its
compute (FLOPs: N (c_u + K c_i)) and wall time, and the effective compute multiplier against the baseline,
ECM = (Var . Cost)_baseline / (Var . Cost)_method (docs/method.md §5). The oracle limit of the reuse family,
(σ_b² + σ_w²)(c_u + c_i) / (σ_b sqrt(c_u) + σ_w sqrt(c_i))², comes from the split-half estimates of σ_b², σ_w².
A multi-step student (generator.timesteps) is measured as it trains: each replicate (and each diagnostic and pilot
round) draws one student step k uniformly and estimates the gradient at step k's x0 by backward simulation, so the
variance includes the spread over k and c_u the extra generator forwards (averaged over k).
Nothing here passes or fails: it prints a table and writes JSON.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from distill.carv import TimestepSampler, dmd_timestep_p, ecm, ecm_oracle, optimal_k
from distill.carv.controller import weighted_mean
from distill.config import FitConfig
from distill.errors import DistillError
from distill.losses import dmd_loss

ESTIMATORS = (
    ("baseline", 1, "uniform", "none"),
    ("K=4", 4, "uniform", "none"),
    ("K=16", 16, "uniform", "none"),
    ("K=16+adaptive", 16, "adaptive", "none"),
    ("K=16+adaptive+stratified", 16, "adaptive", "per_sample"),
    ("auto", "auto", "adaptive", "per_sample"),
)


class _Moments:
    """Streaming per-coordinate mean and variance (float64) of flat gradient vectors."""

    def __init__(self):
        self.n, self.sum, self.sq = 0, None, None

    def add(self, v: torch.Tensor) -> None:
        v = v.double()
        self.sum = v.clone() if self.sum is None else self.sum + v
        self.sq = v * v if self.sq is None else self.sq + v * v
        self.n += 1

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def var(self) -> torch.Tensor:  # unbiased, per coordinate
        return (self.sq - self.sum * self.sum / self.n) / (self.n - 1)


def check_bench_options(replicates: int, warmup_steps: int, device: str, ckpt: str | None) -> torch.device:
    """The options of `distill bench variance`, checked before anything runs (a warm-up run included, whose
    own errors would name trainer.max_steps, a key the user never set); returns the device."""
    from distill.evaluate import resolve_device

    if replicates < 2:
        raise DistillError(f"--replicates {replicates}: expected an integer >= 2 (a variance needs two)")
    if warmup_steps < 1:
        raise DistillError(f"--warmup-steps {warmup_steps}: expected an integer >= 1 (at step 0 the DMD gradient "
                           f"is exactly zero: nothing to measure)")
    if ckpt is not None and not Path(ckpt).is_file():
        raise DistillError(f"--ckpt {ckpt!r} does not exist; expected a checkpoint file (runs/.../last.ckpt)")
    return resolve_device(device)


def _frozen_module(cfg: FitConfig, ckpt: str | None, warmup_steps: int, config_path: str | None,
                   overrides: list[str]):
    """The state to measure at: a checkpoint, or the end of a short warm-up run of the config (at initialisation
    the fake score equals the teacher and the DMD gradient is exactly zero: nothing to measure)."""
    from distill.evaluate import read_checkpoint
    from distill.module import DMDModule

    if ckpt is None:
        from distill.config import load_config
        from distill.train import fit

        tmp = tempfile.mkdtemp(prefix="distill-bench-")
        warm = load_config(FitConfig, config_path, [
            *overrides, f"run.dir={tmp}", f"trainer.max_steps={warmup_steps}",
            f"trainer.checkpoint_every_steps={warmup_steps}", "estimator.K=1", "estimator.proposal=uniform",
            "estimator.stratify=none", "estimator.diagnostic_every=0", "logging.wandb=disabled",
            "logging.samples_every_steps=0"])
        code = fit(warm).exit_code
        if code != 0:
            raise RuntimeError(f"the warm-up run failed with status {code}")
        ckpt = str(Path(tmp) / "checkpoints" / "last.ckpt")
        state = f"after a {warmup_steps}-step warm-up run of this config (baseline estimator)"
    else:
        state = f"checkpoint {ckpt}"
    module = DMDModule(cfg)
    checkpoint = read_checkpoint(ckpt)
    _check_fits(ckpt, checkpoint, module, config_path)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    return module, state


def _check_fits(ckpt: str, checkpoint: dict, module, config_path: str | None) -> None:
    """A checkpoint of other networks than the config's is named in one line (train.check_fits' comparison)
    instead of load_state_dict's list of every mismatched tensor; the hint is bench's, not fit's."""
    from distill.train import check_fits

    try:
        check_fits(Path(ckpt), checkpoint["state_dict"], module)
    except DistillError as e:
        what = str(e).split("; expected")[0]
        raise DistillError(f"--ckpt: {what}; expected a checkpoint of the networks of --config "
                           f"{config_path or '(defaults)'} and its overrides") from None


def bench_variance(cfg: FitConfig, ckpt: str | None = None, replicates: int = 32, warmup_steps: int = 200,
                   pilot_rounds: int = 20, diagnostic_rounds: int = 16, device: str = "cpu", progress: bool = True,
                   config_path: str | None = None, overrides: list[str] = ()) -> dict:
    from distill.evaluate import resolve_device

    dev = resolve_device(device)
    cfg = replace(cfg, estimator=replace(cfg.estimator, K=1, proposal="uniform", stratify="none",
                                         diagnostic_every=0))
    module, state = _frozen_module(cfg, ckpt, warmup_steps, config_path, list(overrides))
    module = module.to(dev)
    N = cfg.data.batch_size // (cfg.trainer.devices * cfg.trainer.num_nodes)
    N -= N % 2
    params = [p for p in module.generator.parameters() if p.requires_grad]
    shape = module.sample_shape()

    def outer(r: int):
        gen = torch.Generator(device=dev).manual_seed(10_000 + r)
        z = torch.randn((N, *shape), generator=gen, device=dev)
        return z, module.sample_condition(N, gen, host_rng=torch.Generator().manual_seed(10_000 + r))

    S = module.generator.steps

    def student(z, cond, gen: torch.Generator) -> torch.Tensor:
        """x0 of a uniformly drawn student step k by backward simulation, as training computes it (S = 1: the
        one-step generator, nothing drawn)."""
        if S == 1:
            return module.generator(z, cond)
        k = int(torch.randint(0, S, (1,), generator=gen, device=gen.device))
        return module.generator(z, cond, noise=module._renoise_draws(N, k, gen), until=k)

    costs = module.measure_costs(N, outer(0)[1])
    c_u, c_i = costs["upstream_flops"], costs["inner_flops"]

    # σ_b², σ_w² at this state (uniform proposal, iid draws): the split-half estimate, averaged over rounds
    sb, sw = [], []
    for r in range(diagnostic_rounds):
        module.step = 1_000_000 + r  # the diagnostic's own noise stream
        z, cond = outer(50_000 + r)
        x = student(z, cond, torch.Generator(device=dev).manual_seed(50_000 + r))
        out = module._split_half_diagnostic(x, cond)
        sb.append(out["carv/sigma_b2_raw"])
        sw.append(out["carv/sigma_w2_raw"])
    sigma_b2, sigma_w2 = max(sum(sb) / len(sb), 0.0), max(sum(sw) / len(sw), 0.0)
    k_auto = optimal_k(sigma_b2, sigma_w2, c_u, c_i, k_max=cfg.estimator.k_max)

    p = dmd_timestep_p(module.teacher.T, cfg.estimator.t_min, cfg.estimator.t_max)
    rows, moments = [], {}
    iterator = ESTIMATORS
    for name, K, proposal, stratify in iterator:
        K = k_auto if K == "auto" else K
        e = cfg.estimator
        sampler = TimestepSampler(p, proposal=proposal, stratify=stratify, bins=e.adaptive_bins, ema=e.adaptive_ema,
                                  smoothing=e.adaptive_smoothing, floor=e.adaptive_floor, mix=e.adaptive_mix,
                                  warmup=1, refresh_every=10**9)
        module.sampler = sampler
        if proposal == "adaptive":  # learnt from pilot draws at this state, then frozen: never from its own draws
            for r in range(pilot_rounds):
                z, cond = outer(90_000 + r)
                gen = torch.Generator(device=dev).manual_seed(90_000 + r)
                with torch.no_grad():
                    x = student(z, cond, gen)
                    t, _ = sampler.sample(N, 16, generator=gen, device=dev, stratify="none")
                    eps = torch.randn((N * 16, *shape), generator=gen, device=dev)
                    g = module._integrand(x, cond, t, eps)
                sampler.record(t, g.pow(2).flatten(2).sum(-1))
                sampler.update()  # the first update (warmup=1) builds q from the pilot records; later ones fold in
            sampler.freeze()
        m = _Moments()
        seconds, book = 0.0, 0.0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=replicates, desc=f"{name:>26}", unit="rep", leave=False)
        for r in range(replicates):
            z, cond = outer(r)
            gen = torch.Generator(device=dev).manual_seed(20_000 + r)
            t0 = time.perf_counter()
            x = student(z, cond, gen)
            b0 = time.perf_counter()
            t, w = sampler.sample(N, K, generator=gen, device=dev)
            book += time.perf_counter() - b0
            eps = torch.randn((N * K, *shape), generator=gen, device=dev)
            with torch.no_grad():
                g = module._integrand(x.detach(), cond, t, eps)
                b0 = time.perf_counter()
                g_bar = weighted_mean(g, w)
                sampler.record(t, g.pow(2).flatten(2).sum(-1))  # bookkeeping as in training (not applied: frozen q)
                sampler.update()
                book += time.perf_counter() - b0
            grads = torch.autograd.grad(dmd_loss(x, g_bar).mean(), params, allow_unused=True)
            flat = torch.cat([(gr if gr is not None else torch.zeros_like(q)).flatten() for gr, q in zip(grads, params)])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            m.add(flat)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        moments[name] = m
        rows.append({"name": name, "K": K, "proposal": proposal, "stratify": stratify,
                     "var_trace": float(m.var.sum()), "flops": N * (c_u + K * c_i), "seconds": seconds / replicates,
                     "bookkeeping_fraction": book / seconds})
    base = moments["baseline"]
    base_row = rows[0]
    for row in rows:
        m = moments[row["name"]]
        diff = m.mean - base.mean
        row["mean_dist"] = float(diff.norm())
        row["mean_se"] = float(((m.var + base.var) / replicates).sum().sqrt()) if row["name"] != "baseline" else 0.0
        row["var_reduction"] = base_row["var_trace"] / row["var_trace"]
        row["ecm"] = ecm(base_row["var_trace"], base_row["flops"], row["var_trace"], row["flops"])
        row["ecm_oracle"] = ecm_oracle(sigma_b2, sigma_w2, c_u, c_i)
    return {"state": state, "config": config_path, "overrides": list(overrides), "N": N, "replicates": replicates, "student_steps": S, "sigma_b2": sigma_b2,
            "sigma_w2": sigma_w2, "cost_upstream_flops": c_u, "cost_inner_flops": c_i,
            "cost_upstream_seconds": costs["upstream_seconds"], "cost_inner_seconds": costs["inner_seconds"],
            "k_auto": k_auto, "rows": rows}


def format_table(result: dict) -> str:
    steps = result.get("student_steps", 1)
    head = (f"state: {result['state']}\n" + (f"{steps}-step student (one step k per replicate, backward simulation); "
                                             if steps > 1 else "") +
            f"N = {result['N']} generator samples, R = {result['replicates']} replicates; "
            f"sigma_b2 = {result['sigma_b2']:.4g}, sigma_w2 = {result['sigma_w2']:.4g}, "
            f"c_u = {result['cost_upstream_flops']:.4g} FLOPs, c_i = {result['cost_inner_flops']:.4g} FLOPs "
            f"(c_u/c_i = {result['cost_upstream_flops'] / result['cost_inner_flops']:.2f}), auto K = {result['k_auto']}")
    cols = ("name", "K", "proposal", "stratify", "var_trace", "var_reduction", "mean_dist", "mean_se", "flops",
            "seconds", "ecm", "ecm_oracle", "bookkeeping_fraction")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:
        cells = []
        for c in cols:
            v = row[c]
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n\n" + "\n".join(lines)


def unbiased(result: dict, n_se: float = 3.0) -> bool:
    return all(r["mean_dist"] <= n_se * r["mean_se"] for r in result["rows"][1:])


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                               else str(o)) + "\n")
