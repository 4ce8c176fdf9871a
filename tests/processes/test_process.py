"""The forward process and posterior against Ho et al.'s closed forms (eq. 4, 6, 7, 11)."""

import pytest
import torch

from diffusion.processes import GaussianDiffusion
from diffusion.processes.gaussian import extract
from diffusion.processes.objectives import x0_from_eps
from diffusion.processes.schedules import CosineSchedule, LinearSchedule
from tests.oracles import PointOracle


@pytest.fixture(scope="module")
def process():
    return GaussianDiffusion(LinearSchedule(T=1000))


def test_buffers_are_registered(process):
    names = dict(process.named_buffers())
    for n in ["betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "sqrt_alphas_cumprod"]:
        assert n in names
    assert "betas" in process.state_dict()


@pytest.mark.parametrize("t", [0, 10, 300, 999])
def test_q_sample_empirical_mean_and_variance(process, t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.linspace(-1, 1, 8)
    n = 40_000
    noise = torch.randn(n, 8, generator=g)
    xt = process.q_sample(x0.expand(n, 8), torch.full((n,), t), noise)
    abar = float(process.alphas_cumprod[t])
    se = (1 - abar) ** 0.5 / n**0.5
    torch.testing.assert_close(xt.mean(0), abar**0.5 * x0, atol=5 * se, rtol=0)
    torch.testing.assert_close(xt.var(0), torch.full((8,), 1 - abar), rtol=0.03, atol=1e-6)


def _posterior_closed_form(betas, t, x0, xt):
    betas = betas.double()
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    abar_prev = 1.0 if t == 0 else abar[t - 1]
    mean = abar_prev**0.5 * betas[t] / (1 - abar[t]) * x0 + alphas[t] ** 0.5 * (1 - abar_prev) / (1 - abar[t]) * xt
    var = (1 - abar_prev) / (1 - abar[t]) * betas[t]
    return mean, var


@pytest.mark.parametrize("schedule", [LinearSchedule(T=1000), CosineSchedule(T=500)], ids=["linear", "cosine"])
@pytest.mark.parametrize("t", [0, 1, 137, -1])
def test_posterior_matches_eq_6_7(schedule, t):
    process = GaussianDiffusion(schedule)
    t = t % schedule.T
    x0, xt = torch.randn(4, 3), torch.randn(4, 3)
    mean, var, log_var = process.q_posterior_mean_variance(x0, xt, torch.full((4,), t))
    ref_mean, ref_var = _posterior_closed_form(process.betas, t, x0.double(), xt.double())
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double().flatten(), torch.full((4,), float(ref_var), dtype=torch.float64), rtol=1e-5, atol=1e-12)
    if t > 0:
        torch.testing.assert_close(log_var.exp().double().flatten(), torch.full((4,), float(ref_var), dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [1, 50, 700])
def test_posterior_sampling_reproduces_marginal(process, t):
    """x_t ~ q(x_t|x0), then x_{t-1} ~ q(x_{t-1}|x_t, x0) must be distributed as q(x_{t-1}|x0)."""
    g = torch.Generator().manual_seed(1)
    n = 40_000
    x0 = torch.full((n, 2), 0.7)
    tt = torch.full((n,), t)
    xt = process.q_sample(x0, tt, torch.randn(n, 2, generator=g))
    mean, var, _ = process.q_posterior_mean_variance(x0, xt, tt)
    x_prev = mean + var.sqrt() * torch.randn(n, 2, generator=g)
    abar_prev = float(process.alphas_cumprod[t - 1])
    assert x_prev.mean().item() == pytest.approx(abar_prev**0.5 * 0.7, abs=0.02)
    assert x_prev.var().item() == pytest.approx(1 - abar_prev, rel=0.03)


def test_x0_eps_round_trip(process):
    x0, eps = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    t = torch.tensor([0, 1, 100, 500, 999])
    xt = process.q_sample(x0, t, eps)
    torch.testing.assert_close(x0_from_eps(xt, eps, extract(process.sqrt_alphas_cumprod, t, xt.shape), extract(process.sqrt_one_minus_alphas_cumprod, t, xt.shape)), x0, atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(process.predict_eps_from_x0(xt, t, x0), eps, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_p_mean_variance_is_eq_11_with_fixed_variance(process, variance):
    x0 = torch.randn(3, 2)
    oracle = PointOracle(process, x0)
    t = torch.tensor([5, 400, 999])
    xt = process.q_sample(x0, t, torch.randn(3, 2))
    out = process.p_mean_variance(oracle, xt, t, variance=variance)
    b = process.betas[t][:, None].double()
    abar = process.alphas_cumprod[t][:, None].double()
    eps = oracle(xt, t).double()
    eq11 = (xt.double() - b / (1 - abar).sqrt() * eps) / (1 - b).sqrt()
    torch.testing.assert_close(out.mean.double(), eq11, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.pred_x0, x0, rtol=1e-3, atol=1e-3)
    expected_var = process.posterior_variance[t] if variance == "fixed_small" else process.betas[t]
    torch.testing.assert_close(out.variance[:, 0], expected_var)


def test_clip_denoised_clamps_x0(process):
    xt = torch.full((2, 4), 3.0)
    t = torch.tensor([10, 10])
    out = process.p_mean_variance(lambda x, t: torch.full_like(x, -5.0), xt, t, clip_denoised=True)
    assert out.pred_x0.max() <= 1.0 and out.pred_x0.min() >= -1.0
    torch.testing.assert_close(x0_from_eps(xt, out.pred_eps, extract(process.sqrt_alphas_cumprod, t, xt.shape), extract(process.sqrt_one_minus_alphas_cumprod, t, xt.shape)), out.pred_x0)


@pytest.mark.parametrize("loss_type", ["mse", "l1", "huber"])
def test_training_loss_zero_for_oracle_and_positive_otherwise(loss_type):
    process = GaussianDiffusion(LinearSchedule(T=100), loss_type=loss_type)
    x0 = torch.randn(6, 1, 4, 4)
    t = torch.randint(0, 100, (6,))
    noise = torch.randn_like(x0)
    loss = process.training_losses(PointOracle(process, x0), x0, t, noise)
    assert loss.shape == (6,)
    assert loss.max().item() < 1e-4
    zero = process.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise)
    ref = {"mse": noise.pow(2), "l1": noise.abs(), "huber": torch.where(noise.abs() < 1, 0.5 * noise**2, noise.abs() - 0.5)}
    torch.testing.assert_close(zero, ref[loss_type].flatten(1).mean(1))


def test_bad_choices_raise():
    with pytest.raises(ValueError, match="variance='learned'"):
        GaussianDiffusion(LinearSchedule(T=10), variance="learned")
    with pytest.raises(ValueError, match="loss_type='l3'"):
        GaussianDiffusion(LinearSchedule(T=10), loss_type="l3")
