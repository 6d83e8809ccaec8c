"""Timestep draws for the CARV estimator (docs/method.md §6, "Timestep importance sampling" and "Stratified inverse CDF").

One object holds the base distribution p over the discrete indices {0..T-1}, the proposal q, and the binned
second-moment table that the adaptive proposal is built from. `sample(N, K)` returns indices t ~ q (iid or
stratified) and weights w = p(t)/q(t); the caller averages w * g over the K draws of each outer sample.

Predictability: q changes only inside `update()` (or `load_state_dict()`), and `update()` only folds records that
were fed before it. So the q that weights a draw never saw that draw.

Tables are float64 on the CPU; each device gets a cached copy of the inverse-CDF tables.
"""

from __future__ import annotations

import torch
from torch import Tensor

PROPOSALS = ("uniform", "adaptive")
STRATIFY = ("none", "per_sample", "batch", "global")


def _probabilities(x, name: str, size: int | None = None) -> Tensor:
    """A 1-D float64 CPU probability vector, or ValueError naming `name`."""
    try:
        x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name}: expected a 1-D tensor of probabilities, got {type(x).__name__}") from err
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D tensor of probabilities, got shape {tuple(x.shape)}")
    if size is not None and x.numel() != size:
        raise ValueError(f"{name}: expected {size} entries (one per index of p), got {x.numel()}")
    if not torch.isfinite(x).all() or (x < 0).any():
        raise ValueError(f"{name}: entries must be finite and non-negative")
    total = float(x.sum())
    if abs(total - 1.0) > 1e-4:
        raise ValueError(f"{name}: entries must sum to 1 (got {total:.6g}); normalise it first")
    return x / total  # float64 round-off only; anything larger was refused above


class TimestepSampler:
    """Draws (t, w) with t ~ q on {0..T-1} and w = p(t)/q(t)   (docs/method.md §6, ω(t) = p(t)/q(t)).

    p:          (T,) base probabilities (DMD: uniform over the integer indices [0.02T, 0.98T], zero elsewhere).
    proposal:   "uniform" (q = p), "adaptive" (learned from `record`/`update`), or a (T,) tensor q, the static
                "explicit weight" form, which must be > 0 wherever p > 0.
    stratify:   "none" (iid); "per_sample" (K jittered strata per outer sample); "batch" (N*K strata over the batch,
                dealt to the (n, k) cells by a random permutation); "global" (world_size*N*K strata over the DDP
                global batch, rank r takes its own slice). For "global" the generator passed to `sample` must have
                the SAME state on every rank (e.g. seeded by the step), and should be used for nothing else that
                must differ across ranks; every rank draws the same numbers and keeps its slice.
    bins, ema, smoothing, floor, mix, warmup, refresh_every: the adaptive proposal (docs/method.md §6, form B): `bins`
                equal-width bins over the support of p; per-bin EMA of the second moment with weight `ema` on the
                old value; Gaussian smoothing across bins with std `smoothing` bins (0: none); floor at
                `floor` * max; defensive mixture with weight `mix` on p, so w <= 1/mix; q is rebuilt after
                `warmup` updates and then every `refresh_every` updates (q = p before the first rebuild).
    """

    def __init__(self, p, proposal="uniform", stratify: str = "none", *, bins: int = 32, ema: float = 0.9,
                 smoothing: float = 1.0, floor: float = 0.05, mix: float = 0.1, warmup: int = 100,
                 refresh_every: int = 50):
        self._p = _probabilities(p, "p")
        T = self._p.numel()
        nz = torch.nonzero(self._p > 0).flatten()
        self.lo, self.hi = int(nz[0]), int(nz[-1])  # bins span [first, last] nonzero index of p
        if isinstance(proposal, str):
            if proposal not in PROPOSALS:
                raise ValueError(f"proposal: expected one of {PROPOSALS} or a 1-D tensor q, got {proposal!r}")
            self.kind = proposal
            q = self._p.clone()
        else:
            q = _probabilities(proposal, "proposal", size=T)
            if (q[self._p > 0] <= 0).any():
                raise ValueError("proposal: q must be > 0 wherever p > 0 (otherwise the estimate is biased)")
            self.kind = "fixed"
        if stratify not in STRATIFY:
            raise ValueError(f"stratify: expected one of {STRATIFY}, got {stratify!r}")
        self.stratify = stratify
        for name, value, ok, want in (
                ("bins", bins, isinstance(bins, int) and bins >= 1, "an int >= 1"),
                ("ema", ema, 0.0 <= ema < 1.0, "in [0, 1)"),
                ("smoothing", smoothing, smoothing >= 0.0, ">= 0"),
                ("floor", floor, 0.0 <= floor <= 1.0, "in [0, 1]"),
                ("mix", mix, 0.0 < mix <= 1.0, "in (0, 1] (the defensive mixture keeps w <= 1/mix)"),
                ("warmup", warmup, isinstance(warmup, int) and warmup >= 0, "an int >= 0"),
                ("refresh_every", refresh_every, isinstance(refresh_every, int) and refresh_every >= 1,
                 "an int >= 1")):
            if not ok:
                raise ValueError(f"{name}: expected {want}, got {value!r}")
        self.bins = min(bins, self.hi - self.lo + 1)
        self.ema, self.smoothing, self.floor, self.mix = float(ema), float(smoothing), float(floor), float(mix)
        self.warmup, self.refresh_every = warmup, refresh_every
        # the exact DMD2 baseline: t = randint(lo, hi + 1) when q = p is uniform over a contiguous range
        support_p = self._p[self.lo:self.hi + 1]
        self._randint = self.kind == "uniform" and stratify == "none" and bool((support_p == support_p[0]).all())
        self.m2 = torch.zeros(self.bins, dtype=torch.float64)  # (B,) EMA of E||g||^2 per bin
        self.seen = torch.zeros(self.bins, dtype=torch.bool)  # (B,) bins that ever got a record
        self.n_updates = 0
        self.n_refreshes = 0
        self._pending: tuple[Tensor, Tensor] | None = None  # per-bin (sum of sq_norm, count), on the records' device
        self.frozen = False  # see freeze()
        self._set_q(q)

    # -- tables ------------------------------------------------------------------------------------------------
    @property
    def p(self) -> Tensor:
        return self._p

    @property
    def q(self) -> Tensor:
        return self._q

    @property
    def support(self) -> Tensor:
        """Indices where p > 0 (long)."""
        return torch.nonzero(self._p > 0).flatten()

    def _set_q(self, q: Tensor) -> None:
        self._q = q
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(support of q, its CDF with the last entry exactly 1, w = p/q per index) on `device`."""
        if device not in self._cache:
            idx = torch.nonzero(self._q > 0).flatten()  # zero-probability indices are never drawn
            cdf = torch.cumsum(self._q[idx], 0)
            cdf = cdf / cdf[-1]
            cdf[-1] = 1.0
            w = torch.where(self._q > 0, self._p / self._q.clamp_min(1e-300), torch.zeros_like(self._q))
            self._cache[device] = (idx.to(device), cdf.to(device), w.to(device))
        return self._cache[device]

    def bin_of(self, t: Tensor) -> Tensor:
        """Equal-width bin of each index over [lo, hi]; indices outside are put in the end bins."""
        width = self.hi - self.lo + 1
        return ((t.long() - self.lo).clamp(0, width - 1) * self.bins // width).clamp(0, self.bins - 1)

    # -- drawing -----------------------------------------------------------------------------------------------
    def _uniforms(self, N: int, K: int, generator, device, rank: int, world_size: int, stratify: str) -> Tensor:
        """u in [0, 1), (N, K), float64; stratified as docs/method.md §7 "Stratified inverse CDF": u = (k + U_k)/M."""
        kw = dict(generator=generator, device=device, dtype=torch.float64)
        if stratify == "none":
            return torch.rand(N, K, **kw)
        if stratify == "per_sample":
            k = torch.arange(K, device=device, dtype=torch.float64)
            return (k + torch.rand(N, K, **kw)) / K  # u_k = (k + U_k)/K, K strata per outer sample
        M = N * K * (world_size if stratify == "global" else 1)
        u = (torch.arange(M, device=device, dtype=torch.float64) + torch.rand(M, **kw)) / M  # M strata
        perm = torch.randperm(M, generator=generator, device=device)  # random stratum for each (n, k) cell
        if stratify == "global":
            perm = perm[rank * N * K:(rank + 1) * N * K]  # rank r's slice of the global strata
        return u[perm].view(N, K)

    def sample(self, N: int, K: int, generator: torch.Generator | None = None, device=None, rank: int = 0,
               world_size: int = 1, stratify: str | None = None) -> tuple[Tensor, Tensor]:
        """(t, w), both (N, K): t long indices drawn from q, w = p(t)/q(t) float32 (never normalised or clipped).

        Tensors are created on `device`, else on the generator's device, else the CPU. rank/world_size are used by
        stratify="global" only. `stratify` overrides the sampler's own setting for this call (the split-half
        diagnostic needs iid draws from the current q).
        """
        stratify = self.stratify if stratify is None else stratify
        if stratify not in STRATIFY:
            raise ValueError(f"stratify: expected one of {STRATIFY}, got {stratify!r}")
        if not (isinstance(N, int) and N >= 1 and isinstance(K, int) and K >= 1):
            raise ValueError(f"N, K: expected ints >= 1, got N={N!r}, K={K!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank, world_size: expected 0 <= rank < world_size, got rank={rank!r}, "
                             f"world_size={world_size!r}")
        device = torch.device(device) if device is not None else (
            generator.device if generator is not None else torch.device("cpu"))
        if self._randint and stratify == "none":  # the DMD2 reference draw, number for number (docs/method.md §3, "t uniform over [0.02T, 0.98T]")
            t = torch.randint(self.lo, self.hi + 1, (N, K), generator=generator, device=device)
            return t, torch.ones(N, K, device=device)
        idx, cdf, w_table = self._tables(device)
        u = self._uniforms(N, K, generator, device, rank, world_size, stratify)
        pos = torch.searchsorted(cdf, u.flatten(), right=True).clamp_(max=idx.numel() - 1)
        t = idx[pos].view(N, K)  # t = F_q^{-1}(u) on the discrete support (docs/method.md §7)
        return t, w_table[t].float()  # ω(t) = p(t)/q(t) (docs/method.md §6)

    # -- the adaptive proposal ---------------------------------------------------------------------------------
    def record(self, t: Tensor, sq_norm: Tensor, taken: Tensor | None = None) -> None:
        """Feed ||g||^2 of the UNWEIGHTED integrand at the draws t (same shape). Used at the next `update()`.
        `taken`, a 0-dim bool tensor, masks the whole record on the device (a skipped update feeds nothing) without
        a host sync; without it, non-finite values are refused."""
        t, sq_norm = t.detach(), sq_norm.detach()
        if t.shape != sq_norm.shape:
            raise ValueError(f"sq_norm: expected the shape of t {tuple(t.shape)}, got {tuple(sq_norm.shape)}")
        dtype = torch.float32 if t.device.type == "mps" else torch.float64  # mps has no float64
        b = self.bin_of(t.flatten())
        values = sq_norm.flatten().to(dtype)
        ones = torch.ones(b.numel(), dtype=dtype, device=t.device)
        if taken is None:
            if not torch.isfinite(values).all():  # (a host check: the training step passes `taken` instead)
                raise ValueError("sq_norm: non-finite values were recorded; the proposal table would be corrupted")
        else:
            ones = ones * taken.to(dtype)
            values = torch.where(ones > 0, values, torch.zeros_like(values))
        s = torch.zeros(self.bins, device=t.device, dtype=dtype).index_add_(0, b, values)
        c = torch.zeros(self.bins, device=t.device, dtype=dtype).index_add_(0, b, ones)
        if self._pending is not None:
            s, c = s + self._pending[0].to(s), c + self._pending[1].to(c)
        self._pending = (s, c)

    def reduce_pending(self, reduce) -> None:
        """Apply `reduce` in place to the pending (sum, count) tables: e.g. an all-reduce over DDP ranks, so that
        every rank folds the same statistics and holds the same q."""
        if self._pending is not None:
            for table in self._pending:
                reduce(table)

    def update(self) -> None:
        """Fold the pending records into the per-bin EMA; rebuild an adaptive q after `warmup` updates and then
        every `refresh_every` updates. The only place (with load_state_dict) where q changes. The fold runs on
        the records' device with no host sync; only a rebuild of q reads the table on the host."""
        pending, self._pending = self._pending, None
        if self.frozen:
            return
        if pending is not None:
            s, c = pending
            if self.m2.device != s.device:
                self.m2, self.seen = self.m2.to(s.device, s.dtype), self.seen.to(s.device)
            got = (c > 0) & torch.isfinite(s)
            mean = s / c.clamp_min(1)
            # EMA per bin (docs/method.md §6); a bin's first record initialises it rather than decaying from 0
            folded = torch.where(self.seen, self.ema * self.m2 + (1 - self.ema) * mean, mean)
            self.m2 = torch.where(got, folded.to(self.m2.dtype), self.m2)
            self.seen = self.seen | got
        self.n_updates += 1
        start = max(self.warmup, 1)
        if self.kind == "adaptive" and self.n_updates >= start and (self.n_updates - start) % self.refresh_every == 0:
            self._set_q(self.build_q())
            self.n_refreshes += 1

    def freeze(self) -> None:
        """Build q from the table now and keep it: later records and updates change nothing (a benchmark measures
        at a fixed proposal learnt from pilot draws, never from its own)."""
        if self.kind == "adaptive":
            self._set_q(self.build_q())
        self._pending = None
        self.frozen = True

    def build_q(self) -> Tensor:
        """q = (1 − λ)·q̂ + λ·p with q̂ ∝ p·sqrt(m2) from the current table (docs/method.md §6, form B); p if no records."""
        m2_all, seen = self.m2.to("cpu", torch.float64), self.seen.to("cpu")
        if not seen.any():
            return self._p.clone()
        m2 = torch.where(seen, m2_all, m2_all[seen].mean())  # unrecorded bins: neutral value
        if self.smoothing > 0:  # Gaussian kernel across bins, renormalised at the edges
            i = torch.arange(self.bins, dtype=torch.float64)
            kernel = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / self.smoothing) ** 2)
            m2 = (kernel @ m2) / kernel.sum(1)
        if not m2.max() > 0:
            return self._p.clone()
        m2 = m2.clamp_min(self.floor * m2.max())  # floor at a fraction of the max
        b = self.bin_of(torch.arange(self._p.numel()))
        q_hat = self._p * m2[b].sqrt()  # q*(t) ∝ p(t)·sqrt(E||g(·, t, ·)||²) (docs/method.md §6)
        q_hat = q_hat / q_hat.sum()
        return (1 - self.mix) * q_hat + self.mix * self._p  # q = (1−λ)·q̂ + λ·p, so ω ≤ 1/λ (docs/method.md §6)

    # -- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        pending = None if self._pending is None else [x.to("cpu", torch.float64) for x in self._pending]
        return {"p": self._p.clone(), "q": self._q.clone(), "m2": self.m2.to("cpu", torch.float64).clone(),
                "seen": self.seen.to("cpu").clone(),
                "n_updates": self.n_updates, "n_refreshes": self.n_refreshes, "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        """Restore tables, counters and (for an adaptive proposal) q. p and the bin count must match."""
        p = torch.as_tensor(state["p"], dtype=torch.float64)
        if p.shape != self._p.shape or not torch.allclose(p, self._p, rtol=0, atol=1e-12):
            raise ValueError("state: its p differs from this sampler's p; the tables would not apply")
        if tuple(state["m2"].shape) != (self.bins,):
            raise ValueError(f"state: its table has {tuple(state['m2'].shape)} bins, this sampler {self.bins}")
        self.m2 = state["m2"].to("cpu", torch.float64).clone()
        self.seen = state["seen"].to("cpu", torch.bool).clone()
        self.n_updates, self.n_refreshes = int(state["n_updates"]), int(state["n_refreshes"])
        pending = state.get("pending")
        self._pending = None if pending is None else tuple(x.to("cpu", torch.float64).clone() for x in pending)
        if self.kind == "adaptive":  # a uniform or fixed proposal keeps its own q
            self._set_q(state["q"].to("cpu", torch.float64).clone())

    def __repr__(self) -> str:
        return (f"TimestepSampler(T={self._p.numel()}, support=[{self.lo}, {self.hi}], proposal={self.kind!r}, "
                f"stratify={self.stratify!r}, bins={self.bins}, updates={self.n_updates})")


def dmd_timestep_p(T: int, t_min: float = 0.02, t_max: float = 0.98) -> Tensor:
    """p uniform over the integer indices [int(t_min·T), min(int(t_max·T), T−1)] (docs/method.md §3, DMD2 reference)."""
    if not (isinstance(T, int) and T >= 1 and 0.0 <= t_min <= t_max <= 1.0):
        raise ValueError(f"T, t_min, t_max: expected T >= 1 and 0 <= t_min <= t_max <= 1, got {T}, {t_min}, {t_max}")
    lo, hi = int(t_min * T), min(int(t_max * T), T - 1)
    if lo > hi:
        raise ValueError(f"t_min, t_max: [{t_min}, {t_max}] holds no integer index of 0..{T - 1}")
    p = torch.zeros(T, dtype=torch.float64)
    p[lo:hi + 1] = 1.0 / (hi - lo + 1)
    return p
