"""One interface for every network: the x0-predictor D(x_t, t, labels) (docs/method.md §1).

- `Denoiser` wraps a raw network (a diffusers UNet2DModel or a small MLP) and its schedule, converts eps-, v- or
  x0-predictions to x0 in float32 and applies classifier-free guidance in one batched call.
- `GaussianMixtureDenoiser` is the exact posterior mean E[x0 | x_t] of an isotropic Gaussian mixture: an oracle
  teacher whose score is known in closed form.
- `OneStepGenerator` is G(z) = D_theta(x_init(z), t_init).
- `ddim_sample` is the deterministic DDIM sampler (Song et al. 2021, eq. 12 with eta = 0) on the x0 interface.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from distill.errors import TeacherError
from distill.schedules import PREDICTION_TYPES, Schedule, edm_schedule, to_x0, vp_schedule, x0_loss_weight


class UNetAdapter(nn.Module):
    """Calls a diffusers UNet2DModel as net(x, t, labels) -> raw output."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        return self.unet(x, t, class_labels=labels).sample


class MLP(nn.Module):
    """Time-conditioned MLP for low-dimensional data: net(x, t, labels) -> raw output (labels are ignored).
    With `skip`, the output is x + MLP(x, t): a generator that starts as the identity on z ~ N(0, I) starts with
    spread-out samples instead of a single point, from which DMD's mode-seeking gradient cannot spread them."""

    def __init__(self, dim: int, T: int, hidden: int = 128, depth: int = 3, time_features: int = 16,
                 skip: bool = False):
        super().__init__()
        self.T = T
        self.skip = skip
        self.time_features = time_features
        layers: list[nn.Module] = []
        width = dim + time_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        half = self.time_features // 2
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=x.dtype) * (-math.log(1000.0) / half))
        angle = (t.to(x.dtype) / self.T * 1000.0)[:, None] * freqs[None]  # (B, half)
        out = self.net(torch.cat([x, angle.sin(), angle.cos()], dim=1))
        return x + out if self.skip else out


class Denoiser(nn.Module):
    """D(x_t, t, labels) -> x0 for a network trained on `schedule` with `prediction_type`.

    Conditional networks take labels in [0, num_classes); label `num_classes` is the null (unconditional) label
    used by classifier-free guidance. EDM networks with eps or v outputs get the preconditioning of Karras et al.
    2022, Table 1 (as diffusers' EDMEulerScheduler implements it); "sample" networks output x0 directly.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, prediction_type: str, num_classes: int | None = None,
                 sigma_data: float = 0.5):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.num_classes = num_classes
        self.sigma_data = sigma_data

    @property
    def T(self) -> int:
        return self.schedule.T

    def _raw_to_x0(self, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        a, s = self.schedule.coefficients(t, x_t.float())
        if self.schedule.kind == "edm" and self.prediction_type != "sample":
            sd = self.sigma_data
            c_in = 1.0 / (s * s + sd * sd).sqrt()
            c_noise = 0.25 * self.schedule.sigma.to(x_t.device)[t].log().to(x_t.dtype)
            raw = self.net((c_in * x_t).to(x_t.dtype), c_noise, labels).float()
            c_skip = sd * sd / (s * s + sd * sd)
            c_out = s * sd / (s * s + sd * sd).sqrt()
            if self.prediction_type == "v_prediction":
                c_out = -c_out
            return c_skip * x_t.float() + c_out * raw
        raw = self.net(x_t, t, labels).float()
        return to_x0(raw, x_t.float(), a, s, self.prediction_type)

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, guidance_scale: float = 1.0) -> Tensor:
        """x0 prediction in float32. `t` is a (B,) integer tensor; CFG: D_u + s (D_c - D_u)."""
        if self.num_classes is None:
            if guidance_scale != 1.0:
                raise ValueError("classifier-free guidance needs a class-conditional network")
            return self._raw_to_x0(x_t, t, None)
        if labels is None:
            labels = torch.full((x_t.shape[0],), self.num_classes, device=x_t.device, dtype=torch.long)
        if guidance_scale == 1.0:
            return self._raw_to_x0(x_t, t, labels)
        null = torch.full_like(labels, self.num_classes)
        both = self._raw_to_x0(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def loss_weight(self, t: Tensor, like: Tensor) -> Tensor:
        """Weight turning ||x0_hat - x0||^2 into the network's native loss (eps-, v- or x0-MSE, or EDM's)."""
        a, s = self.schedule.coefficients(t, like.float())
        if self.schedule.kind == "edm" and self.prediction_type != "sample":
            sd = self.sigma_data
            return (s * s + sd * sd) / (s * sd) ** 2  # lambda(sigma) = 1 / c_out^2 (Karras et al. 2022, Table 1)
        return x0_loss_weight(a, s, self.prediction_type)


# --------------------------------------------------------------------------------------------------------------
# The exact Gaussian-mixture teacher.


class GaussianMixture:
    """p(x) = sum_k w_k N(x; m_k, std^2 I)."""

    def __init__(self, means: Tensor, std: float, weights: Tensor | None = None):
        self.means = means.to(torch.float64)  # (M, d)
        self.std = float(std)
        M = means.shape[0]
        self.weights = (torch.full((M,), 1.0 / M, dtype=torch.float64) if weights is None
                        else weights.to(torch.float64) / weights.sum())

    @classmethod
    def ring(cls, modes: int, radius: float, std: float) -> GaussianMixture:
        angle = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        return cls(torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1), std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples (float32) and their mode indices."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[k] + self.std * torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return x.float(), k

    def log_prob_t(self, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """log p_t(x_t) of the noised mixture sum_k w_k N(a m_k, (a^2 std^2 + s^2) I). a, s: (B, 1)."""
        var = a * a * self.std ** 2 + s * s  # (B, 1)
        m = self.means.to(x_t)
        sq = ((x_t[:, None, :] - a[:, None, :] * m[None]) ** 2).sum(-1)  # (B, M)
        d = self.dim
        logn = -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
        return torch.logsumexp(logn + self.weights.to(x_t).log()[None], dim=1)

    def posterior_mean(self, x_t: Tensor, a: Tensor, s: Tensor) -> Tensor:
        """E[x0 | x_t] = sum_k r_k(x_t) [m_k + a std^2 / (a^2 std^2 + s^2) (x_t - a m_k)]  (closed form)."""
        var = a * a * self.std ** 2 + s * s  # (B, 1)
        m = self.means.to(x_t)
        diff = x_t[:, None, :] - a[:, None, :] * m[None]  # (B, M, d)
        logits = -0.5 * (diff ** 2).sum(-1) / var + self.weights.to(x_t).log()[None]  # (B, M)
        r = torch.softmax(logits, dim=1)
        gain = (a * self.std ** 2 / var)[:, :, None]  # (B, 1, 1)
        per_mode = m[None] + gain * diff  # (B, M, d)
        return (r[:, :, None] * per_mode).sum(1)


class GaussianMixtureDenoiser(nn.Module):
    """The exact x0-predictor of a Gaussian mixture under `schedule`, computed in float64."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.num_classes = None
        self.prediction_type = "sample"

    @property
    def T(self) -> int:
        return self.schedule.T

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, guidance_scale: float = 1.0) -> Tensor:
        if guidance_scale != 1.0:
            raise ValueError("the Gaussian-mixture teacher is unconditional; guidance_scale must be 1")
        x64 = x_t.to(torch.float64)
        a, s = self.schedule.coefficients(t, x64)
        return self.mixture.posterior_mean(x64, a, s).to(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# The generator and the sampler.


class OneStepGenerator(nn.Module):
    """G(z) = D_theta(x_init(z), t_init): x_init = sigma_{t_init} z for EDM, z for VP (docs/method.md §2)."""

    def __init__(self, denoiser: Denoiser, t_init: int | None = None):
        from distill.errors import ConfigError

        super().__init__()
        self.denoiser = denoiser
        T = denoiser.T
        # the config knows T only for the gmm teacher: a diffusers teacher's T is known once loaded, here; past it,
        # indexing the schedule would fail much later (an IndexError in the first cost measurement)
        if t_init is not None and not 0 <= t_init < T:
            raise ConfigError("generator.t_init", f"expected an index in [0, {T}) of the teacher's {T} time steps, "
                              f"got {t_init}")
        self.t_init = T - 1 if t_init is None else int(t_init)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        t = torch.full((z.shape[0],), self.t_init, device=z.device, dtype=torch.long)
        x_init = z * self.denoiser.schedule.sigma[self.t_init].item() if self.denoiser.schedule.kind == "edm" else z
        return self.denoiser(x_init, t, labels)


@torch.no_grad()
def ddim_sample(denoiser: nn.Module, noise: Tensor, labels: Tensor | None = None, steps: int = 50,
                guidance_scale: float = 1.0) -> Tensor:
    """Deterministic DDIM (eta = 0) from the last index to 0 in `steps` steps, on the x0 interface."""
    schedule: Schedule = denoiser.schedule
    T = schedule.T
    idx = torch.linspace(T - 1, 0, steps + 1).round().long().unique_consecutive()  # trailing spacing, ends at 0
    x = noise * schedule.sigma[-1].item() if schedule.kind == "edm" else noise.clone()
    for i, t in enumerate(idx):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x0 = denoiser(x, tt, labels, guidance_scale=guidance_scale)
        if i == len(idx) - 1:
            return x0
        a, s = schedule.coefficients(tt, x.float())
        eps = (x.float() - a * x0) / s
        a_next, s_next = schedule.coefficients(torch.full_like(tt, int(idx[i + 1])), x.float())
        x = (a_next * x0 + s_next * eps).to(noise.dtype)
    return x


# --------------------------------------------------------------------------------------------------------------
# Building and loading.


def build_unet(sample_shape: tuple[int, int, int], num_classes: int | None, block_out_channels: list[int],
               layers_per_block: int, attention: bool) -> nn.Module:
    """A small diffusers UNet2DModel; conditional nets get num_classes + 1 label embeddings (the last is null)."""
    from diffusers import UNet2DModel

    C, H, W = sample_shape
    levels = len(block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = math.gcd(*block_out_channels, 32)
    return UNet2DModel(
        sample_size=(H, W), in_channels=C, out_channels=C, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
        num_class_embeds=None if num_classes is None else num_classes + 1, norm_num_groups=groups,
        attention_head_dim=min(8, block_out_channels[-1]),
    )


def _teacher_folders(path: Path) -> tuple[Path, Path]:
    if not path.is_dir():
        raise TeacherError(f"teacher folder {str(path)!r} does not exist; expected a diffusers folder with "
                           f"unet/ and scheduler/ (save_pretrained layout)")
    if (path / "unet" / "config.json").is_file():
        model_dir, sched_dir = path / "unet", path / "scheduler"
    else:
        model_dir, sched_dir = path, path
    if not (model_dir / "config.json").is_file():
        raise TeacherError(f"teacher folder {str(path)!r} has no unet/config.json (nor config.json); expected a "
                           f"diffusers UNet saved with save_pretrained")
    if not (sched_dir / "scheduler_config.json").is_file():
        raise TeacherError(f"teacher folder {str(path)!r} has no scheduler_config.json in {str(sched_dir)!r}; "
                           f"expected the diffusers scheduler saved beside the model")
    return model_dir, sched_dir


def load_schedule(sched_dir: Path) -> tuple[Schedule, str, dict]:
    """Schedule and prediction type from a diffusers scheduler folder."""
    import diffusers

    config = json.loads((sched_dir / "scheduler_config.json").read_text())
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise TeacherError(f"{sched_dir}/scheduler_config.json names an unknown scheduler class {name!r}")
    scheduler = cls.from_pretrained(sched_dir)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if name == "EDMEulerScheduler":
        c = scheduler.config
        T = int(c.get("num_train_timesteps", 1000))
        return edm_schedule(T, c["sigma_min"], c["sigma_max"], c["rho"]), prediction_type, dict(c)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TeacherError(f"scheduler {name} in {sched_dir} has no alphas_cumprod; expected a DDPM-family "
                           f"scheduler or EDMEulerScheduler")
    return vp_schedule(scheduler.alphas_cumprod), prediction_type, dict(scheduler.config)


def load_diffusers_teacher(path: str | Path) -> Denoiser:
    """A frozen Denoiser around a UNet2DModel loaded with `from_pretrained` from a local folder (no network)."""
    from diffusers import UNet2DModel

    model_dir, sched_dir = _teacher_folders(Path(path))
    schedule, prediction_type, sched_config = load_schedule(sched_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise TeacherError(f"{model_dir}/config.json is a {config.get('_class_name')}; expected UNet2DModel")
    try:
        unet = UNet2DModel.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise TeacherError(f"cannot load the UNet in {str(model_dir)!r}: {str(e).splitlines()[0]}") from None
    n_emb = unet.config.num_class_embeds
    denoiser = Denoiser(UNetAdapter(unet), schedule, prediction_type,
                        num_classes=None if n_emb is None else n_emb - 1,
                        sigma_data=float(sched_config.get("sigma_data", 0.5)))
    return denoiser.requires_grad_(False).eval()


def sample_shape_of(denoiser: Denoiser) -> tuple[int, ...]:
    """(C, H, W) of a UNet teacher."""
    cfg = denoiser.net.unet.config
    size = cfg.sample_size
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    return (cfg.in_channels, H, W)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int, taken: Tensor | None = None) -> None:
    """ema <- ema + (1 - d)(model - ema) with the warm-up d = min(decay, (1 + step) / (10 + step)), so that the
    first updates are not dominated by the initial weights (as in diffusers' EMAModel). `taken`, a 0-dim bool
    tensor, masks the update on the device (a skipped optimiser step moves nothing) without a host sync."""
    d = min(decay, (1 + step) / (10 + step))
    weight = 1.0 - d if taken is None else (1.0 - d) * taken.to(torch.float32)
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], weight)


def trainable_copy(denoiser: Denoiser) -> Denoiser:
    """A deep copy with gradients on (the generator and the fake score start from the teacher)."""
    return copy.deepcopy(denoiser).requires_grad_(True).train()
