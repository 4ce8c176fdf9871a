"""The figures of the seed reports, as PNG files (every option: conf/figures.yaml; ``--help`` lists them):

    python -m diffusion.figures figure=schedules T=1000 out=figs/                   # alpha_bar and beta: linear/cosine/...
    python -m diffusion.figures figure=forward out=figs/ data=digits schedule=cosine  # real images noised from t=0 to T
    python -m diffusion.figures figure=reverse ckpt=RUN/checkpoints/last.ckpt transitions=10 out=figs/
    python -m diffusion.figures figure=progression run=RUN out=figs/                  # every checkpoint, same noise
    python -m diffusion.figures figure=reverse ckpt=COND.ckpt "classes=[3,7]" sampler.guidance_scale=3 out=figs/

``reverse`` and ``progression`` sample with the checkpoint's own sampler, or ``sampler=<name>`` (conf/sampler/), with
``sampler.num_steps`` and the other ``sampler.*`` settings changed, as ``diffusion.sample`` does. A class-conditional
checkpoint (trained with ``data.conditional=true``) draws ``n`` images of each of ``classes`` (null or ``all``, the
default: one image of each class; or a list such as ``[3,7]``), guided at ``sampler.guidance_scale`` w (default: the
checkpoint's sampler's, 1 = conditional): in ``reverse`` one row per image, labelled with its class name, in
``progression`` one column per image, labelled likewise; the file name holds the classes and w. ``classes`` or a
guidance scale for an unconditional checkpoint, or a class it does not have, is refused before any work.

``forward`` shows the training config's data, schedule and process: ``data=``, ``schedule=`` and ``process=`` choose
them (and their keys, ``schedule=linear schedule.T=500``) as they do for ``diffusion.train``; left out, the training
defaults. Image grids have one row per image (a progression: per checkpoint, labelled with its step and epoch) and one
column per time, labelled with its t; small images are enlarged (nearest neighbour) to >= 64 px and each figure is
titled with its settings. Each file's name holds the settings that made it, and an existing file is never
overwritten: the command stops before any work and says so, as it does for an option the figure does not take.
``wandb_run=RUN`` also logs the figure to that training run's W&B run, at its last training step.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf

from diffusion.run.config import CONFIG_DIR
from diffusion.run.errors import UsageError, build_or_usage_error, exits_on_usage_error
from diffusion.run.outputs import require_ckpt, unusable_dir_reason
from diffusion.run.wandb_runs import log_to_training_run

if TYPE_CHECKING:  # torch and the module are imported where they are used, once the configuration is checked
    import torch

    from diffusion.training.module import DiffusionModule

log = logging.getLogger("diffusion.figures")

#: each figure's own options; every figure also takes out, seed, wandb_run and trust_checkpoint
FIGURES = {
    "schedules": ("T",),
    "forward": ("n", "columns", "data", "schedule", "process"),
    "reverse": ("ckpt", "n", "transitions", "sampler", "classes"),
    "progression": ("run", "n", "sampler", "classes"),
}
COMMON = ("out", "seed", "wandb_run", "trust_checkpoint")
#: the groups of the training config (conf/config.yaml) that figure=forward takes
TRAINING_GROUPS = ("data", "schedule", "process")


# ----------------------------------------------------------------------------------------------- the options
def _is_set(cfg: DictConfig, key: str) -> bool:
    """Whether an option differs from "not given": a value (null is the default of every figure's own option), a
    group chosen, or ``sampler=<name>`` / a ``sampler.*`` setting."""
    value = cfg.get(key)
    if key == "sampler":
        return value is not None and ("_target_" in value or any(v is not None for v in value.values()))
    return value is not None


def _shown(cfg: DictConfig, key: str) -> str:
    value = cfg.get(key)
    return f"{key}=<{value._target_.rsplit('.', 1)[-1] if '_target_' in value else '...'}>" if isinstance(value, DictConfig) \
        else f"{key}={value}"


def _count(cfg: DictConfig, key: str, default: int, minimum: int = 1, why: str = "") -> int:
    """An integer option >= ``minimum`` (null: ``default``); anything else is a UsageError naming it."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"{key}={value!r} is invalid: it must be an integer >= {minimum}{why}")
    return value


def check_options(cfg: DictConfig) -> str:
    """The figure's name, once every option that can be checked without reading a file or importing torch is
    valid: the figure, options of other figures (refused: they would do nothing), integers, the folders."""
    if OmegaConf.is_missing(cfg, "figure"):
        raise UsageError(f"figure is required: pass figure=<{'|'.join(FIGURES)}>")
    figure = cfg.figure
    if figure not in FIGURES:
        raise UsageError(f"figure={figure!r} is invalid: allowed values are {', '.join(FIGURES)}")
    own = FIGURES[figure]
    others = dict.fromkeys(k for keys in FIGURES.values() for k in keys if k not in own)
    if figure == "forward" and cfg.get("process") is not None:
        others.pop("sampler", None)  # process=blur also chooses the cold sampler, as in training; forward samples nothing
    for key in others:
        if _is_set(cfg, key):
            raise UsageError(f"{_shown(cfg, key)} is not an option of figure={figure}: its options are "
                             f"{', '.join(own)} (and {', '.join(COMMON)})")
    for group in TRAINING_GROUPS:
        if cfg.get(group) is not None and "_target_" not in cfg[group]:  # +schedule.T=500 without schedule=<option>
            raise UsageError(f"{group}.* needs {group}=<option>: name the {group} whose keys you change "
                             f"({group}=<option> {group}.<key>=<value>; options: conf/{group}/)")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UsageError(f"seed={cfg.seed!r} is invalid: it must be an integer")
    _count(cfg, "n", 1, why=" (the number of images)")
    _count(cfg, "T", 1000, why=" (the number of steps)")
    _count(cfg, "columns", 11, 2, " (t = 0 and t = T)")
    _count(cfg, "transitions", 10)
    for key in ("ckpt", "run"):
        if key in own and cfg.get(key) is None:
            what = "a checkpoint written by python -m diffusion.train" if key == "ckpt" else \
                "a training run directory, outputs/train/<run>"
            raise UsageError(f"{key} is required by figure={figure}: pass {key}=<{what}>")
    if "ckpt" in own:
        require_ckpt(cfg)  # a file, or a folder python -m diffusion.export wrote
    if "run" in own and not Path(str(cfg.run)).is_dir():
        raise UsageError(f"run={cfg.run} does not exist or is not a directory: pass a training run directory")
    reason = unusable_dir_reason(out_dir(cfg))
    if reason:
        raise UsageError(f"out={cfg.out} cannot be used: {reason}; choose a folder this user may create and write")
    if cfg.wandb_run is not None and not Path(str(cfg.wandb_run)).is_dir():
        raise UsageError(f"wandb_run={cfg.wandb_run} is not a training run directory")
    return figure


def out_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.out)).expanduser()


# ----------------------------------------------------------------------------------------------- writing
def _new_path(path: Path) -> Path:
    """Figures never overwrite: a figure whose file exists is refused before any work (its name holds its settings)."""
    if path.exists():
        raise UsageError(f"{path} already exists: figures are never overwritten; choose another out (or remove the file)")
    return path


def _save(fig, path: Path) -> Path:
    from diffusion.plots.grids import save_new

    try:
        return save_new(fig, path)
    except FileExistsError as exc:  # written by someone else while this figure was computed
        raise UsageError(f"{path} already exists: figures are never overwritten; choose another out") from exc


def _save_rows(rows: torch.Tensor, path: Path, title: str, column_labels=None, row_labels=None) -> Path:
    """rows: (R, K, C, H, W) in [-1, 1] -> one labelled PNG with R rows of K images, enlarged to a readable size."""
    from diffusion.plots.grids import GridLayout, grid_array, labelled_figure, readable_scale

    r, k = rows.shape[:2]
    scale = readable_scale(max(rows.shape[-2:]))
    grid = grid_array(rows.reshape(r * k, *rows.shape[2:]), nrow=k, scale=scale)
    layout = GridLayout.of(r * k, rows.shape[-1], k, scale=scale)
    return _save(labelled_figure(grid, layout, title, column_labels, row_labels), path)


# ----------------------------------------------------------------------------------------------- the figures
def schedule_name(target: str) -> str:
    """``diffusion.processes.schedules.ContinuousCosineSchedule`` -> ``continuous_cosine``."""
    name = target.rsplit(".", 1)[-1].removesuffix("Schedule")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def schedules_figure(T: int, out: Path) -> Path:
    """alpha_bar_t and beta_t of the linear, cosine and continuous-cosine schedules (Nichol & Dhariwal Fig. 5)."""
    path = _new_path(out / f"schedules_T{T}.png")
    import matplotlib
    import torch

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from diffusion.processes.schedules import ContinuousCosineSchedule, CosineSchedule, LinearSchedule

    schedules = build_or_usage_error("T", lambda: [("linear", LinearSchedule(T)), ("cosine", CosineSchedule(T)),
                                                   ("continuous cosine", ContinuousCosineSchedule(T))])
    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    for name, sched in schedules:
        tab = sched.table()
        u = torch.arange(T) / T
        ax1.plot(u, tab.alphas_cumprod, label=name)
        ax2.plot(u, tab.betas, label=name)
    ax1.set(xlabel="t / T", ylabel="alpha_bar_t", title=f"signal kept: alpha_bar_t (T={T})")
    ax2.set(xlabel="t / T", ylabel="beta_t", title=f"noise added per step: beta_t (T={T})", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a config of conf/ from inside a Hydra app (``@hydra.main`` has initialised Hydra) or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=list(overrides or []))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides or []))


def training_config(cfg: DictConfig) -> DictConfig:
    """The training config (conf/config.yaml) with the data, schedule and process chosen in ``cfg`` (``data=``,
    ``schedule=``, ``process=`` and their keys) in place of its defaults: what ``diffusion.train`` composes from
    the same overrides. Their interpolations resolve in the training config (``data.seed`` is its ``seed``)."""
    train = compose_config("config")
    for group in TRAINING_GROUPS:
        if cfg.get(group) is not None:
            train[group] = cfg[group]
    return train


def forward_figure(train_cfg: DictConfig, n: int, columns: int, out: Path, seed: int = 0) -> Path:
    """``n`` real images (rows) of a training config's data noised (or blurred, ``process=blur``) by q(x_t | x_0)
    at ``columns`` times t from 0 (the image itself) to T, in the papers' numbering: column t shows
    ``q_sample(x_0, t - 1)`` (0-based timesteps)."""
    import torch
    from hydra.utils import instantiate

    from diffusion.processes import build_process
    from diffusion.training.module import to_model_range

    if columns < 2:
        raise UsageError(f"columns={columns} is invalid: it must be >= 2 (t = 0 and t = T)")
    datamodule = build_or_usage_error("data", lambda: instantiate(train_cfg.data))
    learn_sigma = bool(train_cfg.model.get("learn_sigma", False))
    process = build_or_usage_error("process", lambda: build_process(OmegaConf.to_container(train_cfg.process, resolve=True),
                                                                    instantiate(train_cfg.schedule), datamodule.channels,
                                                                    learn_sigma))
    T, schedule = process.num_timesteps, schedule_name(train_cfg.schedule._target_)
    setting = process.kind if process.continuous_time else f"{schedule}_T{T}"  # edm, flow: no schedule, no T
    path = _new_path(out / f"forward_{setting}_{datamodule.name}_n{n}_cols{columns}_seed{seed}.png")
    build_or_usage_error("data", lambda: (datamodule.prepare_data(), datamodule.setup("fit")))
    from diffusion.metrics.classifier import split_images

    x0 = to_model_range(split_images(datamodule, "train", n))  # the images alone (data.conditional: no labels), unflipped
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)  # one eps per image for every column
    columns_at = process.figure_columns(columns)  # (label, t): the process's own time (t, or EDM's sigma)
    cols = [x0 if t is None else process.figure_state(x0, t, noise) for _, t in columns_at]
    what = f"{process.describe()}, {schedule} schedule, T={T}"
    if process.continuous_time:
        what = process.describe() + (" (shown / sqrt(1 + sigma^2))" if process.time_name == "σ" else "")
    title = f"forward process {what}: {datamodule.name}, seed {seed}"
    return _save_rows(torch.stack(cols, dim=1), path, title, [label for label, _ in columns_at])


def _load(ckpt: str, ema: bool = True, trust: bool = False) -> DiffusionModule:
    from diffusion.training.module import DiffusionModule

    return build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(ckpt, ema=ema, trust=trust))


def classes_and_sampler(module: DiffusionModule, source: str, classes, sampler: DictConfig | None):
    """(the class indices a figure of ``module`` draws, or None for an unconditional model; its sampler), checked
    as ``diffusion.sample`` checks them (``classes``, ``sampler=<name>``, ``sampler.*``): a bad value, a class the
    model does not have, classes or guidance for an unconditional model are a one-line UsageError naming
    ``source``, before any work."""
    from diffusion.run.sampling import check_guidance, chosen_classes, chosen_sampler

    named = OmegaConf.create({"ckpt": str(source), "classes": classes})
    chosen = chosen_classes(named, module)
    own = OmegaConf.create({}) if sampler is None else sampler  # None: the checkpoint's own sampler as it is
    built = build_or_usage_error("sampler", lambda: chosen_sampler(module, own))
    check_guidance(module, built, named)
    return chosen, built


def classes_tag(module: DiffusionModule, classes: torch.Tensor) -> str:
    """``all`` for every class of the model in order, else the indices joined by '-' (file names)."""
    return "all" if classes.tolist() == list(range(module.num_classes)) else "-".join(str(k) for k in classes.tolist())


def describe(sampler, conditional: bool) -> str:
    """The sampler's description, naming the guidance scale of a class-conditional model also at w = 1."""
    return sampler.describe() + (", guidance 1 (conditional)" if conditional and sampler.guidance_scale == 1.0 else "")


def reverse_figure(ckpt: str, n: int | None, transitions: int, out: Path, sampler: DictConfig | None = None,
                   seed: int = 0, classes=None, trust: bool = False) -> Path:
    """``n`` samples (rows; default 4) seen at ``transitions`` + 1 evenly spaced points of the reverse chain, x_T to
    x_0; each column is labelled with its t. ``sampler``: ``sampler=<name>`` / ``sampler.*`` as in
    ``diffusion.sample`` (None: the checkpoint's own). A class-conditional checkpoint: ``n`` (default 1) of each of
    ``classes``, class by class, each row labelled with its class name, guided at ``sampler.guidance_scale``."""
    import torch

    if transitions < 1:
        raise UsageError(f"transitions={transitions} is invalid: it must be >= 1")
    module = _load(ckpt, trust=trust)
    chosen_classes, chosen = classes_and_sampler(module, ckpt, classes, sampler)
    times = chosen.kept_times(transitions + 1)  # t=1000 ... t=0, a label per kept state
    n = n if n is not None else 4 if chosen_classes is None else 1
    name = f"reverse_{chosen.name}_{chosen.num_steps}steps_{len(times) - 1}transitions_{Path(ckpt).stem}"
    if chosen_classes is None:
        labels = row_labels = None
    else:
        name += f"_classes{classes_tag(module, chosen_classes)}_w{chosen.guidance_scale:g}"
        labels = chosen_classes.repeat_interleave(n)  # class by class: n rows each
        row_labels = [module.class_names[k] for k in labels.tolist()]
    path = _new_path(out / f"{name}_n{n}_seed{seed}.png")
    out_ = module.sample(len(labels) if labels is not None else n, sampler=chosen, generator=torch.Generator().manual_seed(seed),
                         return_trajectory=True, progress=True, trajectory_points=transitions + 1, labels=labels)
    rows = out_.trajectory.transpose(0, 1)
    run_name = Path(ckpt).resolve().parent.parent.name  # <run>/checkpoints/<file>
    title = f"reverse process: {describe(chosen, labels is not None)}; {run_name}/{Path(ckpt).name}, seed {seed}"
    return _save_rows(rows, path, title, times, row_labels)


def distinct_checkpoints(run: str, trust: bool = False) -> list[tuple[int, int, list[Path]]]:
    """(global step, epoch, files) of every distinct checkpoint of a run, by step ('last' often equals 'best')."""
    from diffusion.sharing.checkpoints import load_file

    ckpts = sorted(Path(run).glob("checkpoints/*.ckpt"))
    if not ckpts:
        raise UsageError(f"run={run} has no checkpoints/*.ckpt")
    by_step: dict[int, tuple[int, list[Path]]] = {}
    for path in ckpts:
        try:
            meta = load_file(path, "checkpoint", mmap=True, trust=trust)
        except ValueError as exc:  # a truncated or foreign file: one line naming it
            raise UsageError(str(exc)) from exc
        step, epoch = int(meta.get("global_step", 0)), int(meta.get("epoch", 0))
        by_step.setdefault(step, (epoch, []))[1].append(path)
    return [(step, epoch, paths) for step, (epoch, paths) in sorted(by_step.items())]


def progression_figure(run: str, n: int | None, out: Path, sampler: DictConfig | None = None, seed: int = 0,
                       classes=None, trust: bool = False) -> Path:
    """One row per distinct checkpoint of a run (ordered by training step, labelled with it), all sampled from the
    same noise with each checkpoint's own sampler (or ``sampler=<name>``), ``sampler.*`` changed; a run with a
    single distinct checkpoint is refused (there is no progression to show). A class-conditional run: ``n``
    (default 1) images of each of ``classes`` per row, each column labelled with its class name, guided at
    ``sampler.guidance_scale``."""
    import torch

    loaded = distinct_checkpoints(run, trust)
    if len(loaded) < 2:
        step, _, paths = loaded[0]
        raise UsageError(f"run={run} has one distinct checkpoint (step {step}: {', '.join(p.name for p in paths)}): "
                         "a progression needs two; train with callbacks.model_checkpoint.save_top_k=-1 to keep one per epoch")
    first_path = loaded[0][2][0]
    first = _load(str(first_path), trust=trust)
    chosen_classes, first_sampler = classes_and_sampler(first, first_path, classes, sampler)  # bad ones: before any work
    n = n if n is not None else 8 if chosen_classes is None else 1
    steps = "-".join(str(s) for s, _, _ in loaded)
    name = f"progression_{Path(run).resolve().name}_steps{steps}"
    labels = column_labels = None
    if chosen_classes is not None:
        name += f"_classes{classes_tag(first, chosen_classes)}_w{first_sampler.guidance_scale:g}"
        labels = chosen_classes.repeat_interleave(n)  # class by class: n columns each
        column_labels = [first.class_names[k] for k in labels.tolist()]
    path = _new_path(out / f"{name}_n{n}_seed{seed}.png")
    rows, samplers = [], set()
    for _, _, paths in loaded:  # the same seed: the same x_T (N(0, I), or a blur model's prior draw) for every checkpoint
        module = _load(str(paths[0]), trust=trust)
        _, chosen = classes_and_sampler(module, paths[0], classes, sampler)
        samplers.add(describe(chosen, labels is not None))
        count = n if labels is None else len(labels)
        rows.append(module.sample(count, sampler=chosen, generator=torch.Generator().manual_seed(seed), labels=labels).samples)
    title = f"samples of each checkpoint of {Path(run).resolve().name}: {'; '.join(sorted(samplers))}, seed {seed}"
    return _save_rows(torch.stack(rows), path, title, column_labels, row_labels=[f"step {s}, epoch {e}" for s, e, _ in loaded])


# ----------------------------------------------------------------------------------------------- the command
def make_figure(cfg: DictConfig) -> Path:
    """Check every option, then draw the figure ``cfg.figure`` into ``out`` (and log it to ``wandb_run``'s W&B run);
    returns its path."""
    figure = check_options(cfg)
    out, seed, trust = out_dir(cfg), cfg.seed, bool(cfg.trust_checkpoint)
    sampler = cfg.get("sampler")
    if figure == "schedules":
        path = schedules_figure(_count(cfg, "T", 1000), out)
    elif figure == "forward":
        path = forward_figure(training_config(cfg), _count(cfg, "n", 8), _count(cfg, "columns", 11, 2), out, seed)
    elif figure == "reverse":
        path = reverse_figure(str(cfg.ckpt), cfg.n, _count(cfg, "transitions", 10), out, sampler, seed, cfg.classes, trust)
    else:
        path = progression_figure(str(cfg.run), cfg.n, out, sampler, seed, cfg.classes, trust)
    if cfg.wandb_run is not None:  # at the run's last step
        build_or_usage_error("wandb_run", lambda: log_to_training_run(str(cfg.wandb_run), images={f"figures/{figure}": path}))
    log.info("written %s%s", path, f" (and logged to the W&B run of {cfg.wandb_run})" if cfg.wandb_run is not None else "")
    return path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="figures")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    make_figure(cfg)


if __name__ == "__main__":
    main()
