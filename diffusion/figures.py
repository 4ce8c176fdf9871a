"""The figures of the seed reports, as PNG files:

    python -m diffusion.figures schedules --T 1000 --out figs/                  # alpha_bar and beta: linear/cosine/...
    python -m diffusion.figures forward --out figs/ data=digits schedule=cosine  # real images noised from t=0 to T
    python -m diffusion.figures reverse --ckpt RUN/checkpoints/last.ckpt --transitions 10 --out figs/
    python -m diffusion.figures progression --run RUN --out figs/                # every checkpoint, same noise

Trailing ``key=value`` arguments of ``forward`` are Hydra overrides of the training config (data, schedule).
Image grids have one row per image and one column per time; each file's name says what it shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

from diffusion.module import DiffusionModule, to_model_range
from diffusion.runtime import UsageError, build_or_usage_error, log_to_training_run

PADDING = 2


def _save_grid(rows: torch.Tensor, path: Path) -> Path:
    """rows: (R, K, C, H, W) in [-1, 1] -> one PNG with R rows of K images."""
    r, k = rows.shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((rows.reshape(r * k, *rows.shape[2:]).clamp(-1, 1) + 1) / 2, path, nrow=k, padding=PADDING)
    return path


def schedules_figure(T: int, out: Path) -> Path:
    """alpha_bar_t and beta_t of the linear, cosine and continuous-cosine schedules (Nichol & Dhariwal Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion.schedules import ContinuousCosineSchedule, CosineSchedule, LinearSchedule

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, sched in [("linear", LinearSchedule(T)), ("cosine", CosineSchedule(T)), ("continuous cosine", ContinuousCosineSchedule(T))]:
        tab = sched.table()
        u = torch.arange(T) / T
        ax1.plot(u, tab.alphas_cumprod, label=name)
        ax2.plot(u, tab.betas, label=name)
    ax1.set(xlabel="t / T", ylabel="alpha_bar_t", title="signal kept: alpha_bar_t")
    ax2.set(xlabel="t / T", ylabel="beta_t", title="noise added per step: beta_t", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / f"schedules_T{T}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def forward_figure(overrides: list[str], n: int, columns: int, out: Path, seed: int = 0) -> Path:
    """``n`` real images (rows) noised (or blurred, ``process=blur``) by q(x_t | x_0) at ``columns`` times from t=0 to T-1."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffusion.blur import BlurDiffusion
    from diffusion.module import build_process
    from diffusion.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    datamodule = build_or_usage_error("data", lambda: instantiate(cfg.data))
    build_or_usage_error("data", lambda: (datamodule.prepare_data(), datamodule.setup("fit")))
    x0 = to_model_range(torch.stack([datamodule.train_set[i] for i in range(min(n, len(datamodule.train_set)))]))
    options = {k: cfg.module[k] for k in ("variance", "loss_type", "objective", "min_snr_gamma", "hybrid_lambda")}
    learn_sigma = bool(cfg.model.get("learn_sigma", False))
    process = build_or_usage_error("schedule", lambda: build_process(instantiate(cfg.schedule), x0.shape[1], **options,
                                                                     learn_sigma=learn_sigma))
    T = process.num_timesteps
    times = torch.linspace(0, T - 1, columns).round().long()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    cols = [process.q_sample(x0, torch.full((len(x0),), int(t)), noise) for t in times]
    kind = "blur" if isinstance(process, BlurDiffusion) else "noise"
    return _save_grid(torch.stack(cols, dim=1), out / f"forward_{kind}_{datamodule.name}_T{T}_{columns}steps.png")


def _load(ckpt: str, ema: bool = True) -> DiffusionModule:
    return build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(ckpt, ema=ema))


def reverse_figure(ckpt: str, n: int, transitions: int, out: Path, sampler: str = "configured", num_steps: int | None = None, seed: int = 0) -> Path:
    """``n`` samples (rows) seen at ``transitions`` + 1 evenly spaced points of the reverse chain, x_T to x_0."""
    if transitions < 1:
        raise UsageError(f"transitions={transitions} is invalid: it must be >= 1")
    module = _load(ckpt)
    chosen = build_or_usage_error("sampler", lambda: module.named_sampler(sampler, num_steps))
    out_ = module.sample(n, sampler=chosen, generator=torch.Generator().manual_seed(seed), return_trajectory=True,
                         progress=True, trajectory_points=transitions + 1)
    rows = out_.trajectory.transpose(0, 1)
    return _save_grid(rows, out / f"reverse_{type(chosen).__name__}_{chosen.num_steps}steps_{rows.shape[1] - 1}transitions.png")


def progression_figure(run: str, n: int, out: Path, seed: int = 0) -> Path:
    """One row per checkpoint of a run (ordered by training step), all sampled from the same noise."""
    ckpts = sorted(Path(run).glob("checkpoints/*.ckpt"))
    if not ckpts:
        raise UsageError(f"run={run} has no checkpoints/*.ckpt")
    loaded = []
    for path in ckpts:
        step = torch.load(path, map_location="cpu", weights_only=False).get("global_step", 0)
        loaded.append((step, path))
    loaded = sorted(dict((s, p) for s, p in loaded).items())  # one per step ('last' may equal 'best')
    rows = []
    for _, path in loaded:  # the same seed: the same x_T (N(0, I), or a blur model's prior draw) for every checkpoint
        rows.append(_load(str(path)).sample(n, generator=torch.Generator().manual_seed(seed)).samples)
    steps = "-".join(str(s) for s, _ in loaded)
    return _save_grid(torch.stack(rows), out / f"progression_steps_{steps}.png")


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
    p.add_argument("--sampler", choices=["configured", "ddpm", "ddim", "cold"], default="configured")
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
        if args.figure == "schedules":
            path = schedules_figure(args.T, args.out)
        elif args.figure == "forward":
            path = forward_figure(args.overrides, args.n, args.columns, args.out, args.seed)
        elif args.figure == "reverse":
            path = reverse_figure(args.ckpt, args.n, args.transitions, args.out, args.sampler, args.num_steps, args.seed)
        else:
            path = progression_figure(args.run, args.n, args.out, args.seed)
        if args.wandb_run:
            log_to_training_run(args.wandb_run, images={f"figures/{args.figure}": path})
    except (UsageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"written {path}" + (f" (and logged to the W&B run of {args.wandb_run})" if args.wandb_run else ""))
    return path


if __name__ == "__main__":
    main()
