"""What a sweep (``-m``) needs beyond Hydra's own sweepers (the job's number is :func:`diffusion.run.jobs.sweep_job_number`): the objective a search optimises, and
``SweepCheck``, which composes a sweep's first job before any job starts (enabled in conf/hydra/default.yaml)."""

from __future__ import annotations

import logging
import sys

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from diffusion.run.errors import TrainingFault
from diffusion.run.jobs import sweep_job_number

log = logging.getLogger("diffusion")


def sweep_objective(metrics: dict[str, float], metric: str) -> float | None:
    """What ``main`` returns to the sweeper: ``metrics[metric]``, the last logged value (val/loss: the last
    validation's mean, with the EMA weights). In a sweep, a value that is not a number fails the job (a
    TrainingFault naming it, handled as in :func:`diffusion.run.errors.exits_on_usage_error`): hydra-optuna-sweeper 1.3 would tell
    Optuna FAIL together with the NaN, which Optuna refuses, and that error would end the whole study with a
    traceback. A metric that was not logged is warned about."""
    import math

    value = metrics.get(metric)
    if sweep_job_number() is not None:
        if value is None:  # the Optuna sweeper records the trial as failed: "Return value must be float-castable"
            log.warning("optimized_metric=%s was not logged by this run (logged: %s)", metric, ", ".join(sorted(metrics)))
        elif math.isnan(value):
            raise TrainingFault(f"optimized_metric {metric}=nan when training ended: this job failed (its weights "
                                "diverged; try a lower optimizer.lr)")
    return value


class SweepCheck(HydraCallback):
    """Compose the first job of a sweep before any job starts, so that a key no config has (a typo in
    ``hydra.sweeper.params``, an Optuna search space, or a swept command-line key) stops the sweep in one line,
    exit status 2, naming the key and the keys allowed there. Hydra's launcher composes each job only when it
    starts it (after the study is created), with a multi-line error. Enabled in conf/hydra/default.yaml.

    The first job: each swept key takes one value (a choice's first, an interval's low end), the command line's
    value of a key replacing the one in ``hydra.sweeper.params``, as in the sweepers. Values are not judged here:
    each job's own checks refuse a bad one.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self._check_storage(OmegaConf.select(config, "hydra.sweeper.storage"))
        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        lines = [f"{key}={value}" for key, value in params.items()]
        lines += list(OmegaConf.to_container(config.hydra.overrides.task))
        parser = OverridesParser.create()
        first_job: dict[str, str] = {}
        for line in lines:
            try:
                (override,) = parser.parse_overrides([line])
            except Exception as err:  # noqa: BLE001 - reported as one line naming the override
                self._refuse(f"{line} is not a valid override: {_one_line(err)}")
            try:
                first_job[override.get_key_element()] = self._one_value(override)
            except Exception:  # noqa: BLE001 - a sweep this check cannot pick from (glob): the launcher will judge
                return
        try:
            GlobalHydra.instance().config_loader().load_sweep_config(config, list(first_job.values()))
        except Exception as err:  # noqa: BLE001 - Hydra's composition error, on one line
            groups = set(config.hydra.runtime.choices)  # model=unet picks a config file: not a key
            bad = [k for k in first_job if k[:1] not in "+~" and "@" not in k and k not in groups
                   and OmegaConf.select(config, k, default=_ABSENT) is _ABSENT]
            if bad:
                parent = bad[0].rpartition(".")[0]
                node = OmegaConf.select(config, parent) if parent else config
                allowed = f"; the keys of {parent or 'the config'}: {', '.join(map(str, node))}" \
                    if isinstance(node, DictConfig) else ""
                self._refuse(f"{bad[0]} is not a key of the config{allowed}")
            self._refuse(_one_line(err))

    @classmethod
    def _check_storage(cls, storage) -> None:
        """Optuna 2.x's RDB storage (the only one hydra-optuna-sweeper 1.3 can use) fails on SQLAlchemy 2 with a bare
        AssertionError once the study is created; refuse it first."""
        if not isinstance(storage, str):
            return
        from importlib.metadata import PackageNotFoundError, version

        try:
            optuna, sqlalchemy = version("optuna"), version("sqlalchemy")
        except PackageNotFoundError:
            return
        if int(optuna.split(".")[0]) < 3 and int(sqlalchemy.split(".")[0]) >= 2:
            cls._refuse(f"hydra.sweeper.storage={storage}: Optuna {optuna}'s RDB storage needs SQLAlchemy < 2 (installed: "
                        f'{sqlalchemy}): pip install "sqlalchemy<2" "alembic<1.14", or keep the study in memory '
                        "(hydra.sweeper.storage=null)")

    @staticmethod
    def _one_value(override) -> str:
        key = override.get_key_element()
        if not override.is_sweep_override():
            return override.input_line  # as typed: quoting kept
        if override.is_interval_sweep():
            return f"{key}={override.value().start}"
        return f"{key}={next(iter(override.sweep_string_iterator()))}"

    @staticmethod
    def _refuse(message: str) -> None:
        print(f"error: sweep: {message}", file=sys.stderr)
        sys.exit(2)


_ABSENT = object()


def _one_line(err: Exception) -> str:
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
