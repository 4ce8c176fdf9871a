"""Schedules against their closed forms and invariants."""

import math

import pytest
import torch

from diffusion.processes.schedules import (
    ContinuousCosineSchedule,
    CosineSchedule,
    LinearSchedule,
    QuadraticSchedule,
    SigmoidSchedule,
)

ALL = [
    LinearSchedule(T=1000),
    LinearSchedule(T=250, scale_with_T=True),
    CosineSchedule(T=1000),
    ContinuousCosineSchedule(T=1000),
    QuadraticSchedule(T=500),
    SigmoidSchedule(T=300),
]


@pytest.mark.parametrize("schedule", ALL, ids=lambda s: repr(s))
def test_shapes_ranges_monotonicity(schedule):
    tab = schedule.table()
    T = schedule.T
    for name, value in tab.as_dict().items():
        assert value.shape == (T,), name
        assert value.dtype == torch.float32, name
        assert torch.isfinite(value).all(), name
    assert ((tab.betas > 0) & (tab.betas < 1)).all()
    assert ((tab.alphas_cumprod > 0) & (tab.alphas_cumprod < 1)).all()
    assert (tab.alphas_cumprod[1:] < tab.alphas_cumprod[:-1]).all(), "alpha_bar must strictly decrease"
    # continuous cosine starts at signal rate max_signal_rate: its beta_0 = 1 - max^2 is a jump by design
    b = tab.betas[1:] if isinstance(schedule, ContinuousCosineSchedule) else tab.betas
    assert (b[1:] >= b[:-1] - 1e-7).all(), "betas must not decrease"
    assert tab.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(tab.alphas_cumprod_prev[1:], tab.alphas_cumprod[:-1])
    # the posterior variance lies between 0 and beta (beta~ = beta (1 - abar_prev) / (1 - abar))
    assert tab.posterior_variance[0] == 0
    assert (tab.posterior_variance[1:] > 0).all() and (tab.posterior_variance <= tab.betas).all()


def test_linear_closed_form():
    T, b0, b1 = 1000, 1e-4, 0.02
    tab = LinearSchedule(T, b0, b1).table()
    betas = [b0 + i * (b1 - b0) / (T - 1) for i in range(T)]
    assert tab.betas[0].item() == pytest.approx(b0, rel=1e-6)
    assert tab.betas[-1].item() == pytest.approx(b1, rel=1e-6)
    assert tab.alphas_cumprod[0].item() == pytest.approx(1 - b0, rel=1e-7)
    assert tab.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - b for b in betas), rel=1e-4)
    # Ho et al.: alpha_bar_T ~ 4e-5 for this schedule, so x_T is nearly pure noise
    assert tab.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_linear_scale_with_T_keeps_the_1000_step_range():
    tab = LinearSchedule(T=250, beta_start=1e-4, beta_end=0.02, scale_with_T=True).table()
    assert tab.betas[0].item() == pytest.approx(4e-4, rel=1e-6)
    assert tab.betas[-1].item() == pytest.approx(0.08, rel=1e-6)


def test_cosine_closed_form():
    T, s = 1000, 0.008
    tab = CosineSchedule(T, s=s).table()

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    # alpha_bar at 0-based t is the paper's alpha_bar(t + 1) = f(t + 1) / f(0)
    assert tab.alphas_cumprod[0].item() == pytest.approx(f(1) / f(0), rel=1e-6)
    assert tab.alphas_cumprod[T // 2].item() == pytest.approx(f(T // 2 + 1) / f(0), rel=1e-5)
    # f(T) = 0: the last beta is clipped to max_beta, so alpha_bar_{T-1} = alpha_bar_{T-2} (1 - 0.999)
    assert tab.betas[-1].item() == pytest.approx(0.999)
    assert tab.alphas_cumprod[-1].item() == pytest.approx(f(T - 1) / f(0) * 0.001, rel=1e-4)


def test_continuous_cosine_rates():
    sched = ContinuousCosineSchedule(T=200, min_signal_rate=0.02, max_signal_rate=0.95)
    tab = sched.table()
    signal, noise = tab.sqrt_alphas_cumprod.double(), tab.sqrt_one_minus_alphas_cumprod.double()
    torch.testing.assert_close(signal**2 + noise**2, torch.ones(200, dtype=torch.float64), atol=1e-6, rtol=0)
    assert signal[0].item() == pytest.approx(0.95, rel=1e-6)
    assert signal[-1].item() == pytest.approx(0.02, rel=1e-5)
    # theta is linear in t
    theta = torch.atan2(noise, signal)
    torch.testing.assert_close(theta.diff(), torch.full((199,), theta.diff().mean().item(), dtype=torch.float64), atol=1e-5, rtol=0)
    # the discretised betas reproduce the rates: cumprod(1 - beta) = signal^2
    torch.testing.assert_close(tab.alphas_cumprod.double(), signal**2, rtol=1e-4, atol=1e-7)


def test_quadratic_and_sigmoid_endpoints():
    q = QuadraticSchedule(T=100, beta_start=1e-4, beta_end=0.02).table()
    assert q.betas[0].item() == pytest.approx(1e-4, rel=1e-5) and q.betas[-1].item() == pytest.approx(0.02, rel=1e-5)
    mid = (math.sqrt(1e-4) + (math.sqrt(0.02) - math.sqrt(1e-4)) * 50 / 99) ** 2
    assert q.betas[50].item() == pytest.approx(mid, rel=1e-5)
    s = SigmoidSchedule(T=101, beta_start=1e-4, beta_end=0.02).table()
    assert s.betas[50].item() == pytest.approx(1e-4 + 0.5 * (0.02 - 1e-4), rel=1e-5)  # sigmoid(0) = 1/2


@pytest.mark.parametrize(
    "factory, name, value",
    [
        (lambda: LinearSchedule(T=0), "T", "0"),
        (lambda: LinearSchedule(T=-5), "T", "-5"),
        (lambda: LinearSchedule(T=10.5), "T", "10.5"),
        (lambda: LinearSchedule(beta_start=0.0), "beta_start", "0.0"),
        (lambda: LinearSchedule(beta_end=1.5), "beta_end", "1.5"),
        (lambda: LinearSchedule(beta_start=0.02, beta_end=0.01), "beta_start", "0.02"),
        (lambda: LinearSchedule(T=10, beta_end=0.02, scale_with_T=True), "beta_end", "0.02"),
        (lambda: QuadraticSchedule(beta_start=0.5, beta_end=0.5), "beta_start", "0.5"),
        (lambda: CosineSchedule(max_beta=1.0), "max_beta", "1.0"),
        (lambda: CosineSchedule(s=-0.1), "s", "-0.1"),
        (lambda: ContinuousCosineSchedule(min_signal_rate=0.0), "min_signal_rate", "0.0"),
        (lambda: ContinuousCosineSchedule(max_signal_rate=1.2), "max_signal_rate", "1.2"),
        (lambda: ContinuousCosineSchedule(min_signal_rate=0.9, max_signal_rate=0.5), "min_signal_rate", "0.9"),
    ],
)
def test_bad_values_raise_naming_parameter_and_value(factory, name, value):
    with pytest.raises(ValueError) as err:
        factory()
    msg = str(err.value)
    assert f"{name}=" in msg and value in msg
    assert "\n" not in msg


def test_continuous_cosine_accepts_signal_rate_one():
    tab = ContinuousCosineSchedule(T=50, min_signal_rate=0.1, max_signal_rate=1.0).table()
    assert all(torch.isfinite(v).all() for v in tab.as_dict().values())
    assert tab.alphas_cumprod[0].item() == pytest.approx(1.0, abs=1e-6)
