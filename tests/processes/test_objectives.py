"""Prediction targets (eps, x0, v), Min-SNR weighting, learned variance and the hybrid loss (#7)."""

import math

import pytest
import torch

from diffusion.models import UNet
from diffusion.processes import GaussianDiffusion
from diffusion.processes.objectives import OBJECTIVES, to_x0_eps
from diffusion.processes.schedules import CosineSchedule, LinearSchedule
from diffusion.samplers.ddim import DDIMSampler
from diffusion.samplers.ddpm import DDPMSampler
from tests.conftest import FAST, run_train
from tests.oracles import PointOracle


def process_for(objective="eps", T=100, **kw):
    return GaussianDiffusion(LinearSchedule(T=T, beta_end=0.02 * 1000 / T), objective=objective, **kw)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_targets_invert_to_x0_and_eps_exactly(objective):
    process = process_for(objective).double()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(64, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.arange(64) * 99 // 63  # both ends included
    xt = process.q_sample(x0, t, eps)
    target = process.training_target(x0, eps, t)
    pred_x0, pred_eps, var = process.model_predictions(target, xt, t)
    torch.testing.assert_close(pred_x0, x0, rtol=1e-6, atol=1e-5)  # the float32 schedule tables bound the round trip
    torch.testing.assert_close(pred_eps, eps, rtol=1e-6, atol=1e-5)  # the float32 schedule tables bound the round trip
    assert var is None
    # the scalar path the DDIM sampler takes agrees with the tensor path
    for i in (0, 31, 63):
        sa, s1m = process.sqrt_alphas_cumprod[t[i]].item(), process.sqrt_one_minus_alphas_cumprod[t[i]].item()
        sx0, seps = to_x0_eps(objective, target[i], xt[i], sa, s1m)
        torch.testing.assert_close(sx0, x0[i], rtol=1e-6, atol=1e-5)  # the float32 schedule tables bound the round trip
        torch.testing.assert_close(seps, eps[i], rtol=1e-6, atol=1e-5)  # the float32 schedule tables bound the round trip


def test_v_target_is_the_definition():
    process = process_for("v").double()
    x0, eps, t = torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64), torch.tensor([50])
    a = process.alphas_cumprod[50].item()
    assert process.training_target(x0, eps, t).item() == pytest.approx(math.sqrt(a) * 2 - math.sqrt(1 - a))


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", [LinearSchedule(T=200, beta_end=0.1), CosineSchedule(T=200)])
def test_samplers_with_an_oracle_recover_x0_under_every_objective(objective, schedule):
    process = GaussianDiffusion(schedule, objective=objective)
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    g = torch.Generator().manual_seed(0)
    ddim = DDIMSampler(process, num_steps=20, eta=0.0).sample(PointOracle(process, x0), x0.shape, generator=g)
    torch.testing.assert_close(ddim.samples, x0, rtol=0, atol=1e-3)
    ddpm = DDPMSampler(process).sample(PointOracle(process, x0), x0.shape, generator=g)
    torch.testing.assert_close(ddpm.samples, x0, rtol=0, atol=1e-3)


def test_min_snr_weights_are_the_closed_form():
    t = torch.tensor([0, 10, 50, 99])
    gamma = 5.0
    for objective, expected in [("eps", lambda s: min(s, gamma) / s), ("x0", lambda s: min(s, gamma)), ("v", lambda s: min(s, gamma) / (s + 1))]:
        process = process_for(objective, min_snr_gamma=gamma).double()
        abar = process.alphas_cumprod[t]
        snr = (abar / (1 - abar)).tolist()
        assert process.loss_weight(t).tolist() == pytest.approx([expected(s) for s in snr], rel=1e-9)
    assert process_for("eps").loss_weight(t) is None
    # weighted loss = weight x unweighted loss, per example
    weighted, plain = process_for("eps", min_snr_gamma=gamma), process_for("eps")
    x0, noise = torch.rand(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    torch.testing.assert_close(weighted.training_losses(model, x0, t, noise), plain.training_losses(model, x0, t, noise) * weighted.loss_weight(t))


def test_learned_variance_shapes_and_range():
    net = UNet(in_channels=3, image_size=8, base_channels=8, channel_mult=[1, 2], attention_resolutions=[], learn_sigma=True)
    out = net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, 6, 8, 8)
    process = process_for(variance="learned_range").double()
    T = process.num_timesteps
    t = torch.arange(1, T).repeat_interleave(4)
    xt = torch.randn(len(t), 3, 2, 2, dtype=torch.float64)
    var_values = torch.randn(len(t), 3, 2, 2, dtype=torch.float64) * 3  # far outside [-1, 1] too
    out = process.p_mean_variance_from_output(torch.cat([torch.zeros_like(xt), var_values], 1), xt, t)
    lo = process.posterior_variance[t].view(-1, 1, 1, 1)
    hi = process.betas[t].view(-1, 1, 1, 1)
    assert (out.variance >= lo * (1 - 1e-6)).all() and (out.variance <= hi * (1 + 1e-6)).all()  # float32 tables
    # the ends of the interpolation are the two fixed variances
    for value, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        learned = process.p_mean_variance_from_output(torch.cat([torch.zeros_like(xt), torch.full_like(xt, value)], 1), xt, t)
        reference = process.p_mean_variance_from_output(torch.cat([torch.zeros_like(xt), var_values], 1), xt, t, variance=fixed)
        torch.testing.assert_close(learned.variance, reference.variance)


@pytest.mark.parametrize("schedule", [LinearSchedule(T=1000), CosineSchedule(T=100)])
def test_learned_variance_spans_log_posterior_variance_to_log_beta_at_every_t(schedule):
    """Nichol & Dhariwal eq. 15 (improved-diffusion's LEARNED_RANGE): v = -1 gives log beta~_t (clipped: beta~_1 at
    t = 0), v = +1 gives log beta_t, at every t with t = 0 included -- so the decoder's variance is learnable too.
    Reference: the posterior variance recomputed here in float64 from the schedule's betas (Ho et al. eq. 7)."""
    process = GaussianDiffusion(schedule, variance="learned_range")
    betas = schedule.betas()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    posterior = betas * (1 - abar_prev) / (1 - abar)
    posterior_clipped = torch.cat([posterior[1:2], posterior[1:]])
    T = len(betas)
    t = torch.arange(T)
    xt = torch.zeros(T, 1, 1, 1)
    def log_variance(v):
        output = torch.cat([torch.zeros_like(xt), torch.full_like(xt, v)], 1)
        return process.p_mean_variance_from_output(output, xt, t, variance="learned_range").log_variance.flatten().double()
    torch.testing.assert_close(log_variance(-1.0), posterior_clipped.log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log_variance(1.0), betas.log(), rtol=1e-5, atol=1e-5)
    # t = 0 moves with the network's output: its range [log beta~_1, log beta_0] is not empty and v = 0 is its middle
    assert betas[0].log() - posterior_clipped[0].log() > 0.1
    torch.testing.assert_close(log_variance(0.0), (betas.log() + posterior_clipped.log()) / 2, rtol=1e-5, atol=1e-5)


def test_hybrid_vlb_term_trains_only_the_variance():
    process = process_for(variance="learned_range", loss_type="hybrid")
    x0, t, noise = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randint(1, 100, (8,)), torch.randn(8, 1, 4, 4)
    output = torch.randn(8, 2, 4, 4, requires_grad=True)
    hybrid = process.training_losses(lambda x, t: output, x0, t, noise).sum()
    mse = torch.nn.functional.mse_loss(output[:, :1], noise, reduction="none").flatten(1).mean(1).sum()
    (grad_hybrid,) = torch.autograd.grad(hybrid, output)
    (grad_mse,) = torch.autograd.grad(mse, output)
    torch.testing.assert_close(grad_hybrid[:, :1], grad_mse[:, :1])  # the VLB term adds nothing to the mean
    assert grad_hybrid[:, 1:].abs().sum() > 0  # and does train the variance
    assert hybrid.item() > mse.item()


def test_hybrid_loss_decreases_on_a_toy_set():
    torch.manual_seed(0)
    process = process_for(variance="learned_range", loss_type="hybrid")
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2], attention_resolutions=[], learn_sigma=True)
    data = torch.zeros(32, 1, 8, 8)
    data[:, :, 2:6, 3:5] = 1.0  # one bar, the same image: a model can learn it fast
    data = data * 2 - 1
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        t = torch.randint(0, process.num_timesteps, (32,))
        loss = process.training_losses(net, data, t).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_improved_ddpm_options_train_sample_and_evaluate_from_the_cli(tmp_path):
    out = tmp_path / "o"
    fast = [o for o in FAST if not o.startswith("sampler.")]  # DDPM runs all T=50 steps
    proc = run_train(*fast, "model.learn_sigma=true", "process.loss_type=hybrid", "process.objective=v", "process.min_snr_gamma=5",
                     "schedule.T=50", "sampler=ddpm", "logger=csv", f"hydra.run.dir={out}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.output[-3000:]
    assert (out / "samples" / "final.png").is_file()
    from diffusion.training.module import DiffusionModule

    module = DiffusionModule.from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert module.process.variance == "learned_range" and module.process.objective == "v" and module.model.out_channels == 2
    ev = run_train(f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "max_images=4", f"hydra.run.dir={tmp_path / 'e'}",
                   tmp_path=tmp_path, module="diffusion.evaluate")
    assert ev.returncode == 0, ev.output[-3000:]


@pytest.mark.parametrize("overrides, text", [
    (["process.loss_type=hybrid"], "process.loss_type=hybrid is invalid with a fixed variance"),
    (["process.objective=score"], "objective"),
    (["process.min_snr_gamma=-1"], "process.min_snr_gamma=-1"),
])
def test_bad_objective_options_are_one_line(tmp_path, overrides, text):
    proc = run_train(*FAST, *overrides, f"hydra.run.dir={tmp_path / 'o'}", tmp_path=tmp_path)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.output, proc.output[-2000:]
