"""The variational bound in bits/dim against closed forms and invariants."""

import math

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
