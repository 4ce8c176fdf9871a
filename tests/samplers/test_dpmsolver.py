"""DPM-Solver++ and UniPC (diffusion/samplers/dpmsolver.py): against diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler, against the exact integrals of the update formulas, against DDIM (order 1), convergence
orders on the exact ODE solution of Gaussian data, sample laws, every objective, and one-line errors."""

import itertools
import math
from pathlib import Path

import pytest
import torch

from diffusion.processes import GaussianDiffusion
from diffusion.processes.schedules import CosineSchedule, LinearSchedule
from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.dpmsolver import DPMSolverSampler, UniPCSampler
from diffusion.samplers.registry import build_sampler
from tests.oracles import GaussianOracle

MU, S = 0.5, 0.3  # the data: N(MU, S^2)
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULES = {"linear": lambda T=1000: LinearSchedule(T=T), "cosine": lambda T=1000: CosineSchedule(T=T)}


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def posterior_mean_std(abar: float) -> float:
    """The std of E[x_0 | x_t] for x_0 ~ N(MU, S^2) at alpha_bar = abar: S sqrt(abar S^2 / (abar S^2 + 1 - abar))."""
    return S * math.sqrt(abar * S**2 / (abar * S**2 + 1 - abar))


class PerturbedOracle:
    """A non-linear deterministic model of (x, t): the Gaussian oracle plus 0.2 tanh(a fixed random 3x3 conv of x)."""

    def __init__(self, process):
        self.oracle = GaussianOracle(process, MU, S)
        self.w = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.3

    def __call__(self, x, t):
        scale = 1 + t.float().reshape(-1, 1, 1, 1) / 1000
        return self.oracle(x, t) + 0.2 * torch.tanh(torch.nn.functional.conv2d(x, self.w, padding=1) * scale)


def diffusers_scheduler(diffusers, process, sampler: DPMSolverSampler, cls=None):
    """diffusers' scheduler with the sampler's settings, on the process's own float32 alpha_bar table.

    It is built from ``trained_betas`` = the process's betas; diffusers then takes their cumulative product in
    float32, which for the cosine schedule moves alpha_bar at t = T-1 (~1e-9) by ~1e-3 relative -- a schedule
    difference, not a solver one -- so its ``alphas_cumprod`` is set to the process's table, the one the
    sampler uses (both then read the identical schedule)."""
    cls = cls or diffusers.DPMSolverMultistepScheduler
    scheduler = cls(num_train_timesteps=process.num_timesteps, trained_betas=process.betas.double().numpy(),
                    solver_order=sampler.order, prediction_type=PREDICTION_TYPE[process.objective],
                    algorithm_type=sampler.algorithm_type, solver_type=sampler.solver_type,
                    lower_order_final=sampler.lower_order_final, timestep_spacing=sampler.spacing,
                    thresholding=sampler.clip_denoised, sample_max_value=1.0)
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()
    scheduler.set_timesteps(sampler.num_steps)
    return scheduler


def run_both(diffusers, process, sampler, model, shape, cls=None):
    """(ours, diffusers') final samples from the same noise, the same model and the same noise draws (one CPU
    generator each, seeded alike: diffusers draws torch.randn(shape) every step, we every step but the last)."""
    scheduler = diffusers_scheduler(diffusers, process, sampler, cls)
    assert scheduler.timesteps.tolist() == sampler.timesteps
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(model, noise=noise, generator=torch.Generator().manual_seed(1)).samples
    x, g = noise.clone(), torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.reshape(1).expand(x.shape[0])), t, x, generator=g).prev_sample
    return ours, x


def assert_float32_close(ours, theirs, rtol=1e-5):
    """Equal within float32 round-off, relative to the samples' scale (an eps model at t = T-1 divides by
    alpha ~ 1e-2..1e-4: both sides round there, differently)."""
    err = (ours - theirs).abs().max().item()
    assert err <= rtol * max(1.0, theirs.abs().max().item()), f"max |ours - diffusers| = {err:.3g}"


# ----------------------------------------------------------------------------------------------- diffusers
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_equal_diffusers(diffusers, spacing):
    """diffusers' grid: linspace/leading over num_steps + 1 points without t = 0, trailing over num_steps points.
    (Where T (n - i) / n or i (T - 1) / n is an exact .5 tie, numpy's float steps and make_timesteps' exact
    products can round it apart, e.g. linspace n = 26: diffusers 499, ours 500; such n are not listed here.)"""
    process = GaussianDiffusion(LinearSchedule(T=1000))
    scheduler = diffusers.DPMSolverMultistepScheduler(trained_betas=process.betas.double().numpy(),
                                                      timestep_spacing=spacing)
    for n in (1, 2, 3, 5, 7, 10, 15, 20, 25, 50, 100, 250, 999):
        scheduler.set_timesteps(n)
        assert DPMSolverSampler(process, num_steps=n, spacing=spacing).timesteps == scheduler.timesteps.tolist()
    assert DPMSolverSampler(process, num_steps=20).timesteps[0] == 999  # the default (linspace) starts at T-1


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("order", [1, 2])
def test_matches_diffusers(diffusers, schedule, objective, algorithm_type, order):
    """Same betas, grid, models (the linear Gaussian oracle on (4096, 1), a non-linear conv model on (2, 3, 8, 8)),
    starting noise and SDE noise draws: the final samples agree within float32 round-off."""
    process = GaussianDiffusion(SCHEDULES[schedule](), objective=objective)
    sampler = DPMSolverSampler(process, num_steps=20, order=order, algorithm_type=algorithm_type)
    for model, shape in ((GaussianOracle(process, MU, S), (4096, 1)), (PerturbedOracle(process), (2, 3, 8, 8))):
        assert_float32_close(*run_both(diffusers, process, sampler, model, shape))


OPTIONS = [  # (num_steps, order, algorithm_type, solver_type, spacing, lower_order_final, clip_denoised)
    (5, 2, "dpmsolver++", "heun", "linspace", True, False),
    (20, 2, "sde-dpmsolver++", "heun", "trailing", True, False),
    (7, 2, "dpmsolver++", "midpoint", "leading", False, True),
    (20, 2, "sde-dpmsolver++", "midpoint", "linspace", True, True),
    (1, 2, "dpmsolver++", "midpoint", "linspace", True, False),
    (3, 3, "dpmsolver++", "heun", "trailing", True, True),  # order 3's warm-up (orders 1, 2): diffusers' exactly
    (2, 3, "sde-dpmsolver++", "midpoint", "linspace", False, False),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_matches_diffusers_options(diffusers, options):
    """solver_type, spacing, lower_order_final, clip_denoised (= diffusers' thresholding with sample_max_value=1),
    very few steps; the cosine eps model, whose x0 predictions leave [-1, 1], makes the clip matter."""
    n, order, algorithm_type, solver_type, spacing, lower_order_final, clip = options
    process = GaussianDiffusion(CosineSchedule(T=1000), objective="eps")
    sampler = DPMSolverSampler(process, num_steps=n, order=order, algorithm_type=algorithm_type, solver_type=solver_type,
                               spacing=spacing, lower_order_final=lower_order_final, clip_denoised=clip)
    ours, theirs = run_both(diffusers, process, sampler, PerturbedOracle(process), (2, 3, 8, 8))
    assert_float32_close(ours, theirs, rtol=1e-4)
    if clip:  # and the clip changed the samples
        unclipped = DPMSolverSampler(process, num_steps=n, order=order, algorithm_type=algorithm_type,
                                     solver_type=solver_type, spacing=spacing, lower_order_final=lower_order_final)
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        other = unclipped.sample(PerturbedOracle(process), noise=noise, generator=torch.Generator().manual_seed(1))
        assert (other.samples - ours).abs().max() > 1e-2


def corrected_diffusers(diffusers):
    """diffusers' scheduler with its third-order multistep update corrected: D2 = 2 (D1_0 - D1_1) / (r0 + r1)
    (= h^2 x'', as in dpm_solver's singlestep Taylor update) and, for the SDE, + 1/2 in the last coefficient."""

    class Corrected(diffusers.DPMSolverMultistepScheduler):
        def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kw):
            sigmas = [self.sigmas[self.step_index + k] for k in (1, 0, -1, -2)]
            (alpha_t, sigma_t), (_, sigma_s0), *_ = [self._sigma_to_alpha_sigma_t(s) for s in sigmas]
            lt, l0, l1, l2 = [torch.log(a) - torch.log(s) for a, s in map(self._sigma_to_alpha_sigma_t, sigmas)]
            m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
            h, r0, r1 = lt - l0, (l0 - l1) / (lt - l0), (l1 - l2) / (lt - l0)
            D1_0, D1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            D1, D2 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1), 2.0 * (D1_0 - D1_1) / (r0 + r1)
            if self.config.algorithm_type == "dpmsolver++":
                e = torch.exp(-h)
                return (sigma_t / sigma_s0 * sample - alpha_t * (e - 1.0) * m0 + alpha_t * ((e - 1.0) / h + 1.0) * D1
                        - alpha_t * ((e - 1.0 + h) / h**2 - 0.5) * D2)
            e = torch.exp(-2.0 * h)
            return (sigma_t / sigma_s0 * torch.exp(-h) * sample + alpha_t * (1 - e) * m0
                    + alpha_t * ((1.0 - e) / (-2.0 * h) + 1.0) * D1
                    + alpha_t * ((1.0 - e - 2.0 * h) / (2.0 * h) ** 2 + 0.5) * D2
                    + sigma_t * torch.sqrt(1.0 - e) * noise)

    return Corrected


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("objective,num_steps,lower_order_final", [("eps", 20, True), ("v", 20, True),
                                                                   ("v", 8, True), ("eps", 8, False)])
def test_order3_matches_diffusers_with_its_3m_update_corrected(diffusers, algorithm_type, objective, num_steps,
                                                               lower_order_final):
    """Order 3 is diffusers' order 3 except for the 3M update's D2 term (test_3m_update_is_exact_for_a_quadratic
    shows theirs is wrong); with that one method replaced, the samples agree within float32 round-off (warm-up,
    and lower_order_final below 15 steps, included)."""
    process = GaussianDiffusion(LinearSchedule(T=1000), objective=objective)
    sampler = DPMSolverSampler(process, num_steps=num_steps, order=3, algorithm_type=algorithm_type,
                               lower_order_final=lower_order_final)
    model = PerturbedOracle(process)
    ours, theirs = run_both(diffusers, process, sampler, model, (2, 3, 8, 8), cls=corrected_diffusers(diffusers))
    assert_float32_close(ours, theirs)
    _, uncorrected = run_both(diffusers, process, sampler, model, (2, 3, 8, 8))
    assert (ours - uncorrected).abs().max() > 1e-4  # and the correction matters


# ----------------------------------------------------------------------------------------------- the formulas
def quadratic(lam):
    return 0.3 * lam**2 - 0.7 * lam + 0.2


def exact_update(x, lam_s, lam_t, alpha_t, sigma_s, sigma_t, sde: bool, a=0.3, b=-0.7, c=0.2):
    """x_t for a data prediction x_theta(lambda) = a lambda^2 + b lambda + c independent of x, in closed form:
    ODE: sigma_t/sigma_s x_s + sigma_t int e^l x_theta dl (Prop. 4.1 of the paper), with the antiderivative
    e^l (a l^2 + (b - 2a) l + c - b + 2a); SDE (noise aside): sigma_t/sigma_s e^{-h} x_s +
    2 alpha_t e^{-2 lambda_t} int e^{2l} x_theta dl, antiderivative e^{2l} (a l^2/2 + (b - a) l/2 + c/2 - b/4 + a/4)."""
    if not sde:
        F = lambda l: math.exp(l) * (a * l * l + (b - 2 * a) * l + c - b + 2 * a)
        return sigma_t / sigma_s * x + sigma_t * (F(lam_t) - F(lam_s))
    F = lambda l: math.exp(2 * (l - lam_t)) * (a * l * l / 2 + (b - a) * l / 2 + c / 2 - b / 4 + a / 4)
    return sigma_t / sigma_s * math.exp(lam_s - lam_t) * x + 2 * alpha_t * (F(lam_t) - F(lam_s))


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_3m_update_is_exact_for_a_quadratic(diffusers, algorithm_type):
    """A third-order update integrates a quadratic x_theta(lambda) exactly. Ours does, to round-off; diffusers' (and
    dpm_solver's) 3M misses by O(h^3) per step (ODE: half the D2 term; SDE: also 1/2 with the wrong sign, O(h^2)),
    so their 3M is only second order. The model (objective x0) answers x_theta(lambda_i) whatever x is."""
    sde = algorithm_type == "sde-dpmsolver++"
    process = GaussianDiffusion(LinearSchedule(T=1000), objective="x0")
    sampler = DPMSolverSampler(process, num_steps=20, order=3, algorithm_type=algorithm_type)
    lam, alpha, sigma = sampler._lambda, sampler._alpha, sampler._sigma
    x = torch.randn(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outputs = [torch.full_like(x, quadratic(lam[i])) for i in range(3)]
    for i in range(2):
        sampler.step(outputs[i], i, x)
    out = sampler.step(outputs[2], 2, x, torch.Generator().manual_seed(5)).prev_sample
    if sde:  # the noise sigma_t sqrt(1 - e^{-2h}) z, with the same draw
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        out = out - sigma[3] * math.sqrt(1 - math.exp(-2 * (lam[3] - lam[2]))) * z
    exact = exact_update(x, lam[2], lam[3], alpha[3], sigma[2], sigma[3], sde)
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-12)
    assert sampler.step_order(2) == 3

    scheduler = diffusers_scheduler(diffusers, process, sampler)
    scheduler._step_index = 2
    theirs = scheduler.multistep_dpm_solver_third_order_update(outputs, sample=x, noise=torch.zeros_like(x))
    assert (theirs - exact).abs().max() > 1e-5


def test_heun_2m_is_exact_for_a_linear_data_prediction():
    """solver_type=heun's order-2 term is the exact integral of a linear x_theta; midpoint (Algorithm 2) is not."""
    process = GaussianDiffusion(CosineSchedule(T=1000), objective="x0")
    x = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = {}
    for solver_type in ("heun", "midpoint"):
        sampler = DPMSolverSampler(process, num_steps=20, order=2, solver_type=solver_type)
        lam, alpha, sigma = sampler._lambda, sampler._alpha, sampler._sigma
        sampler.step(torch.full_like(x, 0.4 * lam[0] - 0.1), 0, x)
        out = sampler.step(torch.full_like(x, 0.4 * lam[1] - 0.1), 1, x).prev_sample
        exact = exact_update(x, lam[1], lam[2], alpha[2], sigma[1], sigma[2], False, a=0.0, b=0.4, c=-0.1)
        errors[solver_type] = (out - exact).abs().max().item()
    assert errors["heun"] < 1e-12 and errors["midpoint"] > 1e-6, errors


@pytest.mark.parametrize("algorithm_type,eta", [("dpmsolver++", 0.0), ("sde-dpmsolver++", 1.0)])
def test_order1_is_ddim(algorithm_type, eta):
    """DPM-Solver++1 is DDIM (eta = 0; the paper, section 4.1), and SDE-DPM-Solver++1 is DDIM with eta = 1 (the
    DDPM posterior given the predicted x_0), drawing the same noise at the same steps; on the same trailing grid."""
    process = GaussianDiffusion(CosineSchedule(T=1000), objective="v")
    oracle = GaussianOracle(process, MU, S)
    noise = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = DPMSolverSampler(process, num_steps=25, order=1, algorithm_type=algorithm_type, spacing="trailing")
    ddim = DDIMSampler(process, num_steps=25, eta=eta, spacing="trailing")
    assert ours.timesteps == ddim.timesteps
    a = ours.sample(oracle, noise=noise, generator=torch.Generator().manual_seed(3)).samples
    b = ddim.sample(oracle, noise=noise, generator=torch.Generator().manual_seed(3)).samples
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------- convergence
def slope(nfes, errors):
    """-d log(error) / d log(NFE), least squares."""
    lx, ly = torch.tensor(nfes, dtype=torch.float64).log(), torch.tensor(errors, dtype=torch.float64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return -float((lx * ly).sum() / (lx * lx).sum())


CONVERGENCE_NFE = [10, 20, 30, 40, 60, 70, 80]  # divisors of 5040, multiples of 5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("order,solver_type,low,high", [(1, "midpoint", 0.9, 1.1), (2, "midpoint", 1.8, 2.3),
                                                         (2, "heun", 1.8, 2.3)])
def test_convergence_order(schedule, order, solver_type, low, high):
    """Error against the exact probability-flow ODE solution has slope ~order in NFE (fit over NFE 10..80).

    Target: on T = 5041 steps (the linear schedule's betas scaled by 1000/T, the cosine one continuous in t/T) the
    linspace grid t_i = (n - i) 5040 / n starts at t = T-1 = 5040 and, for every n here, passes t_e = 1008 = T/5.
    The sampler's x_0 prediction at its call at t_e -- what it would return if it stopped there -- is compared with
    the oracle's x_0 prediction at the exact ODE state there, D(ode_solution(x_T, abar_{T-1}, abar_{t_e}), t_e),
    float64 throughout with lower_order_final off. The interval is fixed on purpose: the sampler's own end moves with
    the grid (its last point is t ~ T/n, whose x_0 prediction it returns), and on any grid uniform in t the last
    log-SNR steps h ~ log((k+1)/k)/2 do not shrink as n grows, so errors at x_0 fall like 1/n at best for every
    order (measured over NFE 10..80: slopes 0.1-0.6 for order 1, ~0 for 2M); on a fixed interval every h shrinks
    like 1/n."""
    T, t_e = 5041, 1008
    sched = LinearSchedule(T=T, scale_with_T=True) if schedule == "linear" else CosineSchedule(T=T)
    process = GaussianDiffusion(sched)
    oracle = GaussianOracle(process, MU, S)
    abar = process.alphas_cumprod.double()
    x_T = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_e = oracle.ode_solution(x_T, abar[T - 1].item(), abar[t_e].item())
    eps = oracle(x_e, torch.full((x_e.shape[0],), t_e))  # the process's objective is eps
    target = (x_e - (1 - abar[t_e]).sqrt() * eps) / abar[t_e].sqrt()  # D(x_e, t_e) = E[x_0 | x_e]
    errors = []
    for n in CONVERGENCE_NFE:
        sampler = DPMSolverSampler(process, num_steps=n, order=order, solver_type=solver_type, lower_order_final=False)
        assert sampler.timesteps[0] == T - 1
        k = sampler.timesteps.index(t_e)
        out = sampler.sample(oracle, noise=x_T, return_trajectory=True)
        errors.append((out.pred_x0[k] - target).abs().max().item())
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert low <= slope(CONVERGENCE_NFE, errors) <= high, (slope(CONVERGENCE_NFE, errors), errors)


# ----------------------------------------------------------------------------------------------- samples
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
def test_samples_have_the_data_law_at_nfe_20(schedule, algorithm_type):
    """NFE 20 (the default 2M, linspace): mean MU, and the spread of what the last step returns, E[x_0 | x_t] at
    the last grid point t = 50 -- std S sqrt(a S^2 / (a S^2 + 1 - a)), a = alpha_bar_50 (0.86 S for the linear
    schedule, 0.96 S for the cosine one), within 5% (order 1 misses by 7-18%). Without the yaml's clip_denoised:
    5% of this data lies above 1, and clamping the x_0 predictions there would pull the mean down (by ~0.006)."""
    process = GaussianDiffusion(SCHEDULES[schedule]())
    sampler = build_sampler("dpmsolver++", process, algorithm_type=algorithm_type, clip_denoised=False)
    assert sampler.nfe == 20 and sampler.order == 2 and sampler.timesteps[-1] == 50
    x = sampler.sample(GaussianOracle(process, MU, S), (16384, 1), generator=torch.Generator().manual_seed(0)).samples
    expected = posterior_mean_std(process.alphas_cumprod[50].item())
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() / expected - 1) < 0.05, (x.std().item(), expected)


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "sde-dpmsolver++"])
@pytest.mark.parametrize("clip", [False, True])
def test_every_objective_gives_the_same_samples(algorithm_type, clip):
    """The same optimal denoiser answered as eps, x0 or v (and with a learned-variance half appended) gives the same
    samples from the same noise and noise draws: the conversions happen in one place (predict_x0_eps)."""
    noise = torch.randn(512, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    samples = []
    for objective, learned in (("eps", False), ("x0", False), ("v", False), ("eps", True)):
        process = GaussianDiffusion(CosineSchedule(T=1000), objective=objective, learn_sigma=learned)
        oracle = GaussianOracle(process, MU, 2.0)  # wide data: the clip bites
        model = (lambda x, t, f=oracle: torch.cat([f(x, t), torch.zeros_like(x)], 1)) if learned else oracle
        sampler = DPMSolverSampler(process, num_steps=12, order=3, algorithm_type=algorithm_type, clip_denoised=clip)
        samples.append(sampler.sample(model, noise=noise, generator=torch.Generator().manual_seed(2)).samples)
    for other in samples[1:]:
        torch.testing.assert_close(other, samples[0], rtol=0, atol=1e-9)
    assert (samples[0].abs().max() <= 1.0) == clip


def test_multistep_state_resets_between_calls():
    """The history of one sample() call does not leak into the next; steps out of order are refused."""
    process = GaussianDiffusion(LinearSchedule(T=1000))
    oracle = GaussianOracle(process, MU, S)
    sampler = DPMSolverSampler(process, num_steps=10, order=3)
    a = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    b = torch.randn(64, 1, generator=torch.Generator().manual_seed(1))
    sampler.sample(oracle, noise=a)
    again = sampler.sample(oracle, noise=b).samples
    fresh = DPMSolverSampler(process, num_steps=10, order=3).sample(oracle, noise=b).samples
    assert torch.equal(again, fresh)
    sampler.reset()
    with pytest.raises(ValueError, match="take the steps in order"):
        sampler.step(oracle(b, torch.full((64,), sampler.timesteps[3])), 3, b)


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("options,named", [
    ({"order": 4}, "order=4"), ({"order": True}, "order=True"), ({"algorithm_type": "x"}, "algorithm_type='x'"),
    ({"solver_type": "bh2"}, "solver_type='bh2'"), ({"spacing": "log"}, "spacing='log'"),
    ({"lower_order_final": "yes"}, "lower_order_final='yes'"), ({"num_steps": 1000}, "num_steps=1000"),
    ({"num_steps": 0}, "num_steps=0"), ({"num_steps": 1001, "spacing": "trailing"}, "num_steps=1001"),
])
def test_bad_options_raise_one_line_errors(options, named):
    process = GaussianDiffusion(LinearSchedule(T=1000))
    with pytest.raises(ValueError) as err:
        build_sampler("dpmsolver++", process, **options)
    assert named in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_registry_yaml_and_hydra_override():
    """conf/sampler/dpmsolver++.yaml builds the sampler with its documented defaults, and 'dpmsolver++' is a valid
    Hydra override value, alone and in a list."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from diffusion.run.config import CONFIG_DIR

    sampler = build_sampler("dpmsolver++", GaussianDiffusion(CosineSchedule(T=1000)))
    assert (sampler.num_steps, sampler.order, sampler.algorithm_type, sampler.lower_order_final, sampler.spacing,
            sampler.clip_denoised, sampler.stochastic) == (20, 2, "dpmsolver++", True, "linspace", True, False)
    assert build_sampler("dpmsolver++", sampler.process, algorithm_type="sde-dpmsolver++").stochastic
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("config.yaml", overrides=["sampler=dpmsolver++", "sampler.order=3"])
    assert cfg.sampler._target_ == "diffusion.samplers.dpmsolver.DPMSolverSampler" and cfg.sampler.order == 3
    (override,) = OverridesParser.create().parse_overrides(["samplers=[ddim,dpmsolver++]"])
    assert override.value() == ["ddim", "dpmsolver++"]


def test_checkpoint_samples_end_to_end(request):
    """A checkpoint's module samples with named_sampler("dpmsolver++") and ("unipc"): the legacy v-objective cosine checkpoint
    (tests/data/legacy/gauss.ckpt, where present: *.ckpt is git-ignored) or else the shared tiny run's."""
    from diffusion.training.module import DiffusionModule

    legacy = Path(__file__).parents[1] / "data" / "legacy" / "gauss.ckpt"
    module = DiffusionModule.from_checkpoint(legacy if legacy.is_file() else request.getfixturevalue("ckpt"))
    for name, cls in (("dpmsolver++", DPMSolverSampler), ("unipc", UniPCSampler)):
        sampler = module.named_sampler(name, num_steps=5)
        assert type(sampler) is cls and sampler.nfe == 5
        out = module.sample(3, sampler=sampler, generator=torch.Generator().manual_seed(0), return_trajectory=True)
        assert out.samples.shape == (3, *module.image_shape) and torch.isfinite(out.samples).all()
        assert out.samples.abs().max() <= 1.0  # clip_denoised: the last step returns a clipped x_0 prediction
        assert out.trajectory.shape == (6, 3, *module.image_shape) and out.pred_x0.shape == (5, 3, *module.image_shape)
        torch.testing.assert_close(out.trajectory[-1], out.samples)


# ----------------------------------------------------------------------------------------------- UniPC
def unipc_pair(diffusers, process, sampler):
    """diffusers' UniPCMultistepScheduler with the sampler's settings, on the process's alpha_bar table."""
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=process.num_timesteps, trained_betas=process.betas.double().numpy(),
        solver_order=sampler.order, prediction_type=PREDICTION_TYPE[process.objective], solver_type=sampler.solver_type,
        lower_order_final=sampler.lower_order_final, timestep_spacing=sampler.spacing,
        thresholding=sampler.clip_denoised, sample_max_value=1.0)
    scheduler.alphas_cumprod = process.alphas_cumprod.clone()
    scheduler.set_timesteps(sampler.num_steps)
    assert scheduler.timesteps.tolist() == sampler.timesteps
    return scheduler


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(diffusers, schedule, objective, order):
    """UniPC-bh2 (diffusers' default) against UniPCMultistepScheduler: same grid, models, noise; final samples equal
    within float32 round-off, for 20 steps and for 6 (the orders tapering as the steps run out)."""
    process = GaussianDiffusion(SCHEDULES[schedule](), objective=objective)
    for n in (20, 6):
        sampler = UniPCSampler(process, num_steps=n, order=order)
        scheduler = unipc_pair(diffusers, process, sampler)
        for model, shape in ((GaussianOracle(process, MU, S), (4096, 1)), (PerturbedOracle(process), (2, 3, 8, 8))):
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            ours = sampler.sample(model, noise=noise).samples
            x = noise.clone()
            scheduler.set_timesteps(n)
            for t in scheduler.timesteps:
                x = scheduler.step(model(x, t.reshape(1).expand(x.shape[0])), t, x).prev_sample
            assert_float32_close(ours, x)


@pytest.mark.parametrize("solver_type,lower_order_final,clip,spacing", [
    ("bh1", True, False, "linspace"), ("bh1", False, True, "trailing"), ("bh2", False, False, "leading"),
    ("bh2", True, True, "linspace")])
def test_unipc_matches_diffusers_up_to_its_last_step(diffusers, solver_type, lower_order_final, clip, spacing):
    """bh1, lower_order_final=false, clip_denoised, other spacings: diffusers' last step (to sigma = 0) is NaN there
    (bh1: B(h) = -h = -inf times an empty sum; order >= 2: differences over r = 0), so the states before it are
    compared, and our last step is the data prediction at the last grid point (order 1, finite)."""
    process = GaussianDiffusion(CosineSchedule(T=1000), objective="eps")
    sampler = UniPCSampler(process, num_steps=10, order=3, solver_type=solver_type, lower_order_final=lower_order_final,
                           spacing=spacing, clip_denoised=clip)
    scheduler = unipc_pair(diffusers, process, sampler)
    model = PerturbedOracle(process)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sampler.sample(model, noise=noise, return_trajectory=True)
    x = noise.clone()
    for t in scheduler.timesteps[:-1]:
        x = scheduler.step(model(x, t.reshape(1).expand(x.shape[0])), t, x).prev_sample
    assert_float32_close(out.trajectory[-2], x, rtol=1e-4)
    assert torch.isfinite(out.samples).all()
    torch.testing.assert_close(out.samples, out.pred_x0[-1])


@pytest.mark.parametrize("solver_type", ["bh2", "bh1"])
@pytest.mark.parametrize("order,low,high", [(1, 1.6, 2.2), (2, 2.5, 3.4)])
def test_unipc_convergence_order(solver_type, order, low, high):
    """The corrector adds one order: UniPC-p's error against the exact ODE solution has slope ~p + 1 (the fixed
    interval of test_convergence_order, linear schedule; the x_0 prediction at the call at t_e, made from the
    predicted state there). Measured: 1.75/1.78 (p = 1), 2.72/3.01 (p = 2) for bh2/bh1."""
    T, t_e = 5041, 1008
    process = GaussianDiffusion(LinearSchedule(T=T, scale_with_T=True))
    oracle = GaussianOracle(process, MU, S)
    abar = process.alphas_cumprod.double()
    x_T = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_e = oracle.ode_solution(x_T, abar[T - 1].item(), abar[t_e].item())
    target = (x_e - (1 - abar[t_e]).sqrt() * oracle(x_e, torch.full((4096,), t_e))) / abar[t_e].sqrt()
    errors = []
    for n in CONVERGENCE_NFE:
        sampler = UniPCSampler(process, num_steps=n, order=order, solver_type=solver_type, lower_order_final=False)
        out = sampler.sample(oracle, noise=x_T, return_trajectory=True)
        errors.append((out.pred_x0[sampler.timesteps.index(t_e)] - target).abs().max().item())
    assert low <= slope(CONVERGENCE_NFE, errors) <= high, (slope(CONVERGENCE_NFE, errors), errors)


def test_unipc_registry_options_and_samples():
    process = GaussianDiffusion(LinearSchedule(T=1000))
    sampler = build_sampler("unipc", process, clip_denoised=False)
    assert (type(sampler), sampler.num_steps, sampler.order, sampler.solver_type, sampler.stochastic) == (
        UniPCSampler, 20, 2, "bh2", False)
    x = sampler.sample(GaussianOracle(process, MU, S), (16384, 1), generator=torch.Generator().manual_seed(0)).samples
    assert abs(x.mean().item() - MU) < 0.01
    assert abs(x.std().item() / posterior_mean_std(process.alphas_cumprod[50].item()) - 1) < 0.03
    for options, named in (({"solver_type": "midpoint"}, "solver_type='midpoint'"), ({"order": 0}, "order=0")):
        with pytest.raises(ValueError) as err:
            build_sampler("unipc", process, **options)
        assert named in str(err.value) and "\n" not in str(err.value)
