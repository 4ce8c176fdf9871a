"""Cold diffusion with Gaussian blur (#7): the blur operator against closed forms, the cold sampler with oracle
restorers, the fitted prior, and process=blur through train, sample, figures and evaluate."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion.processes import GaussianDiffusion, build_process
from diffusion.processes.blur import BlurDiffusion, BlurSchedule, dct_blur
from diffusion.processes.schedules import LinearSchedule
from diffusion.samplers.cold import ColdSampler
from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.ddpm import DDPMSampler
from tests.conftest import FAST, run_train


def images(n=4, c=3, h=16, w=16, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """An independent Gaussian blur: a sampled kernel of radius 6 sigma, convolved in float64 over the image mirrored
    with its edge pixels repeated (the half-sample symmetric extension that the DCT-II assumes)."""
    r = math.ceil(6 * sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = k / k.sum()
    h, w = x.shape[2:]
    assert r <= min(h, w), "one mirror copy per side must cover the kernel"
    xp = x.double()
    xp = torch.cat([xp.flip(2), xp, xp.flip(2)], 2)
    xp = torch.cat([xp.flip(3), xp, xp.flip(3)], 3)
    n, c = x.shape[:2]
    flat = xp.reshape(n * c, 1, *xp.shape[2:])
    flat = F.conv2d(F.conv2d(flat, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
    out = flat.reshape(n, c, *flat.shape[2:])
    return out[:, :, h - r : 2 * h - r, w - r : 2 * w - r]


# ----------------------------------------------------------------------------------------------- the blur operator
@pytest.mark.parametrize("sigma, size", [(1.5, (16, 16)), (2.5, (16, 24)), (4.0, (32, 28))])
def test_dct_blur_equals_a_gaussian_kernel_with_mirrored_borders(sigma, size):
    x = images(2, 3, *size)
    torch.testing.assert_close(dct_blur(x, sigma).double(), reference_blur(x, sigma), rtol=0, atol=1e-5)


def test_blurs_compose_by_adding_variances_and_keep_the_mean():
    x = images()
    a, b = 1.3, 2.1
    torch.testing.assert_close(dct_blur(dct_blur(x, a), b), dct_blur(x, math.hypot(a, b)), rtol=0, atol=1e-5)
    torch.testing.assert_close(dct_blur(x, 3.0).mean((2, 3)), x.mean((2, 3)), rtol=0, atol=1e-6)


def test_the_forward_operator_is_the_identity_at_step_0_and_blurs_monotonically():
    process = BlurDiffusion(BlurSchedule(T=50, kernel_std=0.1), channels=3)
    x0 = images()
    assert torch.equal(process.blur(x0, torch.zeros(4, dtype=torch.long)), x0)
    xs = [process.q_sample(x0, torch.full((4,), t)) for t in range(50)]  # t = 0..T-1 is the paper's s = 1..T
    distance = torch.stack([(x - x0).flatten(1).norm(dim=1) for x in xs])  # (T, B)
    detail = torch.stack([(x - x.mean((2, 3), keepdim=True)).flatten(1).norm(dim=1) for x in xs])
    tv = torch.stack([(x.diff(dim=2).abs().sum((1, 2, 3)) + x.diff(dim=3).abs().sum((1, 2, 3))) for x in xs])
    assert (distance[0] > 0).all() and (distance.diff(dim=0) > 0).all()  # further from x0 at every step
    assert (detail.diff(dim=0) < 0).all() and (tv.diff(dim=0) < 0).all()  # less detail at every step
    # the last step averages completely: exactly the constant image of x0's channel means, at any size
    torch.testing.assert_close(xs[-1], x0.mean((2, 3), keepdim=True).expand_as(x0), rtol=0, atol=1e-6)
    big = images(2, 3, 64, 48)
    last = process.q_sample(big, torch.full((2,), 49))
    torch.testing.assert_close(last, big.mean((2, 3), keepdim=True).expand_as(big), rtol=0, atol=1e-6)


def test_blur_schedule_widths_are_the_closed_forms():
    s = torch.arange(0, 51, dtype=torch.float64)
    incremental = BlurSchedule(T=50, kernel_std=0.1, routine="incremental").sigmas()
    torch.testing.assert_close(incremental[:-1], (0.1 * torch.sqrt(s * (s + 1) * (2 * s + 1) / 6))[:-1])  # sum (0.1 i)^2
    constant = BlurSchedule(T=50, kernel_std=0.7, routine="constant").sigmas()
    torch.testing.assert_close(constant[:-1], 0.7 * s.sqrt()[:-1])
    assert incremental[-1] == constant[-1] == math.inf  # the last step is the complete average
    exponential = BlurSchedule(T=3, kernel_std=0.5, routine="exponential").step_stds()
    torch.testing.assert_close(exponential, torch.tensor([1.0, math.exp(0.5), math.exp(1.0)], dtype=torch.float64))


@pytest.mark.parametrize("kwargs, text", [
    ({"T": 0}, "T=0"), ({"kernel_std": 0}, "kernel_std=0"), ({"routine": "box"}, "routine"),
])
def test_bad_blur_schedules_are_refused(kwargs, text):
    with pytest.raises(ValueError, match=text):
        BlurSchedule(**kwargs)


# ----------------------------------------------------------------------------------------------- the sampler
def fitted_process(x0, T=50):
    process = BlurDiffusion(BlurSchedule(T=T, kernel_std=0.1), channels=x0.shape[1])
    process.observe(x0)
    return process


@pytest.mark.parametrize("improved", [True, False])
@pytest.mark.parametrize("num_steps", [None, 10])
def test_the_cold_sampler_with_an_oracle_restorer_returns_x0(improved, num_steps):
    x0 = images(seed=1) * 0.9
    process = fitted_process(x0)
    sampler = ColdSampler(process, num_steps=num_steps, improved=improved)
    x_T = process.q_sample(x0, torch.full((4,), 49))
    out = sampler.sample(lambda x, t: x0, noise=x_T, return_trajectory=True)
    torch.testing.assert_close(out.samples, x0, rtol=0, atol=1e-5)
    assert out.trajectory.shape[0] == sampler.num_steps + 1
    # every intermediate state is the blurred x0 of its step: D(x0, s) on the grid
    for i, t in enumerate(sampler.timesteps[1:], start=1):
        torch.testing.assert_close(out.trajectory[i], process.q_sample(x0, torch.full((4,), t)), rtol=0, atol=1e-5)


def test_algorithm_2_cancels_a_restorer_error_that_the_blur_keeps_and_algorithm_1_does_not():
    x0 = images(seed=2) * 0.5
    process = fitted_process(x0)
    bias = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)  # a constant image: blurring leaves it unchanged

    def biased(x, t):
        return x0 + bias

    x_T = process.q_sample(x0, torch.full((4,), 49))
    improved = ColdSampler(process, improved=True).sample(biased, noise=x_T).samples
    naive = ColdSampler(process, improved=False).sample(biased, noise=x_T).samples
    torch.testing.assert_close(improved, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(naive, x0 + bias, rtol=0, atol=1e-5)


def test_the_prior_perturbation_steers_but_does_not_stay_in_the_image():
    x0 = images(seed=3) * 0.5
    process = fitted_process(x0)
    y = images(1, seed=4) * 0.5

    def restorer(x, t):  # ignores its input: the result is then the prior colour plus whatever noise is carried
        return y.expand_as(x)

    def draw(**kw):
        return ColdSampler(process, **kw).sample(restorer, (6, 3, 16, 16), generator=torch.Generator().manual_seed(0)).samples

    clean = draw(prior_noise_std=0.0)
    kept = draw(prior_noise_std=0.1, remove_prior_noise=False)
    removed = draw(prior_noise_std=0.1)
    torch.testing.assert_close(removed, clean, rtol=0, atol=1e-5)
    carried = kept - clean
    assert 0.08 < carried.std().item() < 0.12  # the perturbation, unchanged through every step


def test_the_prior_is_the_gaussian_of_the_training_images_channel_means():
    x0 = torch.cat([images(32, seed=s) * 0.5 + 0.1 * s for s in range(4)])
    process = BlurDiffusion(BlurSchedule(T=10), channels=3)
    with pytest.raises(ValueError, match="train the model before sampling"):
        process.sample_prior((2, 3, 8, 8))
    for batch in x0.split(24):  # uneven batches: the running averages must weight them by size
        process.observe(batch)
    means = x0.double().mean((2, 3))
    mean, cov = process.prior_mean_cov()
    torch.testing.assert_close(mean, means.mean(0))
    torch.testing.assert_close(cov, torch.cov(means.T))
    draws = process.sample_prior((20000, 3, 4, 4), torch.Generator().manual_seed(0))
    assert torch.equal(draws, draws[:, :, :1, :1].expand_as(draws))  # constant images
    colours = draws[:, :, 0, 0].double()
    torch.testing.assert_close(colours.mean(0), mean, rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(colours.T), cov, rtol=0.05, atol=1e-4)


def test_samplers_refuse_the_other_process():
    blur = fitted_process(images())
    gaussian = GaussianDiffusion(LinearSchedule(T=50))
    with pytest.raises(ValueError, match=r"forward process \(blur\): it reverses process=gaussian; use sampler=cold$"):
        DDIMSampler(blur, num_steps=10)
    with pytest.raises(ValueError, match="use sampler=cold"):
        DDPMSampler(blur)
    with pytest.raises(ValueError, match=r"it reverses process=blur; use sampler=.*ddim.*ddpm"):
        ColdSampler(gaussian)


@pytest.mark.parametrize("config, schedule, learn_sigma, text", [
    ({"loss_type": "hybrid"}, BlurSchedule(T=10), False, r"loss_type \(process=blur\)='hybrid' is invalid"),
    ({}, BlurSchedule(T=10), True, "model.learn_sigma=true is invalid for process=blur"),
    ({}, LinearSchedule(T=10), False, "process=blur needs schedule=blur"),
])
def test_options_that_mean_nothing_to_the_blur_process_are_refused(config, schedule, learn_sigma, text):
    with pytest.raises(ValueError, match=text):
        build_process({"_target_": "diffusion.processes.BlurDiffusion", **config}, schedule, 1, learn_sigma)


def test_the_gaussian_process_refuses_the_blur_schedule():
    with pytest.raises(ValueError, match="process=gaussian needs a beta schedule .* got BlurSchedule: for schedule=blur use process=blur"):
        build_process(None, BlurSchedule(T=10), 1)


# ----------------------------------------------------------------------------------------------- training
def test_the_restoration_loss_falls_on_a_toy_set():
    from diffusion.models import UNet

    torch.manual_seed(0)
    x0 = images(16, 1, 8, 8, seed=5)
    process = BlurDiffusion(BlurSchedule(T=10, kernel_std=0.3), channels=1).train()
    model = UNet(in_channels=1, image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = process.training_losses(model, x0, process.sample_timesteps(16, x0.device, g)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert float(process.prior_count) == 150 * 16  # every training batch reached the prior


def test_process_blur_trains_samples_and_draws_figures_from_the_cli(tmp_path):
    out = tmp_path / "o"
    proc = run_train(*FAST, "process=blur", "schedule.T=20", "logger=csv", f"hydra.run.dir={out}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.output[-3000:]
    assert (out / "samples" / "final.png").is_file()
    ckpt = out / "checkpoints" / "last.ckpt"
    from diffusion.training.module import DiffusionModule

    module = DiffusionModule.from_checkpoint(ckpt)
    assert isinstance(module.process, BlurDiffusion) and isinstance(module.sampler, ColdSampler)
    assert float(module.process.prior_count) > 0 and module.process.num_timesteps == 20
    # the checkpoint's (EMA) process still averages completely at s = T (an averaged inf buffer would be nan)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(module.process.blur(x, torch.full((2,), 20)), x.mean((2, 3), keepdim=True).expand_as(x))
    sampled = run_train(f"ckpt={ckpt}", "n=6", "sampler=cold", "sampler.num_steps=5", f"hydra.run.dir={tmp_path / 's'}",
                        tmp_path=tmp_path, module="diffusion.sample")
    assert sampled.returncode == 0, sampled.output[-3000:]
    import numpy as np

    samples = np.load(tmp_path / "s" / "samples.npz")["samples"]
    assert samples.shape == (6, 16, 16, 1) and samples.std() > 0
    from diffusion.figures import make_figure
    from diffusion.run.errors import UsageError
    from tests.run.test_errors import compose_cfg

    def figure(*overrides):
        return make_figure(compose_cfg(*overrides, f"out={tmp_path / 'f'}", config_name="figures"))

    reverse = figure("figure=reverse", f"ckpt={ckpt}", "n=2", "transitions=4")
    assert reverse.name == "reverse_cold_3steps_3transitions_last_n2_seed0.png"  # the checkpoint's sampler: FAST's 3 steps
    forward = figure("figure=forward", "n=2", "columns=4", "data=digits", "process=blur")
    assert forward.name == "forward_blur_T50_digits_n2_cols4_seed0.png"
    with pytest.raises(UsageError):  # DDIM cannot reverse a blur: a one-line error, exit 2
        figure("figure=reverse", f"ckpt={ckpt}", "sampler=ddim")
    from diffusion.app import generate, sampler_names

    assert sampler_names(module) == ["cold"]  # the app offers the blur checkpoint its own sampler only
    out = generate(module, "cold", steps=20, seed=0, count=2, strip_images=2, strip_points=21)
    assert out.summary.startswith("2 images with cold, 20 steps") and out.strip.size[0] > out.grid.size[0]
    assert out.strip.info["Columns"].split(" | ")[-1] == "t=0" and len(out.strip.info["Columns"].split(" | ")) == 21
    ev = run_train(f"ckpt={ckpt}", "metrics=[nll]", f"hydra.run.dir={tmp_path / 'e'}", tmp_path=tmp_path, module="diffusion.evaluate")
    assert ev.returncode == 2 and "no likelihood bound" in ev.stderr and "Traceback" not in ev.output, ev.output[-2000:]


def test_a_blur_schedule_without_process_blur_is_a_one_line_error(tmp_path):
    proc = run_train(*FAST, "schedule=blur", f"hydra.run.dir={tmp_path / 'o'}", tmp_path=tmp_path)
    assert proc.returncode == 2 and "use process=blur" in proc.stderr and "Traceback" not in proc.output, proc.output[-2000:]
