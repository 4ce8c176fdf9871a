"""A run that stops and continues: SIGTERM or SLURM's warning signal saves last.ckpt at a step boundary (agreed by
all ranks), then requeues; resuming continues the same W&B run."""

from __future__ import annotations

import logging
import os
import signal
import threading

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion.run import cluster, requeue
from diffusion.run.errors import TrainingFault
from diffusion.training.checkpointing import ModelCheckpoint
from diffusion.training.ema import EMA

log = logging.getLogger("diffusion.training.resumable")


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
    (:func:`diffusion.run.requeue.lightning_requeue_off` says why). A signal at the last training step lets the run
    finish instead. Outside SLURM (``kill -USR1``) the run saves, logs ``interrupted ...; resume with ckpt_path=...``
    and exits the same way, without a requeue.

    Every checkpoint also records the id of the run's W&B run (``wandb_run_id``); ``diffusion.train`` gives it to the
    WandbLogger of a run resumed from that checkpoint, which then continues the same W&B run. Under SLURM it records
    the job (``slurm_job_id``): the requeued job resumes from the last.ckpt of its own run directory by itself
    (:func:`diffusion.run.outputs.check_resume_and_outputs`).

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
        job = cluster.slurm_job_id()
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
        if cluster.slurm_job_id() is not None and threading.current_thread() is threading.main_thread():
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
        job = cluster.slurm_job_id()
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
