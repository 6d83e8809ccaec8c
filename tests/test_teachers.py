import json

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler, UNet2DModel

from distill.errors import TeacherError
from distill.schedules import edm_schedule, vp_schedule
from distill.teachers import (
    MLP,
    Denoiser,
    GaussianMixture,
    GaussianMixtureDenoiser,
    Generator,
    UNetAdapter,
    build_unet,
    ddim_sample,
    load_diffusers_teacher,
    sample_shape_of,
)


def test_mixture_posterior_mean_matches_tweedie_by_autograd():
    """E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha (Tweedie), the score taken by autograd."""
    mix = GaussianMixture.ring(modes=5, radius=2.0, std=0.3)
    schedule = vp_schedule(DDPMScheduler().alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (256,), generator=g)
    x_t = (3 * torch.randn(256, 2, dtype=torch.float64, generator=g)).requires_grad_(True)
    a, s = schedule.coefficients(t, x_t)
    (score,) = torch.autograd.grad(mix.log_prob_t(x_t, a, s).sum(), x_t)
    tweedie = (x_t + s * s * score) / a
    torch.testing.assert_close(mix.posterior_mean(x_t.detach(), a, s), tweedie.detach(), rtol=1e-7, atol=1e-7)


def test_mixture_denoiser_is_exact_at_low_noise_and_the_mean_at_high_noise():
    mix = GaussianMixture.ring(modes=8, radius=2.0, std=0.1)
    D = GaussianMixtureDenoiser(mix, vp_schedule(DDPMScheduler().alphas_cumprod))
    x0, _ = mix.sample(512, generator=torch.Generator().manual_seed(0))
    t0 = torch.zeros(512, dtype=torch.long)
    x_t = D.schedule.add_noise(x0, torch.randn_like(x0), t0)
    assert (D(x_t, t0) - x0).abs().max() < 0.05  # sigma_0 = 0.01: the posterior mean is x0 up to noise
    t_last = torch.full((512,), 999)
    x_t = D.schedule.add_noise(x0, torch.randn_like(x0), t_last)
    assert D(x_t, t_last).norm(dim=1).max() < 0.1  # alpha ~ 0.006: nothing is known, E[x0] = 0


def test_ddim_on_the_exact_teacher_reaches_every_mode():
    mix = GaussianMixture.ring(modes=8, radius=2.0, std=0.1)
    D = GaussianMixtureDenoiser(mix, vp_schedule(DDPMScheduler().alphas_cumprod))
    x = ddim_sample(D, torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)), steps=50)
    dist = torch.cdist(x.double(), mix.means)  # (2000, 8)
    nearest = dist.argmin(1)
    assert dist.min(1).values.median() < 0.2
    counts = torch.bincount(nearest, minlength=8)
    assert counts.min() > 2000 / 8 * 0.5  # every mode covered, roughly evenly


@pytest.fixture
def unet_folder(tmp_path):
    torch.manual_seed(0)
    unet = build_unet((1, 8, 8), 10, [16, 32], 1, True)
    unet.save_pretrained(tmp_path / "unet")
    DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(tmp_path / "scheduler")
    return tmp_path, unet


def test_load_diffusers_teacher_round_trips_and_converts(unet_folder):
    path, unet = unet_folder
    D = load_diffusers_teacher(path)
    assert D.num_classes == 10 and D.prediction_type == "v_prediction"
    assert sample_shape_of(D) == (1, 8, 8)
    assert not any(p.requires_grad for p in D.parameters())
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g)
    labels = torch.arange(6)
    v = unet(x_t, t, class_labels=labels).sample
    a, s = D.schedule.coefficients(t, x_t)
    expected = a * x_t - s * v  # VP: x0 = alpha x_t - sigma v
    torch.testing.assert_close(D(x_t, t, labels), expected, rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_is_one_batched_call_of_the_formula(unet_folder):
    path, _ = unet_folder
    D = load_diffusers_teacher(path)
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
    labels = torch.tensor([0, 3, 7, 9])
    cond = D(x_t, t, labels)
    uncond = D(x_t, t, torch.full_like(labels, 10))
    torch.testing.assert_close(D(x_t, t, labels, guidance_scale=3.0), uncond + 3.0 * (cond - uncond),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(D(x_t, t, None), uncond)  # no labels: the null label


def test_edm_preconditioning_matches_diffusers():
    sched = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    schedule = edm_schedule(100)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       norm_num_groups=8, layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    D = Denoiser(UNetAdapter(unet), schedule, "epsilon", sigma_data=0.5)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([5, 50, 99])
    sigma = schedule.sigma[t].float().view(-1, 1, 1, 1)
    raw = unet(sched.precondition_inputs(x, sigma), sched.precondition_noise(sigma.flatten())).sample
    ref = sched.precondition_outputs(x, raw, sigma)
    torch.testing.assert_close(D(x, t), ref, rtol=1e-4, atol=1e-5)


def test_generator_evaluates_the_denoiser_at_t_init():
    schedule = vp_schedule(DDPMScheduler().alphas_cumprod)
    D = Denoiser(MLP(2, 1000, 16, 1), schedule, "sample")
    G = Generator(D)
    assert G.t_init == 999
    z = torch.randn(5, 2)
    torch.testing.assert_close(G(z), D(z, torch.full((5,), 999)))
    G_edm = Generator(Denoiser(MLP(2, 100, 16, 1), edm_schedule(100), "sample"))
    torch.testing.assert_close(G_edm(z), G_edm.denoiser(80.0 * z, torch.full((5,), 99)), rtol=1e-5, atol=1e-5)


def test_missing_or_broken_teacher_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        load_diffusers_teacher(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="config.json"):
        load_diffusers_teacher(tmp_path / "empty")
    bad = tmp_path / "noweights"
    (bad / "unet").mkdir(parents=True)
    (bad / "unet" / "config.json").write_text(json.dumps(build_unet((1, 8, 8), None, [16, 32], 1, False).config))
    DDPMScheduler().save_pretrained(bad / "scheduler")
    with pytest.raises(TeacherError, match="cannot load the UNet"):
        load_diffusers_teacher(bad)
