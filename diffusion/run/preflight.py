"""The checks ``diffusion.train`` makes before any work: each bad setting that would otherwise surface as a
traceback from torch or Lightning mid-run (or, worse, a run that silently trains nothing) is refused in one line
that names the value and what is allowed (:class:`diffusion.run.errors.UsageError`, exit status 2).

Order in :func:`diffusion.train.train`: :func:`check_config` (the settings that need neither torch nor a file's
contents: ``model.*``, ``optimizer.lr``, ``trainer.devices``, the checkpoint paths) before any heavy import, so that
a typo answers in about a second; :func:`check_settings` (the whole optimizer, the devices this machine has, the
resume checkpoint's file and progress) before anything is built; :func:`prepare_data` (decoding/caching, the split)
before the model; :func:`check_resume_fits` (the checkpoint's tensors against the built module) before the Trainer.

This module imports torch and Lightning only inside the checks that need them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.checks import root_cause
from diffusion.run.cluster import check_job_tasks
from diffusion.run.errors import UsageError, build_or_usage_error
from diffusion.run.jobs import is_rank_zero

if TYPE_CHECKING:
    from diffusion.training.module import DiffusionModule


def check_config(cfg: DictConfig) -> None:
    """What ``diffusion.train`` refuses before it imports torch, each by the class's own checks: ``schedule.*``,
    the data modules' shared ``data.*``, ``model.*`` (this framework's networks, at the data's ``image_size``; only
    the speed switches with ``init_from``, whose network is used), then ``optimizer.lr``, the form of
    ``trainer.devices``, and an ``init_from`` that does not exist."""
    from diffusion.models.settings import SPEED_KEYS, check_network

    schedule = cfg.get("schedule")
    if schedule is not None and str(schedule.get("_target_", "")).startswith("diffusion.processes.schedules."):
        from hydra.utils import instantiate  # the schedule classes load without torch: their own checks, at once

        build_or_usage_error("schedule", lambda: instantiate(schedule))
    data = cfg.get("data")
    if data is not None and str(data.get("_target_", "")).startswith("diffusion.data."):
        import inspect

        from diffusion.data.settings import check_data

        shared = {k: v for k, v in OmegaConf.to_container(data, resolve=True).items()
                  if k in inspect.signature(check_data).parameters}
        build_or_usage_error("data", lambda: check_data(**shared))
    check_process(cfg)
    image_size = cfg.data.get("image_size") if "data" in cfg else None
    known = isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 1
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if cfg.get("init_from") is not None:  # the source's network: this run's speed switches only
        model = {k: v for k, v in model.items() if k in SPEED_KEYS}
    build_or_usage_error("model", lambda: check_network(model, image_size if known else None))
    check_lr(cfg.optimizer)
    check_device_list(cfg.trainer.get("devices"))
    if cfg.get("init_from") is not None and not Path(str(cfg.init_from)).exists():  # ckpt_path: check_resume_and_outputs
        raise UsageError(f"init_from={cfg.init_from} does not exist: pass a checkpoint, a folder python -m "
                         "diffusion.export wrote, or a diffusers UNet2DModel / DDPMPipeline folder")


def check_process(cfg: DictConfig) -> None:
    """``process=edm`` / ``process=flow``: their settings (sigma_min < sigma_max, P_std > 0, logit_std > 0, shift >
    0, ...) and no beta schedule beside them, each in one line before torch."""
    from diffusion.processes.settings import check_edm, check_flow, check_no_schedule, continuous_kind

    process = cfg.get("process")
    kind = continuous_kind(process.get("_target_", "")) if process is not None else None
    if kind is None:
        return
    schedule = cfg.get("schedule")
    build_or_usage_error("schedule", lambda: check_no_schedule(kind, None if schedule is None else schedule.get("_target_")))
    options = {k: v for k, v in OmegaConf.to_container(process, resolve=True).items() if not k.startswith("_")}
    check = check_edm if kind == "edm" else check_flow
    import inspect

    unknown = sorted(set(options) - set(inspect.signature(check).parameters))
    if unknown:
        raise UsageError(f"process.{unknown[0]} is invalid for process={kind}: it takes "
                         f"{', '.join('process.' + p for p in inspect.signature(check).parameters)}")
    build_or_usage_error("process", lambda: check(**options))


_SCHEDULE_ARG = re.compile(r"^[+~]*schedule(\.|=)")
_PROCESS_ARG = re.compile(r"^process=(?P<kind>[^,\s]+)$")


def check_process_overrides(argv: list[str]) -> str | None:
    """The error line for a beta-schedule override beside ``process=edm|flow`` on the command line (Hydra would
    refuse ``schedule.beta_end=...`` on schedule=none as "Key 'beta_end' is not in struct"), or None."""
    from diffusion.processes.settings import CONTINUOUS_KINDS

    kinds = [m["kind"] for m in map(_PROCESS_ARG.match, argv) if m]
    kind = kinds[-1] if kinds else None
    if kind not in CONTINUOUS_KINDS:
        return None
    for arg in argv:
        if _SCHEDULE_ARG.match(arg) and arg != "schedule=none":
            return (f"{arg} is invalid with process={kind}: it has no beta schedule (schedule=none); its noise levels "
                    f"are process.* settings ({'sigma_min, sigma_max, P_mean, P_std, sigma_data' if kind == 'edm' else 'timestep_sampling, logit_mean, logit_std, mode_scale, shift'})")
    return None


def check_sampler_pairing(cfg: DictConfig) -> None:
    """A sampler that does not reverse the configured process (``sampler=ddim`` with ``process=edm``): one line
    naming the samplers that do, before the data and the model are built."""
    from hydra.utils import get_class

    from diffusion.samplers.registry import sampler_name, sampler_names

    process, sampler = cfg.get("process"), cfg.get("sampler")
    if process is None or sampler is None or "_target_" not in process or "_target_" not in sampler:
        return
    kind = getattr(get_class(str(process._target_)), "kind", None)
    reverses = getattr(get_class(str(sampler._target_)), "reverses", ())
    if kind and kind not in reverses:
        name = sampler_name(OmegaConf.to_container(sampler, resolve=True))
        raise UsageError(f"sampler={name} is invalid for process={kind}: it reverses process={'|'.join(reverses)}; "
                         f"use sampler={'|'.join(sampler_names(kind))}")


def check_settings(cfg: DictConfig) -> dict | None:
    """Optimizer and trainer settings (also against the tasks a scheduler started), and the resume checkpoint
    (``ckpt_path``); returns that checkpoint (memory-mapped: its tensors stay on disk) or None."""
    check_optimizer(cfg)
    check_sampler_pairing(cfg)
    check_devices(cfg.trainer.get("devices"), cfg.trainer.get("accelerator"))
    check_job_tasks(cfg.trainer)  # SLURM / submitit: one task per DDP rank
    return read_resume_checkpoint(cfg)


def check_lr(opt: DictConfig) -> None:
    lr = opt.get("lr")
    if "lr" in opt and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
        raise UsageError(f"optimizer.lr={lr!r} is invalid: it must be a finite number > 0 (e.g. optimizer.lr=2e-4)")


def check_optimizer(cfg: DictConfig) -> None:
    """``optimizer.lr`` finite and > 0, then the whole optimizer config built on one stand-in parameter, so that
    every value torch refuses (betas, eps, weight_decay, an unknown key) is refused here, not at the first step."""
    import torch

    from diffusion.training.optim import build_optimizer

    opt = cfg.optimizer
    check_lr(opt)
    trainer = cfg.trainer
    try:
        build_optimizer(OmegaConf.to_container(opt, resolve=True), [torch.nn.Parameter(torch.zeros(1))], torch.device("cpu"),
                        trainer.get("precision", "32-true"), trainer.get("gradient_clip_val"))
    except Exception as exc:  # noqa: BLE001 - torch's own message, on one line, naming the group
        message = " ".join(str(root_cause(exc)).split())
        raise UsageError(message if message.startswith("optimizer") else f"optimizer {opt.get('_target_')}: {message}") from exc


_DEVICE_STRING = re.compile(r"\s*\d+\s*(,\s*\d+\s*)*,?\s*")


def check_device_list(devices) -> None:
    """``trainer.devices``: a positive count, -1 or ``auto`` (all), or a non-empty list of device indices."""
    allowed = "a positive number of devices, -1 or auto (all of them), or a list of device indices such as [0,1]"
    if isinstance(devices, (list, tuple, ListConfig)):
        ok = len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)
    elif isinstance(devices, str):
        ok = devices == "auto" or devices.strip() == "-1" or (bool(_DEVICE_STRING.fullmatch(devices)) and devices.strip() != "0")
    else:
        ok = isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
    if not ok:
        raise UsageError(f"trainer.devices={devices!r} is invalid: it must be {allowed}")


def check_devices(devices, accelerator=None) -> None:
    """``trainer.devices`` (:func:`check_device_list`), and a count of GPUs this machine has."""
    import torch

    check_device_list(devices)
    gpus = accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())
    if not gpus and accelerator != "tpu" and not (devices == "auto" or (isinstance(devices, int) and devices >= 1)
                                                  or (isinstance(devices, str) and devices.strip().isdigit())):
        raise UsageError(f"trainer.devices={devices!r} is invalid on the CPU: it must be a positive number of processes "
                         "or auto (-1 and device lists name GPUs)")
    if gpus and isinstance(devices, int) and not isinstance(devices, bool) and devices > torch.cuda.device_count():
        raise UsageError(f"trainer.devices={devices} is invalid: this machine has {torch.cuda.device_count()} GPU(s) "
                         "(trainer.accelerator=cpu runs that many processes on the CPU)")


def read_init_from(cfg: DictConfig):
    """The model a fine-tuning run starts from (``init_from``: a checkpoint, an exported folder or a diffusers
    folder), with its EMA weights; None without init_from. Refused in one line: unreadable, or with ``ckpt_path``
    (a resume continues its own weights)."""
    path = cfg.get("init_from")
    if path is None:
        return None
    if cfg.get("ckpt_path") is not None:
        raise UsageError(f"init_from={path} is invalid with ckpt_path={cfg.ckpt_path}: a resumed run continues its own "
                         "weights; pass one of them")
    from diffusion.training.module import DiffusionModule

    return build_or_usage_error("init_from", lambda: DiffusionModule.from_checkpoint(
        str(path), trust=bool(cfg.get("trust_checkpoint", False))))


def _epoch_limits(trainer: DictConfig) -> tuple[int, int]:
    """(max_epochs, max_steps) as Lightning resolves them (-1: no limit; neither given: 1000 epochs)."""
    max_steps = trainer.get("max_steps")
    max_steps = -1 if max_steps is None else max_steps
    max_epochs = trainer.get("max_epochs")
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 else -1
    return max_epochs, max_steps


def read_resume_checkpoint(cfg: DictConfig) -> dict | None:
    """The ``ckpt_path`` checkpoint, refused when unreadable (truncated, a text file), not this framework's, or
    already as far as ``trainer.max_epochs`` / ``max_steps`` reach (Lightning would stop at once: nothing trained)."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None
    from diffusion.sharing.checkpoints import read_checkpoint

    ckpt = build_or_usage_error("ckpt_path", lambda: read_checkpoint(path, setting="ckpt_path", mmap=True,
                                                                            trust=bool(cfg.get("trust_checkpoint", False))))
    if cfg.trainer.get("fast_dev_run"):
        return ckpt
    # Lightning's fit loop stops when epoch_progress.current.processed >= max_epochs (a checkpoint written at an
    # epoch's end already counts that epoch) or global_step >= max_steps
    progress = (((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current") or {}
    epochs, step = progress.get("processed"), ckpt.get("global_step")
    max_epochs, max_steps = _epoch_limits(cfg.trainer)
    if epochs is not None and max_epochs != -1 and epochs >= max_epochs:
        raise UsageError(f"trainer.max_epochs={max_epochs} is invalid for ckpt_path={path}: the checkpoint has already "
                         f"trained {epochs} epoch(s) (step {step}), so nothing would be trained; pass trainer.max_epochs="
                         f"<more than {epochs}> (e.g. trainer.max_epochs={epochs + 1}) to train on")
    if step is not None and max_steps != -1 and step >= max_steps:
        raise UsageError(f"trainer.max_steps={max_steps} is invalid for ckpt_path={path}: the checkpoint is already at "
                         f"step {step}, so nothing would be trained; pass trainer.max_steps=<more than {step}> (or -1)")
    return ckpt


def prepare_data(datamodule) -> None:
    """Decode/cache and split the data now (the launching process only; Lightning's DDP ranks find the cache), so
    that unreadable images or a batch larger than the training split stop the run before the model is built."""
    if is_rank_zero():
        build_or_usage_error("data", lambda: (datamodule.prepare_data(), datamodule.setup("fit")))


def _flat(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(f"{prefix}.{key}", sub).items()}
    return {prefix: value}


#: how a hyper-parameter of the checkpoint is set on the command line (in_channels and image_size follow the data)
_SETTING = {"model.in_channels": "the data's channels (model.in_channels)", "model.image_size": "data.image_size"}


_NO_TENSORS = ("sampler", "optimizer", "data", "seed", "num_samples", "sample_every_n_epochs", "lr_warmup_steps",
               "lr_schedule", "lr_min_ratio", "cond_drop_prob", "class_names")


def _settings(hparams: dict) -> dict:
    """The hyper-parameters that shape the module's tensors, keyed as they are set: model.*, schedule.*, process.*, module.*."""
    out = {}
    for key, value in hparams.items():
        if key in ("model", "schedule", "process"):
            out.update(_flat(key, dict(value)))
        elif key not in _NO_TENSORS and not isinstance(value, dict):
            out[f"module.{key}"] = value
    return out


def check_resume_fits(cfg: DictConfig, ckpt: dict | None, module: DiffusionModule) -> None:
    """Refuse a checkpoint whose tensors do not fit the module this config built (another model size, schedule
    length, image size...), naming the settings that differ between the checkpoint and this run."""
    if ckpt is None:
        return
    from diffusion.processes.gaussian import RETIRED_BUFFERS

    retired = {f"process.{name}" for name in RETIRED_BUFFERS}  # old checkpoints' unused tables: dropped on load
    theirs, ours = {k: v for k, v in ckpt["state_dict"].items() if k not in retired}, module.state_dict()
    misfit = sorted(set(theirs) ^ set(ours)) or [k for k in ours if tuple(theirs[k].shape) != tuple(ours[k].shape)]
    then, now = _settings(ckpt["hyper_parameters"]), _settings(dict(module.hparams))
    differ = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    # same shapes, another meaning: the checkpoint's schedule buffers would replace this run's schedule, and a
    # network trained for one target would be trained on another
    meaning = [k for k in differ if k.startswith("schedule.") or k in ("process.objective", "process.variance")]
    if not misfit and meaning:
        raise UsageError(f"ckpt_path={cfg.ckpt_path} was trained with other settings that keep the tensors' shapes ("
                         + "; ".join(f"{k}={then.get(k)!r} there, {now.get(k)!r} here" for k in meaning)
                         + "): resume with the checkpoint's settings, or start a new run without ckpt_path")
    if not misfit:
        return
    if differ:
        what = "settings that differ: " + "; ".join(f"{_SETTING.get(k, k)}={then.get(k)!r} there, {now.get(k)!r} here" for k in differ)
    else:
        k = misfit[0]
        shape = {name: tuple(sd[k].shape) if k in sd else "absent" for name, sd in (("there", theirs), ("here", ours))}
        what = f"{k} is {shape['there']} there, {shape['here']} here"
    raise UsageError(f"ckpt_path={cfg.ckpt_path} does not fit this run's model ({what}): resume with the settings "
                     "the checkpoint was trained with, or start a new run without ckpt_path")
