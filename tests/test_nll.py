"""The variational bound in bits/dim against closed forms and invariants."""

import math

import numpy as np
import pytest
import torch

from diffusion.data import DigitsDataModule
from diffusion.models import UNet
from diffusion.module import to_model_range
from diffusion.process import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl
from diffusion.schedules import LinearSchedule
from tests.oracles import PointOracle

LEVELS = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # bin centres of uint8 images in [-1, 1]


@pytest.mark.parametrize("mean, scale", [(0.3, 0.05), (-0.99, 0.2), (0.0, 3.0), (0.5, 1e-3)])
def test_discretized_gaussian_is_a_distribution_over_the_256_levels(mean, scale):
    logp = discretized_gaussian_log_likelihood(LEVELS, torch.full((256,), mean, dtype=torch.float64), torch.full((256,), math.log(scale), dtype=torch.float64))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def reference_log_likelihood(x, means, log_scales):
    """Ho et al. eq. 13 in float64 with scipy, by an independent closed form: a middle bin [l, u] not containing 0 is
    reflected onto z <= 0 (Phi(u) - Phi(l) = Phi(-l) - Phi(-u)) and, with a = distance of its inner edge from 0 and
    w = u - l, Phi(-a) - Phi(-a - w) = exp(-a^2/2) / 2 * (erfcx(a / sqrt 2) - exp(-a w - w^2/2) erfcx((a + w) / sqrt 2))
    (erfc(z) = erfcx(z) exp(-z^2)), which has no underflow; a bin around 0 is the plain float64 difference.
    (Checked against mpmath at 400 digits to 5e-10 relative while writing this test.)"""
    from scipy import special

    x, means, log_scales = (torch.as_tensor(v).double().numpy() for v in (x, means, log_scales))
    inv_std = np.exp(-log_scales)
    upper, lower = inv_std * (x - means + 1 / 255), inv_std * (x - means - 1 / 255)
    a = np.maximum(np.where(lower > 0, lower, -upper), 0.0)
    w = upper - lower
    bracket = special.erfcx(a / np.sqrt(2)) - np.exp(-a * w - w * w / 2) * special.erfcx((a + w) / np.sqrt(2))
    with np.errstate(divide="ignore"):
        middle = np.where((lower <= 0) & (upper >= 0), np.log(special.ndtr(upper) - special.ndtr(lower)),
                          -a * a / 2 + np.log(0.5) + np.log(bracket))
    return torch.from_numpy(np.where(x < -0.999, special.log_ndtr(upper), np.where(x > 0.999, special.log_ndtr(-lower), middle)))


def test_decoder_likelihood_matches_a_float64_reference_far_from_the_mean():
    """The decoder L_0 of a T=1000 linear schedule (sigma = sqrt(beta~_1) = 0.0074) on float32 inputs, as a model
    gives them: mean errors of std 0.005 .. 0.1 (up to ~50 sigma), means far outside [-1, 1], the edge bins.
    A float32 Phi(u) - Phi(l) cancels to 0 beyond ~5.5 sigma: 5.55 bits/dim instead of 5.45 here at std 0.02."""
    process = GaussianDiffusion(LinearSchedule(T=1000))
    g = torch.Generator().manual_seed(0)
    x = LEVELS.float()[torch.randint(0, 256, (20_000,), generator=g)]
    x[:2000] = -1.0
    x[2000:4000] = 1.0  # the edge bins, the whole tails
    for std in (0.005, 0.02, 0.1, 2.0):
        means = x + std * torch.randn(x.shape, generator=g)
        log_scales = torch.full_like(x, 0.5 * process.posterior_log_variance_clipped[0].item())
        logp = discretized_gaussian_log_likelihood(x, means, log_scales)
        assert logp.dtype == torch.float32
        reference = reference_log_likelihood(x, means, log_scales)
        assert torch.isfinite(reference).all()
        bpd, reference_bpd = -logp.double().mean() / math.log(2), -reference.mean() / math.log(2)
        assert bpd.item() == pytest.approx(reference_bpd.item(), rel=1e-7), std
        torch.testing.assert_close(logp.double(), reference, rtol=1e-6, atol=1e-6)
    # training through it (hybrid / vlb losses): finite gradients however far the mean is
    means = (x + torch.randn(x.shape, generator=g)).requires_grad_()
    discretized_gaussian_log_likelihood(x, means, log_scales).sum().backward()
    assert torch.isfinite(means.grad).all()


def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(5), torch.randn(5)
    lv1, lv2 = torch.randn(5), torch.randn(5)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-5, atol=1e-6)


def _phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_bound_of_a_perfect_model_equals_its_closed_form():
    """Data = one known image x0; the oracle's reverse steps are the true posteriors, so every L_{t-1} is 0 and
    the bound is L_T + L_0 with closed forms."""
    process = GaussianDiffusion(LinearSchedule(T=1000))
    x0 = LEVELS[torch.tensor([[0, 37, 128, 255]])].float()  # edge and interior bins
    out = process.calc_bpd_loop(PointOracle(process, x0), x0, generator=torch.Generator().manual_seed(0))
    assert out["terms"].shape == (1, 1000)
    assert out["terms"][:, :-1].abs().max().item() < 1e-3, "KL terms of the true posterior must vanish"
    abar_T = float(torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[-1])
    prior = sum(0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * v**2) for v in x0.flatten().tolist()) / 4
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    sigma = math.sqrt(float(betas[1] * (1 - abar[0]) / (1 - abar[1])))  # decoder std: beta~_1 (clipped log-variance)
    half = 1 / 255 / sigma
    decoder = [-math.log(_phi(half)), -math.log(_phi(half) - _phi(-half)), -math.log(_phi(half) - _phi(-half)), -math.log(_phi(half))]
    assert out["prior_bpd"].item() == pytest.approx(prior / math.log(2), rel=1e-3)
    assert out["decoder_bpd"].item() == pytest.approx(sum(decoder) / 4 / math.log(2), rel=1e-3)
    assert out["total_bpd"].item() == pytest.approx((prior + sum(decoder) / 4) / math.log(2), rel=2e-3)


def test_monte_carlo_bound_is_unbiased():
    torch.manual_seed(0)
    process = GaussianDiffusion(LinearSchedule(T=40, scale_with_T=True))
    model = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=()).eval()
    x0 = LEVELS[torch.randint(0, 256, (4, 1, 8, 8))].float()
    full = process.calc_bpd_loop(model, x0, generator=torch.Generator().manual_seed(1))["total_bpd"].mean().item()
    g = torch.Generator().manual_seed(2)
    estimates = [process.calc_bpd_loop(model, x0, num_timesteps=10, generator=g)["total_bpd"].mean().item() for _ in range(40)]
    mean = sum(estimates) / len(estimates)
    se = (sum((e - mean) ** 2 for e in estimates) / (len(estimates) - 1) / len(estimates)) ** 0.5
    assert abs(mean - full) < 4 * se + 0.02 * full


def test_trained_model_has_far_lower_bits_per_dim_than_a_random_one():
    torch.manual_seed(0)
    process = GaussianDiffusion(LinearSchedule(T=100, scale_with_T=True))
    dm = DigitsDataModule(image_size=8, batch_size=64)
    dm.setup()
    train = to_model_range(torch.stack([dm.train_set[i] for i in range(len(dm.train_set))]))
    val = to_model_range(torch.stack([dm.val_set[i] for i in range(32)]))
    model = UNet(in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,))
    g = torch.Generator().manual_seed(0)
    random_bpd = process.calc_bpd_loop(model.eval(), val, generator=g)["total_bpd"].mean().item()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(300):
        x0 = train[torch.randint(0, len(train), (64,))]
        loss = process.training_losses(model, x0, torch.randint(0, 100, (64,))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained_bpd = process.calc_bpd_loop(model.eval(), val, generator=torch.Generator().manual_seed(0))["total_bpd"].mean().item()
    assert trained_bpd < 0.6 * random_bpd, (trained_bpd, random_bpd)
