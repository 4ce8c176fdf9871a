"""Cold-diffusion sampling of the blur process (Bansal et al. 2022, Algorithms 1 and 2)."""

from __future__ import annotations

import torch

from diffusion.checks import check_choice
from diffusion.processes.blur import BlurDiffusion
from diffusion.samplers.base import SPACINGS, Sampler, StepOutput, check_number, make_timesteps


class ColdSampler(Sampler):
    """Cold-diffusion sampling of the blur process (Bansal et al. 2022) on a grid of ``num_steps`` timesteps.

    At each step the network restores x^_0 = R(x_s, s); then (``improved``, the paper's Algorithm 2)
    x_{s'} = x_s - D(x^_0, s) + D(x^_0, s'), or (Algorithm 1) x_{s'} = D(x^_0, s'), where s' is the next, lower
    point of the grid (the paper uses every step: s' = s - 1). Algorithm 2 is exact for any restorer whose error
    the degradation does not see at first order: with a perfect restorer both return x_0, but a restorer off by a
    constant image c (which blurring keeps) still lands on x_0 with Algorithm 2 and on x_0 + c with Algorithm 1.

    The fully blurred x_T is a constant image, so colour alone would pick the sample. As in the paper's code, x_T
    is perturbed by white noise of std ``prior_noise_std``; Algorithm 2 carries that perturbation unchanged through
    every step (each step only adds D(x^_0, s') - D(x^_0, s)), and it is subtracted from the result
    (``remove_prior_noise``), so it steers the restorations without staying in the image. Otherwise deterministic.
    """

    reverses = ("blur",)

    def __init__(
        self,
        process: BlurDiffusion,
        num_steps: int | None = None,
        improved: bool = True,
        spacing: str = "linspace",
        clip_denoised: bool = True,
        prior_noise_std: float = 0.02,
        remove_prior_noise: bool = True,
    ):
        self.prior_noise_std = check_number("prior_noise_std", prior_noise_std)
        self.remove_prior_noise = bool(remove_prior_noise)
        self.improved = bool(improved)
        self.spacing = check_choice("sampler spacing", spacing, SPACINGS)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    def set_timesteps(self, num_steps: int) -> None:
        self._set_grid(num_steps, make_timesteps(self.T, num_steps, self.spacing))

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i = self._check_index(i)
        pred_x0 = model_output.clamp(-1.0, 1.0) if self.clip_denoised else model_output
        # the network's 0-based timestep t is the paper's step s = t + 1; the next grid point p is s' = p + 1
        s, s_prev = self.state_times[i], self.state_times[i + 1]
        target = self.process.blur(pred_x0, s_prev)
        if self.improved:
            target = x - self.process.blur(pred_x0, s) + target  # Algorithm 2, line 3
        return StepOutput(target, pred_x0)

    @torch.inference_mode()
    def sample(self, model, shape=None, *, noise=None, generator=None, device=None, return_trajectory=False, progress=False,
               trajectory_points=None, labels=None, null_label=None):
        """As :meth:`Sampler.sample`; without ``noise``, x_T = prior + ``prior_noise_std`` z, z removed at the end
        (Algorithm 2 only: Algorithm 1 re-blurs every step, which does not carry z)."""
        if noise is not None:
            return super().sample(model, noise=noise, generator=generator, device=device, return_trajectory=return_trajectory,
                                  progress=progress, trajectory_points=trajectory_points, labels=labels, null_label=null_label)
        if shape is None:
            raise ValueError("sample() needs a shape or an initial noise tensor")
        prior = self.process.sample_prior(shape, generator, device)
        perturbation = self.prior_noise_std * self.noise_like(prior, generator)
        out = super().sample(model, noise=prior + perturbation, generator=generator, device=device,
                             return_trajectory=return_trajectory, progress=progress, trajectory_points=trajectory_points,
                             labels=labels, null_label=null_label)
        if not (self.improved and self.remove_prior_noise):
            return out
        samples = out.samples - perturbation
        if out.trajectory is not None:
            out.trajectory[-1] = samples.cpu()
        return out._replace(samples=samples)
