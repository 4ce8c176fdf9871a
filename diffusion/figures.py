"""The figures of the seed reports, as PNG files:

    python -m diffusion.figures schedules --T 1000 --out figs/                  # alpha_bar and beta: linear/cosine/...
    python -m diffusion.figures forward --out figs/ data=digits schedule=cosine  # real images noised from t=0 to T
    python -m diffusion.figures reverse --ckpt RUN/checkpoints/last.ckpt --transitions 10 --out figs/
    python -m diffusion.figures progression --run RUN --out figs/                # every checkpoint, same noise
    python -m diffusion.figures reverse --ckpt COND.ckpt --classes 3 7 --guidance-scale 3 --out figs/

A class-conditional checkpoint (trained with ``data.conditional=true``) draws ``--n`` images of each of
``--classes`` (default all: one image of each class), guided at ``--guidance-scale`` w (default: the checkpoint's
sampler's, 1 = conditional): in ``reverse`` one row per image, labelled with its class name, in ``progression`` one
column per image, labelled likewise; the file name holds the classes and w. ``--classes`` or ``--guidance-scale``
for an unconditional checkpoint, or a class it does not have, is refused before any work.

Trailing ``key=value`` arguments of ``forward`` are Hydra overrides of the training config (data, schedule).
Image grids have one row per image (a progression: per checkpoint, labelled with its step and epoch) and one column
per time, labelled with its t; small images are enlarged (nearest neighbour) to >= 64 px and each figure is titled
with its settings. Each file's name holds the settings that made it, and an existing file is never overwritten: the
command stops before any work and says so. ``--wandb-run RUN`` also logs the figure to that training run's W&B run,
at its last training step.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from diffusion.checkpoints import load_file
from diffusion.grids import GridLayout, grid_array, labelled_figure, readable_scale, save_new
from diffusion.module import DiffusionModule, to_model_range
from diffusion.runtime import CONFIG_DIR, UsageError, build_or_usage_error, log_to_training_run
from diffusion.samplers.guidance import check_labels
from diffusion.samplers.registry import sampler_names


def _new_path(path: Path) -> Path:
    """Figures never overwrite: a figure whose file exists is refused before any work (its name holds its settings)."""
    if path.exists():
        raise UsageError(f"{path} already exists: figures are never overwritten; choose another --out (or remove the file)")
    return path


def _save(fig, path: Path) -> Path:
    try:
        return save_new(fig, path)
    except FileExistsError as exc:  # written by someone else while this figure was computed
        raise UsageError(f"{path} already exists: figures are never overwritten; choose another --out") from exc


def _save_rows(rows: torch.Tensor, path: Path, title: str, column_labels=None, row_labels=None) -> Path:
    """rows: (R, K, C, H, W) in [-1, 1] -> one labelled PNG with R rows of K images, enlarged to a readable size."""
    r, k = rows.shape[:2]
    scale = readable_scale(max(rows.shape[-2:]))
    grid = grid_array(rows.reshape(r * k, *rows.shape[2:]), nrow=k, scale=scale)
    layout = GridLayout.of(r * k, rows.shape[-1], k, scale=scale)
    return _save(labelled_figure(grid, layout, title, column_labels, row_labels), path)


def schedule_name(target: str) -> str:
    """``diffusion.schedules.ContinuousCosineSchedule`` -> ``continuous_cosine``."""
    name = target.rsplit(".", 1)[-1].removesuffix("Schedule")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def schedules_figure(T: int, out: Path) -> Path:
    """alpha_bar_t and beta_t of the linear, cosine and continuous-cosine schedules (Nichol & Dhariwal Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from diffusion.schedules import ContinuousCosineSchedule, CosineSchedule, LinearSchedule

    path = _new_path(out / f"schedules_T{T}.png")
    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    for name, sched in [("linear", LinearSchedule(T)), ("cosine", CosineSchedule(T)), ("continuous cosine", ContinuousCosineSchedule(T))]:
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


def forward_figure(overrides: list[str], n: int, columns: int, out: Path, seed: int = 0) -> Path:
    """``n`` real images (rows) noised (or blurred, ``process=blur``) by q(x_t | x_0) at ``columns`` times t from 0
    (the image itself) to T, in the papers' numbering: column t shows ``q_sample(x_0, t - 1)`` (0-based timesteps)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from diffusion.processes import build_process

    if columns < 2:
        raise UsageError(f"columns={columns} is invalid: it must be >= 2 (t = 0 and t = T)")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    datamodule = build_or_usage_error("data", lambda: instantiate(cfg.data))
    learn_sigma = bool(cfg.model.get("learn_sigma", False))
    process = build_or_usage_error("process", lambda: build_process(OmegaConf.to_container(cfg.process, resolve=True),
                                                                    instantiate(cfg.schedule), datamodule.channels, learn_sigma))
    T, schedule = process.num_timesteps, schedule_name(cfg.schedule._target_)
    path = _new_path(out / f"forward_{schedule}_T{T}_{datamodule.name}_n{n}_cols{columns}_seed{seed}.png")
    build_or_usage_error("data", lambda: (datamodule.prepare_data(), datamodule.setup("fit")))
    from diffusion.metrics.classifier import split_images

    x0 = to_model_range(split_images(datamodule, "train", n))  # the images alone (data.conditional: no labels), unflipped
    times = torch.linspace(0, T, columns).round().long().tolist()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)  # one eps per image for every column
    cols = [x0 if t == 0 else process.q_sample(x0, torch.full((len(x0),), t - 1), noise) for t in times]
    what = f"{process.describe()}, {schedule} schedule"
    title = f"forward process {what}, T={T}: {datamodule.name}, seed {seed}"
    return _save_rows(torch.stack(cols, dim=1), path, title, [f"t={t}" for t in times])


def _load(ckpt: str, ema: bool = True, trust: bool = False) -> DiffusionModule:
    return build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(ckpt, ema=ema, trust=trust))


def trajectory_times(sampler, points: int) -> list[str]:
    """The papers' t of each state a trajectory of ``points`` keeps (``sampler.state_times``: x_T first, 0 for x_0),
    as labels; a fractional t (the Karras samplers' sigmas fall between timesteps) with one decimal."""
    return [f"{t:.1f}" if isinstance(t, float) and not t.is_integer() else f"{int(t)}"
            for t in (sampler.state_times[i] for i in sorted(sampler.trajectory_indices(points)))]


def figure_classes(module: DiffusionModule, source: str, classes: list[str] | None,
                   guidance_scale: float | None) -> torch.Tensor | None:
    """The class indices a figure of a class-conditional ``module`` draws (``--classes``: None or ``all``: every
    class; else indices), None for an unconditional one; a UsageError naming the bad value, before any work."""
    if module.num_classes is None:
        if classes is not None:
            raise UsageError(f"--classes {' '.join(classes)} is invalid for {source}: the model is unconditional "
                             "(trained without data.conditional=true); leave --classes out")
        if guidance_scale is not None and guidance_scale != 1.0:
            raise UsageError(f"--guidance-scale {guidance_scale:g} is invalid for {source}: the model is unconditional "
                             "(trained without data.conditional=true), so there is nothing to guide")
        return None
    if classes is None or classes == ["all"]:
        return torch.arange(module.num_classes)
    allowed = f"all or class indices in 0..{module.num_classes - 1} (e.g. --classes 3 7)"
    if not all(re.fullmatch(r"[+-]?\d+", c) for c in classes):
        raise UsageError(f"--classes {' '.join(classes)} is invalid: it must be {allowed}")
    return build_or_usage_error("classes", lambda: check_labels([int(c) for c in classes], module.num_classes, "--classes"))


def classes_tag(module: DiffusionModule, classes: torch.Tensor) -> str:
    """``all`` for every class of the model in order, else the indices joined by '-' (file names)."""
    return "all" if classes.tolist() == list(range(module.num_classes)) else "-".join(str(k) for k in classes.tolist())


def guided_sampler(module: DiffusionModule, name: str | None, num_steps: int | None, guidance_scale: float | None):
    options = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    return build_or_usage_error("sampler", lambda: module.named_sampler(name, num_steps, **options))


def describe(sampler, conditional: bool) -> str:
    """The sampler's description, naming the guidance scale of a class-conditional model also at w = 1."""
    return sampler.describe() + (", guidance 1 (conditional)" if conditional and sampler.guidance_scale == 1.0 else "")


def reverse_figure(ckpt: str, n: int | None, transitions: int, out: Path, sampler: str | None = None,
                   num_steps: int | None = None, seed: int = 0, classes: list[str] | None = None,
                   guidance_scale: float | None = None, trust: bool = False) -> Path:
    """``n`` samples (rows; default 4) seen at ``transitions`` + 1 evenly spaced points of the reverse chain, x_T to
    x_0; each column is labelled with its t. A class-conditional checkpoint: ``n`` (default 1) of each of
    ``classes``, class by class, each row labelled with its class name, guided at ``guidance_scale``."""
    if transitions < 1:
        raise UsageError(f"transitions={transitions} is invalid: it must be >= 1")
    module = _load(ckpt, trust=trust)
    chosen_classes = figure_classes(module, ckpt, classes, guidance_scale)
    chosen = guided_sampler(module, sampler, num_steps, guidance_scale)
    times = trajectory_times(chosen, transitions + 1)
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
    return _save_rows(rows, path, title, [f"t={t}" for t in times], row_labels)


def distinct_checkpoints(run: str, trust: bool = False) -> list[tuple[int, int, list[Path]]]:
    """(global step, epoch, files) of every distinct checkpoint of a run, by step ('last' often equals 'best')."""
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


def progression_figure(run: str, n: int | None, out: Path, seed: int = 0, classes: list[str] | None = None,
                       guidance_scale: float | None = None, trust: bool = False) -> Path:
    """One row per distinct checkpoint of a run (ordered by training step, labelled with it), all sampled from the
    same noise; a run with a single distinct checkpoint is refused (there is no progression to show). A
    class-conditional run: ``n`` (default 1) images of each of ``classes`` per row, each column labelled with its
    class name, guided at ``guidance_scale``."""
    loaded = distinct_checkpoints(run, trust)
    if len(loaded) < 2:
        step, _, paths = loaded[0]
        raise UsageError(f"run={run} has one distinct checkpoint (step {step}: {', '.join(p.name for p in paths)}): "
                         "a progression needs two; train with callbacks.model_checkpoint.save_top_k=-1 to keep one per epoch")
    first = _load(str(loaded[0][2][0]), trust=trust)
    chosen_classes = figure_classes(first, run, classes, guidance_scale)
    scale = guided_sampler(first, None, None, guidance_scale).guidance_scale  # a bad one: refused before any work
    n = n if n is not None else 8 if chosen_classes is None else 1
    steps = "-".join(str(s) for s, _, _ in loaded)
    name = f"progression_{Path(run).resolve().name}_steps{steps}"
    labels = column_labels = None
    if chosen_classes is not None:
        name += f"_classes{classes_tag(first, chosen_classes)}_w{scale:g}"
        labels = chosen_classes.repeat_interleave(n)  # class by class: n columns each
        column_labels = [first.class_names[k] for k in labels.tolist()]
    path = _new_path(out / f"{name}_n{n}_seed{seed}.png")
    rows, samplers = [], set()
    for _, _, paths in loaded:  # the same seed: the same x_T (N(0, I), or a blur model's prior draw) for every checkpoint
        module = _load(str(paths[0]), trust=trust)
        sampler = guided_sampler(module, None, None, guidance_scale)
        samplers.add(describe(sampler, labels is not None))
        count = n if labels is None else len(labels)
        rows.append(module.sample(count, sampler=sampler, generator=torch.Generator().manual_seed(seed), labels=labels).samples)
    title = f"samples of each checkpoint of {Path(run).resolve().name}: {'; '.join(sorted(samplers))}, seed {seed}"
    return _save_rows(torch.stack(rows), path, title, column_labels, row_labels=[f"step {s}, epoch {e}" for s, e, _ in loaded])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m diffusion.figures", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="figure", required=True)
    p = sub.add_parser("schedules", help="alpha_bar and beta of the schedules")
    p.add_argument("--T", type=int, default=1000)
    p = sub.add_parser("forward", help="real images through the forward process")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--columns", type=int, default=11)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the training config, e.g. data=digits schedule=cosine")
    p = sub.add_parser("reverse", help="the reverse process of a checkpoint in K transitions")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=None, help="images (default 4), or of each class (default 1)")
    p.add_argument("--transitions", type=int, default=10)
    p.add_argument("--sampler", choices=sampler_names(), default=None, help="default: the checkpoint's own")
    p.add_argument("--num-steps", type=int, default=None)
    p = sub.add_parser("progression", help="samples of every checkpoint of a run from the same noise")
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=None, help="images (default 8), or of each class (default 1)")
    for p in (sub.choices["reverse"], sub.choices["progression"]):
        p.add_argument("--classes", nargs="+", default=None, metavar="K",
                       help="a class-conditional checkpoint: the classes to draw, e.g. 3 7 (default: all)")
        p.add_argument("--guidance-scale", type=float, default=None, metavar="W",
                       help="a class-conditional checkpoint: classifier-free guidance w (1 conditional, 0 "
                       "unconditional, > 1 guided; default: the checkpoint's sampler's)")
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=Path("figures"))
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--wandb-run", default=None, help="a training run directory: also log the figure to its W&B run")
        p.add_argument("--trust-checkpoint", action="store_true", help="read checkpoints with the full unpickler (runs "
                       "code a file may hold: only for files you trust; default: weights-only)")
    args = parser.parse_args(argv)
    try:
        if getattr(args, "n", None) is not None and args.n < 1:
            raise UsageError(f"--n {args.n} is invalid: it must be >= 1 (the number of images)")
        w = getattr(args, "guidance_scale", None)
        if w is not None and not (math.isfinite(w) and w >= 0):
            raise UsageError(f"--guidance-scale {w:g} is invalid: it must be a number >= 0 (1 conditional, 0 "
                             "unconditional, > 1 guided)")
        if args.figure == "schedules":
            path = schedules_figure(args.T, args.out)
        elif args.figure == "forward":
            path = forward_figure(args.overrides, args.n, args.columns, args.out, args.seed)
        elif args.figure == "reverse":
            path = reverse_figure(args.ckpt, args.n, args.transitions, args.out, args.sampler, args.num_steps, args.seed,
                                  args.classes, args.guidance_scale, args.trust_checkpoint)
        else:
            path = progression_figure(args.run, args.n, args.out, args.seed, args.classes, args.guidance_scale,
                                      args.trust_checkpoint)
        if args.wandb_run:
            log_to_training_run(args.wandb_run, images={f"figures/{args.figure}": path})  # at the run's last step
    except (UsageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"written {path}" + (f" (and logged to the W&B run of {args.wandb_run})" if args.wandb_run else ""))
    return path


if __name__ == "__main__":
    main()
