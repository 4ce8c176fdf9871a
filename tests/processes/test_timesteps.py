"""Importance sampling of t for L_vlb (Nichol & Dhariwal section 3.3) and the pure-VLB loss (#7)."""

import pytest
import torch

from diffusion.processes import GaussianDiffusion
from diffusion.processes.schedules import LinearSchedule
from diffusion.processes.timesteps import LossSecondMomentSampler, build_timestep_sampler
from tests.conftest import FAST, run_train


def filled(losses_per_t: torch.Tensor, history=10) -> LossSecondMomentSampler:
    """A sampler whose every timestep has seen its loss ``history`` times."""
    sampler = LossSecondMomentSampler(len(losses_per_t), history=history)
    t = torch.arange(len(losses_per_t)).repeat(history)
    sampler.update(t, losses_per_t.repeat(history))
    return sampler


def test_uniform_until_every_timestep_has_a_full_history():
    sampler = LossSecondMomentSampler(5, history=3)
    sampler.update(torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3]), torch.arange(9.0))  # t=4 has one loss: not warm
    assert not sampler.warmed_up
    torch.testing.assert_close(sampler.probabilities(), torch.full((5,), 0.2))
    t, w = sampler.sample(1000, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(w, torch.ones(1000))  # 1 / (T p_t) = 1 under the uniform draw
    assert set(t.tolist()) == set(range(5))


def test_probabilities_are_the_second_moment_closed_form():
    history = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])  # sqrt(E[L^2]) = sqrt(5), 2, sqrt(8)
    sampler = LossSecondMomentSampler(3, history=2, uniform_prob=0.03)
    sampler.update(torch.tensor([0, 1, 2, 0, 1, 2]), history.T.flatten())
    root = torch.tensor([5.0, 4.0, 8.0]).sqrt()
    expected = 0.97 * root / root.sum() + 0.01
    torch.testing.assert_close(sampler.probabilities(), expected)


def test_the_history_keeps_the_latest_losses_in_order():
    sampler = LossSecondMomentSampler(2, history=3)
    sampler.update(torch.tensor([1, 1, 1, 1, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert sampler.loss_history[1].tolist() == [3.0, 4.0, 5.0] and sampler.loss_counts.tolist() == [0.0, 3.0]


def test_the_weighted_estimate_is_unbiased_and_less_noisy():
    T = 50
    terms = torch.cat([torch.tensor([40.0, 10.0, 5.0]), torch.full((T - 3,), 0.1)])  # L_vlb: the first terms dominate
    sampler = filled(terms)
    p = sampler.probabilities().double()
    w = 1.0 / (T * p)
    # exactly: E_p[w_t L_t] = mean_t L_t, and the variance of one draw drops below the uniform draw's
    assert (p * w * terms.double()).sum().item() == pytest.approx(terms.double().mean().item(), rel=1e-6)
    var_importance = (p * (w * terms.double()) ** 2).sum() - terms.double().mean() ** 2
    var_uniform = terms.double().var(unbiased=False)
    assert var_importance < 0.05 * var_uniform
    # and by simulation, through sample()
    t, weights = sampler.sample(200_000, "cpu", torch.Generator().manual_seed(0))
    assert (weights * terms[t]).mean().item() == pytest.approx(terms.mean().item(), rel=0.01)


def test_vlb_loss_is_T_times_the_vlb_term():
    process = GaussianDiffusion(LinearSchedule(T=20, beta_end=0.2), loss_type="vlb")
    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise, t = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 7, 19])

    def model(x, t):
        return torch.zeros_like(x)

    xt = process.q_sample(x0, t, noise)
    expected = 20 * process.vb_terms_bpd(model(xt, t), x0, xt, t)
    torch.testing.assert_close(process.training_losses(model, x0, t, noise), expected)
    with pytest.raises(ValueError, match="process.min_snr_gamma=5 is invalid with process.loss_type=vlb"):
        GaussianDiffusion(LinearSchedule(T=20), loss_type="vlb", min_snr_gamma=5)


def test_timestep_sampling_choices():
    assert build_timestep_sampler("uniform", 10) is None
    assert isinstance(build_timestep_sampler("importance", 10), LossSecondMomentSampler)
    with pytest.raises(ValueError, match="timestep_sampling"):
        build_timestep_sampler("stratified", 10)


def test_vlb_with_importance_sampling_trains_from_the_cli(tmp_path):
    out = tmp_path / "o"
    proc = run_train(*FAST, "trainer.limit_train_batches=6", "schedule.T=4", "sampler.num_steps=2", "model.learn_sigma=true",
                     "process.loss_type=vlb", "process.timestep_sampling=importance", "logger=csv",
                     f"hydra.run.dir={out}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.output[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    counts = ckpt["current_model_state"]["timestep_sampler.loss_counts"]  # the raw state (state_dict holds the EMA's)
    # 6 batches of 64 drew every one of the 4 timesteps at least 10 times: the resampler is warm and saved
    assert counts.shape == (4,) and (counts == 10).all()
    assert ckpt["hyper_parameters"]["process"]["timestep_sampling"] == "importance"
