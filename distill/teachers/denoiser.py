"""One interface for every network: the x0-predictor D(x_t, t, cond) (docs/method.md §1).

- `Denoiser` wraps a raw network (a diffusers UNet2DModel or UNet2DConditionModel, or a small MLP) and its
  schedule, converts eps-, v- or x0-predictions to x0 in float32 and applies classifier-free guidance in one
  batched call. The condition is a `distill.conditions.Condition` (class labels or text embeddings); a bare label
  tensor is accepted as class labels.
- `Generator` is the student: G(z) = D_theta(x_init(z), t_init) in one step, or a few steps with re-noising.
- `ddim_sample` is the deterministic DDIM sampler (Song et al. 2021, eq. 12 with eta = 0) on the x0 interface.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from distill.conditions import Condition, as_condition
from distill.schedules import PREDICTION_TYPES, Schedule, to_x0, x0_loss_weight


class UNetAdapter(nn.Module):
    """Calls a diffusers UNet2DModel as net(x, t, cond) -> raw output (class labels, if any)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        return self.unet(x, t, class_labels=None if cond is None else cond.labels).sample


class TextUNetAdapter(nn.Module):
    """Calls a diffusers UNet2DConditionModel as net(x, t, cond) -> raw output: prompt embeddings as
    `encoder_hidden_states`, and for SDXL-style UNets (addition_embed_type "text_time") the pooled embeddings and
    time ids as `added_cond_kwargs`. Inputs are cast to the UNet's dtype (a frozen teacher may be bf16)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        if cond is None or cond.embeds is None:
            raise ValueError("a text-conditional UNet needs a text condition (prompt embeddings)")
        dtype = self.unet.dtype
        added = None
        if cond.pooled is not None:
            added = {"text_embeds": cond.pooled.to(dtype), "time_ids": cond.time_ids.to(dtype)}
        return self.unet(x.to(dtype), t, encoder_hidden_states=cond.embeds.to(dtype), added_cond_kwargs=added).sample


class MLP(nn.Module):
    """Time-conditioned MLP for low-dimensional data: net(x, t, cond) -> raw output (cond is ignored).
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

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        half = self.time_features // 2
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=x.dtype) * (-math.log(1000.0) / half))
        angle = (t.to(x.dtype) / self.T * 1000.0)[:, None] * freqs[None]  # (B, half)
        out = self.net(torch.cat([x, angle.sin(), angle.cos()], dim=1))
        return x + out if self.skip else out


class Denoiser(nn.Module):
    """D(x_t, t, cond) -> x0 for a network trained on `schedule` with `prediction_type`.

    `null` is the network's null (unconditional) condition, one row: for class-conditional networks the label
    `num_classes` (labels live in [0, num_classes)); for text-conditional ones the encoding of the empty prompt (SD
    1.x/2.x) or zeros (SDXL), as DMD2 uses for guidance. None: an unconditional network. EDM networks with eps or
    v outputs get the preconditioning of Karras et al. 2022, Table 1 (as diffusers' EDMEulerScheduler implements
    it); "sample" networks output x0 directly.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, prediction_type: str, num_classes: int | None = None,
                 sigma_data: float = 0.5, null: Condition | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        if null is None and num_classes is not None:
            null = Condition(labels=torch.tensor([num_classes]))
        # buffers (not saved): they follow the module to its device and into its copies
        self._null_fields = tuple(name for name, _ in null._items()) if null is not None else ()
        for name in self._null_fields:
            self.register_buffer(f"null_{name}", getattr(null, name)[:1].clone(), persistent=False)

    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def conditional(self) -> bool:
        return bool(self._null_fields)

    def null_condition(self, batch: int) -> Condition:
        """The null condition as `batch` rows (for guidance, and for calls without a condition)."""
        return Condition(**{name: getattr(self, f"null_{name}") for name in self._null_fields}).expand(batch)

    def net_inputs(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """What the network is called with: x_t and t as they are, or for EDM eps / v networks c_in x_t and c_noise
        (Karras et al. 2022, Table 1)."""
        if self.schedule.kind == "edm" and self.prediction_type != "sample":
            _, s = self.schedule.coefficients(t, x_t.float())
            sd = self.sigma_data
            c_in = 1.0 / (s * s + sd * sd).sqrt()
            c_noise = 0.25 * self.schedule.sigma.to(x_t.device)[t].log().to(x_t.dtype)
            return (c_in * x_t).to(x_t.dtype), c_noise
        return x_t, t

    def _raw_to_x0(self, x_t: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        a, s = self.schedule.coefficients(t, x_t.float())
        if self.schedule.kind == "edm" and self.prediction_type != "sample":
            sd = self.sigma_data
            raw = self.net(*self.net_inputs(x_t, t), cond).float()
            c_skip = sd * sd / (s * s + sd * sd)
            c_out = s * sd / (s * s + sd * sd).sqrt()
            if self.prediction_type == "v_prediction":
                c_out = -c_out
            return c_skip * x_t.float() + c_out * raw
        raw = self.net(x_t, t, cond).float()
        return to_x0(raw, x_t.float(), a, s, self.prediction_type)

    def forward(self, x_t: Tensor, t: Tensor, cond: Condition | Tensor | None = None,
                guidance_scale: float = 1.0) -> Tensor:
        """x0 prediction in float32. `t` is a (B,) integer tensor; CFG: D_u + s (D_c - D_u) in one batched call."""
        cond = as_condition(cond)
        if not self.conditional:
            if guidance_scale != 1.0:
                raise ValueError("classifier-free guidance needs a conditional network")
            return self._raw_to_x0(x_t, t, None)
        if cond is None:
            cond = self.null_condition(x_t.shape[0])
        if guidance_scale == 1.0:
            return self._raw_to_x0(x_t, t, cond)
        null = self.null_condition(x_t.shape[0])
        both = self._raw_to_x0(torch.cat([x_t, x_t]), torch.cat([t, t]), Condition.cat([cond, null]))
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
# The generator and the sampler.


class Generator(nn.Module):
    """The student: one step, or a few steps with re-noising (DMD2 §4.4; docs/method.md §2).

    `timesteps` t_0 > t_1 > ... > t_{S-1} (indices of the teacher's T steps). Step k maps its input x at t_k to
    x0_k = D_theta(x, t_k). Step 0's input is x_init(z) = sigma_{t_0} z for EDM, z for VP; step k > 0's input is
    x0_{k-1} re-noised to t_k with fresh noise, alpha_{t_k} x0_{k-1} + sigma_{t_k} eps_k (the multi-step sampler of
    DMD2, and LCM's). The output is the last step's x0. One entry (the default, T - 1) is the one-step generator
    G(z) = D_theta(x_init(z), t_init).
    """

    def __init__(self, denoiser: Denoiser, timesteps: Sequence[int] | int | None = None):
        from distill.errors import ConfigError

        super().__init__()
        self.denoiser = denoiser
        T = denoiser.T
        # the config knows T only for the gmm teacher: a diffusers teacher's T is known once loaded, here; past it,
        # indexing the schedule would fail much later (an IndexError in the first cost measurement)
        if timesteps is None or isinstance(timesteps, int):  # one step, at generator.t_init
            if timesteps is not None and not 0 <= timesteps < T:
                raise ConfigError("generator.t_init", f"expected an index in [0, {T}) of the teacher's {T} time "
                                  f"steps, got {timesteps}")
            timesteps = [T - 1 if timesteps is None else timesteps]
        timesteps = [int(t) for t in timesteps]
        if not timesteps or any(not 0 <= t < T for t in timesteps):
            raise ConfigError("generator.timesteps", f"expected indices in [0, {T}) of the teacher's {T} time steps, "
                              f"got {timesteps}")
        if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ConfigError("generator.timesteps", f"expected strictly decreasing time indices (the first is where "
                              f"sampling starts), got {timesteps}")
        self.timesteps = tuple(timesteps)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def t_init(self) -> int:
        return self.timesteps[0]

    def init(self, z: Tensor) -> Tensor:
        """Step 0's input from z ~ N(0, I)."""
        return z * self.denoiser.schedule.sigma[self.t_init].item() if self.denoiser.schedule.kind == "edm" else z

    def step(self, x: Tensor, k: int, cond: Condition | Tensor | None = None) -> Tensor:
        """x0 of step k from its input x at t_k."""
        t = torch.full((x.shape[0],), self.timesteps[k], device=x.device, dtype=torch.long)
        return self.denoiser(x, t, cond)

    def renoise(self, x0: Tensor, k: int, eps: Tensor) -> Tensor:
        """Step k's input (k >= 1): the previous step's x0 noised to t_k with fresh noise eps."""
        t = torch.full((x0.shape[0],), self.timesteps[k], device=x0.device, dtype=torch.long)
        return self.denoiser.schedule.add_noise(x0, eps.to(x0.dtype), t)

    def input_of_step(self, z: Tensor, k: int, cond: Condition | Tensor | None = None,
                      noise: Tensor | None = None) -> Tensor:
        """Backward simulation (DMD2 §4.5): step k's input, from z through steps 0 .. k-1 (run as they are, under the
        caller's grad mode) with the re-noising draws `noise` (N, >= k, *shape): noise[:, j - 1] re-noises to
        t_j. k = 0 is x_init(z)."""
        x = self.init(z)
        for j in range(1, k + 1):
            x = self.renoise(self.step(x, j - 1, cond), j, noise[:, j - 1])
        return x

    def forward(self, z: Tensor, cond: Condition | Tensor | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None, until: int | None = None) -> Tensor:
        """The sample: x0 of the last step. `noise` (N, S - 1, *shape) holds the re-noising draws of steps 1 .. S-1;
        without it they are drawn from `generator` (one block per sample, in order). `until=k` is training by
        backward simulation (DMD2 §4.5): steps 0 .. k-1 run without grad, step k under the caller's grad mode, and
        the result is step k's x0 (noise: (N, k, *shape))."""
        last = self.steps - 1 if until is None else int(until)
        if last > 0 and noise is None:
            noise = torch.randn((z.shape[0], last, *z.shape[1:]), generator=generator,
                                device=z.device if generator is None else generator.device).to(z.device, z.dtype)
        if until is None:
            x = self.input_of_step(z, last, cond, noise)
        else:
            with torch.no_grad():
                x = self.input_of_step(z, last, cond, noise)
        return self.step(x, last, cond)


@torch.no_grad()
def ddim_sample(denoiser: nn.Module, noise: Tensor, cond: Condition | Tensor | None = None, steps: int = 50,
                guidance_scale: float = 1.0) -> Tensor:
    """Deterministic DDIM (eta = 0) from the last index to 0 in `steps` steps, on the x0 interface."""
    schedule: Schedule = denoiser.schedule
    T = schedule.T
    idx = torch.linspace(T - 1, 0, steps + 1).round().long().unique_consecutive()  # trailing spacing, ends at 0
    x = noise * schedule.sigma[-1].item() if schedule.kind == "edm" else noise.clone()
    for i, t in enumerate(idx):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x0 = denoiser(x, tt, cond, guidance_scale=guidance_scale)
        if i == len(idx) - 1:
            return x0
        a, s = schedule.coefficients(tt, x.float())
        eps = (x.float() - a * x0) / s
        a_next, s_next = schedule.coefficients(torch.full_like(tt, int(idx[i + 1])), x.float())
        x = (a_next * x0 + s_next * eps).to(noise.dtype)
    return x



# --------------------------------------------------------------------------------------------------------------
# Training helpers.


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int, taken: Tensor | None = None) -> None:
    """ema <- ema + (1 - d)(model - ema) with the warm-up d = min(decay, (1 + step) / (10 + step)), so that the
    first updates are not dominated by the initial weights (as in diffusers' EMAModel). `taken`, a 0-dim bool
    tensor, masks the update on the device (a skipped optimiser step moves nothing) without a host sync."""
    d = min(decay, (1 + step) / (10 + step))
    weight = 1.0 - d if taken is None else (1.0 - d) * taken.to(torch.float32)
    # only what trains moves (a LoRA generator's frozen base weights are the teacher's in both)
    pairs = [(e, p.detach()) for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], weight)


def trainable_copy(denoiser: Denoiser, lora_rank: int = 0, lora_alpha: float = 8.0,
                   gradient_checkpointing: bool = False) -> Denoiser:
    """A deep copy that trains (the generator and the fake score start from the teacher): every weight, or with
    `lora_rank` > 0 only peft LoRA adapters on DMD2's target layers (`LORA_TARGETS`; B = 0 at the start, so the
    copy starts as the teacher exactly). `gradient_checkpointing` recomputes the UNet's activations in the
    backward pass instead of storing them."""
    copied = copy.deepcopy(denoiser).train()
    unet = getattr(copied.net, "unet", None)
    if lora_rank > 0:
        from peft import LoraConfig

        names = [name for name, _ in unet.named_modules()]
        found = [t for t in LORA_TARGETS if any(n == t or n.endswith("." + t) for n in names)]
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=found))
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
    else:
        copied.requires_grad_(True)
    if gradient_checkpointing and unet is not None:
        unet.enable_gradient_checkpointing()
    return copied


# DMD2's LoRA targets for SDXL (attention, feed-forward, convolutions, the time-embedding projection)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                "time_emb_proj")
