"""DMD2's GAN term (distill/gan.py, distill/losses.py): the losses against their closed forms, the bottleneck
features (the UNet's mid-block output, the forward stopped there) on UNet2DModel, SD 1.x and SDXL UNets, LoRA and
gradient-checkpointed copies, the head, seeded Diffusion-GAN noising, and a discriminator that learns."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import ConfigError
from distill.gan import GANHead, bottleneck, logits, logits_at
from distill.losses import gan_discriminator_loss, gan_generator_loss
from distill.schedules import edm_schedule, vp_schedule
from distill.teachers import MLP, Denoiser, GaussianMixture, GaussianMixtureDenoiser, UNetAdapter, build_unet
from distill.teachers import load_teacher, trainable_copy

KINDS = ("unet", "sd15", "sdxl")


def _softplus(x: float) -> float:
    """log(1 + e^x) in a form that cannot overflow: max(x, 0) + log1p(e^-|x|)."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


LOGITS_REAL = [-1000.0, -30.0, -2.5, 0.0, 0.7, 3.0, 40.0, 1000.0]
LOGITS_FAKE = [1000.0, 25.0, -0.3, 0.0, 1.5, -4.0, -60.0, -1000.0]


def test_gan_losses_match_their_closed_forms_even_for_large_logits():
    real = torch.tensor(LOGITS_REAL)
    fake = torch.tensor(LOGITS_FAKE)
    d = gan_discriminator_loss(real, fake)
    g = gan_generator_loss(fake)
    assert d.shape == g.shape == (8,) and d.dtype == g.dtype == torch.float32
    expected_d = torch.tensor([_softplus(f) + _softplus(-r) for r, f in zip(LOGITS_REAL, LOGITS_FAKE)])
    expected_g = torch.tensor([_softplus(-f) for f in LOGITS_FAKE])
    torch.testing.assert_close(d, expected_d, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, expected_g, rtol=1e-6, atol=1e-6)
    assert d[0] == 2000.0 and d[-1] == 0.0 and g[0] == 0.0 and g[-1] == 1000.0  # no overflow at |logit| = 1000
    # bf16 logits (a bf16 head) give float32 losses
    assert gan_generator_loss(fake.bfloat16()).dtype == torch.float32


def test_gan_loss_gradients_are_the_closed_form_sigmoids():
    real = torch.tensor(LOGITS_REAL, requires_grad=True)
    fake = torch.tensor(LOGITS_FAKE, requires_grad=True)
    gan_discriminator_loss(real, fake).sum().backward()
    # d/dr softplus(-r) = -sigmoid(-r); d/df softplus(f) = sigmoid(f)
    torch.testing.assert_close(real.grad, torch.tensor([-_sigmoid(-r) for r in LOGITS_REAL]))
    torch.testing.assert_close(fake.grad, torch.tensor([_sigmoid(f) for f in LOGITS_FAKE]))
    fake2 = torch.tensor(LOGITS_FAKE, requires_grad=True)
    gan_generator_loss(fake2).sum().backward()
    torch.testing.assert_close(fake2.grad, torch.tensor([-_sigmoid(-f) for f in LOGITS_FAKE]))
    assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all() and torch.isfinite(fake2.grad).all()


def test_discriminator_loss_refuses_logits_of_different_shapes():
    with pytest.raises(ValueError, match="one shape"):
        gan_discriminator_loss(torch.zeros(4), torch.zeros(3))


# --------------------------------------------------------------------------------------------------------------
# The head.


@pytest.mark.parametrize("size, blocks", [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (8, 3), ((4, 2), 1)])
def test_head_halves_the_bottleneck_down_to_one_logit(size, blocks):
    head = GANHead(12, size)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == blocks + 1 and convs[-1].out_channels == 1 and convs[-1].kernel_size == (1, 1)
    h, w = (size, size) if isinstance(size, int) else size
    out = head(torch.randn(5, 12, h, w, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (5,) and out.dtype == torch.float32


def test_head_logits_depend_on_the_features():
    """Every sample gets its own logit, also with 32 channels on a 4x4 bottleneck: with gcd(32, 32) = 32 groups,
    the last block's 1x1 GroupNorm would normalise one-element groups to 0 and give every input the same logit."""
    torch.manual_seed(0)
    for channels in (8, 32, 64):
        head = GANHead(channels, 4)
        out = head(torch.randn(6, channels, 4, 4, generator=torch.Generator().manual_seed(1)))
        assert out.std() > 1e-3 * out.abs().mean().clamp_min(1e-3), (channels, out)
        assert len(set(out.tolist())) == 6


def test_head_casts_features_to_its_dtype_and_returns_float32():
    torch.manual_seed(0)
    head = GANHead(16, 2)
    feats = torch.randn(3, 16, 2, 2, generator=torch.Generator().manual_seed(2))
    out32 = head(feats)
    out16 = head.to(torch.bfloat16)(feats)  # float32 features into a bf16 head
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        head(torch.randn(3, 8, 2, 2))


# --------------------------------------------------------------------------------------------------------------
# The bottleneck on each kind of UNet.


@pytest.fixture(scope="module")
def teachers(tiny_teacher, tiny_pipelines):
    """kind -> (denoiser, sample shape, a function B -> condition)."""
    out = {"unet": (load_teacher(tiny_teacher).denoiser, (1, 8, 8), lambda B: torch.arange(B) % 10)}
    for kind in ("sd15", "sdxl"):
        teacher = load_teacher(tiny_pipelines[kind])
        prompts = ["a handwritten three", "a handwritten seven", "a two", "one"]
        out[kind] = (teacher.denoiser, (4, 8, 8), lambda B, text=teacher.text: text([prompts[i % 4] for i in range(B)]))
    return out


def _inputs(shape, B: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g), torch.randint(0, 1000, (B,), generator=g)


def _edm_denoiser():
    """An EDM (VE) eps-predicting class-conditional UNet: its network takes c_in x_t and c_noise."""
    torch.manual_seed(0)
    unet = build_unet((1, 8, 8), 10, [16, 32], 1, False)
    denoiser = Denoiser(UNetAdapter(unet), edm_schedule(1000), "epsilon", num_classes=10)
    return denoiser, (1, 8, 8), lambda B: torch.arange(B) % 10


def _count_calls(modules) -> tuple[list[int], list]:
    """Calls counted by pre-hooks: torch's non-reentrant checkpoint stops a recomputation early, once it has what
    the backward needs, so a forward hook would not see it."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    return calls, [m.register_forward_pre_hook(hook) for m in modules]


@pytest.mark.parametrize("kind", KINDS + ("edm",))
def test_bottleneck_equals_the_mid_block_of_a_full_forward_and_runs_no_up_block(teachers, kind):
    """The same features as the mid block of the Denoiser's own forward (same input scaling: c_in and c_noise for
    EDM, the condition, the adapter), and the forward stops there."""
    denoiser, shape, make_cond = _edm_denoiser() if kind == "edm" else teachers[kind]
    unet = denoiser.net.unet
    x_t, t = _inputs(shape)
    cond = make_cond(3)
    captured = []
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: captured.append(out))
    up_calls, handles = _count_calls(unet.up_blocks)
    with torch.no_grad():
        denoiser(x_t, t, cond)
        assert up_calls[0] == len(unet.up_blocks) and len(captured) == 1  # the full forward runs every up block
        up_calls[0] = 0
        features = bottleneck(denoiser, x_t, t, cond)
    handle.remove()
    for h in handles:
        h.remove()
    assert up_calls[0] == 0, "an up block ran: the forward did not stop at the mid block"
    assert features.shape == captured[0].shape
    torch.testing.assert_close(features, captured[0], rtol=0, atol=0)
    # the condition matters (the features are not computed unconditionally)
    if kind in ("sd15", "sdxl"):
        other = bottleneck(denoiser, x_t, t, make_cond(4)[torch.tensor([1, 2, 3])])
        assert not torch.allclose(other, features)


@pytest.mark.parametrize("kind", KINDS)
def test_head_for_denoiser_fits_the_bottleneck(teachers, kind):
    denoiser, shape, make_cond = teachers[kind]
    head = GANHead.for_denoiser(denoiser, shape)
    x_t, t = _inputs(shape, B=2)
    with torch.no_grad():
        features = bottleneck(denoiser, x_t, t, make_cond(2))
    assert (head.channels, *head.size) == tuple(features.shape[1:])
    assert head.channels == denoiser.net.unet.config.block_out_channels[-1]
    out = head(features)
    assert out.shape == (2,) and out.dtype == torch.float32


def _grads(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor | None]:
    return {prefix + n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_x_t_the_unet_and_the_head(teachers, kind):
    denoiser, shape, make_cond = teachers[kind]
    fake_score = trainable_copy(denoiser)
    head = GANHead.for_denoiser(fake_score, shape)
    x_t, t = _inputs(shape)
    x_t.requires_grad_(True)
    head(bottleneck(fake_score, x_t, t, make_cond(3))).sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    unet = fake_score.net.unet
    for name, module in (("down_blocks", unet.down_blocks), ("mid_block", unet.mid_block), ("head", head)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert all(p.grad is None for p in unet.up_blocks.parameters())  # never ran
    assert all(p.grad is None for p in unet.conv_out.parameters())


@pytest.mark.parametrize("kind", ("sd15", "sdxl"))  # diffusers' UNet2DModel has no add_adapter (no LoRA copy)
def test_a_lora_copy_gets_gradients_only_on_its_adapters(teachers, kind):
    denoiser, shape, make_cond = teachers[kind]
    fake_score = trainable_copy(denoiser, lora_rank=4)
    head = GANHead.for_denoiser(fake_score, shape)
    x_t, t = _inputs(shape)
    x_t.requires_grad_(True)
    head(bottleneck(fake_score, x_t, t, make_cond(3))).sum().backward()
    grads = _grads(fake_score.net.unet)
    with_grad = [n for n, g in grads.items() if g is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    # B = 0 at the start, so only lora_B has a non-zero gradient (and A's is zero)
    assert sum(grads[n].abs().sum() for n in with_grad if "lora_B" in n) > 0
    assert any(n.startswith("mid_block") for n in with_grad)
    assert x_t.grad.abs().sum() > 0 and all(p.grad is not None for p in head.parameters())


@pytest.mark.parametrize("kind", ("unet", "sd15"))
def test_gradient_checkpointing_gives_the_same_gradients(teachers, kind):
    denoiser, shape, make_cond = teachers[kind]
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        fake_score = trainable_copy(denoiser, gradient_checkpointing=checkpointing)
        head = GANHead.for_denoiser(fake_score, shape)
        x_t, t = _inputs(shape)
        x_t.requires_grad_(True)
        unet = fake_score.net.unet
        calls, handles = _count_calls([unet.down_blocks[0].resnets[0]])
        head(bottleneck(fake_score, x_t, t, make_cond(3))).sum().backward()
        for h in handles:
            h.remove()
        results.append((calls[0], x_t.grad, _grads(unet), _grads(head)))
    (calls0, x0g, unet0, head0), (calls1, x1g, unet1, head1) = results
    assert (calls0, calls1) == (1, 2)  # checkpointing recomputed the block in the backward pass
    torch.testing.assert_close(x1g, x0g)
    assert unet0.keys() == unet1.keys() and head0.keys() == head1.keys()
    for name in unet0:
        if unet0[name] is None:
            assert unet1[name] is None, name
        else:
            torch.testing.assert_close(unet1[name], unet0[name], msg=name)
    for name in head0:
        torch.testing.assert_close(head1[name], head0[name], msg=name)


@pytest.mark.parametrize("kind", ("unet", "sd15"))
def test_a_bf16_unet_gives_bf16_features_and_float32_logits(teachers, kind):
    denoiser, shape, make_cond = teachers[kind]
    fake_score = trainable_copy(denoiser)
    head = GANHead.for_denoiser(fake_score, shape)
    x_t, t = _inputs(shape)
    with torch.no_grad():
        reference = head(bottleneck(fake_score, x_t, t, make_cond(3)))
    fake_score.net.to(torch.bfloat16)
    x_t.requires_grad_(True)
    features = bottleneck(fake_score, x_t, t, make_cond(3))  # float32 x_t into a bf16 UNet
    out = head(features)
    assert features.dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0.1, atol=0.1)
    out.sum().backward()
    assert x_t.grad.dtype == torch.float32 and x_t.grad.abs().sum() > 0


def test_no_hook_is_left_behind_after_an_error_inside_the_forward(teachers):
    denoiser, shape, make_cond = teachers["unet"]
    unet = denoiser.net.unet
    x_t, t = _inputs(shape)

    def boom(*_):
        raise RuntimeError("boom inside the forward")

    failing = unet.down_blocks[0].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom inside the forward"):
            bottleneck(denoiser, x_t, t, make_cond(3))
    finally:
        failing.remove()
    assert not unet.mid_block._forward_hooks
    with torch.no_grad():  # a full forward after the error runs to the end
        assert denoiser(x_t, t, make_cond(3)).shape == x_t.shape
    bottleneck(denoiser, x_t, t, make_cond(3))
    assert not unet.mid_block._forward_hooks  # nor after a normal call


def test_logits_are_a_function_of_the_generator_seed(teachers):
    denoiser, shape, make_cond = teachers["sd15"]
    head = GANHead.for_denoiser(denoiser, shape)
    x0, _ = _inputs(shape, B=4, seed=3)
    cond = make_cond(4)
    with torch.no_grad():
        a = logits(denoiser, head, x0, cond, torch.Generator().manual_seed(7))
        b = logits(denoiser, head, x0, cond, torch.Generator().manual_seed(7))
        c = logits(denoiser, head, x0, cond, torch.Generator().manual_seed(8))
        # the documented draws: t first, then eps, both from the generator
        g = torch.Generator().manual_seed(7)
        t = torch.randint(0, denoiser.T, (4,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        explicit = logits_at(denoiser, head, x0, cond, t, eps)
        # and explicit (t, eps) mean x_t = alpha_t x0 + sigma_t eps
        by_hand = head(bottleneck(denoiser, denoiser.schedule.add_noise(x0, eps, t), t, cond))
    assert a.shape == (4,) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(a, explicit)
    torch.testing.assert_close(explicit, by_hand, rtol=0, atol=0)


def test_the_mixture_teacher_has_no_bottleneck():
    schedule = vp_schedule(torch.linspace(0.999, 0.01, 100))
    mlp = Denoiser(MLP(2, 100), schedule, "epsilon")
    exact = GaussianMixtureDenoiser(GaussianMixture.ring(4, 2.0, 0.1), schedule)
    for denoiser in (mlp, exact):
        with pytest.raises(ConfigError, match="mixture") as info:
            bottleneck(denoiser, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
        assert info.value.key == "gan.weight_generator"
        with pytest.raises(ConfigError, match="gan.weight_generator"):
            GANHead.for_denoiser(denoiser, (2,))


# --------------------------------------------------------------------------------------------------------------
# A discriminator that learns.


def test_the_discriminator_learns_to_tell_digits_from_rotated_digits(tiny_teacher, digits_shards):
    """Head + a fully trainable tiny UNet2DModel, 40 Adam steps of the discriminator loss with Diffusion-GAN noising
    (t ~ U[0, T)), real = digits, fake = the same digits rotated by 90 degrees. Accuracy on the 180 held-out digits
    and their rotations (360 decisions), noised at t ~ U[0, T/2) with fixed draws (at larger t the noise hides the
    difference; over all of [0, T) the accuracy was 0.79): chance gives 0.5 with a standard error of
    sqrt(0.25 / 360) = 0.026, so the threshold 0.75 is 9.5 standard errors above chance. Measured: 0.95 (about 5 s
    on one core)."""
    from distill.pretrain_t2i import load_digits

    train, _ = load_digits(digits_shards, "train")
    val, _ = load_digits(digits_shards, "val")
    assert len(val) == 180

    def fake(x):
        return x.rot90(1, (2, 3))

    torch.manual_seed(0)
    fake_score = trainable_copy(load_teacher(tiny_teacher).denoiser)
    head = GANHead.for_denoiser(fake_score, (1, 8, 8))
    optimiser = torch.optim.Adam([*fake_score.parameters(), *head.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        x = train[torch.randint(0, len(train), (64,), generator=g)]
        loss = gan_discriminator_loss(logits(fake_score, head, x, None, g),
                                      logits(fake_score, head, fake(x), None, g)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, fake_score.T // 2, (len(val),), generator=g)
    eps = torch.randn(val.shape, generator=g)
    with torch.no_grad():
        real_logits = logits_at(fake_score, head, val, None, t, eps)
        fake_logits = logits_at(fake_score, head, fake(val), None, t, eps)
    accuracy = ((real_logits > 0).sum() + (fake_logits < 0).sum()).item() / (2 * len(val))
    assert accuracy > 0.75, accuracy
