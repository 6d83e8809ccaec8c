import torch

from distill.losses import denoising_loss, dmd_grad, dmd_loss


def test_dmd_grad_matches_the_formula_draw_by_draw():
    g = torch.Generator().manual_seed(0)
    x, mu_real, mu_fake = (torch.randn(7, 3, 4, 4, generator=g) for _ in range(3))
    out = dmd_grad(x, mu_real, mu_fake)
    assert out.shape == x.shape
    for i in range(7):  # direct evaluation, one draw at a time
        expected = (mu_fake[i] - mu_real[i]) / (x[i] - mu_real[i]).abs().mean()
        torch.testing.assert_close(out[i], expected)


def test_dmd_grad_normaliser_is_per_draw_not_pooled():
    x = torch.zeros(2, 4)
    mu_real = torch.stack([torch.full((4,), 1.0), torch.full((4,), 10.0)])
    mu_fake = mu_real + 1.0
    out = dmd_grad(x, mu_real, mu_fake)
    torch.testing.assert_close(out[0], torch.full((4,), 1.0))
    torch.testing.assert_close(out[1], torch.full((4,), 0.1))


def test_dmd_grad_maps_nan_to_zero_and_inf_to_the_largest_float_as_nan_to_num():
    """A draw whose teacher reconstruction is exact has normaliser 0. The reference (tianweiy/DMD2,
    main/sd_guidance.py) applies torch.nan_to_num to the ratio: 0/0 = nan becomes 0, c/0 = +-inf becomes
    +-float32 max (not 0). Such a draw then makes the surrogate loss non-finite, so the update is skipped by the
    non-finite guard (docs/method.md §3) rather than taken with a silently zeroed gradient."""
    x = torch.zeros(1, 4)
    mu_real = torch.zeros(1, 4)  # |x - mu_real| = 0: normaliser 0
    mu_fake = torch.tensor([[1.0, -2.0, 0.0, 0.0]])  # +inf, -inf, nan, nan before nan_to_num
    out = dmd_grad(x, mu_real, mu_fake)
    big = torch.finfo(torch.float32).max
    assert torch.equal(out, torch.tensor([[big, -big, 0.0, 0.0]]))
    assert not torch.isfinite(dmd_loss(x, out)).all()  # loss inf: the guard skips this update
    other = dmd_grad(torch.ones(1, 4), mu_real, mu_fake)  # a draw with a normaliser of 1 is untouched
    assert torch.equal(other, mu_fake)


def test_surrogate_gradient_is_g_over_numel():
    g_ = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 3, 3, generator=g_, requires_grad=True)
    grad = torch.randn(5, 2, 3, 3, generator=g_)
    per_sample = dmd_loss(x, grad)
    assert per_sample.shape == (5,)
    per_sample.mean().backward()
    torch.testing.assert_close(x.grad, grad / x.numel())
    # the reference: 0.5 * F.mse_loss(x, (x - g).detach(), reduction="mean")
    x2 = x.detach().clone().requires_grad_(True)
    (0.5 * torch.nn.functional.mse_loss(x2, (x2 - grad).detach())).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_denoising_loss_is_weighted_per_sample_mse():
    x0 = torch.zeros(3, 2, 2)
    x0_hat = torch.ones(3, 2, 2) * torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
    w = torch.tensor([1.0, 0.5, 2.0]).view(3, 1, 1)
    torch.testing.assert_close(denoising_loss(x0_hat, x0, w), torch.tensor([1.0, 2.0, 18.0]))
