"""Karras-style samplers (diffusion/samplers/karras.py): euler, euler_ancestral, heun on a sigma grid.

Proven against diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and HeunDiscreteScheduler on the
same betas, grid, model and noise; against EDM eq. 5 and a literal transcription of EDM Algorithm 2 (churn, which
diffusers' Heun lacks); against the exact probability-flow ODE solution of Gaussian data (orders 1 and 2) and the
data distribution N(mu, s^2).
"""

import math

import numpy as np
import pytest
import torch

from diffusion.processes import GaussianDiffusion
from diffusion.processes.schedules import LinearSchedule
from diffusion.samplers.karras import EulerAncestralSampler, EulerSampler, HeunSampler, karras_sigmas, sigma_to_t
from tests.oracles import GaussianOracle

MU, S = 0.3, 0.5
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


@pytest.fixture(scope="module")
def processes():
    return {obj: GaussianDiffusion(LinearSchedule(T=1000), objective=obj) for obj in PREDICTION_TYPE}


class Wavy(GaussianOracle):
    """A non-linear deterministic model of (x, t): the oracle's answer plus 0.2 tanh(3 x) cos(t / 300) (so that the
    samples stay O(1) and float32 tolerances mean the same for every objective)."""

    def __call__(self, x, t):
        wave = torch.tanh(3 * x) * torch.cos(t.float().reshape(-1, *([1] * (x.dim() - 1))) / 300)
        return super().__call__(x, t) + 0.2 * wave


def noise_of(n, seed=0, dtype=torch.float32):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def diffusers_sample(scheduler, model, noise, num_steps, generator=None, grid=None, init=None):
    """The diffusers pipeline loop: latents * init_noise_sigma (``init``: ours, the same starting state), then
    scale_model_input / model / step."""
    scheduler.set_timesteps(num_steps)
    if grid is not None:  # impose our grid (a scheduler without that grid option)
        scheduler.sigmas = torch.tensor(grid[0], dtype=torch.float32)
        scheduler.timesteps = torch.tensor(grid[1], dtype=torch.float32)
    x = noise * (scheduler.init_noise_sigma if init is None else init)
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        extra = {"generator": generator} if generator is not None else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


# ----------------------------------------------------------------------------------------------- vs diffusers
def _cases():
    from diffusers import EulerAncestralDiscreteScheduler as EA
    from diffusers import EulerDiscreteScheduler as E
    from diffusers import HeunDiscreteScheduler as H

    # diffusers' karras/exponential grids take sigma_min/sigma_max from its spacing's timesteps (leading starts at
    # t = (N-1) T/N, not T-1); ours are the schedule's ends (EDM eq. 5). Under linspace both are the schedule's ends.
    return {
        "euler-karras": (lambda p: EulerSampler(p, 20, sigmas="karras"), lambda kw: E(use_karras_sigmas=True, **kw)),
        "euler-exponential": (lambda p: EulerSampler(p, 20, sigmas="exponential"),
                              lambda kw: E(use_exponential_sigmas=True, **kw)),
        "euler-schedule-leading": (lambda p: EulerSampler(p, 20, sigmas="schedule", spacing="leading"),
                                   lambda kw: E(**{**kw, "timestep_spacing": "leading"})),
        "euler-schedule-trailing": (lambda p: EulerSampler(p, 20, sigmas="schedule", spacing="trailing"),
                                    lambda kw: E(**{**kw, "timestep_spacing": "trailing"})),
        "heun-karras": (lambda p: HeunSampler(p, 10, sigmas="karras"), lambda kw: H(use_karras_sigmas=True, **kw)),
        "heun-schedule-leading": (lambda p: HeunSampler(p, 10, sigmas="schedule", spacing="leading"),
                                  lambda kw: H(**{**kw, "timestep_spacing": "leading"})),
        "ancestral-schedule-leading": (lambda p: EulerAncestralSampler(p, 20, sigmas="schedule", spacing="leading"),
                                       lambda kw: EA(**{**kw, "timestep_spacing": "leading"})),
        "ancestral-schedule-trailing": (lambda p: EulerAncestralSampler(p, 20, sigmas="schedule", spacing="trailing"),
                                        lambda kw: EA(**{**kw, "timestep_spacing": "trailing"})),
        # diffusers' ancestral scheduler has no karras grid: ours is imposed on it (same step arithmetic and draws)
        "ancestral-karras": (lambda p: EulerAncestralSampler(p, 20, sigmas="karras"), lambda kw: EA(**kw)),
    }


@pytest.mark.parametrize("model_name", ["oracle", "wavy"])
@pytest.mark.parametrize("objective", list(PREDICTION_TYPE))
@pytest.mark.parametrize("case", list(_cases()))
def test_matches_diffusers(processes, case, objective, model_name):
    if case.startswith("ancestral") and objective == "x0":
        pytest.skip("diffusers' EulerAncestralDiscreteScheduler does not implement prediction_type='sample'")
    p = processes[objective]
    ours_of, theirs_of = _cases()[case]
    ours = ours_of(p)
    theirs = theirs_of({"trained_betas": p.betas.numpy(), "prediction_type": PREDICTION_TYPE[objective],
                        "timestep_spacing": "linspace"})
    model = (GaussianOracle if model_name == "oracle" else Wavy)(p, MU, S)
    imposed = (ours.sigmas, [float(t) for t in ours.timesteps]) if case == "ancestral-karras" else None
    # same grid: our sigmas of every call (heun: repeated as diffusers') and timesteps
    theirs.set_timesteps(ours.num_steps)
    if imposed is None:
        # diffusers' sigmas come from its float32 cumprod: 1e-4 off near t = 0 (ours: the table's float64 values)
        np.testing.assert_allclose(ours.call_sigmas, theirs.sigmas.double().numpy(), rtol=2e-4, atol=0)
        np.testing.assert_allclose([float(t) for t in ours.timesteps], theirs.timesteps.double().numpy(), rtol=0,
                                   atol=1e-2 if "schedule" not in case else 0)  # the same 1e-4 in sigma
        # diffusers starts at sigma_0 (linspace/trailing) or sqrt(sigma_0^2 + 1); ours always at the latter
        assert ours.init_noise_sigma == pytest.approx(math.sqrt(float(theirs.sigmas[0]) ** 2 + 1), rel=2e-5)
    if "schedule" in case:
        assert all(isinstance(t, int) for t in ours.timesteps)
    else:
        assert all(isinstance(t, float) for t in ours.timesteps)
    noise = noise_of(1024)
    a = ours.sample(model, noise=noise, generator=torch.Generator().manual_seed(1)).samples
    seeded = (lambda: None) if case.startswith("heun") else (lambda: torch.Generator().manual_seed(1))
    b = diffusers_sample(theirs, model, noise, ours.num_steps, seeded(), grid=imposed, init=ours.init_noise_sigma)
    assert a.dtype == b.dtype == torch.float32
    if model_name == "oracle":  # on diffusers' own grid: a true denoiser barely feels its sigma_min error
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    # on our grid imposed (the 1e-4 of diffusers' sigma_min, divided by sigma_min = 0.01 in Heun's correction,
    # moves the wavy model's x0 samples by 3e-4): the step arithmetic, the draws, the objectives alike
    imposed = (ours.call_sigmas, [float(t) for t in ours.timesteps])
    b = diffusers_sample(theirs, model, noise, ours.num_steps, seeded(), grid=imposed, init=ours.init_noise_sigma)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_heun_clip_denoised_matches_diffusers_clip_sample(processes):
    from diffusers import HeunDiscreteScheduler

    p = processes["eps"]
    oracle = GaussianOracle(p, MU, 1.0)  # data beyond [-1, 1]: the clamp acts
    ours = HeunSampler(p, 10, clip_denoised=True)
    theirs = HeunDiscreteScheduler(trained_betas=p.betas.numpy(), use_karras_sigmas=True, clip_sample=True)
    noise = noise_of(1024)
    a = ours.sample(oracle, noise=noise).samples
    b = diffusers_sample(theirs, oracle, noise, 10, init=ours.init_noise_sigma)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    unclipped = HeunSampler(p, 10).sample(oracle, noise=noise).samples
    assert unclipped.abs().max() > 1.5 and a.abs().max() <= 1.0


# ----------------------------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_karras_grid_is_edm_eq5_on_the_schedules_ends(processes, spacing):
    """EDM eq. 5 with rho = 7 from sigma_min = sigma(t=0) to sigma_max = sigma(t=T-1), computed here from the betas
    in float64 (whatever the spacing, unlike diffusers), then 0."""
    p = processes["eps"]
    abar = torch.cumprod(1 - LinearSchedule(T=1000).table().betas.double(), 0)
    smin, smax = math.sqrt((1 - abar[0]) / abar[0]), math.sqrt((1 - abar[-1]) / abar[-1])
    n, rho = 12, 7.0
    expected = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    sampler = EulerSampler(p, n, spacing=spacing)
    np.testing.assert_allclose(sampler.sigmas, expected + [0.0], rtol=1e-6)
    assert sampler.timesteps[0] == 999.0 and abs(sampler.timesteps[-1]) < 1e-9
    exp_grid = EulerSampler(p, n, sigmas="exponential").sigmas[:-1]
    np.testing.assert_allclose(np.diff(np.log(exp_grid)), math.log(smin / smax) / (n - 1), rtol=1e-6)
    assert karras_sigmas(smin, smax, 1) == [smax]


def test_sigma_to_t_inverts_alphas_cumprod_at(processes):
    """The network at t(sigma) is asked about sigma: alphas_cumprod_at(t(sigma)) = 1 / (1 + sigma^2)."""
    p = processes["eps"]
    sampler = EulerSampler(p, 30)
    sigmas = torch.tensor(sampler.sigmas[:-1], dtype=torch.float64)
    log_sigmas = [math.log(s) for s in p.sigma_table()]
    t = torch.tensor([sigma_to_t(s, log_sigmas) for s in sigmas.tolist()], dtype=torch.float64)
    assert sampler.timesteps == t.tolist()  # what the sampler sends the network
    abar = p.alphas_cumprod_at(t.float()).double()
    torch.testing.assert_close(abar, 1 / (1 + sigmas**2), rtol=2e-6, atol=0)
    assert sigma_to_t(1e6, log_sigmas) == 999.0 and sigma_to_t(1e-6, log_sigmas) == 0.0


# ----------------------------------------------------------------------------------------------- convergence orders
@pytest.mark.parametrize("sigmas", ["karras", "exponential", "schedule"])
@pytest.mark.parametrize("cls,order", [(EulerSampler, 1), (HeunSampler, 2)])
def test_convergence_order(processes, cls, order, sigmas):
    """RMS error against the exact probability-flow ODE solution falls as NFE^-order over NFE 10..80.

    The exact target: the sampler starts at x_T = init_noise_sigma z at sigma_0 (the schedule's sigma_max; the
    state x = x_VP / sqrt(alpha_bar)), i.e. at the VP state x_T / sqrt(1 + sigma_0^2) with alpha_bar_T =
    1 / (1 + sigma_0^2) (alpha_bar_{T-1}); the ODE takes that to ``ode_solution(x_T / sqrt(1 + sigma_0^2),
    alpha_bar_T, abar_0=1)``. (The samplers integrate to sigma_min and take D there, the step to sigma = 0: a bias
    sigma_min^2 / (2 s) |z| = 1e-4 RMS, below Heun's 5e-3 at NFE 79.) Measured: Euler -0.97..-0.99, Heun
    -2.17..-2.34 (steeper than 2 at NFE 10-20, before the asymptotic regime: hence the one-sided margin)."""
    p = processes["eps"]
    oracle = GaussianOracle(p, MU, S)
    z = noise_of(4096, dtype=torch.float64)
    nfes, errors = [], []
    for budget in (10, 20, 40, 80):
        sampler = cls(p, cls.steps_for_nfe(budget), sigmas=sigmas)
        assert sampler.nfe <= budget
        oracle.calls = 0
        out = sampler.sample(oracle, noise=z).samples
        assert oracle.calls == sampler.nfe
        s0 = sampler.sigmas[0]
        x_T = z * sampler.init_noise_sigma
        exact = oracle.ode_solution(x_T / math.sqrt(1 + s0**2), 1 / (1 + s0**2), 1.0)
        nfes.append(sampler.nfe)
        errors.append((out - exact).pow(2).mean().sqrt().item())
    slope = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    assert order - 0.25 < -slope < order + 0.5, f"{cls.__name__} {sigmas}: slope {slope:.2f}, errors {errors}"


# ----------------------------------------------------------------------------------------------- distributions
@pytest.mark.parametrize("make", [
    lambda p: EulerSampler(p, 100),
    lambda p: EulerAncestralSampler(p, 200),
    lambda p: EulerAncestralSampler(p, 100, eta=0.5),
    lambda p: HeunSampler(p, 25),
    lambda p: HeunSampler(p, 40, s_churn=10, s_tmin=0.05, s_tmax=50),
], ids=["euler", "euler_ancestral", "euler_ancestral-eta0.5", "heun", "heun-churn"])
def test_samples_are_the_data_distribution(processes, make):
    """N(mu, s^2) from the exact denoiser at moderate NFE (16384 draws: standard errors 0.004 and 0.003; the
    first-order samplers' bias at these NFE is about 0.02 in std)."""
    p = processes["eps"]
    sampler = make(p)
    out = sampler.sample(GaussianOracle(p, MU, S), (1 << 14, 1), generator=torch.Generator().manual_seed(0)).samples
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - S) < 0.03, (out.mean(), out.std())


def test_heun_churn_is_edm_algorithm_2(processes):
    """Our Heun with churn against a literal transcription of EDM Algorithm 2 (closed-form Gaussian denoiser, the
    same noise draws: s_tmax < sigma_0, so step 0 draws none). diffusers' EulerDiscreteScheduler churns differently
    (its network sees x at sigma, the output is read at sigma^), so it is no reference here."""
    p = processes["eps"]
    n, s_churn, s_tmin, s_tmax, s_noise = 12, 6.0, 0.05, 50.0, 1.003
    sampler = HeunSampler(p, n, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    assert sampler.stochastic and sampler.nfe == 2 * n - 1 and sampler.gammas[0] == 0
    z = noise_of(2048, dtype=torch.float64)
    ours = sampler.sample(GaussianOracle(p, MU, S), noise=z, generator=torch.Generator().manual_seed(3)).samples

    def D(x, sigma):  # E[x_0 | x_0 + sigma eps = x] for x_0 ~ N(mu, s^2)
        return MU + S**2 / (S**2 + sigma**2) * (x - MU)

    g, t = torch.Generator().manual_seed(3), sampler.sigmas
    x = z * sampler.init_noise_sigma
    for i in range(n):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0
        t_hat = t[i] + gamma * t[i]
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t[i] ** 2) * s_noise * torch.randn(x.shape, generator=g, dtype=x.dtype)
        d = (x - D(x, t_hat)) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d2 = (x_next - D(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=0)


def test_churn_at_step_zero_is_in_init_noise_sigma(processes):
    """On a grid that starts below sigma_max, step 0's churn widens x_T: sqrt(sigma^_0^2 + 1) under leading spacing
    (the network still sees the prior draw itself); on the karras grid sigma^ is capped at sigma_max (gamma_0 = 0)."""
    p = processes["eps"]
    sampler = HeunSampler(p, 10, sigmas="schedule", spacing="leading", s_churn=5)
    assert sampler.sigmas[0] < sampler.sigma_max / 2 and sampler.gammas[0] == pytest.approx(math.sqrt(2) - 1)
    assert sampler.init_noise_sigma == pytest.approx(math.sqrt(sampler.sigma_hats[0] ** 2 + 1))
    assert isinstance(sampler.timesteps[0], float) and sampler.timesteps[0] > 900  # the t of sigma^_0
    karras = HeunSampler(p, 10, s_churn=40)
    assert karras.gammas[0] == 0 and max(karras.sigma_hats) <= karras.sigma_max


# ----------------------------------------------------------------------------------------------- objectives, clip
@pytest.mark.parametrize("make", [
    lambda p, **kw: EulerSampler(p, 15, **kw),
    lambda p, **kw: EulerAncestralSampler(p, 15, **kw),
    lambda p, **kw: HeunSampler(p, 8, **kw),
    lambda p, **kw: HeunSampler(p, 8, s_churn=4, **kw),
], ids=["euler", "euler_ancestral", "heun", "heun-churn"])
def test_every_objective_gives_the_same_samples(processes, make):
    z = noise_of(1024)
    out = {obj: make(p).sample(GaussianOracle(p, MU, S), noise=z, generator=torch.Generator().manual_seed(2)).samples
           for obj, p in processes.items()}
    torch.testing.assert_close(out["x0"], out["eps"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["v"], out["eps"], atol=1e-5, rtol=0)
    # clip_denoised keeps every D(x; sigma) and the result in [-1, 1] (data N(0.3, 1) goes beyond)
    for p in processes.values():
        res = make(p, clip_denoised=True).sample(GaussianOracle(p, MU, 1.0), noise=z, return_trajectory=True,
                                                 generator=torch.Generator().manual_seed(2))
        assert res.pred_x0.abs().max() <= 1.0 and res.samples.abs().max() <= 1.0
        assert make(p).sample(GaussianOracle(p, MU, 1.0), noise=z,
                              generator=torch.Generator().manual_seed(2)).samples.abs().max() > 1.5


def test_ancestral_step_keeps_the_marginal_and_eta0_is_euler(processes):
    p = processes["eps"]
    for eta in (0.3, 1.0, 2.0):
        sampler = EulerAncestralSampler(p, 10, eta=eta)
        for s, s_next in zip(sampler.sigmas[:-2], sampler.sigmas[1:-1]):
            down, up = sampler.ancestral_step(s, s_next)
            assert down**2 + up**2 == pytest.approx(s_next**2, rel=1e-12)
            if eta == 1.0:  # the DDPM posterior's variance in sigma form
                assert up**2 == pytest.approx(s_next**2 * (s**2 - s_next**2) / s**2, rel=1e-12)
    z = noise_of(512)
    oracle = GaussianOracle(p, MU, S)
    a = EulerAncestralSampler(p, 10, eta=0.0).sample(oracle, noise=z, generator=torch.Generator().manual_seed(0))
    assert not EulerAncestralSampler(p, 10, eta=0.0).stochastic
    torch.testing.assert_close(a.samples, EulerSampler(p, 10).sample(oracle, noise=z).samples, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------- trajectory, grid API
def test_trajectory_is_in_image_scale(processes):
    """States come back as the network's VP input x / sqrt(1 + sigma^2): x_T is the prior draw (to 2e-5 under
    linspace spacing, exactly under leading) and every state has the VP marginal's std sqrt(a s^2 + 1 - a)."""
    p = processes["eps"]
    z = noise_of(4096)
    for spacing, tol in (("linspace", 3e-5), ("leading", 1e-6)):
        sampler = HeunSampler(p, 25, spacing=spacing)
        res = sampler.sample(GaussianOracle(p, MU, S), noise=z, return_trajectory=True)
        n = sampler.nfe
        assert res.trajectory.shape == (n + 1, 4096, 1) and res.pred_x0.shape == (n, 4096, 1)
        torch.testing.assert_close(res.trajectory[0], z, rtol=tol, atol=0)
        torch.testing.assert_close(res.trajectory[-1], res.samples, rtol=0, atol=0)
        for state, sigma in zip(res.trajectory, sampler.call_sigmas):
            a = 1 / (1 + sigma**2)
            assert state.std().item() == pytest.approx(math.sqrt(a * S**2 + 1 - a), rel=0.06)
    assert sampler.state_times[0] == 1000 and sampler.state_times[-1] == 0 and len(sampler.state_times) == n + 1
    kept = sampler.sample(GaussianOracle(p, MU, S), noise=z, return_trajectory=True, trajectory_points=5)
    assert kept.trajectory.shape[0] == 5


def test_heun_calls_steps_and_reset(processes):
    p = processes["eps"]
    sampler = HeunSampler(p, 10)
    assert sampler.nfe == 19 and len(sampler.timesteps) == 19 and len(sampler.call_sigmas) == 20
    assert sampler.timesteps[1] == sampler.timesteps[2]  # the correction and the next Euler call share sigma_1
    assert HeunSampler.steps_for_nfe(19) == 10 and HeunSampler.steps_for_nfe(20) == 10
    assert HeunSampler.steps_for_nfe(1) == 1 and HeunSampler(p, 1).nfe == 1
    x = torch.randn(4, 1)
    sampler.step(torch.zeros_like(x), 0, x * sampler.init_noise_sigma)
    sampler.reset()
    with pytest.raises(ValueError, match="is a Heun correction"):
        sampler.step(torch.zeros_like(x), 1, x)
    sampler.set_timesteps(4)
    assert sampler.nfe == 7 and sampler._x_hat is None
    assert "10 steps (19 NFE)" in HeunSampler(p, 10).describe()


@pytest.mark.parametrize("make,text", [
    (lambda p: EulerSampler(p, 10, sigmas="cubic"), "sampler sigmas='cubic' is invalid: allowed values are karras"),
    (lambda p: HeunSampler(p, 10, rho=0), "sampler rho=0 is invalid: it must be a number > 0"),
    (lambda p: HeunSampler(p, 10, s_churn=-1), "sampler s_churn=-1 is invalid"),
    (lambda p: HeunSampler(p, 10, s_tmin=1.0, s_tmax=0.5), "sampler s_tmax=0.5 is invalid: it must be >= s_tmin=1.0"),
    (lambda p: HeunSampler(p, 10, s_noise=float("nan")), "sampler s_noise=nan is invalid"),
    (lambda p: EulerAncestralSampler(p, 10, eta=-0.5), "sampler eta=-0.5 is invalid"),
    (lambda p: EulerSampler(p, 0), "sampler num_steps=0 is invalid"),
    (lambda p: EulerSampler(p, 10, sigmas="schedule", spacing="cubic"), "sampler spacing='cubic' is invalid"),
])
def test_bad_options_raise_one_line(processes, make, text):
    with pytest.raises(ValueError) as err:
        make(processes["eps"])
    assert text in str(err.value) and "\n" not in str(err.value)


def test_registry_builds_them_with_the_yaml_defaults(processes):
    from diffusion.samplers.registry import build_sampler, sampler_names

    p = processes["eps"]
    assert {"euler", "euler_ancestral", "heun"} <= set(sampler_names("gaussian"))
    heun = build_sampler("heun", p)
    assert isinstance(heun, HeunSampler) and heun.num_steps == 10 and heun.clip_denoised and heun.s_tmax == math.inf
    assert build_sampler("euler", p).num_steps == 20 and build_sampler("euler_ancestral", p).eta == 1.0
    with pytest.raises(ValueError, match="sampler sigmas='cubic' is invalid"):
        build_sampler("euler", p, sigmas="cubic")


def test_legacy_checkpoint_samples_with_heun():
    """End to end: a checkpoint (v objective, cosine schedule, UNet) sampled by the module with heun."""
    from diffusion.training.module import DiffusionModule

    module = DiffusionModule.from_checkpoint("tests/data/legacy/gauss.ckpt")
    sampler = module.named_sampler("heun", num_steps=5)
    assert isinstance(sampler, HeunSampler) and sampler.nfe == 9
    out = module.sample(3, sampler=sampler, generator=torch.Generator().manual_seed(0))
    res = module.sample(3, sampler=sampler, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert out.samples.shape == (3, *module.image_shape) and torch.isfinite(out.samples).all()
    assert out.samples.abs().max() <= 1.0  # clip_denoised: true in conf/sampler/heun.yaml
    assert res.trajectory.shape == (10, 3, *module.image_shape) and torch.isfinite(res.trajectory).all()
    torch.testing.assert_close(res.samples, out.samples, atol=0, rtol=0)


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_the_network_first_sees_the_prior_draw_on_a_short_schedule(spacing):
    """sigma_max = 1.32 for linear T = 100: a start at sigma_0 (diffusers' under linspace) would hand the network
    noise of std 0.8; ours starts at sqrt(sigma_0^2 + 1), so the first input is the N(0, I) draw itself."""
    from diffusion.processes import GaussianDiffusion
    from diffusion.processes.schedules import LinearSchedule

    p = GaussianDiffusion(LinearSchedule(T=100))
    z = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for sampler in (EulerSampler(p, 10, spacing=spacing), HeunSampler(p, 5, spacing=spacing, sigmas="schedule")):
        x_T = sampler.initial_state(None, z, None, None)
        torch.testing.assert_close(sampler.scale_model_input(x_T, 0), z, rtol=1e-6, atol=1e-6)
