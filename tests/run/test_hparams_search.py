"""Optuna searches (issue #14, item 4): ``python -m diffusion.train -m hparams_search=digits_optuna`` runs its
trials as Hydra jobs, the sweeper's optimization_results.yaml holds the best of their final val/loss, the report
names that trial (one subprocess, ~25 s). In-process, with ``train`` faked: a failed or NaN trial is named and the
study goes on; a search space naming a key no config has is refused before the study starts. A finished search's
directory is refused; a DDP rank of a trial runs that trial, not a search."""

import json
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from diffusion.report import report
from diffusion.train import CONFIG_DIR
from tests.conftest import FAST

#: the search of conf/hparams_search/digits_optuna.yaml, with the widths narrowed from the command line (speed)
WIDTHS = [8, 16]
SEARCH = ["hparams_search=digits_optuna", "hydra.sweeper.n_trials=3", f"model.base_channels=choice({','.join(map(str, WIDTHS))})"]
QUIET = ["logger=none", "module.sample_every_n_epochs=0", "final_samples=false"]


def expected_trials(n: int) -> list[dict]:
    """The parameters Optuna's TPE sampler with the preset's seed suggests for the first ``n`` trials, asked here
    with the preset's search space written out by hand (in the preset's order: each suggestion draws in turn)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1234, n_startup_trials=10))
    trials = []
    for _ in range(n):
        trial = study.ask()
        trials.append({
            "optimizer.lr": trial.suggest_float("optimizer.lr", 0.0002, 0.01, log=True),
            "callbacks.ema.decay": trial.suggest_categorical("callbacks.ema.decay", [0.99, 0.995, 0.999]),
            "model.base_channels": trial.suggest_categorical("model.base_channels", WIDTHS),
        })
        study.tell(trial, 1.0)
    return trials


def test_a_three_trial_search_finds_and_reports_its_best_trial(train_cli, tmp_path, capsys):
    sweep = tmp_path / "search"
    fast = [o for o in FAST if not o.startswith("model.base_channels=")]
    proc = train_cli("-m", *SEARCH, *fast, *QUIET, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.output[-3000:]
    assert "setup plugin" not in proc.output, "alembic's import-time log lines must be silenced"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"]

    trials = []
    for job in jobs:
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text()))
        params = {k: yaml.safe_load(overrides[k]) for k in ("optimizer.lr", "callbacks.ema.decay", "model.base_channels")}
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert (config["optimizer"]["lr"], config["callbacks"]["ema"]["decay"], config["model"]["base_channels"]) \
            == tuple(params.values()), "the trial's parameters must reach its run"
        loss = json.loads((sweep / job / "metrics.json").read_text())["metrics"]["val/loss"]
        trials.append((params, loss))
    # the seed in the preset fixes the suggestions: the same as Optuna's own sampler with that seed gives
    assert [p for p, _ in trials] == expected_trials(3)

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best_job = min(range(3), key=lambda i: trials[i][1])
    assert results["best_value"] == trials[best_job][1], "Optuna must get each trial's final val/loss"
    assert results["best_params"] == trials[best_job][0]

    out = report(sweep)
    printed = capsys.readouterr().out
    assert out["best"]["job"] == str(best_job)
    assert f"| {best_job} (best) |" in printed
    params = " ".join(f"{k}={v}" for k, v in trials[best_job][0].items())
    assert f"best: trial {best_job} val/loss={trials[best_job][1]:.5g} params {params}" in printed


@pytest.fixture
def search_in_process(monkeypatch, tmp_path):
    """Run ``python -m diffusion.train <overrides>`` in this process, Hydra, the Optuna sweeper and main's error
    handling as they are, with ``train`` replaced by ``fake_train(cfg) -> metrics`` (no training: seconds, not
    minutes). Hydra's global state (its config singletons, the root logger's handlers) is put back afterwards."""
    import logging

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import diffusion.train

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(fake_train, *overrides: str) -> None:
        monkeypatch.setattr(diffusion.train, "train", fake_train)
        monkeypatch.setattr("sys.argv", ["train", *overrides])
        diffusion.train.main()

    yield run
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_failed_trial_is_named_and_the_search_goes_on(search_in_process, tmp_path, capsys):
    from diffusion.run.errors import TrainingFault
    from diffusion.run.jobs import sweep_job_number

    def fake_train(cfg):
        job = sweep_job_number()
        if job == 1:
            raise TrainingFault("loss is nan at step 3: training stopped")
        return {"val/loss": float("nan") if job == 2 else cfg.optimizer.lr, "train/loss_epoch": 1.0}

    sweep = tmp_path / "search"
    search_in_process(fake_train, "-m", *SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}")
    out = capsys.readouterr()
    assert "error: job 1: loss is nan at step 3: training stopped" in out.err.splitlines()
    assert "Failed experiment: loss is nan at step 3" in out.out
    # a NaN handed to the sweeper would end the study (hydra-optuna-sweeper 1.3 tells Optuna FAIL with the value)
    assert "error: job 2: optimized_metric val/loss=nan when training ended" in out.err
    assert "Failed experiment: optimized_metric val/loss=nan" in out.out
    lrs = [trial["optimizer.lr"] for trial in expected_trials(4)]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == min(lrs[0], lrs[3]), "the best of the trials that finished, main's return value"


def test_a_typo_in_the_search_space_is_refused_before_the_study(search_in_process, tmp_path, capsys):
    preset = (Path(CONFIG_DIR) / "hparams_search" / "digits_optuna.yaml").read_text()
    assert "  callbacks.ema.decay: " in preset
    (tmp_path / "conf" / "hparams_search").mkdir(parents=True)
    (tmp_path / "conf" / "hparams_search" / "typo.yaml").write_text(preset.replace("  callbacks.ema.decay: ", "  callbacks.ema.decy: "))

    def fake_train(cfg):
        raise AssertionError("no trial may start")

    sweep = tmp_path / "search"
    with pytest.raises(SystemExit) as info:
        search_in_process(fake_train, "-m", "hparams_search=typo", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                          f"hydra.sweep.dir={sweep}")
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "error: sweep: callbacks.ema.decy is not a key of the config; "
        "the keys of callbacks.ema: _target_, decay, warmup_power, inv_gamma\n")
    assert not sweep.exists()


def compose_search(*overrides: str):
    return compose(config_name="config", overrides=["hparams_search=digits_optuna", *overrides], return_hydra_config=True)


def test_a_search_into_a_finished_search_is_refused(tmp_path, capsys):
    sweep = tmp_path / "search"
    sweep.mkdir()
    (sweep / "optimization_results.yaml").write_text("name: optuna\nbest_value: 0.5\n")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose_search(f"hydra.sweep.dir={sweep}")
        with pytest.raises(SystemExit) as info:
            instantiate(cfg.hydra.callbacks.output_dir).on_multirun_start(config=cfg)
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: hydra.sweep.dir={sweep} holds an earlier sweep (optimization_results.yaml)")
    assert (sweep / "optimization_results.yaml").read_text() == "name: optuna\nbest_value: 0.5\n"


def test_a_ddp_rank_of_a_trial_runs_the_trial_not_a_search(monkeypatch, tmp_path):
    """Lightning re-launches DDP ranks 1.. as ``python -m diffusion.train <sys.argv[1:]> hydra.run.dir=<job>``; the
    trial's overrides hold hparams_search=..., whose hydra.mode: MULTIRUN would make each rank start a study."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from diffusion.run.ddp import prepare_ddp_relaunch

    trial = ["optimizer.lr=0.001", "callbacks.ema.decay=0.99", "model.base_channels=8", "hparams_search=digits_optuna"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        job = compose_search(*trial[:3])
        assert job.hydra.mode == RunMode.MULTIRUN
        with open_dict(job):
            job.hydra.overrides.task = trial
            job.hydra.runtime.output_dir = str(tmp_path / "search" / "0")
        monkeypatch.setattr("sys.argv", ["train", "-m", "hparams_search=digits_optuna", "hydra.sweeper.n_trials=3"])
        HydraConfig.instance().set_config(job)
        try:
            prepare_ddp_relaunch()
        finally:
            HydraConfig.instance().cfg = None
        rank = compose(config_name="config", overrides=[*sys.argv[1:], f"hydra.run.dir={tmp_path / 'search' / '0'}"],
                       return_hydra_config=True)
    assert rank.hydra.mode == RunMode.RUN, "a re-launched rank would start a search of its own"
    assert (rank.optimizer.lr, rank.model.base_channels) == (0.001, 8)
