"""PLMS and PNDM (Liu et al. 2022): against diffusers' PNDMScheduler, convergence to the exact probability-flow ODE
solution, N(mu, s^2) samples, objectives, clipping, and one-line errors."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler

from diffusion.processes import GaussianDiffusion
from diffusion.processes.schedules import LinearSchedule
from diffusion.samplers import build_sampler, make_timesteps
from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.pndm import PLMSSampler, PNDMSampler
from tests.oracles import GaussianOracle, PointOracle

MU, S = 0.5, 0.3
SAMPLERS = {"plms": (PLMSSampler, True), "pndm": (PNDMSampler, False)}  # name: (class, diffusers' skip_prk_steps)


@pytest.fixture(scope="module")
def processes():
    return {obj: GaussianDiffusion(LinearSchedule(T=1000), objective=obj) for obj in ("eps", "x0", "v")}


def _coef(process, t, x):
    a = process.alphas_cumprod_at(t).double().reshape(-1, *([1] * (x.dim() - 1)))
    return a.sqrt().to(x.dtype), (1 - a).sqrt().to(x.dtype)


class Nonlinear:
    """A deterministic non-linear network of (x, t): x0 = 0.8 tanh(1.5 alpha x) + 0.1 sin(3x) cos(t / 150), answered
    in the process's objective from the definitions (eps = (x - alpha x0) / sigma, v = alpha eps - sigma x0)."""

    def __init__(self, process):
        self.process = process

    def __call__(self, x, t):
        alpha, sigma = _coef(self.process, t, x)
        x0 = 0.8 * torch.tanh(1.5 * alpha * x) + 0.1 * torch.sin(3 * x) * torch.cos(t.reshape(alpha.shape) / 150)
        eps = (x - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[self.process.objective]


def as_eps(process, model):
    """The same network answering eps, converted at its own (x, t) from the definitions (v = alpha eps - sigma x0,
    alpha^2 + sigma^2 = 1): what diffusers' epsilon scheduler is given for an x0 or v network."""

    def eps_model(x, t):
        out = model(x, t)
        alpha, sigma = _coef(process, t, x)
        if process.objective == "x0":
            return (x - alpha * out) / sigma
        if process.objective == "v":
            return sigma * x + alpha * out
        return out

    return eps_model


def diffusers_sample(process, model, x, num_steps, skip_prk_steps, prediction_type="epsilon", spacing="leading"):
    """diffusers' own loop (pipeline_pndm): same betas, steps_offset=0, x_0 at alpha_bar = 1 (set_alpha_to_one)."""
    scheduler = PNDMScheduler(num_train_timesteps=process.num_timesteps, trained_betas=process.betas.numpy(),
                              skip_prk_steps=skip_prk_steps, set_alpha_to_one=True, prediction_type=prediction_type,
                              timestep_spacing=spacing, steps_offset=0)
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps:
        out = model(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = scheduler.step(out, int(t), x).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


def noise(n=4096, seed=0, dtype=torch.float32):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------- diffusers
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("spacing, num_steps", [("leading", n) for n in (1, 2, 4, 10, 12, 30, 50)]
                         + [("trailing", 10), ("trailing", 50)])
def test_timesteps_are_diffusers(processes, name, spacing, num_steps):
    """One entry per network call: diffusers' prk_timesteps + plms_timesteps (PLMS's repeated warm-up entry)."""
    cls, skip = SAMPLERS[name]
    if cls is PNDMSampler and num_steps < 4:
        pytest.skip("PNDM needs 4 steps (refused below)")
    sampler = cls(processes["eps"], num_steps=num_steps, spacing=spacing)
    reference = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=skip, timestep_spacing=spacing, steps_offset=0)
    reference.set_timesteps(num_steps)
    assert sampler.timesteps == reference.timesteps.tolist()
    assert sampler.nfe == (num_steps + (1 if num_steps > 1 else 0) if cls is PLMSSampler else num_steps + 9)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("model_kind", ["oracle", "nonlinear"])
@pytest.mark.parametrize("num_steps", [10, 50])  # k = T // N = 100, 20 (even: diffusers' midpoint is consistent)
def test_final_samples_equal_diffusers(processes, name, objective, model_kind, num_steps):
    """Same betas, grid, model and starting noise: diffusers' PNDMScheduler and ours agree to float32 precision.

    diffusers is given the network as eps (an x0 or v network converted at its own (x, t)): its own
    prediction_type="v_prediction" combines v's instead, see test_diffusers_v_prediction_is_first_order."""
    process = processes[objective]
    cls, skip = SAMPLERS[name]
    model = GaussianOracle(process, MU, S) if model_kind == "oracle" else Nonlinear(process)
    x_T = noise()
    ours = cls(process, num_steps=num_steps).sample(model, noise=x_T).samples
    ref, _ = diffusers_sample(process, as_eps(process, model), x_T, num_steps, skip)
    assert ours.dtype == torch.float32 and ref.abs().max() > 0.5
    torch.testing.assert_close(ours, ref, rtol=0, atol=5e-5)


def paper_fpndm(process, model, x, grid):
    """F-PNDM written after the paper's code (luping-liu/PNDM, runner/method.py: gen_order_4, runge_kutta, transfer),
    in float64, with the transfer reading alpha_bar at the network's t (that code reads index t + 1), x_0 at
    alpha_bar = 1, and the integer midpoint t_next + (t - t_next) // 2 that diffusers gives the network."""
    table = process.alphas_cumprod.double()

    def transfer(x, t, t_next, e):  # eq. 9 in the code's form
        a, b = table[t].item(), (1.0 if t_next < 0 else table[t_next].item())
        return x + (b - a) * (x / (a**0.5 * (a**0.5 + b**0.5)) - e / (a**0.5 * (((1 - b) * a) ** 0.5 + ((1 - a) * b) ** 0.5)))

    def net(x, t):
        return model(x, torch.full((x.shape[0],), t, dtype=torch.long))

    ets = []
    for t, t_next in zip(grid, grid[1:] + [-1]):
        if len(ets) > 2:  # eq. 12
            ets.append(net(x, t))
            e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        else:  # eq. 13
            mid = t_next + (t - t_next) // 2
            ets.append(net(x, t))
            e2 = net(transfer(x, t, mid, ets[-1]), mid)
            e3 = net(transfer(x, t, mid, e2), mid)
            e4 = net(transfer(x, t, t_next, e3), t_next)
            e = (ets[-1] + 2 * e2 + 2 * e3 + e4) / 6
        x = transfer(x, t, t_next, e)
    return x


@pytest.mark.parametrize("num_steps", [10, 12, 30, 50])  # k = T // N = 100, 83, 33, 20
def test_pndm_equals_the_papers_method_and_diffusers_for_even_k(processes, num_steps):
    """For odd k diffusers lands the first Runge-Kutta stage at t - k // 2 but calls the network at the midpoint
    t_next + k // 2, one step lower; ours (and the paper's method) land where the network is called."""
    process = processes["eps"]
    oracle = GaussianOracle(process, MU, S)
    sampler = PNDMSampler(process, num_steps=num_steps)
    x_T = noise(dtype=torch.float64)
    ours = sampler.sample(oracle, noise=x_T).samples
    grid = make_timesteps(1000, num_steps, "leading")
    torch.testing.assert_close(ours, paper_fpndm(process, oracle, x_T, grid), rtol=0, atol=1e-9)
    theirs, _ = diffusers_sample(process, oracle, x_T, num_steps, False)
    gap = (ours - theirs).abs().max().item()  # float64 states; diffusers' alpha_bar is a float32 cumprod
    if (1000 // num_steps) % 2 == 0:
        assert gap < 1e-5, gap
    elif num_steps == 12:  # measured 1.9e-4: diffusers' half-step lands 41 steps down, its network is called at 42
        assert gap > 1e-4, gap


def test_diffusers_v_prediction_is_first_order(processes):
    """Why the test above hands diffusers eps: its v_prediction mode combines v outputs of different states and
    converts the sum with the current x_t, an O(delta) error in the combined noise. Against the exact ODE solution
    its PLMS error falls only like NFE^-1 (measured slope 1.2) and is > 10x ours at NFE 41 and 81."""
    process = processes["v"]
    oracle = GaussianOracle(process, MU, S)
    x_T, abar = noise(dtype=torch.float64), process.alphas_cumprod.double()
    errors = []
    for num_steps in (20, 40, 80):
        sampler = PLMSSampler(process, num_steps=num_steps)
        exact = oracle.ode_solution(x_T, abar[sampler.timesteps[0]].item())
        theirs, _ = diffusers_sample(process, oracle, x_T, num_steps, True, prediction_type="v_prediction")
        ours = sampler.sample(oracle, noise=x_T).samples
        errors.append(((theirs - exact).abs().max().item(), (ours - exact).abs().max().item()))
    slope = -np.polyfit(np.log([20, 40, 80]), np.log([e for e, _ in errors]), 1)[0]
    assert 0.8 < slope < 1.5, errors
    assert all(theirs > 10 * ours for theirs, ours in errors[1:]), errors


# ----------------------------------------------------------------------------------------------- convergence
NFES = [10, 14, 20, 28, 40, 57, 80]


def _errors(cls, process, nfes):
    oracle = GaussianOracle(process, MU, S)
    x_T, abar = noise(dtype=torch.float64), process.alphas_cumprod.double()
    errors = []
    for nfe in nfes:
        sampler = cls(process, num_steps=cls.steps_for_nfe(nfe))
        assert sampler.nfe == nfe
        exact = oracle.ode_solution(x_T, abar[sampler.timesteps[0]].item())  # from x_T at its alpha_bar to x_0
        errors.append((sampler.sample(oracle, noise=x_T).samples - exact).abs().max().item())
    return errors


def _slope(nfes, errors):
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


def test_convergence_to_the_exact_ode_solution(processes):
    """Gaussian data, exact denoiser, linear schedule, leading grid, NFE 10..80. Measured slopes of log max-error
    against log NFE: DDIM 0.95, PLMS 1.98, PNDM 2.98 (from NFE 14); the multistep's order 4 does not show globally
    (the noise varies like sqrt(t + 1) near t = 0, see the module docstring). Tested conservatively: PLMS > 1.5,
    PNDM > 2, every error falls from NFE 20 to 40 to 80, and PLMS is >= 10x more accurate than DDIM from NFE 20."""
    process = processes["eps"]
    ddim, plms = _errors(DDIMSampler, process, NFES), _errors(PLMSSampler, process, NFES)
    pndm = _errors(PNDMSampler, process, NFES[1:])
    assert 0.85 < _slope(NFES, ddim) < 1.15, ddim
    assert _slope(NFES, plms) > 1.5, plms
    assert _slope(NFES[1:], pndm) > 2.0, pndm
    for errors in (ddim, plms, pndm):
        e = dict(zip(NFES[-len(errors):], errors))
        assert e[20] > e[40] > e[80], errors
    assert all(p * 10 < d for p, d in zip(plms[2:], ddim[2:])), (plms, ddim)
    assert plms[0] * 2 < ddim[0] and plms[-1] < 3e-3, (plms, ddim)


@pytest.mark.parametrize("name, nfe, var_rel", [("plms", 20, 0.05), ("pndm", 20, 0.2), ("pndm", 30, 0.05)])
def test_samples_are_the_data_distribution(processes, name, nfe, var_rel):
    """N(mu, s^2) from 20k samples. Measured variance / s^2 at NFE 20: PLMS 0.997, PNDM 0.86 (its 12-call warm-up
    leaves 11 grid steps; DDIM: 0.65); at NFE 30 PNDM 1.006."""
    cls, _ = SAMPLERS[name]
    process = processes["eps"]
    sampler = cls(process, num_steps=cls.steps_for_nfe(nfe))
    out = sampler.sample(GaussianOracle(process, MU, S), (20_000, 1), generator=torch.Generator().manual_seed(3))
    x = out.samples.double()
    assert sampler.nfe == nfe
    assert x.mean().item() == pytest.approx(MU, abs=0.01) and x.var().item() == pytest.approx(S**2, rel=var_rel)


# ----------------------------------------------------------------------------------------------- objectives, clipping
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("clip", [False, True])
def test_every_objective_gives_the_same_samples(processes, name, clip):
    """The multistep combines each call's eps (at its own x and t), so eps, x0 and v networks that agree agree."""
    cls, _ = SAMPLERS[name]
    x_T = noise(1024, seed=1)
    out = {obj: cls(p, num_steps=20, clip_denoised=clip).sample(GaussianOracle(p, 0.9, 0.3), noise=x_T).samples
           for obj, p in processes.items()}
    torch.testing.assert_close(out["x0"], out["eps"], rtol=0, atol=2e-5)
    torch.testing.assert_close(out["v"], out["eps"], rtol=0, atol=2e-5)
    assert (out["eps"].abs().max() <= 1.0) == clip  # N(0.9, 0.3^2) data leaves [-1, 1] unless clipped


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_single_point_data_is_recovered_exactly(processes, name, objective):
    """With one data point every noise along the DDIM path is the same eps, so every combination is exact."""
    cls, _ = SAMPLERS[name]
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    oracle = PointOracle(processes[objective], x0)
    sampler = cls(processes[objective], num_steps=10, clip_denoised=True)
    out = sampler.sample(oracle, x0.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.samples, x0, atol=1e-4, rtol=0)
    assert oracle.calls == sampler.nfe == (11 if cls is PLMSSampler else 19)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_clip_denoised_keeps_every_predicted_x0_in_range(processes, name):
    cls, _ = SAMPLERS[name]
    wild = lambda x, t: -3 * torch.ones_like(x) + torch.sin(x)  # noqa: E731 - predicted x0 far outside [-1, 1]
    clipped = cls(processes["eps"], num_steps=10, clip_denoised=True).sample(wild, (8, 1), return_trajectory=True)
    free = cls(processes["eps"], num_steps=10).sample(wild, (8, 1), generator=None, return_trajectory=True)
    assert clipped.pred_x0.abs().max() <= 1.0 and clipped.samples.abs().max() <= 1.0
    assert free.pred_x0.abs().max() > 1.0


def test_first_plms_step_is_a_clipped_ddim_step(processes):
    process = processes["eps"]
    plms, ddim = PLMSSampler(process, num_steps=10, clip_denoised=True), DDIMSampler(process, num_steps=10, clip_denoised=True)
    x, e = torch.randn(16, 1) * 2, torch.randn(16, 1) * 3
    plms.reset()
    assert plms.timesteps[0] == ddim.timesteps[0] == 900
    torch.testing.assert_close(plms.step(e, 0, x).prev_sample, ddim.step(e, 0, x).prev_sample)


# ----------------------------------------------------------------------------------------------- the API
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_state_resets_between_samples_and_trajectories(processes, name):
    cls, _ = SAMPLERS[name]
    process = processes["eps"]
    sampler, model = cls(process, num_steps=8), Nonlinear(process)
    x_T = noise(64)
    first = sampler.sample(model, noise=x_T, return_trajectory=True)
    for i in range(5):  # an interrupted run leaves history behind ...
        sampler.step(model(x_T, torch.full((64,), sampler.timesteps[i])), i, x_T)
    second = sampler.sample(model, noise=x_T)  # ... which sample() clears
    assert torch.equal(first.samples, second.samples)
    assert first.trajectory.shape == (sampler.nfe + 1, 64, 1) and first.pred_x0.shape == (sampler.nfe, 64, 1)
    assert torch.equal(first.trajectory[-1], first.samples) and len(sampler.state_times) == sampler.nfe + 1
    sampler.reset()
    assert sampler.ets == [] and sampler._x_start is None


def test_single_step_plms_does_not_reuse_an_earlier_runs_history(processes):
    """num_steps=1 is one multistep call on an empty history (a DDIM step): left-over noises would make it AB2."""
    process = processes["eps"]
    sampler, model, x_T = PLMSSampler(process, num_steps=1), Nonlinear(process), noise(64)
    fresh = sampler.sample(model, noise=x_T).samples
    sampler.step(model(x_T * 2, torch.full((64,), 0)), 0, x_T * 2)  # an interrupted run
    torch.testing.assert_close(sampler.sample(model, noise=x_T).samples, fresh, rtol=0, atol=0)
    ddim = DDIMSampler(process, num_steps=1, clip_denoised=False).sample(model, noise=x_T).samples
    torch.testing.assert_close(fresh, ddim)


@pytest.mark.parametrize("name, nfe, num_steps", [("plms", 1, 1), ("plms", 2, 1), ("plms", 3, 2), ("plms", 51, 50),
                                                  ("pndm", 13, 4), ("pndm", 59, 50)])
def test_registry_and_steps_for_nfe(processes, name, nfe, num_steps):
    sampler = build_sampler(name, processes["eps"])
    assert type(sampler) is SAMPLERS[name][0] and sampler.name == name and sampler.num_steps == 50
    assert sampler.clip_denoised and sampler.spacing == "leading"
    assert type(sampler).steps_for_nfe(nfe) == num_steps
    sampler.set_timesteps(num_steps)
    assert sampler.nfe == (1 if nfe == 2 else nfe)  # 2 calls is no PLMS run: the largest below it


@pytest.mark.parametrize("make, text", [
    (lambda p: PLMSSampler(p, num_steps=0), "num_steps=0"),
    (lambda p: PLMSSampler(p, num_steps=1001), "num_steps=1001"),
    (lambda p: PLMSSampler(p, num_steps=2.5), "num_steps=2.5"),
    (lambda p: PNDMSampler(p, num_steps=3), "num_steps=3"),
    (lambda p: PNDMSampler(p, spacing="cubic"), "spacing='cubic'"),
    (lambda p: PLMSSampler.steps_for_nfe(0), "nfe=0"),
    (lambda p: PNDMSampler.steps_for_nfe(12), "nfe=12"),
    (lambda p: PLMSSampler(p, num_steps=5).step(torch.zeros(1), 6, torch.zeros(1)), "step index 6"),
    (lambda p: build_sampler("pndm", p, eta=0.5), "'eta'"),
])
def test_bad_options_raise_one_line(processes, make, text):
    with pytest.raises(ValueError) as err:
        make(processes["eps"])
    assert text in str(err.value) and "\n" not in str(err.value)


def test_end_to_end_from_a_checkpoint():
    from diffusion.training.module import DiffusionModule

    module = DiffusionModule.from_checkpoint(Path(__file__).parents[1] / "data" / "legacy" / "gauss.ckpt")
    for name in SAMPLERS:
        sampler = module.named_sampler(name, num_steps=10)
        out = module.sample(3, sampler=sampler, generator=torch.Generator().manual_seed(0))
        traj = module.sample(3, sampler=sampler, generator=torch.Generator().manual_seed(0), return_trajectory=True)
        assert out.samples.shape == (3, *module.image_shape) and torch.isfinite(out.samples).all()
        assert torch.equal(traj.samples, out.samples) and traj.trajectory.shape[0] == sampler.nfe + 1
        assert math.isfinite(traj.trajectory.abs().max().item())
