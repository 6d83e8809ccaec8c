"""Measurements the CARV accounting runs on a live model: the exact parameter-space split-half (σ_b², σ_w²) and the
per-sample / per-draw costs c_u, c_i (docs/method.md §5). Torch only: the caller passes the pieces of its model as
callables, so these work on any generator, teacher and fake score.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from distill.carv.accounting import split_half
from distill.carv.measure import count_flops
from distill.carv.sampler import TimestepSampler

# integrand(x (N, ...), t (N, K), eps (N*K, ...)) -> g (N, K, ...): the per-draw DMD integrand, no grad
Integrand = Callable[[Tensor, Tensor, Tensor], Tensor]
# surrogate(x (n, ...), g_bar (n, ...)) -> per-sample losses whose gradient w.r.t. x is g_bar / numel
Surrogate = Callable[[Tensor, Tensor], Tensor]


def _flat(grads: tuple[Tensor | None, ...], params: list[Tensor]) -> Tensor:
    """One float64 vector of a parameter gradient (zeros where a parameter got none)."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)]).double()


def split_half_estimate(x: Tensor, params: list[Tensor], integrand: Integrand, surrogate: Surrogate,
                        sampler: TimestepSampler, Kd: int, generator: torch.Generator) -> tuple[float, float]:
    """(σ_b², σ_w²) of the parameter gradient by the split-half estimate (docs/method.md §5): halves i of the N
    samples x (with their graph to `params`), halves A/B of Kd iid draws from `sampler`'s current q, the four
    parameter gradients G_iA, G_iB by autograd.grad (nothing accumulates in .grad; no state changes)."""
    N = x.shape[0]
    t, w = sampler.sample(N, Kd, generator=generator, device=x.device, stratify="none")
    eps = torch.randn((N * Kd, *x.shape[1:]), generator=generator, device=x.device)
    with torch.no_grad():
        y = w.view(*w.shape, *([1] * (x.dim() - 1))) * integrand(x.detach(), t, eps)  # (N, Kd, ...)
    grads = []
    for half in (slice(0, N // 2), slice(N // 2, N)):
        for draws in (slice(0, Kd // 2), slice(Kd // 2, Kd)):
            loss = surrogate(x[half], y[half, draws].mean(1)).mean()
            grads.append(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
    flat = [_flat(G, params) for G in grads]
    sigma_b2, sigma_w2 = split_half(*flat, N=N, K=Kd)
    return float(sigma_b2), float(sigma_w2)


def _strata_in_use(sampler: TimestepSampler) -> str:
    """The strata training draws with, as one rank sees them (global strata are a batch's strata on one rank)."""
    return "batch" if sampler.stratify == "global" else sampler.stratify


def stratified_within_estimate(x: Tensor, params: list[Tensor], integrand: Integrand, surrogate: Surrogate,
                               sampler: TimestepSampler, K_s: int, generator: torch.Generator) -> float:
    """σ_w,strat²(K_s) = K_s · v(K_s): the within-sample variance of the estimator in use (the sampler's q and its
    stratification) at K_s draws, in parameter space and per-draw units (equal to σ_w² when stratification does
    nothing; docs/method.md §5, "Stratified draws"). Two independent K_s-draw sets A, B per sample, each drawn as
    training draws them; the difference of their gradients over half i of the samples, D_i = G_iA − G_iB, holds
    within-sample noise only: E‖D_i‖² = 4 v(K_s)/N, so v̂(K_s) = (N/4) · ½ Σ_i ‖D_i‖². One autograd.grad per
    half (the surrogate's gradient is linear in its target); no state changes."""
    N = x.shape[0]
    stratify = _strata_in_use(sampler)
    draws = [sampler.sample(N, K_s, generator=generator, device=x.device, stratify=stratify) for _ in range(2)]
    t = torch.cat([draws[0][0], draws[1][0]], 1)  # (N, 2 K_s): set A, then set B
    w = torch.cat([draws[0][1], draws[1][1]], 1)
    eps = torch.randn((N * 2 * K_s, *x.shape[1:]), generator=generator, device=x.device)
    with torch.no_grad():
        y = w.view(*w.shape, *([1] * (x.dim() - 1))) * integrand(x.detach(), t, eps)  # (N, 2 K_s, ...)
        diff = y[:, :K_s].mean(1) - y[:, K_s:].mean(1)  # ḡ_nA − ḡ_nB
    total = 0.0
    for half in (slice(0, N // 2), slice(N // 2, N)):
        D = torch.autograd.grad(surrogate(x[half], diff[half]).mean(), params, retain_graph=True, allow_unused=True)
        total += float(sum((d.double() ** 2).sum() for d in D if d is not None))
    return K_s * (N / 4) * 0.5 * total


def measure_costs(upstream: Callable[[], object], inner: Callable[[], object], n_upstream: int, n_inner: int,
                  device: torch.device, repeats: int = 3) -> dict[str, float]:
    """c_u per sample and c_i per draw, as FLOPs (torch.utils.flop_counter: reproducible) and as wall time (the
    mean of `repeats` calls after one warm-up): {upstream,inner}_{flops,seconds}. `upstream()` runs
    the generator forward and backward on n_upstream samples; `inner()` one teacher and fake-score evaluation on
    n_inner draws. A network whose ops the FLOP counter cannot see (a closed-form teacher) counts as 1 FLOP."""
    out = {}
    for name, fn, n in (("upstream", upstream, n_upstream), ("inner", inner, n_inner)):
        out[f"{name}_flops"] = max(count_flops(fn) / n, 1.0)
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[f"{name}_seconds"] = (time.perf_counter() - t0) / repeats / n
    return out


# losses(t (N, K), w (N, K), generator) -> (N, K): each draw's weighted loss w·ℓ, with its graph to the parameters
DrawLosses = Callable[[Tensor, Tensor, torch.Generator], Tensor]


def _half_gradients(losses: Tensor, params: list[Tensor]) -> list[Tensor]:
    """The parameter gradients of the mean loss over each half of the samples (rows), flattened, float64."""
    N = losses.shape[0]
    out = []
    for half in (slice(0, N // 2), slice(N // 2, N)):
        out.append(_flat(torch.autograd.grad(losses[half].mean(), params, retain_graph=True, allow_unused=True),
                         params))
    return out


def draw_loss_variance_estimate(losses: DrawLosses, params: list[Tensor], N: int, sampler: TimestepSampler,
                                K_s: int, generator: torch.Generator) -> tuple[float, float, float]:
    """(σ_b², σ_w², σ_w,strat²(K_s)) of the gradient of a loss that is itself an expectation over (t, noise) per
    sample, the fake score's denoising loss (docs/method.md §9, "Splitting compute between the updates"): per-draw
    units as for the DMD gradient, so that Var = (σ_b² + v(K))/N with v(1) = σ_w², v(K_s) = σ_w,strat²/K_s.

    Two independent K_s-draw sets A, B per sample, drawn as training draws them (the sampler's q and strata); G_hS,
    the gradient of the mean weighted loss over half h of the samples with set S. Halves hold independent samples,
    sets independent draws: E‖G_1S − G_2S‖² = 4(σ_b² + v(K_s))/N and E‖G_hA − G_hB‖² = 4 v(K_s)/N. For iid draws
    v(1) = K_s v(K_s); with strata one more set of one draw per sample (C) gives σ_b² + v(1) the same way, and
    σ_w,strat² is returned (NaN for iid draws: nothing beyond σ_w² to model). Six half-batch backward passes (eight
    with strata); no state changes."""
    stratify = _strata_in_use(sampler)
    sets = []
    for K in (K_s, K_s) + ((1,) if stratify != "none" else ()):
        t, w = sampler.sample(N, K, generator=generator, device=params[0].device, stratify=stratify)
        sets.append(_half_gradients(losses(t, w, generator), params))
    (a1, a2), (b1, b2) = sets[0], sets[1]
    total = N / 4 * 0.5 * float(((a1 - a2) ** 2).sum() + ((b1 - b2) ** 2).sum())  # σ_b² + v(K_s)
    within = N / 4 * 0.5 * float(((a1 - b1) ** 2).sum() + ((a2 - b2) ** 2).sum())  # v(K_s)
    sigma_b2 = total - within
    if stratify == "none":
        return sigma_b2, K_s * within, float("nan")
    c1, c2 = sets[2]
    return sigma_b2, N / 4 * float(((c1 - c2) ** 2).sum()) - sigma_b2, K_s * within
