"""The LightningModule: a network plus its forward process (``process=``: DDPM's Gaussian one, trained with L_simple;
cold diffusion's blur; EDM's preconditioned denoiser; flow matching's velocity), trained with the process's loss.

It is built from plain config dicts (``model``, ``schedule``, ``sampler``, ``optimizer``) that it saves as
hyper-parameters, so ``DiffusionModule.load_from_checkpoint(path)`` rebuilds it without the Hydra config.
Schedule tensors are buffers of ``self.process``: they live in the checkpoint and move with the module.
With the EMA callback, a checkpoint's ``state_dict`` holds the EMA weights and ``current_model_state`` the raw ones.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from torchmetrics import MeanMetric

from diffusion.models.speed import apply_speed_options, split_speed_options
from diffusion.plots.grids import class_rows_image, grid_image, save_png
from diffusion.processes.base import build_process
from diffusion.processes.timesteps import build_timestep_sampler
from diffusion.samplers.base import Sampler
from diffusion.samplers.guidance import check_labels
from diffusion.samplers.registry import build_sampler, sampler_config
from diffusion.sharing.checkpoints import folder_kind, read_checkpoint, read_safetensors_folder
from diffusion.sharing.legacy import LEGACY_PROCESS_KEYS, has_legacy_layout, upgrade_hyper_parameters
from diffusion.training.optim import build_optimizer, check_lr_schedule, lr_factor

NUM_QUARTILES = 4


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], done on the device in the training step."""
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images


class DiffusionModule(L.LightningModule):
    """DDPM training (Ho et al. Algorithm 1) and sampling with the configured sampler.

    Args:
        model: config of the network (``_target_`` + arguments), e.g. ``diffusion.models.UNet``, plus the speed
            switches ``channels_last`` and ``compile`` (:mod:`diffusion.models.speed`).
        schedule: config of the noise schedule, e.g. ``diffusion.processes.schedules.LinearSchedule``.
        sampler: config of the sampler used for sample grids (``_partial_``: it receives the process).
        optimizer: config of the optimizer (``_partial_``: it receives the parameters).
        process: config of the forward process (``conf/process/``, ``_partial_``: it receives the schedule, the
            image channels and ``learn_sigma``): its variance, loss, objective and timestep sampling (``importance``
            draws t by Nichol & Dhariwal's sqrt(E[L_t^2]); validation always draws uniformly).
        lr_warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        lr_schedule: after the warm-up, ``constant`` (the optimizer's lr) or ``cosine`` (half a cosine from lr down to
            ``lr_min_ratio * lr`` at the last step of the run, Loshchilov & Hutter 2017, eq. 5).
        lr_min_ratio: the final learning rate of ``cosine`` as a fraction of lr.
        num_samples: images in each sample grid.
        sample_every_n_epochs: generate a grid every N validation epochs (0: only at the end of training).
        seed: base seed of the noise and timestep draws, which depend only on (seed, rank, step): a resumed run
            draws exactly what an uninterrupted one would have.
        data: the data config the model was trained on, kept in the checkpoint so that evaluation finds its
            validation set without the training config (not used for training).
        cond_drop_prob: a class-conditional model (``model.num_classes``, batches of (images, labels)): the rate at
            which training replaces a label by the null class, so that the one network also learns the
            unconditional model that classifier-free guidance needs (Ho & Salimans 2022: 0.1-0.2). Unused otherwise.
        class_names: the data's class names, in label order (grid rows, the app's class picker); None: the indices.
    """

    def __init__(
        self,
        model: dict,
        schedule: dict,
        sampler: dict,
        optimizer: dict,
        process: dict | None = None,
        lr_warmup_steps: int = 0,
        lr_schedule: str = "constant",
        lr_min_ratio: float = 0.0,
        num_samples: int = 64,
        sample_every_n_epochs: int = 5,
        seed: int = 0,
        data: dict | None = None,
        cond_drop_prob: float = 0.1,
        class_names: list[str] | None = None,
        **legacy: Any,
    ):
        super().__init__()
        check_lr_schedule(lr_schedule, lr_min_ratio, lr_warmup_steps)
        if isinstance(cond_drop_prob, bool) or not isinstance(cond_drop_prob, (int, float)) or not 0 <= cond_drop_prob < 1:
            raise ValueError(f"module.cond_drop_prob={cond_drop_prob!r} is invalid: it must be a number in [0, 1) "
                             "(the rate of labels replaced by the null class in training; 0.1 is usual)")
        given = {"model": model, "schedule": schedule, "sampler": sampler, "optimizer": optimizer, "process": process,
                 "data": data}
        if legacy or has_legacy_layout(given):
            # hyper-parameters of a checkpoint written by an earlier layout (Lightning's load_from_checkpoint passes
            # them as they were saved): today's layout, so that such a checkpoint is read as it was trained
            unknown = sorted(set(legacy) - set(LEGACY_PROCESS_KEYS))
            if unknown:
                raise TypeError(f"DiffusionModule got an unexpected argument {unknown[0]!r}")
            upgraded = upgrade_hyper_parameters({**given, **legacy})
            model, schedule, sampler, optimizer, process, data = (upgraded[k] for k in given)
        self.save_hyperparameters({"model": model, "schedule": schedule, "sampler": sampler, "optimizer": optimizer,
                                   "process": process, "lr_warmup_steps": lr_warmup_steps, "lr_schedule": lr_schedule,
                                   "lr_min_ratio": lr_min_ratio, "num_samples": num_samples,
                                   "sample_every_n_epochs": sample_every_n_epochs, "seed": seed, "data": data,
                                   "cond_drop_prob": cond_drop_prob,
                                   "class_names": None if class_names is None else [str(c) for c in class_names]})
        network, speed = split_speed_options(model)
        self.model = apply_speed_options(instantiate(network), **speed)
        self.process = build_process(process, instantiate(schedule), self.model.in_channels, network.get("learn_sigma"))
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"module class_names has {len(class_names)} names for model.num_classes={self.num_classes}")
        self.sampler = self.build_sampler(sampler)
        # importance sampling of discrete t (the processes check their own timestep_sampling; a continuous one draws
        # its t itself)
        self.timestep_sampler = (None if self.process.continuous_time else
                                 build_timestep_sampler(self.process.timestep_sampling, self.process.num_timesteps))
        self.quartile_loss = torch.nn.ModuleList(MeanMetric() for _ in range(NUM_QUARTILES))
        self._generator: torch.Generator | None = None
        self.has_ema = False  # set by from_checkpoint: whether the checkpoint held EMA weights
        self._last_grid = None  # (what drew it, its images): log_sample_grid reuses them for the same weights

    @classmethod
    def from_checkpoint(cls, path: str | Path, ema: bool = True, map_location: str | torch.device = "cpu",
                        trust: bool = False) -> "DiffusionModule":
        """Rebuild a trained module from a checkpoint alone (no Hydra config), with its EMA or its raw weights; read
        weights-only unless ``trust`` (:func:`diffusion.sharing.checkpoints.read_checkpoint`).

        Raises ValueError naming the path when it is not a checkpoint written by this framework.
        """
        kind = folder_kind(path)
        if kind is not None:
            return cls._from_folder(Path(path), kind, ema, map_location)
        if Path(path).is_dir():
            raise ValueError(f"ckpt={path} is a folder, but neither a model python -m diffusion.export wrote (config.json "
                             "+ model.safetensors) nor a diffusers UNet2DModel / DDPMPipeline folder")
        ckpt = read_checkpoint(path, map_location=map_location, trust=trust)
        module = cls(**ckpt["hyper_parameters"])
        # With the EMA callback, state_dict holds the EMA weights and current_model_state the raw ones.
        raw = ckpt.get("current_model_state")
        module.load_state_dict(raw if (not ema and raw is not None) else ckpt["state_dict"])
        module.has_ema = raw is not None
        module.eval()
        return module

    @classmethod
    def _from_folder(cls, path: Path, kind: str, ema: bool, map_location) -> "DiffusionModule":
        """A shared model: an exported safetensors folder (its hyper-parameters and the weights it was exported
        with) or a diffusers UNet2DModel / DDPMPipeline folder (:mod:`diffusion.sharing.diffusers_bridge`)."""
        if kind == "safetensors":
            hparams, state, has_ema = read_safetensors_folder(path)
            if not ema and has_ema:
                raise ValueError(f"ema=false is invalid for ckpt={path}: an exported model holds one set of weights, "
                                 "the EMA ones; export the raw ones with python -m diffusion.export ema=false")
            module = cls(**upgrade_hyper_parameters(hparams))
            module.load_state_dict(state)
        else:
            from diffusion.sharing.diffusers_bridge import import_pipeline

            spec = import_pipeline(path)
            module = cls(model=spec["model"], schedule=spec["schedule"], sampler=spec["sampler"], process=spec["process"],
                         optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-4})
            module.model.load_state_dict(spec["state_dict"])
            has_ema = False
        module.has_ema = has_ema
        module.to(map_location)
        module.eval()
        return module

    # ----------------------------------------------------------------------------------------------- helpers
    def build_sampler(self, config: dict, **overrides: Any) -> Sampler:
        """Instantiate a sampler config (a ``_partial_`` taking the process) with optional overrides."""
        return build_sampler(config, self.process, **overrides)

    def named_sampler(self, name: str | None = None, num_steps: int | None = None, **options: Any) -> Sampler:
        """``None``: the sampler the model was trained with; a name of the registry (``conf/sampler/``): that
        sampler with its defaults. ``num_steps`` changes the grid; ``options`` any other setting."""
        if name in (None, "configured"):
            config = dict(self.hparams.sampler)
        else:
            config = sampler_config(name)
        return self.build_sampler(config, **({"num_steps": num_steps} if num_steps is not None else {}), **options)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t) if y is None else self.model(x, t, y)

    @property
    def num_classes(self) -> int | None:
        """The classes of a class-conditional network (``model.num_classes``), None for an unconditional one."""
        return getattr(self.model, "num_classes", None)

    @property
    def class_names(self) -> list[str]:
        """The name of each class, in label order (the indices when the data gave none)."""
        names = self.hparams.get("class_names")
        return list(names) if names else [str(k) for k in range(self.num_classes or 0)]

    def split_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images, labels or None) from a batch: images, or (images, labels) from ``data.conditional=true``."""
        images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        if (labels is None) != (self.num_classes is None):
            raise ValueError("a class-conditional model (model.num_classes) needs data.conditional=true, and "
                             "data.conditional=true a class-conditional model" if labels is None else
                             "batches hold labels (data.conditional=true) but the model is unconditional: "
                             "leave model.num_classes null, diffusion.train sets it from the data")
        return images, labels

    def _seeded_generator(self, *keys: int) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device)
        seed = self.hparams.seed
        for k in keys:  # a simple, collision-resistant mix of the keys into a 63-bit seed
            seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
        return self._generator.manual_seed(seed)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.model
        return (m.in_channels, m.image_size, m.image_size)

    # ----------------------------------------------------------------------------------------------- training
    def _losses(self, batch, generator: torch.Generator, t: torch.Tensor | None = None, drop_labels: bool = False):
        images, labels = self.split_batch(batch)
        x0 = to_model_range(images)
        if t is None:
            t = self.process.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        model = self.model
        if labels is not None:
            p = self.hparams.get("cond_drop_prob", 0.0)
            if drop_labels and p > 0:  # Ho & Salimans Algorithm 1: c <- null with probability p_uncond
                dropped = torch.rand(labels.shape, device=labels.device, generator=generator) < p
                labels = labels.masked_fill(dropped, self.num_classes)
            model = _Conditioned(self.model, labels)
        return self.process.training_losses(model, x0, t, noise), t

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        g = self._seeded_generator(1, self.global_rank, self.global_step)
        if self.timestep_sampler is None:
            losses, t = self._losses(batch, g, drop_labels=True)
            loss = losses.mean()
        else:  # importance: the weighted mean estimates the uniform one; every rank's losses update the history
            images, _ = self.split_batch(batch)
            t, weights = self.timestep_sampler.sample(images.shape[0], images.device, g)
            losses, _ = self._losses(batch, g, t, drop_labels=True)
            self.timestep_sampler.update(self.all_gather(t), self.all_gather(losses.detach()))
            loss = (losses * weights).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=losses.shape[0])
        # improved-diffusion's view of which noise levels are learning: the loss per quarter of [0, T) (edm: of the
        # training sigmas' law; flow: of [0, 1]) (a mask-weighted mean: no data-dependent indexing, so no host
        # synchronisation in the step)
        quartile = self.process.time_bins(t, NUM_QUARTILES)
        for q, metric in enumerate(self.quartile_loss):
            metric.update(losses.detach(), (quartile == q).to(losses.dtype))
            self.log(f"train/loss_q{q}", metric, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        # The same noise for the same batch every epoch: val/loss curves compare like with like.
        losses, _ = self._losses(batch, self._seeded_generator(2, self.global_rank, batch_idx))
        self.log("val/loss", losses.mean(), prog_bar=True, sync_dist=True, batch_size=losses.shape[0])
        if batch_idx == 0 and self._grid_due():
            # Validation runs with the EMA weights swapped in (EMA callback), so the grid shows them.
            self.log_sample_grid(f"epoch_{self.current_epoch:04d}", epoch=self.current_epoch)

    def _grid_due(self) -> bool:
        every = self.hparams.sample_every_n_epochs
        trainer = self.trainer
        return (
            every > 0
            and not trainer.sanity_checking
            and trainer.is_global_zero
            and (self.current_epoch + 1) % every == 0
        )

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.inference_mode()
    def sample(
        self,
        n: int,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
        trajectory_points: int | None = None,
        labels=None,
    ):
        """Draw ``n`` images in [-1, 1] with ``sampler`` (default: the configured one); see :meth:`Sampler.sample`.

        ``labels``: ``n`` classes of a class-conditional model, guided at the sampler's ``guidance_scale``; None
        draws unconditionally (the null class). ValueError (one line) for classes outside the model's, classes for an
        unconditional model, or guidance without classes."""
        sampler = sampler or self.sampler
        if labels is not None:
            labels = check_labels(labels, self.num_classes)
            if len(labels) != n:
                raise ValueError(f"{len(labels)} labels for {n} images")
        elif sampler.guidance_scale != 1.0 and self.num_classes is None:
            raise ValueError(f"sampler guidance_scale={sampler.guidance_scale:g} is invalid for this model: it is "
                             "unconditional (trained without data.conditional=true), so there is nothing to guide")
        was_training = self.training
        self.eval()
        try:
            return sampler.sample(
                self.model,
                (n, *self.image_shape),
                generator=generator,
                device=self.device,
                return_trajectory=return_trajectory,
                progress=progress,
                trajectory_points=trajectory_points,
                labels=None if labels is None else labels.to(self.device),
            )
        finally:
            self.train(was_training)

    def log_sample_grid(self, name: str, epoch: int | None = None) -> Path | None:
        """Sample a grid with a fixed seed, save it as ``<root>/samples/<name>.png`` and send the same pixels to the
        loggers (W&B: key ``samples``, at this global step, captioned with the epoch, step and sampler).

        The grid is uint8, enlarged to a readable size (:func:`diffusion.plots.grids.grid_image`); ``epoch``: the epoch it
        ends (None: the end of training, after ``current_epoch`` epochs)."""
        n = self.hparams.num_samples
        seed = self.hparams.seed
        g = torch.Generator(device=self.device).manual_seed(seed)
        profiler = getattr(self._trainer, "profiler", None)
        labels, per_class = self.grid_labels(n)
        key = (self.global_step, self.sampler.describe(), n, seed, _weights_sum(self.model))
        if self._last_grid is not None and self._last_grid[0] == key:  # the same weights, sampler and noise: the
            images = self._last_grid[1]  # same images (the final grid after a last epoch that drew one)
        else:
            with profiler.profile("sample_grid") if profiler is not None else nullcontext():  # in the profiler's report
                images = self.sample(n if labels is None else len(labels), generator=g, labels=labels).samples
            self._last_grid = (key, images)
        when = f"epoch {epoch}" if epoch is not None else f"end of training, {self.current_epoch} epochs"
        caption = f"{name}: {when}, step {self.global_step}; {self.sampler.describe()}, seed {seed}"
        if labels is None:
            image = grid_image(images, nrow=max(1, int(n**0.5)))
        else:  # one row per class, named
            image = class_rows_image(images, per_class, self.class_names, f"{when}, step {self.global_step}; "
                                     f"{self.sampler.describe()}, seed {seed}")
            caption += "; one row per class"
        path = None
        if self._trainer is not None:
            path = Path(self.trainer.default_root_dir) / "samples" / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(image, path)  # with a labelled grid's text chunks (its rows' classes)
            for logger in self.trainer.loggers:
                log_image = getattr(logger, "log_image", None)
                if callable(log_image):  # W&B: a PIL image is logged as is (a float tensor would be scaled to 0..1)
                    log_image(key="samples", images=[image], step=self.global_step, caption=[caption])
                elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                    pixels = np.asarray(image)
                    logger.experiment.add_image("samples", pixels, self.global_step,
                                                dataformats="HW" if pixels.ndim == 2 else "HWC")
        return path

    def grid_labels(self, n: int) -> tuple[torch.Tensor | None, int]:
        """A sample grid's classes: for a class-conditional model every class, ``max(1, n // num_classes)`` images
        each, in rows (labels, images per class); for an unconditional one (None, n)."""
        if self.num_classes is None:
            return None, n
        per_class = max(1, n // self.num_classes)
        return torch.arange(self.num_classes).repeat_interleave(per_class), per_class

    # ----------------------------------------------------------------------------------------------- optimiser
    _lr_total_steps = 0  # the run's optimizer steps, for lr_schedule=cosine (0 until training starts)

    def on_train_start(self) -> None:
        if self.hparams.get("lr_schedule", "constant") == "cosine":
            self._lr_total_steps = int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        trainer = self._trainer
        optimizer = build_optimizer(self.hparams.optimizer, self.parameters(), self.device,
                                    trainer.precision if trainer is not None else "32-true",
                                    trainer.gradient_clip_val if trainer is not None else None)
        warmup = self.hparams.lr_warmup_steps
        cosine = self.hparams.get("lr_schedule", "constant") == "cosine"
        if warmup <= 0 and not cosine:
            return optimizer
        # the run's step count is read at on_train_start: trainer.estimated_stepping_batches here would set up the
        # train loader before a resumed run restores its place in the epoch (a mid-epoch resume then diverged)
        factor = lambda step: lr_factor(step, warmup, self._lr_total_steps if cosine else 0,  # noqa: E731
                                        self.hparams.get("lr_min_ratio", 0.0))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _Conditioned:
    """``(x, t) -> network(x, t, labels)``: what the process's losses call for a class-conditional network."""

    def __init__(self, network, labels: torch.Tensor):
        self.network, self.labels = network, labels

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x, t, self.labels)


@torch.no_grad()
def _weights_sum(model: torch.nn.Module) -> float:
    """A float64 checksum of the weights (sum of every parameter's sum, each weighted by its index): any change to
    any weight changes it, barring a coincidence in the last bits."""
    return float(sum((i + 1) * p.double().sum() for i, p in enumerate(model.parameters())))
