"""`distill bench variance`: the CARV estimators against the DMD2 baseline at one frozen training state.

For each estimator the generator's parameter gradient is estimated R times (fresh z, t, eps each replicate; the
same z across estimators, common random numbers) and summarised by the trace of its covariance across
replicates, the distance of its mean from the baseline's mean with the standard error of that distance, its
compute (FLOPs: N (c_u + K c_i)) and wall time, and the effective compute multiplier against the baseline,
ECM = (Var . Cost)_baseline / (Var . Cost)_method (docs/method.md §5). The oracle limit of the reuse family,
(σ_b² + σ_w²)(c_u + c_i) / (σ_b sqrt(c_u) + σ_w sqrt(c_i))², comes from the split-half estimates of σ_b², σ_w².
Reuse over (t, eps) cannot remove σ_b²: no estimator of the family cuts the variance past the ceiling
(σ_b² + σ_w²) / σ_b², printed with each estimator's fraction of it (for a multi-step student σ_b² there includes
N·V_k, the spread of the mean gradient over the student steps, which every sample of a replicate shares).
The `auto` row's K is the one training would choose at this state: the training diagnostic run with that row's
sampler (adaptive, stratified), its within-sample variance measured as drawn, its rounds folded into a
`KController` one by one as training folds its diagnostics, then `KController.target` (at σ_b²'s posterior mean).
Every variance cut and ECM carries a 95% interval, a bootstrap over the replicates resampled in pairs (computed
from each estimator's Gram matrix of replicate gradients), and a row whose variance (or the baseline's) has a relative standard error above 50% is flagged
`heavy_tail`: a few replicates hold most of it and its ratios mean little.
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

from distill.carv import TimestepSampler, dmd_timestep_p, ecm, ecm_oracle
from distill.carv.controller import KController, weighted_mean
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
    """Streaming per-coordinate mean and variance (float64) of flat gradient vectors, and the replicates themselves
    (float32, on the host) while they fit `keep_bytes`: their Gram matrix gives the intervals (`replicate_gram`)."""

    def __init__(self, keep_bytes: int = 0):
        self.n, self.sum, self.sq = 0, None, None
        self.keep_bytes, self.kept = keep_bytes, []

    def add(self, v: torch.Tensor) -> None:
        if self.kept is not None:
            if (len(self.kept) + 1) * v.numel() * 4 > self.keep_bytes:
                self.kept = None  # too large to keep: no intervals for this estimator
            else:
                self.kept.append(v.detach().float().cpu())
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

    def replicate_gram(self, chunk: int = 1 << 20) -> torch.Tensor | None:
        """G[i, j] = <x_i, x_j> over the kept replicates (float64, (R, R)); None when they were not kept."""
        if not self.kept:
            return None
        X = torch.stack(self.kept)
        G = torch.zeros(len(self.kept), len(self.kept), dtype=torch.float64)
        for a in range(0, X.shape[1], chunk):
            block = X[:, a:a + chunk].double()
            G += block @ block.T
        return G


def trace_of_resamples(G: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The unbiased covariance trace of each resample of the replicates, idx (B, R) of row indices, from their Gram
    matrix alone: sum_i |x_i - x_bar|^2 / (R - 1) = (sum_i G_ii - (1/R) sum_kl G_kl) / (R - 1)."""
    R = idx.shape[1]
    diag = G.diagonal()[idx].sum(1)
    total = G[idx[:, :, None], idx[:, None, :]].sum((1, 2))
    return (diag - total / R) / (R - 1)


def variance_ratio_ci(G_base: torch.Tensor, G: torch.Tensor, draws: int = 4000, seed: int = 0,
                      level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of Var_baseline / Var_estimator, the replicates resampled in pairs (replicate r
    of both shares its z: common random numbers)."""
    R = G.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ratios = []
    for a in range(0, draws, 250):
        idx = torch.randint(0, R, (min(250, draws - a), R), generator=gen)
        ratios.append(trace_of_resamples(G_base, idx) / trace_of_resamples(G, idx))
    r = torch.cat(ratios).sort().values
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return [float(r[int(lo * draws)]), float(r[min(int(hi * draws), draws - 1)])]


def variance_relative_se(G: torch.Tensor) -> float:
    """Relative standard error of the covariance trace: the spread of the replicates' squared deviations
    d_i = |x_i - x_bar|^2 (sd(d) / (mean(d) sqrt(R))). Gaussian replicates keep it at sqrt(2 / R) (one dimension)
    or below (sqrt(2 / (R P)) for P independent ones); a few replicates holding most of the variance push it up: the
    variance, and any ratio of it, is then not known."""
    R = G.shape[0]
    row = G.sum(1)
    d = G.diagonal() - 2 * row / R + row.sum() / R**2
    return float(d.std() / (d.mean() * R**0.5)) if float(d.mean()) > 0 else float("inf")


HEAVY_TAIL_SE = 0.5  # a variance trace with a relative standard error above this is flagged (heavy_tail)


def variance_cut_ceiling(sigma_b2: float, sigma_w2: float) -> float | None:
    """(σ_b² + σ_w²) / σ_b²: reuse over (t, eps) cannot remove σ_b², so no K, proposal or stratification cuts the
    variance of the one-draw baseline past this; None when the split-half σ_b² is 0 (no bound measured)."""
    return (sigma_b2 + sigma_w2) / sigma_b2 if sigma_b2 > 0 else None


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
                   pilot_rounds: int = 20, diagnostic_rounds: int = 64, device: str = "cpu", progress: bool = True,
                   config_path: str | None = None, overrides: list[str] = (), keep_bytes: int = 4 << 30) -> dict:
    """The table (module docstring). The intervals need each estimator's R replicate gradients on the host at once
    (R x parameters x 4 bytes); above `keep_bytes` they are left out (null in the JSON, said in `intervals`)."""
    from distill.evaluate import resolve_device

    dev = resolve_device(device)
    cfg = replace(cfg, estimator=replace(cfg.estimator, K=1, proposal="uniform", stratify="none",
                                         diagnostic_every=0))
    module, state = _frozen_module(cfg, ckpt, warmup_steps, config_path, list(overrides))
    module = module.to(dev)
    N = cfg.data.batch_size // (cfg.trainer.devices * cfg.trainer.num_nodes)
    N -= N % 2
    params = module.trained(module.generator)
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

    def diagnose(seed: int) -> dict[str, float]:
        """The training diagnostic (`DMDModule._split_half_diagnostic`) at this state with module.sampler, averaged
        over `diagnostic_rounds` rounds of fresh z: raw σ_b², σ_w², and σ_w,strat² (a stratifying sampler) and
        the across-step term (a multi-step student) where measured."""
        sums: dict[str, list[float]] = {}
        for r in range(diagnostic_rounds):
            module.step = 1_000_000 + seed + r  # the diagnostic's own noise stream
            z, cond = outer(seed + r)
            x = student(z, cond, torch.Generator(device=dev).manual_seed(seed + r))
            out = module._split_half_diagnostic(x, cond, lambda gen: student(z, cond, gen))
            for key, value in out.items():
                if key.endswith("_raw"):
                    sums.setdefault(key.removeprefix("carv/").removesuffix("_raw"), []).append(value)
        out = {key: sum(v) / len(v) for key, v in sums.items()}
        for key, v in sums.items():  # the standard error of each mean over the rounds
            out[f"{key}_se"] = (sum((a - out[key]) ** 2 for a in v) / (len(v) - 1) / len(v)) ** 0.5 \
                if len(v) > 1 else math.nan
        return out, sums

    # σ_b², σ_w² at this state (uniform proposal, iid draws): the split-half estimate, averaged over rounds; with a
    # multi-step student the spread over its steps, N·V_k, which reuse cannot remove either
    split, _ = diagnose(50_000)
    sigma_b2, sigma_w2 = max(split["sigma_b2"], 0.0), max(split["sigma_w2"], 0.0)
    sigma_b2_steps = max(split["sigma_b2_steps"], 0.0) if "sigma_b2_steps" in split else None
    k_auto, auto_model = None, None

    p = dmd_timestep_p(module.teacher.T, cfg.estimator.t_min, cfg.estimator.t_max)
    rows, moments, grams = [], {}, {}
    iterator = ESTIMATORS
    for name, K, proposal, stratify in iterator:
        e = cfg.estimator
        sampler = TimestepSampler(p, proposal=proposal, stratify=stratify, warmup=1, refresh_every=10**9,
                                  **e.adaptive_table)
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
        if K == "auto":  # as training chooses it: the diagnostic with this sampler, then KController's target
            diag, rounds = diagnose(70_000)
            # the controller folds the rounds in order, as training folds its diagnostics at a state that holds:
            # its EMA (and σ_b²'s posterior mean) weights the last ones most, not the mean of all rounds
            control = KController(1, True, cfg.estimator.k_max, ema=cfg.estimator.auto_ema,
                                  strat_K=module.strat_K())
            for r in range(diagnostic_rounds):
                control.observe(*(rounds[key][r] if key in rounds else None
                                  for key in ("sigma_b2", "sigma_w2", "sigma_w2_strat", "sigma_b2_steps")))
            K = k_auto = control.target(N, c_u, c_i)
            auto_model = {**diag, "strat_K": control.strat_K, "sigma_b2_ema": control.sigma_b2,
                          "sigma_b2_posterior": control.sigma_b2_posterior(),
                          "model": dict(zip(("sigma_b2", "a", "b"), control.model(control.sigma_b2_posterior())))}
        m = _Moments(keep_bytes)
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
        moments[name], grams[name] = m, m.replicate_gram()
        m.kept = None
        rows.append({"name": name, "K": K, "proposal": proposal, "stratify": stratify,
                     "var_trace": float(m.var.sum()), "flops": N * (c_u + K * c_i), "seconds": seconds / replicates,
                     "bookkeeping_fraction": book / seconds})
    base, G_base = moments["baseline"], grams["baseline"]
    base_row = rows[0]
    upstream = sigma_b2 + (sigma_b2_steps or 0.0)  # what no reuse of (t, eps) removes
    ceiling = variance_cut_ceiling(upstream, sigma_w2)
    # the ceiling is an estimate too: its range with σ_b² (and N·V_k) at ± 1.96 standard errors of their means
    upstream_se = math.hypot(split["sigma_b2_se"], split.get("sigma_b2_steps_se", 0.0))
    ceiling_range = [variance_cut_ceiling(upstream + 1.96 * upstream_se, sigma_w2),
                     variance_cut_ceiling(upstream - 1.96 * upstream_se, sigma_w2)]
    base_se = variance_relative_se(G_base) if G_base is not None else None
    for row in rows:
        m, G = moments[row["name"]], grams[row["name"]]
        diff = m.mean - base.mean
        row["mean_dist"] = float(diff.norm())
        row["mean_se"] = float(((m.var + base.var) / replicates).sum().sqrt()) if row["name"] != "baseline" else 0.0
        row["var_reduction"] = base_row["var_trace"] / row["var_trace"]
        row["ceiling_fraction"] = row["var_reduction"] / ceiling if ceiling else None
        row["ecm"] = ecm(base_row["var_trace"], base_row["flops"], row["var_trace"], row["flops"])
        row["ecm_oracle"] = ecm_oracle(upstream, sigma_w2, c_u, c_i)
        if G is None or G_base is None:
            row["var_cut_ci"] = row["ecm_ci"] = row["var_rel_se"] = None
            row["heavy_tail"] = None
            continue
        cut = variance_ratio_ci(G_base, G)
        row["var_cut_ci"] = cut
        row["ecm_ci"] = [c * base_row["flops"] / row["flops"] for c in cut]  # FLOPs are exact: only Var varies
        row["var_rel_se"] = variance_relative_se(G)
        row["heavy_tail"] = max(row["var_rel_se"], base_se) > HEAVY_TAIL_SE
    compare_auto_with_best_fixed(rows, grams)
    kept = all(G is not None for G in grams.values())
    return {"state": state, "commit": source_version(), "config": config_path, "overrides": list(overrides), "N": N,
            "replicates": replicates, "student_steps": S, "sigma_b2": sigma_b2, "sigma_w2": sigma_w2,
            "var_cut_ceiling": ceiling, "cost_upstream_flops": c_u, "cost_inner_flops": c_i,
            "cost_upstream_seconds": costs["upstream_seconds"], "cost_inner_seconds": costs["inner_seconds"],
            "sigma_b2_se": split["sigma_b2_se"], "sigma_w2_se": split["sigma_w2_se"],
            "sigma_b2_steps_se": split.get("sigma_b2_steps_se"), "diagnostic_rounds": diagnostic_rounds,
            "var_cut_ceiling_range": ceiling_range, "sigma_b2_steps": sigma_b2_steps, "k_auto": k_auto,
            "auto_diagnostic": auto_model, "rows": rows,
            "intervals": ("95% percentile bootstrap over replicates (pairs resampled), 4000 draws" if kept else
                          f"left out: R x parameters x 4 bytes exceeds {keep_bytes / 2**30:.1f} GiB")}


def compare_auto_with_best_fixed(rows: list[dict], grams: dict) -> None:
    """On the auto row: the best fixed estimator of the run (highest ECM, the baseline included), auto's ECM as a
    fraction of it, and that fraction's 95% interval, a paired bootstrap of the two variance traces (their
    replicates share z) times the exact cost ratio: `best_fixed`, `ecm_vs_best_fixed`, `ecm_vs_best_fixed_ci`."""
    auto = next((r for r in rows if r["name"] == "auto"), None)
    if auto is None:
        return
    best = max((r for r in rows if r["name"] != "auto"), key=lambda r: r["ecm"])
    auto["best_fixed"] = best["name"]
    auto["ecm_vs_best_fixed"] = auto["ecm"] / best["ecm"]
    G_best, G_auto = grams.get(best["name"]), grams.get("auto")
    if G_best is None or G_auto is None:
        auto["ecm_vs_best_fixed_ci"] = None
        return
    cost = best["flops"] / auto["flops"]
    auto["ecm_vs_best_fixed_ci"] = [c * cost for c in variance_ratio_ci(G_best, G_auto)]


def source_version() -> str:
    """The code that measured: the git commit of distill's checkout ("+dirty" with local changes to the package
    itself; result files written beside it do not count), or the installed package's version outside a checkout."""
    import subprocess
    from importlib.metadata import version

    here = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "distill"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return f"distill {version('distill')}"


def _se(se: float | None) -> str:
    return f" ± {se:.2g}" if se is not None and math.isfinite(se) else ""


def _range(r: list | None) -> str:
    """The ceiling's range from σ_b² ± 1.96 SE (an upper end of None: σ_b² may be 0, no bound)."""
    if not r or r[0] is None:
        return ""
    return f" (σ_b² ± 1.96 SE: {r[0]:.3g} to " + (f"{r[1]:.3g})" if r[1] is not None else "unbounded)")


def format_table(result: dict) -> str:
    steps = result.get("student_steps", 1)
    ceiling = result.get("var_cut_ceiling")
    head = (f"state: {result['state']}\n" + (f"{steps}-step student (one step k per replicate, backward simulation); "
                                             if steps > 1 else "") +
            f"N = {result['N']} generator samples, R = {result['replicates']} replicates; "
            f"sigma_b2 = {result['sigma_b2']:.4g}{_se(result.get('sigma_b2_se'))}, "
            f"sigma_w2 = {result['sigma_w2']:.4g}{_se(result.get('sigma_w2_se'))}, "
            + (f"across the student steps N V_k = {result['sigma_b2_steps']:.4g}"
               f"{_se(result.get('sigma_b2_steps_se'))}, "
               if result.get("sigma_b2_steps") is not None else "") +
            f"c_u = {result['cost_upstream_flops']:.4g} FLOPs, c_i = {result['cost_inner_flops']:.4g} FLOPs "
            f"(c_u/c_i = {result['cost_upstream_flops'] / result['cost_inner_flops']:.2f}), auto K = {result['k_auto']}"
            f"\nvariance-cut ceiling (sigma_b2 + sigma_w2) / sigma_b2 = "
            + (f"{ceiling:.3g}" if ceiling else "none (sigma_b2 = 0)") + _range(result.get("var_cut_ceiling_range"))
            + f"; [intervals: {result.get('intervals')}]")

    def interval(v, ci) -> str:
        return f"{v:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")

    cols = ("name", "K", "proposal", "stratify", "var_trace", "var cut [95%]", "of ceiling", "mean_dist", "mean_se",
            "flops", "seconds", "ECM [95%]", "ecm_oracle", "bookkeeping", "heavy tail")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in result["rows"]:
        frac = row.get("ceiling_fraction")
        cells = [row["name"], str(row["K"]), row["proposal"], row["stratify"], f"{row['var_trace']:.4g}",
                 interval(row["var_reduction"], row.get("var_cut_ci")), f"{frac:.0%}" if frac is not None else "",
                 f"{row['mean_dist']:.4g}", f"{row['mean_se']:.4g}", f"{row['flops']:.4g}", f"{row['seconds']:.4g}",
                 interval(row["ecm"], row.get("ecm_ci")), f"{row['ecm_oracle']:.4g}",
                 f"{row['bookkeeping_fraction']:.2%}",
                 {True: "YES: ratios not reliable", False: "no", None: "?"}[row.get("heavy_tail")]]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\n\nheavy tail: a variance trace (this row's or the baseline's) with a relative standard error above "
            f"{HEAVY_TAIL_SE:.0%}: a few replicates hold most of it, so its ratios mean little"
            if any(row.get("heavy_tail") for row in result["rows"]) else "")
    return head + "\n\n" + "\n".join(lines) + note


def unbiased(result: dict, n_se: float = 3.0) -> bool:
    return all(r["mean_dist"] <= n_se * r["mean_se"] for r in result["rows"][1:])


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o)
                               else str(o)) + "\n")
