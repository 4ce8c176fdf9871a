"""The one sampling loop and the hooks every sampler fills in, in the spirit of diffusers' schedulers.

    sampler = build_sampler("dpmsolver++", process, num_steps=20)   # diffusion.samplers.registry
    out = sampler.sample(model, (16, 1, 32, 32), generator=g, return_trajectory=True)

or by hand, exactly what :meth:`Sampler.sample` does::

    x = sampler.init_noise_sigma * process.sample_prior(shape, g)
    sampler.reset()                                        # multistep state starts empty on every call
    for i, t in enumerate(sampler.timesteps):              # one entry per network call (int or float t)
        t = torch.full((x.shape[0],), t)                    # long, or float for a fractional t
        out = model(sampler.scale_model_input(x, i), t)    # the network sees x in its training scale
        x = sampler.step(out, i, x, g).prev_sample

Hooks (defaults in brackets): ``set_timesteps(num_steps)`` fills ``timesteps`` (the network's t at each call,
possibly fractional) and ``state_times`` (the paper's t of every state, x_T first, 0 for x_0); ``init_noise_sigma``
[1] scales the prior draw; ``scale_model_input(x, i)`` [identity] maps the sampler's state to the network's input
(and, at i = len(timesteps), the final state to an image); ``reset()`` [no-op] clears multistep state;
``step(model_output, i, x, generator)`` is the update. ``predict_x0_eps`` turns any objective's output into
(x_0, eps), clipped where asked. ``nfe`` counts network calls and ``steps_for_nfe`` inverts it, for comparisons at
equal cost.

Class-conditional models: ``sample(network, shape, labels=y)`` calls ``network(x, t, y)``, guided at the sampler's
``guidance_scale`` (and ``guidance_rescale``) by :class:`diffusion.samplers.guidance.Guided`: one batched forward
pass per call, so ``nfe`` is unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from diffusion.checks import check_choice, check_whole
from diffusion.processes.base import randn
from diffusion.processes.objectives import eps_from_x0, to_x0_eps
from diffusion.samplers.controls import SPACING_CONTROL, SPACINGS, Control  # noqa: F401 - also imported from here
from diffusion.samplers.guidance import Guided

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = ["Sampler", "StepOutput", "SampleOutput", "Control", "TwoCallsPerStep", "make_timesteps", "check_num_steps", "check_nfe",
           "check_number", "SPACINGS", "Model"]


def check_num_steps(num_steps, T: int, name: str = "sampler num_steps", continuous: bool = False) -> int:
    """An int in [1, T] (a config's value: 3.0 is refused), or a one-line ValueError naming it; ``continuous``: T is
    a continuous-time process's bound on solver steps (it has no T timesteps)."""
    return check_whole(name, num_steps, 1, T, floats=False, high_text=f"{T}, the most solver steps" if continuous else f"T={T}")


def check_nfe(nfe) -> int:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe={nfe!r} is invalid: it must be an integer >= 1 (network calls per sample)")
    return nfe


class TwoCallsPerStep:
    """A Heun-type sampler's cost (a mixin before its Sampler base): two network calls per step but the last."""

    @classmethod
    def steps_for_nfe(cls, nfe: int) -> int:
        """N steps cost 2N - 1 calls: the most steps within ``nfe`` calls."""
        return (check_nfe(nfe) + 1) // 2


def check_number(name: str, value, low: float = 0.0, low_open: bool = False) -> float:
    """A real number >= low (> low when ``low_open``), or a one-line ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low):
        raise ValueError(f"sampler {name}={value!r} is invalid: it must be a number {'>' if low_open else '>='} {low:g}")
    return float(value)


def make_timesteps(T: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """A strictly decreasing grid of ``num_steps`` 0-based timesteps in [0, T-1].

    - ``leading``  (DDIM paper's uniform skip, diffusers' default): ``[0, k, 2k, ...]`` reversed, k = T // num_steps;
    - ``trailing`` (Lin et al. 2023): ``round(T - i T / num_steps) - 1``, always starts at T-1;
    - ``linspace``: ``round(linspace(0, T-1, num_steps))`` reversed, both ends included;
    - ``quadratic`` (DDIM paper, CIFAR10): ``int(linspace(0, sqrt(0.8 T), num_steps)^2)`` reversed, with repeated
      small values bumped up by one (the paper's code repeats t = 0).
    """
    check_choice("sampler spacing", spacing, SPACINGS)
    check_num_steps(num_steps, T)
    n = num_steps
    if spacing == "leading":
        grid = [i * (T // n) for i in range(n)]
    elif spacing == "trailing":
        grid = [round(T * (n - i) / n) - 1 for i in range(n)][::-1]
    elif spacing == "linspace":
        grid = [T - 1] if n == 1 else [round(i * (T - 1) / (n - 1)) for i in range(n)]
    else:
        top = math.sqrt(0.8 * T)
        grid = [int((i * top / (n - 1)) ** 2) if n > 1 else int(top**2) for i in range(n)]
        for i in range(1, n):  # the squares crowd near 0 (0, 0, 1, 3, ...): keep the grid strictly increasing
            grid[i] = max(grid[i], grid[i - 1] + 1)
        if grid[-1] > T - 1:
            grid = []  # more steps than the quadratic grid can hold
    if len(set(grid)) != n:
        raise ValueError(
            f"sampler spacing={spacing!r} with num_steps={n} repeats timesteps for T={T}: "
            "use fewer steps or spacing=linspace"
        )
    return sorted(grid, reverse=True)


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


class SampleOutput(NamedTuple):
    samples: torch.Tensor
    #: (states, B, C, H, W) on the CPU: x_T, then the state after every network call (or the trajectory_points
    #: kept), each as an image (``scale_model_input``); None unless asked for.
    trajectory: torch.Tensor | None = None
    #: (states - 1, B, C, H, W) on the CPU: the predicted x_0 at every kept call; None unless asked for.
    pred_x0: torch.Tensor | None = None


class Sampler:
    """The loop; a family subclasses it and defines :meth:`set_timesteps` and :meth:`step` (and the hooks it needs).

    ``reverses``: the process kinds (``process.kind``) this sampler can reverse; ``stochastic``: whether it draws
    noise after the start (the comparison keeps the deterministic ones apart).
    """

    reverses: tuple[str, ...] = ("gaussian",)
    stochastic: bool = False
    #: the starting noise scale: x_T = init_noise_sigma * a prior draw (sigma_max-scale samplers set it)
    init_noise_sigma: float = 1.0
    #: classifier-free guidance (every sampler; build_sampler sets them from ``sampler.guidance_scale`` ...): w
    #: (1: conditional, 0: unconditional, > 1: guided) and Lin et al.'s rescale phi; used when sample() gets labels
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    #: the options a person tunes by hand (the sampling page's widgets for this sampler); the registry adds the
    #: guidance controls for class-conditional models
    controls: tuple[Control, ...] = ()

    def __init__(self, process, num_steps: int | None = None, clip_denoised: bool = False):
        kind = getattr(process, "kind", type(process).__name__)
        if kind not in self.reverses:
            from diffusion.samplers.registry import sampler_names  # the registry imports the sampler classes

            raise ValueError(f"sampler {type(self).__name__} is invalid for this model's forward process ({kind}): it "
                             f"reverses process={'|'.join(self.reverses)}; use sampler={'|'.join(sampler_names(kind))}")
        self.process = process
        self.clip_denoised = bool(clip_denoised)
        self.timesteps: list[int | float] = []
        self.state_times: list[float] = []
        self.set_timesteps(self.T if num_steps is None else num_steps)

    @property
    def T(self) -> int:
        return self.process.num_timesteps

    @property
    def nfe(self) -> int:
        """Network calls per sample."""
        return len(self.timesteps)

    @property
    def num_steps(self) -> int:
        """The ``num_steps`` the grid was set with (the number of solver steps; ``nfe`` may differ)."""
        return self._num_steps

    @classmethod
    def steps_for_nfe(cls, nfe: int) -> int:
        """The ``num_steps`` that costs ``nfe`` network calls (one call per step unless a family says otherwise)."""
        return check_nfe(nfe)

    def set_timesteps(self, num_steps: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_grid(self, num_steps: int, timesteps: list, state_times: list | None = None) -> None:
        """``timesteps``: the network's t at each call; ``state_times``: the paper's (1-based) t of x_T and of the
        state after each call, 0 for x_0 (default for a discrete grid: t + 1 of each call, then 0)."""
        self._num_steps = num_steps
        self.timesteps = list(timesteps)
        self.state_times = list(state_times) if state_times is not None else [t + 1 for t in self.timesteps] + [0]
        self.reset()

    def reset(self) -> None:
        """Clear multistep state (called by ``set_timesteps`` and at the start of every ``sample``)."""

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The network's input at call ``i`` from the sampler's state; at ``i = nfe``, the final image."""
        return x

    def display_state(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """What a trajectory shows of the state before call ``i`` (figures, the app's strip): the network's input
        unless a sampler says otherwise."""
        return self.scale_model_input(x, i)

    def predict_x0_eps(self, model_output: torch.Tensor, x: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) from the network's output at an input x = alpha x_0 + sigma eps (floats or tensors), under the
        process's objective; with ``clip_denoised`` x_0 is clamped to [-1, 1] and eps recomputed from it."""
        prediction, _ = self.process.split_output(model_output, x)
        x0, eps = to_x0_eps(self.process.objective, prediction, x, alpha, sigma)
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = eps_from_x0(x, x0, alpha, sigma)
        return x0, eps

    def step(self, model_output: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None) -> StepOutput:
        """The update after network call ``i`` (0-based index into :attr:`timesteps`)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _check_index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.timesteps):
            raise ValueError(f"step index {i!r} is invalid: it must be an integer in [0, {len(self.timesteps) - 1}] "
                             "(the position in sampler.timesteps)")
        return i

    def _timestep_tensor(self, t: int | float, x: torch.Tensor) -> torch.Tensor:
        """(B,) of ``t``: long for a grid timestep, float32 for a fractional one (a new tensor per call: a model
        wrapper may keep it)."""
        return torch.full((x.shape[0],), t, dtype=torch.float32 if isinstance(t, float) else torch.long, device=x.device)

    def trajectory_indices(self, points: int | None = None) -> set[int]:
        """Which states of the chain a trajectory keeps: 0 is x_T, i the state after call i (all, or ``points``
        evenly spaced ones, both ends included)."""
        n = self.nfe
        if points is None:
            return set(range(n + 1))
        if isinstance(points, bool) or not isinstance(points, int) or points < 2:
            raise ValueError(f"trajectory_points={points!r} is invalid: it must be an integer >= 2 (x_T and x_0)")
        return set(torch.linspace(0, n, min(points, n + 1)).round().long().tolist())

    def kept_times(self, points: int | None = None) -> list[str]:
        """The papers' t of each state a trajectory of ``points`` keeps (:attr:`state_times`: x_T first, 0 for x_0),
        as labels (``t=999``); a fractional t (the Karras samplers' sigmas fall between timesteps) with one decimal.
        A continuous-time process labels its own time with 3 significant digits (``sigma=80``, ``t=0.25``)."""
        times = [self.state_times[i] for i in sorted(self.trajectory_indices(points))]
        if getattr(self.process, "continuous_time", False):
            return [f"{self.process.time_name}={t:.3g}" for t in times]
        return [f"t={t:.1f}" if isinstance(t, float) and not t.is_integer() else f"t={int(t)}" for t in times]

    def initial_state(self, shape, noise: torch.Tensor | None, generator, device) -> torch.Tensor:
        """x_T = ``init_noise_sigma`` * (``noise`` or a draw from the process's prior)."""
        if noise is None:
            if shape is None:
                raise ValueError("sample() needs a shape or an initial noise tensor")
            noise = self.process.sample_prior(shape, generator, device)
        elif device is not None:
            noise = noise.to(device)
        return noise * self.init_noise_sigma if self.init_noise_sigma != 1.0 else noise

    @torch.inference_mode()
    def sample(
        self,
        model: Model,
        shape: tuple[int, ...] | None = None,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        return_trajectory: bool = False,
        progress: bool | Callable[[int, int], None] = False,
        trajectory_points: int | None = None,
        labels: torch.Tensor | None = None,
        null_label: int | None = None,
    ) -> SampleOutput:
        """Run the whole reverse chain from x_T (a prior draw, or ``noise``: the same noise gives every sampler the
        same start) and return x_0.

        ``return_trajectory`` keeps the state after every network call (and each call's predicted x_0);
        ``trajectory_points=K`` keeps only K evenly spaced states, x_T and x_0 included, so long chains fit.
        ``labels`` (B,): the classes of a class-conditional ``model`` (``model(x, t, y)``), guided at
        ``guidance_scale``; ``null_label``: its "no class" index (default ``model.num_classes``).
        """
        if labels is not None:
            model = Guided(model, labels, self.guidance_scale, self.guidance_rescale, null_label)
        elif self.guidance_scale != 1.0:
            raise ValueError(f"sampler guidance_scale={self.guidance_scale:g} needs classes to guide towards: sample a "
                             "class-conditional model with classes (or leave guidance_scale at 1)")
        x = self.initial_state(shape, noise, generator, device)
        self.reset()
        keep = self.trajectory_indices(trajectory_points) if return_trajectory else ()
        trajectory, preds = ([self.scale_model_input(x, 0).cpu()], []) if return_trajectory else (None, None)
        calls = range(self.nfe)
        report = progress if callable(progress) else None
        if progress and report is None:
            from tqdm.auto import tqdm

            calls = tqdm(calls, desc=f"{type(self).__name__} sampling", leave=False)
        for i in calls:
            out = model(self.scale_model_input(x, i), self._timestep_tensor(self.timesteps[i], x))
            x, pred_x0 = self.step(out, i, x, generator)
            if return_trajectory and i + 1 in keep:
                trajectory.append(self.display_state(x, i + 1).cpu())
                preds.append(pred_x0.cpu())
            if report is not None:
                report(i + 1, self.nfe)
        x = self.scale_model_input(x, self.nfe)
        if return_trajectory:
            return SampleOutput(x, torch.stack(trajectory), torch.stack(preds))
        return SampleOutput(x)

    def describe(self) -> str:
        """``ddim, 50 steps`` plus the settings that change what it draws (figure titles, captions)."""
        name = getattr(self, "name", None) or type(self).__name__  # the registry's name (sampler=<name>)
        text = f"{name}, {self.num_steps} steps" + ("" if self.nfe == self.num_steps else f" ({self.nfe} NFE)")
        if self.guidance_scale != 1.0:
            text += f", guidance {self.guidance_scale:g}"
        if self.guidance_rescale:
            text += f" (rescale {self.guidance_rescale:g})"
        return text

    def noise_like(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return randn(x.shape, generator, x.device, x.dtype)
