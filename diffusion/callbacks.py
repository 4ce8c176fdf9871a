"""Training callbacks: the EMA of the weights (with warm-up), and what keeps a run's work when it fails or stops:
last.ckpt at every epoch, checkpoints written atomically, a non-finite-loss guard, SIGTERM, SLURM requeue and resume."""

from __future__ import annotations

from contextlib import contextmanager

import hashlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion import requeue
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
        average = self._average_model
        groups = None
        if (average is not None and average.use_buffers and int(average.n_averaged) > 0
                and trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1)):
            groups = self._pairs(average, pl_module)
        if groups is None:  # the first update (a copy), no update this step, or a layout the lean path does not take
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        # what AveragedModel.update_parameters does, without rebuilding and regrouping its tensor lists every step
        # (3 ms of the digits default's step, 0.5 ms this way): the same lerp over the same tensors
        with torch.no_grad():
            for ema_tensors, tensors in groups:
                self._lerp(ema_tensors, tensors, None)
        average.n_averaged += 1
        self._latest_update_step = trainer.global_step

    _groups = None  # ((averaged model, module), [(its tensors, the module's), one pair per device and dtype])

    def _pairs(self, average, pl_module) -> list | None:
        """The averaged model's parameters (and buffers) with the module's, grouped by device and dtype as
        AveragedModel groups them, built once per (averaged model, module): Parameter objects, not detached views,
        so that swapping their ``.data`` for validation leaves the lists valid."""
        if self._groups is None or self._groups[0] != (id(average), id(pl_module)):
            import itertools

            buffers = average.use_buffers
            ours = list(itertools.chain(average.module.parameters(), average.module.buffers() if buffers else []))
            theirs = list(itertools.chain(pl_module.parameters(), pl_module.buffers() if buffers else []))
            if len(ours) != len(theirs):
                raise RuntimeError(f"EMA: the averaged model has {len(ours)} tensors, the module {len(theirs)}")
            grouped: dict = {}
            for a, m in zip(ours, theirs):
                if a.device != m.device:  # the averaged weights on another device: Lightning's own update
                    return None
                grouped.setdefault((a.device, a.dtype, m.dtype), ([], []))
                grouped[(a.device, a.dtype, m.dtype)][0].append(a)
                grouped[(a.device, a.dtype, m.dtype)][1].append(m)
            self._groups = ((id(average), id(pl_module)), list(grouped.values()))
        return self._groups[1]

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
    """What lets a run be stopped and continued: SIGTERM saves ``last.ckpt`` and exits 143; SLURM's warning signal
    (``requeue_signals``) saves it at the next batch boundary and requeues the job; checkpoints name the W&B run and
    the SLURM job.

    Schedulers and clusters send SIGTERM before they kill a job. Lightning then stops after the current batch with a
    ``SIGTERMException``, a ``SystemExit`` of status 0, and saves nothing. Here the run writes ``last.ckpt`` (atomically
    through ``AtomicCheckpointIO``; in DDP every rank takes part and global rank 0 writes), logs
    ``interrupted at step N; resume with ckpt_path=<last.ckpt>`` and exits with 143 (128 + SIGTERM), so that a job
    script sees it did not finish.

    **Preemption and requeue.** SLURM warns a job before its time limit or a preemption with the signal of
    ``#SBATCH --signal=USR1@90`` (Lightning's convention; submitit's sbatch asks for ``USR2@90``). While training, the
    handler only notes the signal. At the end of the training step it arrived in (of an optimizer step, with
    gradient accumulation) the ranks agree that one of them got it (one all-reduce per optimizer step in DDP, where
    Lightning already synchronises every step for its SIGTERM broadcast; nothing in one process), and the run stops
    there the way SIGTERM stops it: after that batch and any validation that follows it, ``last.ckpt`` is written
    (the EMA, the optimizer, the loop counters and the train loader's place in the epoch, see
    :class:`diffusion.data.resumable.ResumableDataLoader`, so the resumed run repeats no batch and skips none). Global
    rank 0 then requeues the job: ``scontrol requeue <job id>`` (``<array job>_<task>`` for an array task), logs
    ``preempted by SIGUSR1 at step N: saved <last.ckpt>; requeued SLURM job <id>, which resumes from it``, the ranks
    wait for it, and the process exits with 128 + the signal (138 for SIGUSR1). Under the submitit launcher the
    signal's earlier handler is submitit's (``checkpoint_and_try_requeue``, which would requeue and exit in the middle
    of a step): it is replaced while training and called after the save instead of ``scontrol``, so submitit
    requeues the job (the same Hydra job again: hydra-submitit-launcher's ``checkpoint()`` resubmits the same
    arguments) and counts its timeouts as usual. Lightning's own SLURM auto-requeue is off
    (:func:`diffusion.requeue.lightning_requeue_off` says why). A signal at the last training step lets the run
    finish instead. Outside SLURM (``kill -USR1``) the run saves, logs ``interrupted ...; resume with ckpt_path=...``
    and exits the same way, without a requeue.

    Every checkpoint also records the id of the run's W&B run (``wandb_run_id``); ``diffusion.train`` gives it to the
    WandbLogger of a run resumed from that checkpoint, which then continues the same W&B run. Under SLURM it records
    the job (``slurm_job_id``): the requeued job resumes from the last.ckpt of its own run directory by itself
    (:func:`diffusion.runtime.check_resume_and_outputs`).

    Args:
        requeue_signals: the signals that mean "save, requeue and exit" (names such as SIGUSR1); [] for none.
    """

    EXIT_CODE = 128 + signal.SIGTERM
    _NOT_REQUEUE = ("SIGTERM", "SIGINT", "SIGKILL", "SIGSTOP", "SIGCHLD", "SIGSEGV")

    def __init__(self, requeue_signals: list[str] | None = ("SIGUSR1", "SIGUSR2")):
        names = list(requeue_signals or [])
        allowed = ("a list of signal names such as [SIGUSR1, SIGUSR2] (or [] for none), other than "
                   + ", ".join(self._NOT_REQUEUE))
        full = [n if isinstance(n, str) and n.upper().startswith("SIG") else f"SIG{n}" for n in names]
        if any(not isinstance(n, str) or not isinstance(getattr(signal, f.upper(), None), signal.Signals)
               or f.upper() in self._NOT_REQUEUE for n, f in zip(names, full)):
            raise ValueError(f"callbacks.resumable.requeue_signals={names!r} is invalid: it must be {allowed}")
        self.requeue_signals = [signal.Signals[f.upper()] for f in full]
        self._received: int | None = None  # the first requeue signal this process got
        self._stopping: int | None = None  # the requeue signal the run stops for (all ranks agreed), or None
        self._ignoring = False  # the signal came at the last training step: the run finishes
        self._suspended = False  # the stop waits for the validation that follows the batch
        self._previous: dict[int, object] = {}  # the handlers before training (submitit's, under its launcher)

    # ----------------------------------------------------------------------------------------------- signals
    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning registered its handlers (it restores the ones before fit when it tears down)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.requeue_signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._received is None:  # nothing else here: a handler runs between any two bytecodes of the step
            self._received = signum

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._stopping is not None or self._ignoring or not self.requeue_signals:
            return
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if not (last_batch or (batch_idx + 1) % trainer.accumulate_grad_batches == 0):
            return  # gradients accumulated for the next optimizer step would be lost
        received = self._received is not None
        if trainer.world_size > 1:  # same batch on every rank: stop together if any rank got the signal
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        signum = self._received or self.requeue_signals[0]
        if self._fit_ends_here(trainer, last_batch):
            self._ignoring = True
            if trainer.is_global_zero:
                log.warning("%s at step %d, the last training step: the run finishes instead of being requeued",
                            signal.Signals(signum).name, trainer.global_step)
            return
        self._stopping = signum
        # the flag Lightning's SIGTERM handler sets: it stops after this batch (and its validation) on every rank
        trainer._signal_connector.received_sigterm = True

    @staticmethod
    def _fit_ends_here(trainer, last_batch: bool) -> bool:
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            return True
        return last_batch and trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._stopping is not None and trainer._signal_connector.received_sigterm and not self._suspended:
            # Lightning would stop the validation after its first batch: let it finish, then stop
            self._suspended = True
            trainer._signal_connector.received_sigterm = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._suspended:
            self._suspended = False
            trainer._signal_connector.received_sigterm = True

    # ----------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.version:
                checkpoint[WANDB_RUN_ID] = logger.version
        job = requeue.slurm_job_id()
        if job is not None:
            checkpoint[requeue.JOB_ID_KEY] = job

    def on_exception(self, trainer, pl_module, exception) -> None:
        if not isinstance(exception, SIGTERMException):
            self._restore_handlers()
            return
        requeue_signal = self._stopping
        exception.code = self.EXIT_CODE if requeue_signal is None else 128 + requeue_signal
        for callback in trainer.callbacks:
            if isinstance(callback, EMA):
                callback.restore_training_weights(pl_module)
        try:
            path, failed = self._save(trainer), None
        except TrainingFault as err:
            path, failed = None, err
        if requeue_signal is not None:
            code = self._requeue(trainer, requeue_signal, path, failed)
            if code is not None:
                exception.code = code
            self._restore_handlers()
            return
        self._restore_handlers()
        if not trainer.is_global_zero:
            return
        if failed is not None:
            log.warning("interrupted at step %d; no checkpoint saved: %s", trainer.global_step, failed)
        elif path is None:
            log.warning("interrupted at step %d, before any training step: nothing to resume", trainer.global_step)
        else:
            log.warning("interrupted at step %d; resume with ckpt_path=%s", trainer.global_step, path)

    def _requeue(self, trainer, signum: int, path: str | None, failed: Exception | None) -> int | None:
        """After the save: global rank 0 requeues the job (submitit's handler, else ``scontrol requeue``) and logs one
        line; every rank waits for it. Returns the exit status submitit's handler chose, or None."""
        name, step, code = signal.Signals(signum).name, trainer.global_step, None
        if requeue.slurm_job_id() is not None and threading.current_thread() is threading.main_thread():
            # a requeue ends the running job with SIGTERM (then SIGKILL): the run only exits from here on, so SIGTERM
            # must not start Lightning's own stop (a collective in DDP) in the middle of it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # the rows logged so far reach their files before the job is ended
                logger.save()
            if failed is not None:
                log.warning("preempted by %s at step %d; no checkpoint saved, so the job is not requeued: %s",
                            name, step, failed)
            else:
                code = self._hand_over(signum, name, step, path)
        trainer.strategy.barrier("ResumableRun.requeue")  # no rank exits before rank 0 requeued (srun may kill it)
        return code

    def _hand_over(self, signum: int, name: str, step: int, path: str | None) -> int | None:
        saved = f"saved {path}" if path else "nothing to save before the first training step"
        previous = self._previous.get(signum)
        if callable(previous):  # submitit's handler: it requeues the job (and counts its timeouts) itself
            who = getattr(getattr(previous, "__self__", None), "__module__", "") or getattr(previous, "__module__", "")
            log.warning("preempted by %s at step %d: %s; handing over to %s's handler, which requeues the job",
                        name, step, saved, who.split(".")[0] or "the earlier")
            try:
                previous(signum, None)
            except SystemExit as exit_:
                return exit_.code if isinstance(exit_.code, int) else 1
            except Exception as err:  # noqa: BLE001 - submitit's "not requeued because ..." is reported, not raised
                log.warning("the job was not requeued: %s", " ".join(str(err).split()))
            return None
        job = requeue.slurm_job_id()
        if job is None:
            if path:
                log.warning("interrupted by %s at step %d; resume with ckpt_path=%s", name, step, path)
            else:
                log.warning("interrupted by %s at step %d, before any training step: nothing to resume", name, step)
            return None
        error = requeue.requeue(job)
        if error is None:
            log.warning("preempted by %s at step %d: %s; requeued SLURM job %s, which resumes from it", name, step,
                        saved, job)
        else:
            log.warning("preempted by %s at step %d: %s, but SLURM job %s was not requeued (%s)%s", name, step, saved,
                        job, error, f"; resume with ckpt_path={path}" if path else "")
        return None

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
