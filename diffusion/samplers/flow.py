"""Samplers of process=flow (:mod:`diffusion.processes.flow`): the ODE dx/dt = v(x, t) integrated from t = 1
(x ~ N(0, I)) to t = 0 on the flow's own t grid.

The grid: u_i = 1 - i / N (i = 0..N), shifted as training was, t_i = shift u_i / (1 + (shift - 1) u_i) (Esser et al.
2024, section 5.3.2; ``shift`` null: the process's). The network is called at 1000 t_i (the process's time input);
x_0 predicted at a call is x - t v.

- :class:`FlowEulerSampler`: x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i) (diffusers' FlowMatchEulerDiscreteScheduler,
  given the same grid); one call per step.
- :class:`FlowHeunSampler`: Heun's trapezoidal correction at t_{i+1} (diffusers' FlowMatchHeunDiscreteScheduler);
  Euler on the last step, to t = 0, where an x0 network's velocity (x - x_0) / t is undefined: N steps, 2N - 1 calls.
"""

from __future__ import annotations

import torch

from diffusion.samplers.base import Sampler, StepOutput, TwoCallsPerStep, check_num_steps, check_number

__all__ = ["FlowSampler", "FlowEulerSampler", "FlowHeunSampler"]


class FlowSampler(Sampler):
    """The shared part: the shifted t grid, the velocity and the predicted x_0 of a call."""

    reverses = ("flow",)

    def __init__(self, process, num_steps: int | None = 20, shift: float | None = None, clip_denoised: bool = False):
        self.shift_override = None if shift is None else check_number("shift", shift, 0.0, low_open=True)
        super().__init__(process, num_steps=num_steps, clip_denoised=clip_denoised)

    @property
    def shift(self) -> float:
        return self.process.shift if self.shift_override is None else self.shift_override

    def set_timesteps(self, num_steps: int) -> None:
        from diffusion.processes.flow import shift_time

        check_num_steps(num_steps, self.T, continuous=True)
        #: the solver's grid: t_0 = 1 > ... > t_N = 0
        self.times: list[float] = [shift_time(1 - i / num_steps, self.shift) for i in range(num_steps + 1)]
        self.times[-1] = 0.0
        self.call_times: list[float] = self._calls(num_steps)
        timesteps = [float(self.process.network_time(t)) for t in self.call_times[:-1]]
        self._set_grid(num_steps, timesteps, list(self.call_times))

    def _calls(self, num_steps: int) -> list[float]:
        """The t of each network call, then 0 (one call per step by default)."""
        return list(self.times)

    def velocity(self, model_output: torch.Tensor, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, x_0 = x - t v) at call i; with ``clip_denoised`` x_0 is clamped to [-1, 1] and v = (x - x_0) / t."""
        t = self.call_times[i]
        v = self.process.velocity(model_output, x, t)
        x0 = self.process.x0_of(v, x, t)
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            v = (x - x0) / t
        return v, x0

    def _call(self, model_output: torch.Tensor, i: int, x: torch.Tensor):
        """(i, t, t_next, v, x_0) of call i: what each step starts from."""
        i = self._check_index(i)
        v, x0 = self.velocity(model_output, x, i)
        return i, self.call_times[i], self.call_times[i + 1], v, x0

    def describe(self) -> str:
        return super().describe() + (f", shift {self.shift:g}" if self.shift != 1 else "")


class FlowEulerSampler(FlowSampler):
    """Euler's method on dx/dt = v: x_{i+1} = x_i + (t_{i+1} - t_i) v_i; the last step (to t = 0) returns x - t v,
    the predicted x_0, itself."""

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i, t, t_next, v, x0 = self._call(model_output, i, x)
        if t_next == 0:
            return StepOutput(x0, x0)
        return StepOutput(x + (t_next - t) * v, x0)


class FlowHeunSampler(TwoCallsPerStep, FlowSampler):
    """Heun's method: the Euler step x' = x_i + (t_{i+1} - t_i) v_i, then x_{i+1} = x_i + (t_{i+1} - t_i)
    (v_i + v(x', t_{i+1})) / 2; Euler on the last step. Each network call is one entry of ``timesteps``."""

    def _calls(self, num_steps: int) -> list[float]:
        times = self.times
        calls, self._is_correction = [], []
        for k in range(num_steps):
            calls.append(times[k])
            self._is_correction.append(False)
            if times[k + 1] > 0:
                calls.append(times[k + 1])
                self._is_correction.append(True)
        return calls + [0.0]

    def reset(self) -> None:
        """Forget the Euler half-step (x_i, v_i) kept for the correction."""
        self._x = self._v = None

    def step(self, model_output, i, x, generator=None) -> StepOutput:
        i, t, t_next, v, x0 = self._call(model_output, i, x)
        if t_next == 0:
            return StepOutput(x0, x0)
        if not self._is_correction[i]:
            self._x, self._v = x, v
            return StepOutput(x + (t_next - t) * v, x0)
        if self._x is None:
            raise ValueError(f"step index {i} is a Heun correction: call step({i - 1}) first (or sample())")
        t_prev = self.call_times[i - 1]
        x_next = self._x + (t - t_prev) * (0.5 * (self._v + v))
        self._x = self._v = None
        return StepOutput(x_next, x0)
