"""process=flow (diffusion/processes/flow.py) against the definitions of Lipman et al. 2023 / Esser et al. 2024
(the path, the velocity target, logit-normal and mode sampling, the shift), diffusers' shift on identical inputs,
and closed forms for Gaussian data."""

import math

import pytest
import torch

from diffusion.processes import FlowMatching
from diffusion.processes.schedules import NoSchedule
from tests.oracles import FlowGaussianOracle

MU, S = 0.2, 0.4


def flow(**kwargs):
    return FlowMatching(NoSchedule(), channels=1, **kwargs)


def test_path_and_velocity_target():
    p = flow()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    xt = p.q_sample(x0, t, eps)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.7 * x0[1] + 0.3 * eps[1])
    seen = {}

    def net(x, timestep):
        seen["t"] = timestep
        return eps - x0  # the exact conditional velocity: zero loss

    assert p.training_losses(net, x0, t, eps).abs().max() == 0
    torch.testing.assert_close(seen["t"], 1000 * t)  # the network's time input


@pytest.mark.parametrize("objective", ["v", "x0", "eps"])
def test_exact_network_reaches_the_bayes_loss_and_one_velocity(objective):
    """Gaussian data, the exact network in each objective: the loss at t is the posterior variance of that target
    (closed form), and the three objectives give the same velocity (the conversions on the path)."""
    p = flow(objective=objective)
    oracle = FlowGaussianOracle(objective, MU, S)
    g = torch.Generator().manual_seed(1)
    for t in (0.1, 0.5, 0.9):
        x0 = MU + S * torch.randn(1 << 14, 1, 2, 2, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        loss = p.training_losses(oracle, x0, torch.full((len(x0),), t, dtype=torch.float64), eps).mean().item()
        a, b = 1 - t, t
        var_x = a**2 * S**2 + b**2
        target_var, cov = {"v": (1 + S**2, b - a * S**2), "x0": (S**2, a * S**2), "eps": (1.0, b)}[objective]
        bayes = target_var - cov**2 / var_x
        assert loss == pytest.approx(bayes, rel=0.04), (objective, t, loss, bayes)
    x = torch.randn(5, 1, 2, 2, generator=g, dtype=torch.float64)
    t = 0.35
    v = p.velocity(oracle(x, torch.full((5,), 1000 * t, dtype=torch.float64)), x, t)
    x0, eps = FlowGaussianOracle("v", MU, S).answers(x, t)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(p.x0_of(v, x, t), x0)


def test_logit_normal_times():
    p = flow(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = p.sample_timesteps(1 << 16, "cpu", torch.Generator().manual_seed(0)).double()
    logit = (t / (1 - t)).log()
    assert logit.mean().item() == pytest.approx(0.5, abs=0.01) and logit.std().item() == pytest.approx(0.8, abs=0.01)


def test_mode_sampling_is_esser_eq_20():
    """f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u): s = 0 is uniform on (0, 1); s > 0 puts mass in the middle.
    Its mean is E[1 - u] - s E[cos^2(pi u / 2) - 1 + u] = 1/2 - s (1/2 - 1 + 1/2) = 1/2 for every s, and its second
    moment follows from the integrals of u^2, u cos^2, cos^4 over (0, 1), evaluated numerically here."""
    g = torch.Generator().manual_seed(0)
    uniform = flow(timestep_sampling="mode", mode_scale=0.0).sample_timesteps(1 << 16, "cpu", g)
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.005) and uniform.var().item() == pytest.approx(1 / 12, abs=0.002)
    t = flow(timestep_sampling="mode", mode_scale=1.29).sample_timesteps(1 << 16, "cpu", g).double()
    u = torch.linspace(0, 1, 200001, dtype=torch.float64)
    f = 1 - u - 1.29 * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    assert t.var().item() == pytest.approx(torch.trapezoid(f**2, u).item() - 0.25, abs=0.002)
    assert t.var().item() < 1 / 12 - 0.02  # concentrated in the middle


def test_shift_is_diffusers_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion.processes.flow import shift_time

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    unshifted = torch.linspace(1, 1 / 1000, 1000)
    torch.testing.assert_close(scheduler.sigmas[:-1] if len(scheduler.sigmas) > 1000 else scheduler.sigmas,
                               shift_time(unshifted, 3.0), rtol=1e-5, atol=1e-6)
    p = flow(timestep_sampling="uniform", shift=3.0)
    t = p.sample_timesteps(1 << 16, "cpu", torch.Generator().manual_seed(0)).double()
    # the shifted uniform law's CDF: P(t' <= x) = P(u <= x / (shift - (shift - 1) x))
    for x in (0.25, 0.5, 0.75):
        assert (t <= x).double().mean().item() == pytest.approx(x / (3 - 2 * x), abs=0.006)


@pytest.mark.parametrize("kwargs,text", [
    ({"logit_std": 0}, "process.logit_std=0 is invalid"),
    ({"shift": 0}, "process.shift=0 is invalid"),
    ({"shift": -2.0}, "process.shift=-2.0 is invalid"),
    ({"objective": "score"}, "process.objective='score' is invalid for process=flow: allowed values are v, x0, eps"),
    ({"timestep_sampling": "importance"}, "process.timestep_sampling='importance' is invalid for process=flow"),
    ({"mode_scale": 3.0}, "process.mode_scale=3.0 is invalid"),
    ({"learn_sigma": True}, "model.learn_sigma=true is invalid for process=flow"),
])
def test_bad_settings_are_one_line(kwargs, text):
    with pytest.raises(ValueError) as err:
        flow(**kwargs)
    assert str(err.value).startswith(text) and "\n" not in str(err.value)
