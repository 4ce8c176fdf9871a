"""Training callbacks: the EMA of the weights (with warm-up), and what keeps a run's work when it fails or stops:
last.ckpt at every epoch, checkpoints written atomically, a non-finite-loss guard, SIGTERM and resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.runtime import TrainingFault

log = logging.getLogger("diffusion.callbacks")


def ema_decay(step: int, decay: float, warmup_power: float | None = 2 / 3, inv_gamma: float = 1.0) -> float:
    """The EMA decay used at optimizer step ``step`` (0-based): ``min(decay, 1 - (1 + step / inv_gamma) ** -power)``.

    The warm-up of ema-pytorch and diffusers' ``EMAModel(use_ema_warmup=True)`` (after TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``): the average starts as a copy of the weights (decay 0 at step 0)
    and forgets its start quickly (0.90 after 30 steps, 0.99 after 1,000 with power 2/3), so the EMA weights of a
    short run or sweep are not its random initialisation. ``warmup_power=None``: the constant ``decay``.
    """
    if warmup_power is None:
        return decay
    return min(decay, 1.0 - (1.0 + step / inv_gamma) ** -warmup_power)


class EMA(EMAWeightAveraging):
    """Lightning's EMA weight averaging (``torch.optim.swa_utils.AveragedModel``) with warm-up and a fused update.

    The averaged weights are swapped in for validation (so sample grids show them), copied into the model when
    training ends, and saved as the checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``);
    resuming restores both. The update ``ema <- lerp(ema, w, 1 - decay_step)`` is one ``torch._foreach_lerp_``
    (no Python loop over parameters), which also leaves constant buffers such as the schedule tables bit-for-bit
    unchanged. ``decay_step`` is :func:`ema_decay` of the optimizer step, a Python float (no host sync), so a
    resumed run continues the same decay sequence.

    Args:
        decay: the decay once warmed up (0.995 for the digits default, 0.9999 for long runs).
        warmup_power: power of the warm-up (2/3 suits runs of up to ~10^5-10^6 steps, 3/4 shorter ones);
            null turns the warm-up off (the decay is constant from the first update).
        inv_gamma: the warm-up's time scale in steps (1 in ema-pytorch and diffusers).
    """

    def __init__(self, decay: float = 0.999, warmup_power: float | None = 2 / 3, inv_gamma: float = 1.0,
                 update_every_n_steps: int = 1, update_starting_at_step: int | None = None):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"callbacks.ema.decay={decay!r} is invalid: it must be a number in [0, 1]")
        if warmup_power is not None and (isinstance(warmup_power, bool) or not isinstance(warmup_power, (int, float))
                                         or warmup_power <= 0):
            raise ValueError(f"callbacks.ema.warmup_power={warmup_power!r} is invalid: it must be a number > 0 "
                             "(or null for no warm-up)")
        if isinstance(inv_gamma, bool) or not isinstance(inv_gamma, (int, float)) or inv_gamma <= 0:
            raise ValueError(f"callbacks.ema.inv_gamma={inv_gamma!r} is invalid: it must be a number > 0")
        super().__init__(
            decay=decay, update_every_n_steps=update_every_n_steps, update_starting_at_step=update_starting_at_step
        )
        self.decay, self.warmup_power, self.inv_gamma = float(decay), warmup_power, float(inv_gamma)
        self.current_decay = ema_decay(0, self.decay, warmup_power, self.inv_gamma)
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = self._lerp

    @torch.no_grad()
    def _lerp(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], _num_averaged) -> None:
        # ema + (1 - decay) (w - ema) = decay ema + (1 - decay) w; lerp with weight 1 keeps w exactly (decay 0)
        torch._foreach_lerp_(ema_params, params, 1.0 - self.current_decay)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # AveragedModel copies the weights on its first update; afterwards the decay of this optimizer step applies
        self.current_decay = ema_decay(trainer.global_step - 1, self.decay, self.warmup_power, self.inv_gamma)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    _swapped = False  # whether the EMA weights are in the model (during validation)

    def _swap_models(self, pl_module) -> None:
        super()._swap_models(pl_module)
        self._swapped = not self._swapped

    def restore_training_weights(self, pl_module) -> None:
        """Put the raw weights back into the model if validation was interrupted with the EMA weights swapped in,
        so that a checkpoint saved now (on SIGTERM) holds each set of weights under its own key."""
        if self._swapped:
            self._swap_models(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.restore_training_weights(pl_module)

    def average_state_dict(self) -> dict:
        """The EMA weights of the wrapped LightningModule (empty before fit)."""
        if self._average_model is None:
            return {}
        return self._average_model.module.state_dict()



def state_hash(state: dict) -> str:
    """SHA-256 of a state dict's names and bytes, in name order: equal hashes mean bit-for-bit equal weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RankProbe(Callback):
    """A diagnostic: each rank writes ``probe_rank<R>.json`` into the run directory when training ends: who trained
    (global rank, world size, steps, T), the hash of its EMA weights (:func:`state_hash`; equal on every rank of a
    correct DDP run) and its training throughput. Added from the command line, never by default:
    ``+callbacks.probe._target_=diffusion.callbacks.RankProbe`` (the DDP tests, experiments/gpu_check.py).

    Throughput: ``train_images`` and ``train_seconds`` count the batches after the first of each epoch, from one
    batch's end to the next (CUDA synchronised), so data-loader start-up, validation and compilation stay out."""

    def __init__(self):
        self.train_images, self.train_seconds = 0, 0.0
        self._last: tuple[int, float] | None = None  # (epoch, time) of the previous batch end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._last is not None and self._last[0] == trainer.current_epoch:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            self.train_images += int(images.shape[0])
            self.train_seconds += now - self._last[1]
        self._last = (trainer.current_epoch, now)

    def on_train_end(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if isinstance(c, EMA))
        record = {
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "T": pl_module.process.num_timesteps,
            "ema_hash": state_hash(ema.average_state_dict()),
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
            "device": str(pl_module.device),
        }
        path = Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record))

# ----------------------------------------------------------------------------------------------- checkpoints
class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``last.ckpt`` rewritten every epoch and the best score kept on resume.

    Lightning 2.6 writes ``last.ckpt`` only at a step where it also saves a top-k checkpoint, so once the monitored
    ``val/loss`` stops improving ``last.ckpt`` stays at the best epoch (a 4-epoch run ended at step 100 with
    ``last.ckpt`` at step 25). Here ``last.ckpt`` is also written after every validation and at the end of every epoch
    (also one that ``max_steps`` ends early) wherever no checkpoint of that step was written yet (``save_last=link``
    would link it to the best file: refused).

    A resumed run (``ckpt_path=``) writes into a new run directory; Lightning then drops the checkpoint's best score
    and top-k ("the dirpath has changed"), so the next epoch, however much worse, became "best". Here they are restored
    whatever the directory: a new ``best-*.ckpt`` appears only when it beats the earlier run's best, whose file stays
    where it is (Lightning removes only files in its own ``dirpath``, never the resumed checkpoint).
    """

    def __init__(self, *args, save_last: bool | None = None, **kwargs):
        if save_last not in (None, True, False):
            raise ValueError(f"callbacks.model_checkpoint.save_last={save_last!r} is invalid: true or false (last.ckpt "
                             "must hold the latest epoch, not a link to the best one)")
        super().__init__(*args, save_last=save_last, **kwargs)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else the top-k save comes at the epoch's end
            self.save_last_now(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # after this epoch's validation; also where max_steps stops a run within an epoch. (Not on_train_end: the EMA
        # callback has copied the EMA weights over the raw ones by then.)
        super().on_train_epoch_end(trainer, pl_module)
        self.save_last_now(trainer)

    def save_last_now(self, trainer) -> str | None:
        """Write ``last.ckpt`` unless a checkpoint of this very step was written already; every rank must call it (DDP:
        global rank 0 writes). Returns its path, or None without ``save_last`` or before the first step."""
        if not self.save_last:
            return None
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return self.last_model_path or None

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """Lightning's save, with a write fault on global rank 0 (``AtomicCheckpointIO``'s ``TrainingFault``: a full
        disk, non-finite weights) raised on every rank: only rank 0 writes, and without this the other ranks would
        wait in the save's barrier until the process group timed out. One broadcast per checkpoint."""
        error = None
        try:
            super()._save_checkpoint(trainer, filepath)
        except TrainingFault as err:
            error = str(err)
            trainer.strategy.barrier("Trainer.save_checkpoint")  # the barrier rank 0 skipped, where the others wait
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise TrainingFault(error)

    @property
    def last_saved_step(self) -> int:
        return self._last_global_step_saved

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            return super().load_state_dict(state_dict)
        # resumed into a new directory: the earlier run's best stays the one to beat; last.ckpt is this run's own
        self.best_model_score = state_dict["best_model_score"]
        self.best_model_path = state_dict["best_model_path"]
        self.best_k_models = state_dict.get("best_k_models", self.best_k_models)
        self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
        self.kth_value = state_dict.get("kth_value", self.kth_value)


def non_finite_weight(checkpoint: dict) -> str | None:
    """The name of the first weight in a checkpoint (``state_dict``: the EMA weights with the EMA callback;
    ``current_model_state``: the raw ones) that holds a NaN or an infinity, or None (once per checkpoint write)."""
    for key in ("state_dict", "current_model_state"):
        for name, value in (checkpoint.get(key) or {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return f"{key}.{name}"
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes every checkpoint the trainer saves (best, last, the SIGTERM one) so that a file name only ever holds a
    whole checkpoint: ``torch.save`` into a temporary file in the same folder, flush, ``fsync``, then ``os.replace``
    onto the name (atomic on POSIX) and ``fsync`` of the folder. Lightning's own save stages the file in the system
    temp folder and moves it, a copy when that is another file system, which a full disk leaves truncated.

    A write error (a full disk, a lost permission) stops the run with a one-line ``TrainingFault`` naming the file;
    the file at that name is then the previous checkpoint, byte for byte, and no temporary file is left. A checkpoint
    whose weights are not finite is refused the same way: a diverged run never replaces a good checkpoint.
    Remote paths (``s3://`` ...) go to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        bad = non_finite_weight(checkpoint)
        if bad is not None:
            raise TrainingFault(f"refusing to write checkpoint {path}: {bad} is not finite (the run diverged); "
                                "the checkpoints written before are kept")
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:  # torch.save reports the file's OSError as a RuntimeError
            cause = exc if isinstance(exc, OSError) else exc.__context__
            if not isinstance(cause, OSError):
                raise
            kept = "the previous one is unchanged" if path.exists() else "nothing was written"
            raise TrainingFault(f"could not write checkpoint {path}: {cause.strerror or cause}; {kept}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        try:  # make the rename itself durable; the checkpoint is complete either way
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------- faults
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


class ResumableRun(Callback):
    """What lets a run be stopped and continued: SIGTERM saves ``last.ckpt`` and exits 143; checkpoints name the W&B run.

    Schedulers and clusters send SIGTERM before they kill a job. Lightning then stops after the current batch with a
    ``SIGTERMException``, a ``SystemExit`` of status 0, and saves nothing. Here the run writes ``last.ckpt`` (atomically
    through ``AtomicCheckpointIO``; in DDP every rank takes part and global rank 0 writes), logs
    ``interrupted at step N; resume with ckpt_path=<last.ckpt>`` and exits with 143 (128 + SIGTERM), so that a job
    script sees it did not finish.

    Every checkpoint also records the id of the run's W&B run (``wandb_run_id``); ``diffusion.train`` gives it to the
    WandbLogger of a run resumed from that checkpoint, which then continues the same W&B run.
    """

    EXIT_CODE = 128 + signal.SIGTERM

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                checkpoint[WANDB_RUN_ID] = logger.version

    def on_exception(self, trainer, pl_module, exception) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = self.EXIT_CODE  # Lightning re-raises this SystemExit: the process exits 143, not 0
        for callback in trainer.callbacks:
            if isinstance(callback, EMA):
                callback.restore_training_weights(pl_module)
        try:
            path, failed = self._save(trainer), None
        except TrainingFault as err:
            path, failed = None, err
        if not trainer.is_global_zero:
            return
        if failed is not None:
            log.warning("interrupted at step %d; no checkpoint saved: %s", trainer.global_step, failed)
        elif path is None:
            log.warning("interrupted at step %d, before any training step: nothing to resume", trainer.global_step)
        else:
            log.warning("interrupted at step %d; resume with ckpt_path=%s", trainer.global_step, path)

    @staticmethod
    def _save(trainer) -> str | None:
        ckpt = trainer.checkpoint_callback
        if isinstance(ckpt, ModelCheckpoint) and ckpt.save_last:
            return ckpt.save_last_now(trainer)
        if trainer.global_step == 0:
            return None
        path = os.path.join(getattr(ckpt, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints"),
                            "last.ckpt")
        trainer.save_checkpoint(path)
        return path


WANDB_RUN_ID = "wandb_run_id"


def wandb_run_id(checkpoint: dict | None) -> str | None:
    """The W&B run id a checkpoint recorded (``ResumableRun``), or None."""
    run_id = checkpoint.get(WANDB_RUN_ID) if isinstance(checkpoint, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None
