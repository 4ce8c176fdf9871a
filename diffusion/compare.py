"""Sample quality against cost: ``python -m diffusion.compare ckpt=PATH "samplers=[ddim,ddpm]" "nfe=[5,10,20]"``.

For each sampler named (registry names, ``conf/sampler/``; ``samplers=null``: every sampler that reverses the
checkpoint's process) and each target NFE (network evaluations per image), the sampler is built with
``num_steps = steps_for_nfe(nfe)`` and draws ``n`` images, every sampler from the same starting noise: one draw of the
process's prior from a CPU generator seeded with ``seed``, batch by batch, so image i starts from the same x_T under
every sampler (a sampler scales it by its ``init_noise_sigma``); a stochastic sampler draws its later noise from a
generator seeded with ``seed + 1``. Each cell records the metric of those images against the ``split`` images
(``fd_classifier``: the Frechet distance and KID on the features of a classifier trained on the data's training split,
:mod:`diffusion.metrics.classifier`, offline; ``fid``: Inception, with ``fid.weights``) and the sampling time per image.
A combination a sampler cannot run (more steps than T, ...) is logged and kept as a skipped row; a sampler that
cannot spend exactly the NFE asked for runs ``steps_for_nfe(nfe)`` steps and its row holds the NFE it spent.

Written into the run directory (one already holding any of them is refused: nothing is written over):
``compare.csv`` (a row per sampler and NFE), ``compare.md`` (the metric, a row per sampler and a column per NFE, then
KID and seconds per image), ``compare.png`` (the metric against NFE, one line per sampler, log NFE axis; seconds per
image against NFE) and ``grids/<sampler>_nfe<k>.png`` (the first ``grid_size`` images: the same starting noises in
every grid).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion.run.config import CONFIG_DIR, save_run_config
from diffusion.run.errors import UsageError, build_or_usage_error, exits_on_usage_error
from diffusion.run.outputs import require_ckpt

if TYPE_CHECKING:  # torch loads once the settings that need no checkpoint have passed
    import torch

log = logging.getLogger("diffusion.compare")

METRICS = ("fd_classifier", "fid")
#: what a comparison writes: a directory holding any of them is refused
OUTPUTS = ("compare.csv", "compare.md", "compare.png", "grids")
DESCRIPTION = {
    "fd_classifier": "Frechet distance on the features of a LeNet-like classifier trained on the data's training split",
    "fid": "FID (Frechet distance on Inception features)",
}


@dataclass
class Row:
    """One cell of the comparison: a sampler at a target NFE."""

    sampler: str
    target_nfe: int
    num_steps: int | None = None
    nfe: int | None = None  # the network evaluations it spent per image
    value: float | None = None  # the metric
    kid: float | None = None
    kid_std: float | None = None
    seconds_per_image: float | None = None
    status: str = "ok"  # ok | skipped
    stochastic: bool | None = None
    settings: str = ""  # sampler.describe()
    note: str = ""


# ----------------------------------------------------------------------------------------------- inputs
def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _as_list(value) -> list:
    if OmegaConf.is_list(value):
        return list(OmegaConf.to_container(value, resolve=True))
    return [value] if isinstance(value, (int, str)) else value


def check_nfe(value) -> list[int]:
    """The target NFEs, ascending; UsageError unless a non-empty list of distinct positive integers."""
    values = _as_list(value)
    if not isinstance(values, list) or not values or not all(_positive_int(v) for v in values) or len(set(values)) != len(values):
        raise UsageError(f"nfe={value} is invalid: it must be a list of distinct positive integers (network evaluations "
                         'per image), e.g. "nfe=[5,10,20]"')
    return sorted(values)


def check_sampler_names(value) -> list[str] | None:
    """The sampler names asked for (None: all that reverse the checkpoint's process); unknown names refused."""
    from diffusion.samplers.registry import sampler_names

    if value is None:
        return None
    names = _as_list(value)
    allowed = sampler_names()
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise UsageError(f"samplers={value} is invalid: it must be a list of distinct sampler names ({', '.join(allowed)})")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise UsageError(f"samplers={names} is invalid: {unknown[0]!r} is not a sampler; allowed values are {', '.join(allowed)}")
    return names


def check_inputs(cfg: DictConfig) -> tuple[list[str] | None, list[int]]:
    """Every setting that can be checked without the checkpoint, in one-line UsageErrors."""
    require_ckpt(cfg)
    if not Path(cfg.ckpt).is_file():
        raise UsageError(f"ckpt={cfg.ckpt} is not a file: compare reads a .ckpt file written by python -m diffusion.train")
    nfe = check_nfe(cfg.nfe)
    names = check_sampler_names(cfg.samplers)
    if not _positive_int(cfg.n) or cfg.n < 2:
        raise UsageError(f"n={cfg.n!r} is invalid: it must be an integer >= 2 (a Frechet distance needs a covariance)")
    for key in ("batch_size", "grid_size", "kid_subset_size", "kid_subsets"):
        if not _positive_int(cfg[key]):
            raise UsageError(f"{key}={cfg[key]!r} is invalid: it must be a positive integer")
    if cfg.max_images is not None and (not _positive_int(cfg.max_images) or cfg.max_images < 2):
        raise UsageError(f"max_images={cfg.max_images!r} is invalid: it must be an integer >= 2 (or null: the whole split)")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise UsageError(f"seed={cfg.seed!r} is invalid: it must be an integer")
    if cfg.metric not in METRICS:
        raise UsageError(f"metric={cfg.metric!r} is invalid: allowed values are {', '.join(METRICS)}")
    if cfg.split not in ("val", "train"):
        raise UsageError(f"split={cfg.split!r} is invalid: allowed values are val, train")
    out = Path(cfg.paths.output_dir)
    held = [name for name in OUTPUTS if (out / name).exists()]
    if held:
        raise UsageError(f"output directory {out} already holds {held[0]}: choose another hydra.run.dir")
    return names, nfe


# ----------------------------------------------------------------------------------------------- sampling
def starting_noise(process, shape: tuple[int, ...], n: int, batch_size: int, seed: int):
    """The starting noise of every sampler, batch by batch: prior draws from one CPU generator seeded with ``seed``
    (the same on every device)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        yield process.sample_prior((min(batch_size, n - start), *shape), generator, "cpu")


def sampler_for_nfe(module, name: str, nfe: int):
    """Sampler ``name`` with the steps that cost ``nfe`` network calls (ValueError when it cannot run them)."""
    from diffusion.samplers.registry import sampler_class, sampler_config

    num_steps = sampler_class(name).steps_for_nfe(nfe)
    return module.build_sampler(sampler_config(name), num_steps=num_steps)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def draw_from_noise(module, sampler, noise_batches, step_seed: int, desc: str, total: int | None = None) -> tuple[torch.Tensor, float]:
    """uint8 images from each starting-noise batch, and the seconds the sampling took (the network's calls and the
    sampler's steps, not the noise draws)."""
    import torch

    from diffusion.plots.grids import to_uint8

    device = module.device
    generator = torch.Generator(device=device).manual_seed(step_seed)
    images, seconds = [], 0.0
    for noise in tqdm(noise_batches, desc=desc, total=total, unit="batch", leave=False):
        noise = noise.to(device)
        _sync(device)
        start = time.perf_counter()
        out = sampler.sample(module.model, noise=noise, generator=generator, device=device)
        _sync(device)
        seconds += time.perf_counter() - start
        images.append(to_uint8(out.samples).cpu())
    return torch.cat(images), seconds


def quality(real: torch.Tensor, fake: torch.Tensor, feature, cfg: DictConfig, device) -> dict:
    """The Frechet distance and KID (its subsets drawn from ``seed``: the same subsets for every cell)."""
    import torch

    from diffusion.metrics import fid_kid

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return fid_kid(real, fake, feature, ("fid", "kid"), cfg.kid_subset_size, cfg.kid_subsets, cfg.batch_size, device)


# ----------------------------------------------------------------------------------------------- outputs
def write_new(path: Path, text: str) -> Path:
    """Write ``text`` to ``path``, which must not exist: a temporary file hard-linked into place (never half-written;
    FileExistsError if the path appeared meanwhile: nothing is written over)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: an exclusive create
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def csv_text(rows: list[Row], metric: str) -> str:
    buf = io.StringIO()
    fields = [f for f in asdict(rows[0]) if f != "value"] if rows else []
    header = ["sampler", "target_nfe", "num_steps", "nfe", metric, *[f for f in fields if f not in ("sampler", "target_nfe", "num_steps", "nfe")]]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        values = {**asdict(row), metric: row.value}
        writer.writerow(["" if values[h] is None else values[h] for h in header])
    return buf.getvalue()


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _table(rows: list[Row], names: list[str], nfes: list[int], cell) -> list[str]:
    lines = ["| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
    by_key = {(r.sampler, r.target_nfe): r for r in rows}
    for name in names:
        cells = []
        for k in nfes:
            r = by_key[(name, k)]
            if r.status != "ok":
                cells.append("skipped")
            else:
                cells.append(cell(r) + ("" if r.nfe == k else f" ({r.nfe} NFE)"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[Row], names: list[str], nfes: list[int], about: dict) -> str:
    lines = [f"# {about['metric']} against NFE", "", about["sentence"], "",
             *_table(rows, names, nfes, lambda r: _fmt(r.value)), "",
             "KID on the same features (x 1000, lower is better):", "",
             *_table(rows, names, nfes, lambda r: _fmt(None if r.kid is None else 1000 * r.kid, 3)), "",
             "Seconds per image (sampling only):", "",
             *_table(rows, names, nfes, lambda r: _fmt(r.seconds_per_image, 3))]
    skipped = [r for r in rows if r.status != "ok"]
    if skipped:
        lines += ["", "Skipped:", ""] + [f"- {r.sampler} at NFE {r.target_nfe}: {r.note}" for r in skipped]
    return "\n".join(lines) + "\n"


def ckpt_label(path: str | Path) -> str:
    """The checkpoint as a title names it: its run folder and file (``<run>/last.ckpt``), or the path if short."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}/{path.name}"
    return str(path) if len(str(path)) <= 60 else f".../{path.parent.name}/{path.name}"


def plot(rows: list[Row], names: list[str], about: dict):
    """Two panels: the metric against NFE (log-log where positive) and seconds per image against NFE."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), dpi=100, facecolor="white")
    quality_ax, time_ax = fig.subplots(1, 2)
    for name in names:
        done = sorted((r for r in rows if r.sampler == name and r.status == "ok"), key=lambda r: r.nfe)
        if not done:
            continue
        stochastic = bool(done[0].stochastic)
        style = {"marker": "o", "linestyle": "--" if stochastic else "-", "label": name + (" (stochastic)" if stochastic else "")}
        quality_ax.plot([r.nfe for r in done], [r.value for r in done], **style)
        time_ax.plot([r.nfe for r in done], [r.seconds_per_image for r in done], **style)
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    done = [r for r in rows if r.status == "ok"]
    values, times = [r.value for r in done], [r.seconds_per_image for r in done]
    ticks = sorted({r.target_nfe for r in done})  # the NFEs asked for (a point sits at the NFE it spent)
    for ax, ylabel, ys in ((quality_ax, f"{about['metric']} (lower is better)", values), (time_ax, "seconds per image", times)):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])  # in plain numbers
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ys and min(ys) > 0 and max(ys) > 10 * min(ys):  # a log axis only where the values span a decade
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 0.1, 0.2, 0.5, 1, ...
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("NFE (network evaluations per image, log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        if ys:
            ax.legend(fontsize=8)
    quality_ax.set_title(f"{about['metric']} against NFE")
    time_ax.set_title(f"sampling time per image ({about['device']})")
    title = f"{about['ckpt']}: {about['metric']} against NFE, n={about['n']} samples per point, seed {about['seed']}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.labels = {"Title": title}  # save_new writes it into the PNG's text chunks
    return fig


def grid_figure(images: torch.Tensor, name: str, sampler, target_nfe: int, seed: int):
    """The first images of a cell as a labelled grid (each enlarged to a readable size, pixel for pixel)."""
    from diffusion.plots.grids import GridLayout, grid_array, labelled_figure, readable_scale

    k = len(images)
    nrow = max(1, math.ceil(math.sqrt(k)))
    side = max(images.shape[-2:])
    layout = GridLayout.of(k, side, nrow, scale=readable_scale(side))
    import textwrap

    nfe_text = f"NFE {sampler.nfe}" + ("" if sampler.nfe == target_nfe else f" (asked {target_nfe})")
    width = max(32, layout.width // 7)  # characters of ~7 px that fit over the grid
    lines = [f"{name}, {nfe_text}", *textwrap.wrap(sampler.describe(), width), f"starting noises 0-{k - 1} of seed {seed}"]
    return labelled_figure(grid_array(images, nrow=nrow), layout, "\n".join(lines))


# ----------------------------------------------------------------------------------------------- the comparison
def compare(cfg: DictConfig) -> list[Row]:
    """Check every input, then run every sampler at every NFE and write the tables, the plot and the grids."""
    names, nfes = check_inputs(cfg)  # every check that needs no torch, before the imports below
    import torch

    from diffusion.metrics import inception, inception_weights
    from diffusion.metrics.classifier import (
        check_labels,
        check_options,
        set_up_datamodule,
        split_images,
        trained_classifier,
    )
    from diffusion.plots.grids import save_new
    from diffusion.run.sampling import resolve_device
    from diffusion.samplers.registry import sampler_names
    from diffusion.training.module import DiffusionModule

    feature = None
    if cfg.metric == "fid":
        feature = build_or_usage_error("fid", lambda: inception(inception_weights(cfg.fid.weights)))
    device = resolve_device(cfg.device)
    module = build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema,
                                                                                 trust=cfg.get("trust_checkpoint", False)))
    kind = module.process.kind
    allowed = sampler_names(kind)
    if names is None:
        names = allowed
    wrong = [n for n in names if n not in allowed]
    if wrong:
        raise UsageError(f"samplers={names} is invalid for {cfg.ckpt}: {wrong[0]} does not reverse its {kind} process; "
                         f"allowed values are {', '.join(allowed)}")
    data_cfg = cfg.get("data") or module.hparams.get("data")
    if not data_cfg:
        raise UsageError(f"ckpt={cfg.ckpt} stores no data config: pass data=<option> (and its data.root)")
    options = OmegaConf.to_container(cfg.classifier, resolve=True)
    if cfg.metric == "fd_classifier":
        build_or_usage_error("metric", lambda: (check_labels(data_cfg), check_options(options)))
    save_run_config(cfg)  # every check passed: record the config (a refused run leaves the directory as it was)

    out = Path(cfg.paths.output_dir)
    module = module.to(device)
    datamodule = build_or_usage_error("data", lambda: set_up_datamodule(data_cfg))
    real = split_images(datamodule, cfg.split, cfg.max_images)
    if len(real) < 2:
        raise UsageError(f"split={cfg.split} holds {len(real)} images: a Frechet distance needs >= 2 (use split=train)")
    about = {"metric": cfg.metric, "ckpt": ckpt_label(cfg.ckpt), "n": cfg.n, "seed": cfg.seed, "device": device.type}
    if cfg.metric == "fd_classifier":
        feature, info = build_or_usage_error("classifier", lambda: trained_classifier(
            data_cfg, cfg.paths.cache_dir, device, datamodule=datamodule, **options))
        accuracy = "no validation images" if info["accuracy"] is None else f"validation accuracy {100 * info['accuracy']:.2f}%"
        measure = f"{DESCRIPTION['fd_classifier']} ({accuracy}; `{info['path']}`)"
    else:
        measure = DESCRIPTION["fid"]
    about["sentence"] = (f"Checkpoint `{cfg.ckpt}` ({'EMA' if cfg.ema and module.has_ema else 'raw'} weights): {cfg.n} samples per "
                         f"cell, every sampler from the same starting noise (seed {cfg.seed}), against {len(real)} {cfg.split} "
                         f"images. {cfg.metric}: {measure}; lower is better. Seconds per image on {device.type}, batches of "
                         f"{cfg.batch_size}.")
    feature = feature.to(device)

    shape = module.image_shape
    with torch.inference_mode():  # one untimed call: the first cell's time holds no start-up cost
        warm = next(starting_noise(module.process, shape, min(cfg.n, cfg.batch_size), cfg.batch_size, cfg.seed))
        module.model(warm.to(device), torch.zeros(len(warm), dtype=torch.long, device=device))
    rows: list[Row] = []
    cells = [(name, k) for name in names for k in nfes]
    log.info("comparing %d samplers (%s) at NFE %s: %d cells of %d images", len(names), ", ".join(names), nfes, len(cells), cfg.n)
    for name, k in tqdm(cells, desc="sampler x NFE", unit="cell"):
        try:
            sampler = sampler_for_nfe(module, name, k)
        except (ValueError, NotImplementedError) as exc:
            rows.append(Row(name, k, status="skipped", note=" ".join(str(exc).split())))
            log.warning("%s at NFE %d skipped: %s", name, k, rows[-1].note)
            continue
        row = Row(name, k, num_steps=sampler.num_steps, nfe=sampler.nfe, stochastic=bool(sampler.stochastic), settings=sampler.describe())
        if sampler.nfe != k:
            row.note = f"{name} cannot spend exactly {k} NFE: {sampler.num_steps} steps spend {sampler.nfe}"
            log.info("%s", row.note)
        noise = starting_noise(module.process, shape, cfg.n, cfg.batch_size, cfg.seed)
        fake, seconds = draw_from_noise(module, sampler, noise, cfg.seed + 1, f"{name}, NFE {sampler.nfe}", math.ceil(cfg.n / cfg.batch_size))
        scores = quality(real, fake, feature, cfg, device)
        row.value, row.kid, row.kid_std, row.seconds_per_image = scores["fid"], scores["kid"], scores["kid_std"], seconds / cfg.n
        rows.append(row)
        save_new(grid_figure(fake[: cfg.grid_size], name, sampler, k, cfg.seed), out / "grids" / f"{name}_nfe{k}.png")
        log.info("%s at NFE %d (%s): %s %.4g, KID %.4g, %.3g s per image", name, sampler.nfe, row.settings, cfg.metric,
                 row.value, row.kid, row.seconds_per_image)

    write_new(out / "compare.csv", csv_text(rows, cfg.metric))
    table = markdown(rows, names, nfes, about)
    write_new(out / "compare.md", table)
    save_new(plot(rows, names, about), out / "compare.png")
    print(table, end="")
    log.info("written %s, %s, %s and %d grids in %s", "compare.csv", "compare.md", "compare.png",
             sum(r.status == "ok" for r in rows), out / "grids")
    return rows


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    compare(cfg)


if __name__ == "__main__":
    main()
