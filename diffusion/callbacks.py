"""Training callbacks: exponential moving average of the weights."""

from __future__ import annotations

from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(EMAWeightAveraging):
    """Lightning's EMA weight averaging (``torch.optim.swa_utils.AveragedModel``) with a fused update.

    The averaged weights are swapped in for validation (so sample grids show them), copied into the model when
    training ends, and saved as the checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``);
    resuming restores both. The update is ``torch._foreach_lerp_`` (one fused call, not a Python loop over
    parameters), which also leaves constant buffers such as the schedule tables bit-for-bit unchanged.
    """

    def __init__(self, decay: float = 0.999, update_every_n_steps: int = 1, update_starting_at_step: int | None = None):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay={decay!r} is invalid: it must lie in [0, 1]")
        super().__init__(
            decay=decay, update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step
        )
        self.decay = decay
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(decay)

    def average_state_dict(self) -> dict:
        """The EMA weights of the wrapped LightningModule (empty before fit)."""
        if self._average_model is None:
            return {}
        return self._average_model.module.state_dict()
