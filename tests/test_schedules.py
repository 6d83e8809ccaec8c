import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler

from distill import schedules as S


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_noising_matches_diffusers_add_noise(beta_schedule):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    schedule = S.vp_schedule(sched.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, 8, 8, generator=g)
    eps = torch.randn(64, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    ours = schedule.add_noise(x0, eps, t)
    ref = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert schedule.T == 1000
    assert torch.all(schedule.sigma[1:] > schedule.sigma[:-1])  # noise grows with t


def test_v_matches_diffusers_get_velocity():
    sched = DDPMScheduler(num_train_timesteps=1000)
    schedule = S.vp_schedule(sched.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(32, 2, 4, 4, generator=g), torch.randn(32, 2, 4, 4, generator=g)
    t = torch.randint(0, 1000, (32,), generator=g)
    x_t = schedule.add_noise(x0, eps, t)
    a, s = schedule.coefficients(t, x0)
    torch.testing.assert_close(S.v_from_x0(x_t, x0, a, s), sched.get_velocity(x0, eps, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vp", "edm"])
@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_conversions_round_trip(kind, prediction_type):
    schedule = S.vp_schedule(DDPMScheduler().alphas_cumprod) if kind == "vp" else S.edm_schedule(1000)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(128, 5, dtype=torch.float64, generator=g)
    eps = torch.randn(128, 5, dtype=torch.float64, generator=g)
    t = torch.randint(0, 1000, (128,), generator=g)
    x_t = schedule.add_noise(x0, eps, t)
    a, s = schedule.coefficients(t, x0)
    raw = S.from_x0(x0, x_t, a, s, prediction_type)
    if prediction_type == "epsilon":
        torch.testing.assert_close(raw, eps)  # the exact target
    torch.testing.assert_close(S.to_x0(raw, x_t, a, s, prediction_type), x0)


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_x0_loss_weight_turns_x0_error_into_native_error(prediction_type):
    schedule = S.vp_schedule(DDPMScheduler().alphas_cumprod)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(64, 4, dtype=torch.float64, generator=g)
    x0_hat = x0 + 0.1 * torch.randn(64, 4, dtype=torch.float64, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    x_t = schedule.add_noise(x0, torch.randn(64, 4, dtype=torch.float64, generator=g), t)
    a, s = schedule.coefficients(t, x0)
    native = ((S.from_x0(x0_hat, x_t, a, s, prediction_type) - S.from_x0(x0, x_t, a, s, prediction_type)) ** 2)
    weighted = S.x0_loss_weight(a, s, prediction_type) * (x0_hat - x0) ** 2
    torch.testing.assert_close(native, weighted)


def test_karras_grid_matches_formula_and_diffusers():
    T = 40
    sig = S.karras_sigmas(T, 0.002, 80.0, 7.0)
    assert sig[0].item() == pytest.approx(0.002) and sig[-1].item() == pytest.approx(80.0)
    ramp = torch.linspace(0, 1, T, dtype=torch.float64)
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0)._compute_karras_sigmas(ramp)
    torch.testing.assert_close(sig, ref.flip(0).to(torch.float64))
    edm = S.edm_schedule(T)
    assert torch.all(edm.alpha == 1) and torch.all(edm.sigma[1:] > edm.sigma[:-1])


def test_unknown_prediction_type_is_an_error():
    with pytest.raises(ValueError, match="prediction_type"):
        S.to_x0(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1), "score")
