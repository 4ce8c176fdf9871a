"""Samplers of the continuous-time processes: process=flow's flow_euler / flow_heun (diffusion/samplers/flow.py) and
process=edm through the sigma samplers (heun, euler, euler_ancestral, dpmpp_2m: diffusion/samplers/karras.py).

Proven against diffusers' FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler on the same grid,
model and noise; against literal transcriptions of NVlabs/edm's ``edm_sampler`` (generate.py, EDM Algorithm 1 and 2)
and k-diffusion's ``sample_dpmpp_2m`` (sampling.py); against the exact probability-flow ODE solution of Gaussian
data (convergence orders 1 and 2) and the data distribution N(mu, s^2) itself, driven by the exact denoiser and
velocity (tests/oracles.py)."""

import math

import numpy as np
import pytest
import torch

from diffusion.processes import EDMProcess, FlowMatching
from diffusion.processes.schedules import NoSchedule
from diffusion.samplers.flow import FlowEulerSampler, FlowHeunSampler
from diffusion.samplers.karras import DPMSolverPP2MSampler, EulerAncestralSampler, EulerSampler, HeunSampler
from diffusion.samplers.registry import build_sampler, sampler_names
from tests.oracles import EDMGaussianOracle, FlowGaussianOracle

MU, S = 0.3, 0.5


def edm_process(**kwargs):
    return EDMProcess(NoSchedule(), channels=1, **kwargs)


def flow_process(**kwargs):
    return FlowMatching(NoSchedule(), channels=1, **kwargs)


def noise_of(n, seed=0, dtype=torch.float32):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class WavyVelocity:
    """A non-linear deterministic network of (x, 1000 t): the exact Gaussian velocity plus 0.2 tanh(3 x) cos(t / 300)."""

    def __init__(self):
        self.oracle = FlowGaussianOracle("v", MU, S)

    def __call__(self, x, timestep):
        wave = torch.tanh(3 * x) * torch.cos(timestep.float().reshape(-1, *([1] * (x.dim() - 1))) / 300)
        return self.oracle(x, timestep) + 0.2 * wave


# ----------------------------------------------------------------------------------------------- flow vs diffusers
def diffusers_loop(scheduler, model, z):
    """diffusers' sampling loop: one ``step`` per entry of ``scheduler.timesteps``, the network at that timestep."""
    x = z.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.float().expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    p = flow_process(shift=shift)
    sampler = FlowEulerSampler(p, 12)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    unshifted = [1 - i / 12 for i in range(12)]  # diffusers shifts the sigmas it is given, as our grid is shifted
    scheduler.set_timesteps(sigmas=unshifted)
    torch.testing.assert_close(scheduler.sigmas.double(), torch.tensor(sampler.times, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scheduler.timesteps.double(), torch.tensor(sampler.timesteps, dtype=torch.float64),
                               rtol=1e-6, atol=1e-4)
    model, z = WavyVelocity(), noise_of(512)
    torch.testing.assert_close(sampler.sample(model, noise=z).samples, diffusers_loop(scheduler, model, z), rtol=1e-5, atol=1e-5)


def test_flow_heun_matches_diffusers():
    """diffusers' FlowMatchHeunDiscreteScheduler on our grid (its own grid ends at sigma_min = 1/1000): the same
    2N - 1 calls (timesteps repeated, Euler into t = 0) and the same samples."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    p = flow_process()
    sampler = FlowHeunSampler(p, 8)
    scheduler = FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(8)
    grid = torch.tensor(sampler.times, dtype=torch.float32)  # 1 ... 0
    scheduler.timesteps = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2)]) * 1000
    scheduler.sigmas = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2), grid[-1:]])
    assert len(scheduler.timesteps) == sampler.nfe == 15
    torch.testing.assert_close(scheduler.timesteps.double(), torch.tensor(sampler.timesteps, dtype=torch.float64),
                               rtol=1e-6, atol=1e-4)
    model, z = WavyVelocity(), noise_of(512)
    torch.testing.assert_close(sampler.sample(model, noise=z).samples, diffusers_loop(scheduler, model, z), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- edm vs NVlabs, k-diffusion
def nvlabs_edm_sampler(net, latents, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0,
                       S_max=float("inf"), S_noise=1, randn_like=torch.randn_like):
    """NVlabs/edm generate.py edm_sampler, transcribed (round_sigma is the identity; net(x, sigma) is EDMPrecond)."""
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def k_diffusion_dpmpp_2m(model, x, sigmas):
    """k-diffusion sampling.py sample_dpmpp_2m, transcribed (model(x, sigma) is the denoiser)."""
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


class WavyF:
    """A non-linear raw network F(c_in x, c_noise) for EDM: the exact Gaussian one plus a wave."""

    def __init__(self):
        self.oracle = EDMGaussianOracle(0.5, MU, S)

    def __call__(self, x_in, c_noise):
        return self.oracle(x_in, c_noise) + 0.2 * torch.tanh(3 * x_in) * torch.cos(c_noise).reshape(-1, 1)


def precond(process, network):
    """EDMPrecond around ``network``: D(x; sigma) for one sigma (NVlabs' net(x, sigma))."""
    def net(x, sigma):
        return process.denoise(network, x, torch.full((x.shape[0],), float(sigma), dtype=torch.float64))
    return net


def test_heun_on_edm_is_nvlabs_edm_sampler():
    """EDM's own sampler, 18 steps (35 NFE), deterministic: the same samples as ``sampler=heun`` on process=edm."""
    p = edm_process()
    sampler = HeunSampler(p, 18)
    assert sampler.nfe == 35 and sampler.init_noise_sigma == 80.0
    z = noise_of(256, dtype=torch.float64)
    theirs = nvlabs_edm_sampler(precond(p, WavyF()), z)
    # the network's time input travels as float32 (as in every sampler): c_noise, and so D, agree to ~1e-7
    torch.testing.assert_close(sampler.sample(WavyF(), noise=z).samples, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("s_tmax", [50.0, math.inf])
def test_heun_churn_on_edm_is_nvlabs_algorithm_2(s_tmax):
    """With S_churn the noise comes from the same generator in the same order (one draw per step, before it); with
    EDM's default S_tmax = inf step 0 is churned too, uncapped: sigma^_0 = 80 (1 + gamma) as in NVlabs' sampler."""
    p = edm_process()
    sampler = HeunSampler(p, 10, s_churn=20, s_tmin=0.05, s_tmax=s_tmax)
    z = noise_of(256, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    draws = iter([torch.zeros_like(z)] + [torch.randn(z.shape, generator=g, dtype=torch.float64) for _ in range(9)])
    # step 0's churn is folded into init_noise_sigma: NVlabs' first draw replaced by a scaled start
    k_hat0 = sampler.sigma_hats[0]
    theirs = nvlabs_edm_sampler(precond(p, WavyF()), z * sampler.init_noise_sigma / 80, num_steps=10, S_churn=20,
                                S_min=0.05, S_max=s_tmax, randn_like=lambda x: next(draws))
    ours = sampler.sample(WavyF(), noise=z, generator=torch.Generator().manual_seed(5)).samples
    assert k_hat0 == pytest.approx(80.0 if s_tmax == 50 else 80.0 * math.sqrt(2))  # gamma = min(20 / 10, sqrt(2) - 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # float32 c_noise, as above


def test_dpmpp_2m_on_edm_is_k_diffusion():
    p = edm_process()
    sampler = DPMSolverPP2MSampler(p, 15, clip_denoised=False)
    z = noise_of(256, dtype=torch.float64)
    sigmas = torch.tensor(sampler.sigmas, dtype=torch.float64)
    theirs = k_diffusion_dpmpp_2m(precond(p, WavyF()), z * 80, sigmas)
    torch.testing.assert_close(sampler.sample(WavyF(), noise=z).samples, theirs, rtol=1e-5, atol=1e-5)  # float32 c_noise


# ----------------------------------------------------------------------------------------------- convergence orders
@pytest.mark.parametrize("cls,order", [(EulerSampler, 1), (HeunSampler, 2), (DPMSolverPP2MSampler, 2)])
def test_edm_convergence_order(cls, order):
    """RMS error against the exact ODE solution from x = sigma_max z to sigma_min, then the step to sigma = 0 (D
    there, exact), falls as NFE^-order. sigma_max = 20 keeps the exact map's tail small at low NFE."""
    p = edm_process(sigma_min=0.01, sigma_max=20.0)
    oracle = EDMGaussianOracle(0.5, MU, S)
    z = noise_of(4096, dtype=torch.float64)
    nfes, errors = [], []
    for budget in (10, 20, 40, 80):
        sampler = cls(p, cls.steps_for_nfe(budget), clip_denoised=False)
        out = sampler.sample(oracle, noise=z).samples
        at_min = oracle.ode_solution(z * 20.0, 20.0, 0.01)
        exact = oracle.denoiser(at_min, 0.01)
        nfes.append(sampler.nfe)
        errors.append((out - exact).pow(2).mean().sqrt().item())
    slope = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    assert order - 0.3 < -slope < order + 0.6, f"{cls.__name__}: slope {slope:.2f}, errors {errors}"


@pytest.mark.parametrize("objective", ["v", "x0"])
@pytest.mark.parametrize("cls,order", [(FlowEulerSampler, 1), (FlowHeunSampler, 2)])
def test_flow_convergence_order(cls, order, objective):
    """RMS error against the exact ODE solution from t = 1 to the last grid time, then the exact x_0 prediction
    there (the last step), falls as NFE^-order, with a v or an x0 network."""
    p = flow_process(objective=objective)
    oracle = FlowGaussianOracle(objective, MU, S)
    z = noise_of(4096, dtype=torch.float64)
    nfes, errors = [], []
    for budget in (10, 20, 40, 80):
        sampler = cls(p, cls.steps_for_nfe(budget))
        out = sampler.sample(oracle, noise=z).samples
        t_last = sampler.times[-2]
        exact = FlowGaussianOracle("v", MU, S).answers(oracle.ode_solution(z, 1.0, t_last), t_last)[0]
        nfes.append(sampler.nfe)
        errors.append((out - exact).pow(2).mean().sqrt().item())
    slope = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    assert order - 0.3 < -slope < order + 0.6, f"{cls.__name__} {objective}: slope {slope:.2f}, errors {errors}"


# ----------------------------------------------------------------------------------------------- distributions
@pytest.mark.parametrize("make", [
    lambda: HeunSampler(edm_process(), 18),
    lambda: EulerSampler(edm_process(), 100),
    lambda: DPMSolverPP2MSampler(edm_process(), 30),
    lambda: EulerAncestralSampler(edm_process(), 150),
    lambda: HeunSampler(edm_process(), 25, s_churn=10, s_tmin=0.05, s_tmax=50),
    lambda: FlowEulerSampler(flow_process(), 100),
    lambda: FlowHeunSampler(flow_process(shift=3.0), 30),
], ids=["edm-heun", "edm-euler", "edm-dpmpp_2m", "edm-euler_ancestral", "edm-heun-churn", "flow-euler", "flow-heun-shift3"])
def test_samples_are_the_data_distribution(make):
    """N(mu, s^2) from the exact denoiser / velocity (16384 draws: standard errors 0.004 and 0.003)."""
    sampler = make()
    oracle = FlowGaussianOracle("v", MU, S) if sampler.process.kind == "flow" else EDMGaussianOracle(0.5, MU, S)
    out = sampler.sample(oracle, (1 << 14, 1), generator=torch.Generator().manual_seed(0)).samples
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - S) < 0.03, (out.mean(), out.std())


def test_a_broken_preconditioning_is_caught():
    """The distribution test fails when the process's c_skip is off (a check of the checks)."""
    p = edm_process()
    sampler = HeunSampler(p, 18)
    original = p.preconditioning

    def wrong(sigma):
        c_skip, c_out, c_in, c_noise = original(sigma)
        return c_skip * 0.9, c_out, c_in, c_noise

    p.preconditioning = wrong
    out = sampler.sample(EDMGaussianOracle(0.5, MU, S), (1 << 12, 1), generator=torch.Generator().manual_seed(0)).samples
    assert abs(out.mean().item() - MU) > 0.02 or abs(out.std().item() - S) > 0.03


# ----------------------------------------------------------------------------------------------- pairing, labels
def test_each_sampler_says_which_processes_it_reverses():
    assert sampler_names("edm") == ["dpmpp_2m", "euler", "euler_ancestral", "heun"]
    assert sampler_names("flow") == ["flow_euler", "flow_heun"]
    assert "dpmpp_2m" in sampler_names("gaussian") and "flow_euler" not in sampler_names("gaussian")
    with pytest.raises(ValueError, match=r"^sampler DDIMSampler is invalid for this model's forward process \(edm\): it "
                       r"reverses process=gaussian; use sampler=dpmpp_2m\|euler\|euler_ancestral\|heun$"):
        build_sampler("ddim", edm_process())
    with pytest.raises(ValueError, match=r"reverses process=gaussian\|edm; use sampler=flow_euler\|flow_heun$"):
        build_sampler("heun", flow_process())
    with pytest.raises(ValueError, match=r"^sampler sigmas=schedule is invalid for process=edm"):
        build_sampler("euler", edm_process(), sigmas="schedule")


def test_trajectory_labels_are_the_process_time():
    edm = build_sampler("heun", edm_process(), num_steps=3)
    assert edm.kept_times() == ["σ=80", "σ=2.52", "σ=2.52", "σ=0.002", "σ=0.002", "σ=0"]
    assert edm.timesteps[0] == pytest.approx(math.log(80) / 4)  # the network's time input is c_noise
    flow = build_sampler("flow_euler", flow_process(), num_steps=4)
    assert flow.kept_times() == ["t=1", "t=0.75", "t=0.5", "t=0.25", "t=0"]
    assert flow.timesteps == [1000.0, 750.0, 500.0, 250.0]
    shifted = build_sampler("flow_euler", flow_process(shift=3.0), num_steps=2)
    assert shifted.times == pytest.approx([1.0, 0.75, 0.0]) and "shift 3" in shifted.describe()


def test_an_edm_trajectory_shows_the_state_in_the_image_range():
    """The kept states are x / sqrt(1 + sigma^2) (the VP equivalent, what figures and the app's strip show), not the
    network's input c_in x, which is about 2 x near sigma = 0 for sigma_data = 0.5."""
    p = edm_process()
    sampler = HeunSampler(p, 18)  # EDM's own step count (35 NFE)
    z = noise_of(4096, dtype=torch.float64)
    out = sampler.sample(EDMGaussianOracle(0.5, MU, S), noise=z, return_trajectory=True)
    sigmas = list(sampler.call_sigmas)  # the sigma of each kept state: x_T, then the state before each later call, x_0
    assert len(out.trajectory) == len(sigmas) == sampler.nfe + 1
    for state, sigma in zip(out.trajectory, sigmas):
        expected = math.sqrt(S**2 + sigma**2) / math.sqrt(1 + sigma**2)  # std of x_0 + sigma eps, then scaled
        # within 30% (the Euler predictor states are off by up to ~20%); c_in x would be 2x at the end
        assert abs(float(state.std()) / expected - 1) < 0.3, (sigma, float(state.std()), expected)
    assert abs(float(out.trajectory[-2].std()) / S - 1) < 0.1  # sigma_min = 0.002: about the data's std (c_in x: 2 S)
