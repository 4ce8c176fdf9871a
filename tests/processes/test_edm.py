"""process=edm (diffusion/processes/edm.py) against Karras et al. 2022 (Table 1, eq. 2 and 8) and against literal
transcriptions of the two public implementations: NVlabs/edm's ``EDMPrecond`` and ``EDMLoss``
(training/networks.py, training/loss.py) and k-diffusion's ``Denoiser.get_scalings`` / ``Denoiser.loss``
(k_diffusion/layers.py), on identical inputs; and against closed forms for Gaussian data."""

import math

import pytest
import torch

from diffusion.processes import EDMProcess
from diffusion.processes.schedules import LinearSchedule, NoSchedule
from tests.oracles import EDMGaussianOracle

MU, S = 0.2, 0.4


def nvlabs_edm_precond(model, x, sigma, sigma_data=0.5):
    """NVlabs/edm training/networks.py EDMPrecond.forward (the model's output dtype kept), transcribed."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    F_x = model(c_in * x, c_noise.flatten())
    return c_skip * x + c_out * F_x


def nvlabs_edm_loss(model, images, rnd_normal, noise, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """NVlabs/edm training/loss.py EDMLoss.__call__ with its two draws given (rnd_normal, and noise for randn_like)."""
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    n = noise * sigma
    D_yn = nvlabs_edm_precond(model, images + n, sigma.flatten(), sigma_data)
    return weight * ((D_yn - images) ** 2)


def k_diffusion_scalings(sigma, sigma_data=0.5):
    """k-diffusion layers.py Denoiser.get_scalings: (c_skip, c_out, c_in)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5
    c_in = 1 / (sigma ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out, c_in


def k_diffusion_loss(model, x, noise, sigma, sigma_data=0.5):
    """k-diffusion layers.py Denoiser.loss (weighting 'karras', where the target is the network's, unweighted)."""
    c_skip, c_out, c_in = [s.reshape(-1, 1, 1, 1) for s in k_diffusion_scalings(sigma, sigma_data)]
    noised = x + noise * sigma.reshape(-1, 1, 1, 1)
    model_output = model(noised * c_in, sigma.log() / 4)
    target = (x - c_skip * noised) / c_out
    return (model_output - target).pow(2).flatten(1).mean(1)


class Wavy:
    """A non-linear deterministic stand-in network F(x, c_noise)."""

    def __call__(self, x, c_noise):
        return torch.tanh(2 * x) * torch.cos(3 * c_noise).reshape(-1, 1, 1, 1) + 0.1 * x


@pytest.fixture
def edm():
    return EDMProcess(NoSchedule(), channels=1)


def test_preconditioning_is_table_1_and_both_implementations(edm):
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
    sd = 0.5
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))  # Table 1, "Ours"
    torch.testing.assert_close(c_out, sigma * sd / torch.sqrt(sd**2 + sigma**2))
    torch.testing.assert_close(c_in, 1 / torch.sqrt(sd**2 + sigma**2))
    torch.testing.assert_close(c_noise, torch.log(sigma) / 4)
    for ours, theirs in zip((c_skip, c_out, c_in), k_diffusion_scalings(sigma)):
        torch.testing.assert_close(ours, theirs)
    # the float form the samplers use is the same numbers
    for k, s in enumerate(sigma.tolist()):
        assert edm.preconditioning(s) == pytest.approx([float(v[k]) for v in (c_skip, c_out, c_in, c_noise)], rel=1e-12)
    # the effective target has unit variance at every sigma for data of std sigma_data (the design rule of Table 1):
    # Var[(x0 - c_skip (x0 + sigma n)) / c_out] = ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1
    torch.testing.assert_close(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2, torch.ones_like(sigma))
    # and the loss weight is 1 / c_out^2 (eq. 8 with Table 1's lambda)
    torch.testing.assert_close(edm.loss_weight(sigma), 1 / c_out**2)


def test_denoiser_equals_nvlabs_edm_precond(edm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g) * 3
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 20.0, 80.0])
    torch.testing.assert_close(edm.denoise(Wavy(), x, sigma), nvlabs_edm_precond(Wavy(), x, sigma), rtol=1e-6, atol=1e-6)


def test_training_loss_equals_nvlabs_edm_loss_and_k_diffusion(edm):
    """The same two draws (ln sigma's normal and eps) give NVlabs' per-pixel loss (averaged per image here) and
    k-diffusion's target-space loss: lambda ||D - x0||^2 = ||F - target||^2."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    rnd, noise = torch.randn(8, generator=g), torch.randn(8, 1, 8, 8, generator=g)
    sigma = (rnd * 1.2 - 1.2).exp()
    ours = edm.training_losses(Wavy(), x0, sigma, noise)
    theirs = nvlabs_edm_loss(Wavy(), x0, rnd.reshape(-1, 1, 1, 1), noise).flatten(1).mean(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, k_diffusion_loss(Wavy(), x0, noise, sigma), rtol=1e-4, atol=1e-5)


def test_training_sigmas_are_log_normal():
    p = EDMProcess(NoSchedule(), 1, P_mean=-0.4, P_std=0.7)
    log_sigma = p.sample_timesteps(1 << 16, "cpu", torch.Generator().manual_seed(0)).log()
    assert log_sigma.mean().item() == pytest.approx(-0.4, abs=0.01) and log_sigma.std().item() == pytest.approx(0.7, abs=0.01)
    bins = torch.bincount(p.time_bins(log_sigma.exp(), 4), minlength=4).float() / len(log_sigma)
    torch.testing.assert_close(bins, torch.full((4,), 0.25), atol=0.01, rtol=0)  # quartiles of the law


def test_exact_denoiser_reaches_the_bayes_loss(edm):
    """With Gaussian data and the exact denoiser, the expected loss at sigma is lambda(sigma) times the posterior
    variance s^2 sigma^2 / (s^2 + sigma^2): checks q_sample, the preconditioning and the weight together."""
    oracle = EDMGaussianOracle(0.5, MU, S)
    g = torch.Generator().manual_seed(2)
    for sigma in (0.01, 0.3, 1.0, 10.0):
        x0 = MU + S * torch.randn(4096, 1, 4, 4, generator=g, dtype=torch.float64)
        t = torch.full((4096,), sigma, dtype=torch.float64)
        loss = edm.training_losses(oracle, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64)).mean().item()
        bayes = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * S**2 * sigma**2 / (S**2 + sigma**2)
        assert loss == pytest.approx(bayes, rel=0.03), (sigma, loss, bayes)


@pytest.mark.parametrize("kwargs,text", [
    ({"sigma_min": 80.0, "sigma_max": 80.0}, "process.sigma_min=80.0 is invalid with process.sigma_max=80.0"),
    ({"P_std": 0}, "process.P_std=0 is invalid"),
    ({"sigma_data": 0}, "process.sigma_data=0 is invalid"),
    ({"sigma_min": -1}, "process.sigma_min=-1 is invalid"),
    ({"learn_sigma": True}, "model.learn_sigma=true is invalid for process=edm"),
])
def test_bad_settings_are_one_line(kwargs, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(".", r"\.")) as err:
        EDMProcess(NoSchedule(), 1, **kwargs)
    assert "\n" not in str(err.value)


def test_a_beta_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule LinearSchedule is invalid for process=edm"):
        EDMProcess(LinearSchedule(T=10), 1)


def test_forward_figure_columns_are_sigmas(edm):
    columns = edm.figure_columns(5)
    assert [label for label, _ in columns] == ["σ=0", "σ=0.002", "σ=0.068", "σ=2.3", "σ=80"]  # log-spaced: ratio 40000^(1/3)
    x0 = torch.zeros(2, 1, 4, 4)
    noise = torch.ones_like(x0)
    assert torch.allclose(edm.figure_state(x0, columns[-1][1], noise), torch.full_like(x0, 80 / math.sqrt(1 + 80**2)))
