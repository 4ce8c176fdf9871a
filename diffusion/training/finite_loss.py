"""The non-finite-loss guard: a NaN or infinite loss stops the run in one line, its checkpoints kept as they were."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from diffusion.run.errors import TrainingFault


class FiniteLoss(Callback):
    """Stops training at the first non-finite training loss, before anything is saved from the diverged weights.

    Without it a diverging run (too high a learning rate, an fp16 overflow) trains on NaN to the end, exits 0, writes
    NaN checkpoints over good ones and a black final grid. The check reads the loss each training step returns.
    Reading a GPU tensor on the host waits for the GPU, so the flag stays on the device (the first step whose loss is
    not finite, updated without a sync) and is read every ``check_every_n_steps`` steps and before every validation,
    checkpoint and the end of training; the error names the first bad step whichever step reads it. ``None`` (the
    default) reads it every step in one process (free on a CPU, and no extra wait on a GPU while the progress bar
    shows the loss, which reads it every step) and every ``trainer.log_every_n_steps`` steps in DDP, where a read is
    a collective: the ranks gather their flags, so all stop together. The stop is a one-line ``TrainingFault`` (exit
    status 1) naming the step and the last checkpoint kept.
    """

    NO_STEP = torch.iinfo(torch.int64).max

    def __init__(self, check_every_n_steps: int | None = None):
        if check_every_n_steps is not None and (isinstance(check_every_n_steps, bool) or
                                                not isinstance(check_every_n_steps, int) or check_every_n_steps < 1):
            raise ValueError(f"callbacks.finite_loss.check_every_n_steps={check_every_n_steps!r} is invalid: "
                             "it must be an integer >= 1 (or null: every step in one process, every "
                             "trainer.log_every_n_steps steps in DDP)")
        self.check_every_n_steps = check_every_n_steps
        self._step = 0
        self._first_step: torch.Tensor | None = None  # on the loss's device
        self._first_loss: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step  # the step this batch's loss belongs to (the module's self.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            loss = loss.detach().float().reshape(())
            if self._first_step is None:
                self._first_step = torch.full((), self.NO_STEP, dtype=torch.int64, device=loss.device)
                self._first_loss = torch.zeros((), device=loss.device)
            new = ~torch.isfinite(loss) & (self._first_step == self.NO_STEP)
            self._first_step = torch.where(new, self._step, self._first_step)
            self._first_loss = torch.where(new, loss, self._first_loss)
        every = self.check_every_n_steps or (1 if trainer.world_size == 1 else max(1, trainer.log_every_n_steps))
        if (self._step + 1) % every == 0:
            self.check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.check(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer)

    def check(self, trainer) -> None:
        """Raise the TrainingFault if any rank's loss was not finite (a host sync; in DDP a collective)."""
        if self._first_step is None:
            return
        steps = trainer.strategy.all_gather(self._first_step).reshape(-1)
        first = int(steps.min())
        if first == self.NO_STEP:
            return
        value = float(trainer.strategy.all_gather(self._first_loss).reshape(-1)[steps.argmin()])
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or ""
        if last:
            kept = f"the last checkpoint, {last} (step {getattr(ckpt, 'last_saved_step', '?')}), is kept"
        elif trainer.ckpt_path:
            kept = f"nothing was saved since {trainer.ckpt_path}"
        else:
            kept = "no checkpoint had been written"
        raise TrainingFault(f"loss is {value} at step {first}: training stopped (try a lower optimizer.lr); {kept}")
