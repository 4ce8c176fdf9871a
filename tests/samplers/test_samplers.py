"""Samplers: timestep grids, oracle recovery, DDIM(eta=1) == DDPM, and whole-chain distributions."""

import math

import pytest
import torch

from diffusion.processes import GaussianDiffusion
from diffusion.processes.schedules import CosineSchedule, LinearSchedule
from diffusion.samplers import make_timesteps
from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.ddpm import DDPMSampler
from tests.oracles import GaussianOracle, PointOracle


@pytest.fixture(scope="module")
def process():
    return GaussianDiffusion(LinearSchedule(T=1000))


# ----------------------------------------------------------------------------------------------- grids
EXPECTED_ENDS = {  # T=1000, 50 steps: (first, second, last)
    "leading": (980, 960, 0),
    "trailing": (999, 979, 19),
    "linspace": (999, round(48 * 999 / 49), 0),
    "quadratic": (int(math.sqrt(800) ** 2), int((48 * math.sqrt(800) / 49) ** 2), 0),  # 0, 1, 2, 3, 6, ...
}


@pytest.mark.parametrize("spacing", list(EXPECTED_ENDS))
def test_grid_first_last_and_previous_timesteps(process, spacing):
    sampler = DDIMSampler(process, num_steps=50, spacing=spacing)
    ts = sampler.timesteps
    first, second, last = EXPECTED_ENDS[spacing]
    assert len(ts) == 50 and ts[0] == first and ts[1] == second and ts[-1] == last
    assert all(a > b for a, b in zip(ts, ts[1:])) and 0 <= ts[-1] and ts[0] <= 999
    # the state after each step is at the next grid point (papers' 1-based t; 0 is x_0)
    assert sampler.state_times == [t + 1 for t in ts] + [0]


@pytest.mark.parametrize("spacing", list(EXPECTED_ENDS))
@pytest.mark.parametrize("num_steps", [1, 7, 333, 1000])
def test_grid_is_valid_for_odd_step_counts(spacing, num_steps):
    try:
        ts = make_timesteps(1000, num_steps, spacing)
    except ValueError as err:  # quadratic cannot place 1000 distinct steps
        assert spacing == "quadratic" and "repeats timesteps" in str(err)
        return
    assert len(ts) == num_steps and len(set(ts)) == num_steps
    assert all(0 <= t <= 999 for t in ts) and ts == sorted(ts, reverse=True)
    if spacing in ("trailing", "linspace"):
        assert ts[0] == 999


@pytest.mark.parametrize("spacing", list(EXPECTED_ENDS))
def test_deterministic_step_lands_on_previous_marginal(process, spacing):
    """With the true noise, a DDIM(eta=0) step from x_t lands on sqrt(abar_prev) x0 + sqrt(1-abar_prev) eps,
    where prev is the next grid entry: wrong previous-timestep arithmetic would miss it."""
    sampler = DDIMSampler(process, num_steps=50, spacing=spacing)
    abar = process.alphas_cumprod.double()
    x0, eps = torch.rand(2, 3).double() * 2 - 1, torch.randn(2, 3).double()
    ts = sampler.timesteps
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else None
        xt = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        out = sampler.step(eps, i, xt).prev_sample
        a_prev = abar[prev] if prev is not None else torch.tensor(1.0, dtype=torch.float64)
        torch.testing.assert_close(out, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- oracle recovery
def test_ddim_eta0_recovers_x0_exactly(process):
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    oracle = PointOracle(process, x0)
    out = DDIMSampler(process, num_steps=50, eta=0.0).sample(oracle, x0.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, x0, atol=1e-4, rtol=0)
    assert oracle.calls == 50, "DDIM with 50 of 1000 steps must call the model 50 times"


def test_ddpm_recovers_x0(process):
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    oracle = PointOracle(process, x0)
    out = DDPMSampler(process).sample(oracle, x0.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, x0, atol=1e-3, rtol=0)
    assert oracle.calls == 1000


@pytest.mark.parametrize("schedule", [LinearSchedule(T=1000), CosineSchedule(T=200)], ids=["linear", "cosine"])
def test_ddim_eta1_full_grid_has_ddpm_step_moments(schedule):
    process = GaussianDiffusion(schedule, variance="fixed_small")
    ddpm = DDPMSampler(process)
    ddim = DDIMSampler(process, num_steps=schedule.T, eta=1.0, spacing="leading")
    assert ddim.timesteps == ddpm.timesteps
    x, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    T = schedule.T
    for t in [T - 1, T // 2, 3, 1, 0]:
        i = T - 1 - t
        out = process.p_mean_variance_from_output(eps, x, torch.full((3,), t))
        x01, _ = ddim.predict_x0_eps(eps, x, ddim._abar[i] ** 0.5, (1 - ddim._abar[i]) ** 0.5)
        m2 = ddim._abar_prev[i] ** 0.5 * x01 + max(1 - ddim._abar_prev[i] - ddim.sigma2(i), 0) ** 0.5 * eps
        torch.testing.assert_close(m2, out.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.full_like(out.variance, ddim.sigma2(i)), out.variance, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(x01, out.pred_x0, rtol=1e-4, atol=1e-4)
        # and DDPM's step without its noise is that mean
        no_noise = ddpm.step(eps, i, x, generator=None).prev_sample if t == 0 else None
        if no_noise is not None:
            torch.testing.assert_close(no_noise, out.mean)


def _chain_moments(sampler, oracle, n=20_000, seed=0):
    out = sampler.sample(oracle, (n, 1), generator=torch.Generator().manual_seed(seed)).samples.double()
    return out.mean().item(), out.var().item()


def test_quadratic_grid_values():
    ts = make_timesteps(1000, 50, "quadratic")[::-1]
    assert ts[:6] == [0, 1, 2, 3, 5, 8]  # int(i^2 * 800 / 49^2) = 0, 0, 1, 2, 5, 8 made strictly increasing
    assert ts[25] == int((25 * math.sqrt(800) / 49) ** 2)


def test_whole_chain_distribution_with_exact_gaussian_score():
    """Data N(mu, s^2): DDPM, DDIM(eta=1) and DDIM(eta=0) on the full grid, with the exact optimal noise predictor,
    must all return N(mu, s^2) samples; 50 DDIM steps keep the mean and most of the variance."""
    process = GaussianDiffusion(LinearSchedule(T=1000))
    mu, s = 0.5, 0.3
    oracle = GaussianOracle(process, mu, s)
    m_ddpm, v_ddpm = _chain_moments(DDPMSampler(process), oracle, seed=1)
    m_ddim1, v_ddim1 = _chain_moments(DDIMSampler(process, num_steps=1000, eta=1.0), oracle, seed=2)
    m_ddim0, v_ddim0 = _chain_moments(DDIMSampler(process, num_steps=1000, eta=0.0), oracle, seed=3)
    for m, v in [(m_ddpm, v_ddpm), (m_ddim1, v_ddim1), (m_ddim0, v_ddim0)]:
        assert m == pytest.approx(mu, abs=0.01)
        assert v == pytest.approx(s**2, rel=0.05)
    m50, v50 = _chain_moments(DDIMSampler(process, num_steps=50, eta=0.0), oracle, seed=4)
    assert m50 == pytest.approx(mu, abs=0.01) and v50 == pytest.approx(s**2, rel=0.2)


def test_ddim_eta1_full_grid_equals_ddpm_sample_for_sample():
    """Same noise draws in the same order: DDIM(eta=1, every step) and DDPM(beta~) give the same samples."""
    process = GaussianDiffusion(LinearSchedule(T=1000))
    oracle = GaussianOracle(process, -0.2, 0.6)
    a = DDPMSampler(process).sample(oracle, (256, 1), generator=torch.Generator().manual_seed(5)).samples
    b = DDIMSampler(process, num_steps=1000, eta=1.0).sample(oracle, (256, 1), generator=torch.Generator().manual_seed(5)).samples
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------- interface
def test_same_generator_seed_same_samples(process):
    model = GaussianOracle(process, 0.0, 0.5)
    a = DDIMSampler(process, num_steps=20, eta=1.0).sample(model, (4, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    b = DDIMSampler(process, num_steps=20, eta=1.0).sample(model, (4, 1, 2, 2), generator=torch.Generator().manual_seed(7))
    c = DDIMSampler(process, num_steps=20, eta=1.0).sample(model, (4, 1, 2, 2), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.samples, b.samples) and not torch.equal(a.samples, c.samples)


def test_trajectory_capture(process):
    x0 = torch.zeros(2, 1, 4, 4)
    out = DDIMSampler(process, num_steps=10).sample(PointOracle(process, x0), x0.shape, return_trajectory=True)
    assert out.trajectory.shape == (11, 2, 1, 4, 4) and out.pred_x0.shape == (10, 2, 1, 4, 4)
    torch.testing.assert_close(out.trajectory[-1], out.samples)
    # noise level decreases along the trajectory
    assert out.trajectory[0].abs().mean() > out.trajectory[5].abs().mean() > out.trajectory[-1].abs().mean()


@pytest.mark.parametrize("sampler_cls", [DDPMSampler, DDIMSampler])
def test_clip_denoised_keeps_predicted_x0_in_range(process, sampler_cls):
    sampler = sampler_cls(process, num_steps=1000, clip_denoised=True)
    out = sampler.sample(lambda x, t: -3 * torch.ones_like(x), (2, 1, 2, 2), return_trajectory=True)
    assert out.pred_x0.abs().max() <= 1.0


def test_set_timesteps_changes_the_grid(process):
    sampler = DDIMSampler(process, num_steps=50)
    sampler.set_timesteps(10)
    assert sampler.num_steps == 10 and sampler.timesteps[0] == 900
    with pytest.raises(ValueError, match="step index 10 is invalid"):
        sampler.step(torch.zeros(1), 10, torch.zeros(1))


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda p: DDIMSampler(p, num_steps=0), "num_steps=0"),
        (lambda p: DDIMSampler(p, num_steps=1001), "num_steps=1001"),
        (lambda p: DDIMSampler(p, eta=-1.0), "eta=-1.0"),
        (lambda p: DDIMSampler(p, spacing="cubic"), "spacing='cubic'"),
        (lambda p: DDPMSampler(p, num_steps=1001), "num_steps=1001"),
        (lambda p: DDPMSampler(p, variance="learned"), "variance='learned'"),
    ],
)
def test_bad_sampler_settings_raise(process, make, text):
    with pytest.raises(ValueError) as err:
        make(process)
    assert text in str(err.value)


@pytest.mark.parametrize("value, text", [
    (0, "sampler num_steps=0 is invalid: it must be an integer in [1, T=1000]"),
    (1001, "sampler num_steps=1001 is invalid: it must be an integer in [1, T=1000]"),
    (3.0, "sampler num_steps=3.0 is invalid: it must be an integer in [1, T=1000]"),  # a config's value: ints only
    (True, "sampler num_steps=True is invalid: it must be an integer in [1, T=1000]"),
    (10**400, "sampler num_steps=1000000"),  # no float overflow on the way
])
def test_num_steps_is_an_int_in_1_to_T(process, value, text):
    """check_num_steps refuses all but an int in [1, T] (a config's value: 3.0 too), in its own words."""
    from diffusion.samplers.base import check_num_steps

    with pytest.raises(ValueError) as err:
        DDIMSampler(process, num_steps=value)
    assert str(err.value).startswith(text)
    with pytest.raises(ValueError) as err:
        check_num_steps(value, 1000)
    assert str(err.value).startswith(text)
    assert check_num_steps(7, 1000) == 7


def test_whole_numbers_from_the_page():
    """A page's number field sends floats: 3.0 is 3; 2.5, nan, inf, a string, None and a bool are refused."""
    from diffusion.checks import check_whole

    assert check_whole("steps", 3.0, 1, 1000) == 3 and type(check_whole("steps", 3.0, 1, 1000)) is int
    with pytest.raises(ValueError, match=r"^steps=2\.5 is invalid: it must be a whole number in \[1, 1000\]$"):
        check_whole("steps", 2.5, 1, 1000)
    for bad in (float("nan"), float("inf"), "3", None, False):
        with pytest.raises(ValueError, match="is invalid: it must be a whole number in"):
            check_whole("steps", bad, 1, 1000)
