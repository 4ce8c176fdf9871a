"""The two ways a run stops early, and how a CLI reports them: :class:`UsageError` (a bad setting, found before any
work: one line, exit 2) and :class:`TrainingFault` (a fault during the work: one line, exit 1)."""

from __future__ import annotations

import sys

from omegaconf.errors import MissingMandatoryValue

from diffusion.checks import root_cause
from diffusion.run.jobs import hydra_job, sweep_job_number


class UsageError(Exception):
    """A bad setting or input found before any work starts; the CLI prints it as one line and exits 2."""


class TrainingFault(Exception):
    """A fault that stops a run during the work (a non-finite loss, a checkpoint that cannot be written); the CLI
    prints it as one line and exits 1. Checkpoints written before it are kept as they were."""


def build_or_usage_error(what: str, fn):
    """Run a constructor; a bad value becomes a one-line UsageError.

    The package's ValueErrors already name the setting ("schedule T=0 is invalid: ..."); other errors a bad value
    can cause (a TypeError for a list given as a number, say) are prefixed with the config groups involved.
    """
    try:
        return fn()
    except UsageError:
        raise
    except MissingMandatoryValue as exc:
        raise UsageError(f"{exc.full_key} is required: pass {exc.full_key}=<value>") from exc
    except Exception as exc:  # noqa: BLE001
        cause = root_cause(exc)
        if isinstance(cause, ValueError):
            raise UsageError(str(cause)) from exc
        if isinstance(cause, (TypeError, KeyError)):
            raise UsageError(f"{what}: {type(cause).__name__}: {cause}") from exc
        if type(cause).__name__ == "MisconfigurationException":  # Lightning's refusal of a setting (trainer.*)
            raise UsageError(f"{what}: {cause}") from exc
        raise


def exits_on_usage_error(fn):
    """CLI entry points: a UsageError becomes one line on stderr and exit status 2 (no traceback), and so does a
    PermissionError (a folder or file the run may not write or read: it names the path); a TrainingFault (a
    fault during training: NaN loss, full disk) one line and exit status 1.

    In a job of a sweep (``-m``) the line names the job. A sweeper that lets jobs fail (``hydra.sweeper.
    max_failure_rate`` > 0: the Optuna sweeper of conf/hparams_search/) gets the error raised on: Hydra records the
    job as failed, the sweeper marks the trial FAIL and the study goes on. Otherwise (Hydra's basic sweeper) the
    first failed job ends the sweep, as a single run ends."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UsageError, TrainingFault) as err:
            job = sweep_job_number()
            print(f"error: {'' if job is None else f'job {job}: '}{err}", file=sys.stderr)
            if job is not None and (hydra_job().sweeper.get("max_failure_rate") or 0) > 0:
                raise  # to the sweeper, which records this job (trial) as failed and goes on
            sys.exit(2 if isinstance(err, UsageError) else 1)
        except PermissionError as err:
            print(f"error: permission denied on {err.filename or err}: choose paths this user may write "
                  "(hydra.run.dir, paths.cache_dir) and read (data.root, ckpt / ckpt_path)", file=sys.stderr)
            sys.exit(2)

    return wrapper
