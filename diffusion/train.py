"""Train a diffusion model: ``python -m diffusion.train [overrides]`` (Hydra; ``-m`` for sweeps).

The composition root only: read the config, build the data, module, callbacks, loggers and trainer, fit, and
draw the final sample grid with the EMA weights. Everything it builds is a class named by ``_target_`` in conf/.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion.run import preflight, requeue
from diffusion.run.cluster import adopt_submitit_local_ranks, require_launcher_plugin
from diffusion.run.config import CONFIG_DIR, instantiate_group, resolved_config, save_run_config
from diffusion.run.ddp import prepare_ddp_relaunch, share_run_stamp
from diffusion.run.errors import build_or_usage_error, exits_on_usage_error
from diffusion.run.jobs import is_rank_zero, job_names
from diffusion.run.outputs import check_resume_and_outputs, write_text_atomic
from diffusion.run.sweeps import sweep_objective
from diffusion.run.wandb_runs import configure_wandb_mode

if TYPE_CHECKING:  # torch, Lightning and the module load once the configuration has passed preflight.check_config
    from diffusion.training.module import DiffusionModule

log = logging.getLogger("diffusion.train")



def conditioning(model: dict, num_classes: int | None, class_names: list[str] | None) -> dict:
    """The network's ``num_classes`` from the data's (``data.conditional=true``), as channels and image size are;
    ValueError (one line) for a ``model.num_classes`` the data cannot feed."""
    asked = model.get("num_classes")
    if num_classes is None and asked is not None:
        raise ValueError(f"model.num_classes={asked} is invalid without data.conditional=true (the batches carry no "
                         "labels): pass data.conditional=true and leave model.num_classes null, it follows the data")
    if num_classes is not None and asked is not None and asked != num_classes:
        raise ValueError(f"model.num_classes={asked} is invalid: the data has {num_classes} classes "
                         f"({', '.join(map(str, (class_names or [])[:10]))}); leave it null, it follows the data")
    return {**model, "num_classes": num_classes} if num_classes is not None or "num_classes" in model else model


def build_module(cfg: DictConfig, channels: int, image_size: int, num_classes: int | None = None,
                 class_names: list[str] | None = None, init_from: DiffusionModule | None = None) -> DiffusionModule:
    """The LightningModule from plain dicts; the network's in_channels, image_size and (conditional data)
    num_classes follow the data. ``init_from`` (fine-tuning): its network, schedule and process, and its weights; this
    run's data, optimizer, sampler, module and speed settings."""
    from diffusion.training.module import DiffusionModule

    model = {**OmegaConf.to_container(cfg.model, resolve=True), "in_channels": channels, "image_size": image_size}
    schedule, process = OmegaConf.to_container(cfg.schedule, resolve=True), OmegaConf.to_container(cfg.process, resolve=True)
    if init_from is not None:
        model = init_network(cfg, init_from, model, channels, image_size)
        schedule, process = dict(init_from.hparams.schedule), dict(init_from.hparams.process)
    model = conditioning(model, num_classes, class_names)
    module = DiffusionModule(
        model=model,
        schedule=schedule,
        sampler=OmegaConf.to_container(cfg.sampler, resolve=True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        process=process,
        seed=cfg.seed,
        data=OmegaConf.to_container(cfg.data, resolve=True) if "data" in cfg else None,
        class_names=class_names if num_classes is not None else None,
        **OmegaConf.to_container(cfg.module, resolve=True),
    )
    if init_from is not None:
        module.load_state_dict(init_from.state_dict())  # the same network and process: every tensor fits
    return module


def init_network(cfg: DictConfig, source: DiffusionModule, model: dict, channels: int, image_size: int) -> dict:
    """The network config of a fine-tuning run (``init_from``): the source's, with this run's speed switches;
    ValueError (one line) when the data's images are not the size and channels it was trained on."""
    from diffusion.models.settings import SPEED_KEYS

    theirs = dict(source.hparams.model)
    if (theirs.get("in_channels"), theirs.get("image_size")) != (channels, image_size):
        raise ValueError(f"init_from={cfg.init_from} was trained on {theirs.get('in_channels')}-channel "
                         f"{theirs.get('image_size')} px images, and this run's data gives {channels}-channel {image_size} px "
                         "ones: pass the data (data.image_size, data.channels) it was trained on")
    return {**theirs, **{k: model[k] for k in SPEED_KEYS if k in model}}


def build_loggers(cfg: DictConfig, resume_run_id: str | None = None) -> list:
    """The configured loggers; ``resume_run_id`` (the W&B run of the ``ckpt_path`` checkpoint) continues that run."""
    configure_wandb_mode(cfg)
    group, name = job_names()
    loggers = cfg.get("logger") or {}
    for conf in loggers.values():
        if conf is not None and "WandbLogger" in str(conf.get("_target_", "")):
            if conf.get("group") is None and group is not None:
                conf.group = group
            if conf.get("name") is None:
                conf.name = name
            run_id = resume_run_id if group is None else None
            if run_id and conf.get("id") is None:  # resume (not a sweep's jobs): continue the checkpoint's W&B run
                with open_dict(conf):
                    conf.id = run_id
    return instantiate_group(loggers, "logger")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; returns the final logged metrics."""
    started = time.perf_counter()
    adopt_submitit_local_ranks()  # a submitit local job's tasks are its DDP ranks (as SLURM's are)
    requeued = check_resume_and_outputs(cfg)  # a requeued SLURM job: ckpt_path is now its own last.ckpt
    preflight.check_config(cfg)  # what needs no torch, refused before the heavy imports below
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor

    from diffusion.training.resumable import wandb_run_id

    source = preflight.read_init_from(cfg)  # fine-tuning: the network to start from, read before any work
    resume = preflight.check_settings(cfg)  # each bad value is refused before the data and the model are built
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_or_usage_error("data", lambda: instantiate(cfg.data))
    preflight.prepare_data(datamodule)
    module = build_or_usage_error("model/schedule/sampler", lambda: build_module(
        cfg, datamodule.channels, datamodule.image_size, getattr(datamodule, "num_classes", None),
        getattr(datamodule, "class_names", None), source))
    if source is not None:
        log.info("init_from=%s: the network, schedule and process of that model, and its %s weights; this run's model.*, "
                 "schedule.* and process.* settings other than the speed switches are not used", cfg.init_from,
                 "EMA" if source.has_ema else "raw")
        del source
    preflight.check_resume_fits(cfg, resume, module)
    resume_run_id, resume_step = wandb_run_id(resume), (resume or {}).get("global_step")
    del resume
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = build_loggers(cfg, resume_run_id)
    if requeued and resume_step is not None and is_rank_zero():
        requeue.continue_csv_logs(loggers, resume_step)
    if not loggers:  # Lightning refuses a LearningRateMonitor without a logger; there is nothing to monitor into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    prepare_ddp_relaunch()
    trainer: L.Trainer = build_or_usage_error("trainer", lambda: instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **requeue.lightning_requeue_off(cfg.trainer)))
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved_config(cfg))
    n_params = sum(p.numel() for p in module.model.parameters())
    log.info("model %s: %.2fM parameters; output dir %s", cfg.model._target_, n_params / 1e6, cfg.paths.output_dir)

    save_run_config(cfg, keep_existing=requeued is not None)  # every check passed (a refused run changes nothing)
    fit_started = time.perf_counter()
    # the resume checkpoint weights-only (diffusion.sharing.checkpoints) unless trust_checkpoint=true
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=not cfg.get("trust_checkpoint", False))
    fit_ended = time.perf_counter()

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero and cfg.get("final_samples", True):
        # the EMA callback copied the averaged weights into the model when training ended
        path = module.log_sample_grid("final")
        log.info("samples (EMA weights) written to %s", path)
    best = getattr(trainer.checkpoint_callback, "best_model_path", None)
    if trainer.is_global_zero:
        if best:
            log.info("best checkpoint %s; last %s", best, trainer.checkpoint_callback.last_model_path)
        # where the wall clock went: the first-run overhead budget (before_fit includes the heavy imports, which train()
        # makes once the torch-free checks have passed)
        seconds = {"before_fit": fit_started - started, "fit": fit_ended - fit_started,
                   "after_fit": time.perf_counter() - fit_ended}
        summary = {"metrics": metrics, "global_step": trainer.global_step, "epoch": trainer.current_epoch,
                   "best_checkpoint": best or None, "parameters": n_params,
                   "seconds": {k: round(v, 2) for k, v in seconds.items()}}
        write_text_atomic(Path(cfg.paths.output_dir, "metrics.json"), json.dumps(summary, indent=2))  # read by diffusion.report
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
@exits_on_usage_error
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    finally:
        wandb = sys.modules.get("wandb")  # imported only by a run that logs to W&B (logger=none/csv never loads it)
        if wandb is not None and wandb.run is not None:  # each job of a sweep closes its own W&B run
            wandb.finish()
    return sweep_objective(metrics, cfg.get("optimized_metric") or "val/loss")  # what a search optimises


if __name__ == "__main__":
    require_launcher_plugin()  # hydra/launcher=slurm without the plugin: one line
    refused = preflight.check_process_overrides(sys.argv[1:])  # schedule.beta_end=... with process=edm: one line
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        sys.exit(2)
    share_run_stamp()  # srun / torchrun: every rank resolves one run directory
    main()
