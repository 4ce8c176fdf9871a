"""The figures of the seed reports, as PNG files:

    python -m diffusion.figures schedules --T 1000 --out figs/                  # alpha_bar and beta: linear/cosine/...
    python -m diffusion.figures forward --out figs/ data=digits schedule=cosine  # real images noised from t=0 to T
    python -m diffusion.figures reverse --ckpt RUN/checkpoints/last.ckpt --transitions 10 --out figs/
    python -m diffusion.figures progression --run RUN --out figs/                # every checkpoint, same noise

Trailing ``key=value`` arguments of ``forward`` are Hydra overrides of the training config (data, schedule).
Image grids have one row per image (a progression: per checkpoint, labelled with its step and epoch) and one column
per time, labelled with its t; small images are enlarged (nearest neighbour) to >= 64 px and each figure is titled
with its settings. Each file's name holds the settings that made it, and an existing file is never overwritten: the
command stops before any work and says so. ``--wandb-run RUN`` also logs the figure to that training run's W&B run,
at its last training step.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from diffusion.grids import GridLayout, grid_array, labelled_figure, readable_scale, save_new
from diffusion.module import DiffusionModule, to_model_range
from diffusion.runtime import CONFIG_DIR, UsageError, build_or_usage_error, log_to_training_run
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
    x0 = to_model_range(torch.stack([datamodule.train_set[i] for i in range(min(n, len(datamodule.train_set)))]))
    times = torch.linspace(0, T, columns).round().long().tolist()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)  # one eps per image for every column
    cols = [x0 if t == 0 else process.q_sample(x0, torch.full((len(x0),), t - 1), noise) for t in times]
    what = f"{process.describe()}, {schedule} schedule"
    title = f"forward process {what}, T={T}: {datamodule.name}, seed {seed}"
    return _save_rows(torch.stack(cols, dim=1), path, title, [f"t={t}" for t in times])


def _load(ckpt: str, ema: bool = True) -> DiffusionModule:
    return build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(ckpt, ema=ema))


def trajectory_times(sampler, points: int) -> list[str]:
    """The papers' t of each state a trajectory of ``points`` keeps (``sampler.state_times``: x_T first, 0 for x_0),
    as labels; a fractional t (the Karras samplers' sigmas fall between timesteps) with one decimal."""
    return [f"{t:.1f}" if isinstance(t, float) and not t.is_integer() else f"{int(t)}"
            for t in (sampler.state_times[i] for i in sorted(sampler.trajectory_indices(points)))]


def reverse_figure(ckpt: str, n: int, transitions: int, out: Path, sampler: str | None = None, num_steps: int | None = None, seed: int = 0) -> Path:
    """``n`` samples (rows) seen at ``transitions`` + 1 evenly spaced points of the reverse chain, x_T to x_0;
    each column is labelled with its t."""
    if transitions < 1:
        raise UsageError(f"transitions={transitions} is invalid: it must be >= 1")
    module = _load(ckpt)
    chosen = build_or_usage_error("sampler", lambda: module.named_sampler(sampler, num_steps))
    times = trajectory_times(chosen, transitions + 1)
    name = f"reverse_{chosen.name}_{chosen.num_steps}steps_{len(times) - 1}transitions"
    path = _new_path(out / f"{name}_{Path(ckpt).stem}_n{n}_seed{seed}.png")
    out_ = module.sample(n, sampler=chosen, generator=torch.Generator().manual_seed(seed), return_trajectory=True,
                         progress=True, trajectory_points=transitions + 1)
    rows = out_.trajectory.transpose(0, 1)
    run_name = Path(ckpt).resolve().parent.parent.name  # <run>/checkpoints/<file>
    title = f"reverse process: {chosen.describe()}; {run_name}/{Path(ckpt).name}, seed {seed}"
    return _save_rows(rows, path, title, [f"t={t}" for t in times])


def distinct_checkpoints(run: str) -> list[tuple[int, int, list[Path]]]:
    """(global step, epoch, files) of every distinct checkpoint of a run, by step ('last' often equals 'best')."""
    ckpts = sorted(Path(run).glob("checkpoints/*.ckpt"))
    if not ckpts:
        raise UsageError(f"run={run} has no checkpoints/*.ckpt")
    by_step: dict[int, tuple[int, list[Path]]] = {}
    for path in ckpts:
        try:
            meta = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line naming it
            raise UsageError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from exc
        step, epoch = int(meta.get("global_step", 0)), int(meta.get("epoch", 0))
        by_step.setdefault(step, (epoch, []))[1].append(path)
    return [(step, epoch, paths) for step, (epoch, paths) in sorted(by_step.items())]


def progression_figure(run: str, n: int, out: Path, seed: int = 0) -> Path:
    """One row per distinct checkpoint of a run (ordered by training step, labelled with it), all sampled from the
    same noise; a run with a single distinct checkpoint is refused (there is no progression to show)."""
    loaded = distinct_checkpoints(run)
    if len(loaded) < 2:
        step, _, paths = loaded[0]
        raise UsageError(f"run={run} has one distinct checkpoint (step {step}: {', '.join(p.name for p in paths)}): "
                         "a progression needs two; train with callbacks.model_checkpoint.save_top_k=-1 to keep one per epoch")
    steps = "-".join(str(s) for s, _, _ in loaded)
    path = _new_path(out / f"progression_{Path(run).resolve().name}_steps{steps}_n{n}_seed{seed}.png")
    rows, samplers = [], set()
    for _, _, paths in loaded:  # the same seed: the same x_T (N(0, I), or a blur model's prior draw) for every checkpoint
        module = _load(str(paths[0]))
        samplers.add(module.sampler.describe())
        rows.append(module.sample(n, generator=torch.Generator().manual_seed(seed)).samples)
    title = f"samples of each checkpoint of {Path(run).resolve().name}: {'; '.join(sorted(samplers))}, seed {seed}"
    return _save_rows(torch.stack(rows), path, title, row_labels=[f"step {s}, epoch {e}" for s, e, _ in loaded])


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
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--transitions", type=int, default=10)
    p.add_argument("--sampler", choices=sampler_names(), default=None, help="default: the checkpoint's own")
    p.add_argument("--num-steps", type=int, default=None)
    p = sub.add_parser("progression", help="samples of every checkpoint of a run from the same noise")
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=8)
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=Path("figures"))
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--wandb-run", default=None, help="a training run directory: also log the figure to its W&B run")
    args = parser.parse_args(argv)
    try:
        if getattr(args, "n", 1) < 1:
            raise UsageError(f"--n {args.n} is invalid: it must be >= 1 (the number of images)")
        if args.figure == "schedules":
            path = schedules_figure(args.T, args.out)
        elif args.figure == "forward":
            path = forward_figure(args.overrides, args.n, args.columns, args.out, args.seed)
        elif args.figure == "reverse":
            path = reverse_figure(args.ckpt, args.n, args.transitions, args.out, args.sampler, args.num_steps, args.seed)
        else:
            path = progression_figure(args.run, args.n, args.out, args.seed)
        if args.wandb_run:
            log_to_training_run(args.wandb_run, images={f"figures/{args.figure}": path})  # at the run's last step
    except (UsageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"written {path}" + (f" (and logged to the W&B run of {args.wandb_run})" if args.wandb_run else ""))
    return path


if __name__ == "__main__":
    main()
