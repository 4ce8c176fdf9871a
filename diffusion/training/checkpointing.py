"""Checkpoints that survive faults: last.ckpt at every epoch and at the run's last, each file written atomically
(never half-written, the previous one kept), and a checkpoint with non-finite weights refused."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO

from diffusion.run.errors import TrainingFault


def _last_epoch(trainer) -> bool:
    """Whether the epoch now ending is the run's last: ``max_epochs`` or ``max_steps`` reached, or a stop requested."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    return (bool(trainer.should_stop) or (max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs)
            or (max_steps not in (None, -1) and trainer.global_step >= max_steps))


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``last.ckpt`` rewritten every ``every_n_epochs`` epochs and at the run's
    last epoch, and the best score kept on resume.

    Lightning 2.6 writes ``last.ckpt`` only at a step where it also saves a top-k checkpoint, so once the monitored
    ``val/loss`` stops improving ``last.ckpt`` stays at the best epoch (a 4-epoch run ended at step 100 with
    ``last.ckpt`` at step 25). Here ``last.ckpt`` is also written after the validation and at the end of every
    ``every_n_epochs``-th epoch, and of the last one (``max_epochs``, an epoch that ``max_steps`` ends early, a
    requested stop) whatever N, wherever no checkpoint of that step was written yet (``save_last=link`` would link it
    to the best file: refused). The top-k check runs at the same epochs. A SIGTERM or requeue signal saves
    ``last.ckpt`` at once (``ResumableRun``), so a larger N costs only what a ``kill -9`` interrupts.

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

    def _due(self, trainer) -> bool:
        """Whether this epoch saves: every ``every_n_epochs``-th epoch, and the run's last epoch whatever N."""
        every = self._every_n_epochs
        return every >= 1 and ((trainer.current_epoch + 1) % every == 0 or _last_epoch(trainer))

    @contextmanager
    def _every_epoch_if_last(self, trainer):
        """Lightning's top-k check runs when (epoch + 1) % every_n_epochs == 0; at the run's last epoch, whatever N."""
        every = self._every_n_epochs
        if every > 1 and self._due(trainer):
            self._every_n_epochs = 1
        try:
            yield
        finally:
            self._every_n_epochs = every

    def on_validation_end(self, trainer, pl_module) -> None:
        with self._every_epoch_if_last(trainer):
            super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer) and self._due(trainer):  # else at the epoch's end
            self.save_last_now(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # after this epoch's validation; also where max_steps stops a run within an epoch. (Not on_train_end: the EMA
        # callback has copied the EMA weights over the raw ones by then.)
        with self._every_epoch_if_last(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        if self._due(trainer):
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
