"""Turn a Hydra sweep into a table and a plot: ``python -m diffusion.report sweep=outputs/train/multirun/<date_time>``
(its options: conf/report.yaml).

Each job directory of the sweep holds ``.hydra/overrides.yaml`` (what was swept) and ``metrics.json`` (written by
``diffusion.train``), and possibly ``results.json`` files of ``diffusion.evaluate`` runs made inside it
(``hydra.run.dir=<job>/eval``). The report lists one row per job: the parameters that vary across jobs, then the
final metrics, and plots each metric against each swept parameter. It writes ``report.csv``, ``report.md`` and
``report.png`` into the sweep directory.

An evaluate sweep (``python -m diffusion.evaluate -m ckpt=PATH metrics=[fd_classifier] sampler.guidance_scale=0,1,2,4``,
in ``outputs/evaluate/multirun/<date_time>``) is read the same way, each job's own ``results.json`` holding its
metrics: ``fd_classifier`` (the Frechet distance on the classifier's features), ``class_accuracy`` (a class-conditional
checkpoint's samples labelled as their class; the plot marks chance), ``confident`` and ``diversity_ratio`` (within-class
diversity of the samples over the real images'), besides ``nll_bpd``, ``fid`` and ``kid``; jobs without
``results.json`` (failed) are listed.

It names the best job, in its row and in a last line ``best: trial N val/loss=... params ...``: for a search
(``hparams_search=...``) the job of the sweeper's ``optimization_results.yaml`` (best_params, best_value); N is its
directory, which is Optuna's trial number unless a stored study (``hydra.sweeper.storage``) continued an earlier
one. For a grid sweep: ``best: job N``, the lowest val/loss. Jobs without metrics.json (failed) are listed.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig, OmegaConf

from diffusion.run.config import CONFIG_DIR
from diffusion.run.errors import UsageError, build_or_usage_error, exits_on_usage_error

log = logging.getLogger("diffusion.report")

METRIC_KEYS = ("val/loss", "train/loss_epoch")
#: the columns of the table, in this order (those that some job has)
COLUMNS = ("val/loss", "train/loss_epoch", "nll_bpd", "fid", "kid", "fd_classifier", "class_accuracy", "confident",
           "diversity_ratio", "global_step")
#: what each fd_classifier column reads in results.json's "fd_classifier"
FD_CLASSIFIER_KEYS = {"fd_classifier": "value", "class_accuracy": "class_accuracy", "confident": "confident",
                      "diversity_ratio": "diversity_ratio", "chance": "chance"}


def _value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def job_kind(job: Path) -> str:
    """``evaluate`` for a job of a ``diffusion.evaluate`` sweep (its config's task_name; without one, a results.json
    of its own and no metrics.json), else ``train``."""
    config = job / ".hydra" / "config.yaml"
    if config.is_file():
        try:
            task = (yaml.safe_load(config.read_text()) or {}).get("task_name")
        except yaml.YAMLError:
            task = None
        if task is not None:
            return "evaluate" if task == "evaluate" else "train"
    return "evaluate" if (job / "results.json").is_file() and not (job / "metrics.json").is_file() else "train"


def read_job(job: Path) -> dict | None:
    overrides_file = job / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return None
    params = {}
    for item in yaml.safe_load(overrides_file.read_text()) or []:
        key, _, value = item.partition("=")
        params[key.lstrip("+~")] = _value(value)
    metrics = {}
    if (job / "metrics.json").is_file():
        summary = json.loads((job / "metrics.json").read_text())
        metrics.update({k: v for k, v in summary.get("metrics", {}).items() if k in METRIC_KEYS})
        metrics["global_step"] = summary.get("global_step")
    for results in sorted(job.rglob("results.json")):
        data = json.loads(results.read_text())
        if "nll" in data:
            metrics["nll_bpd"] = data["nll"]["bpd"]
        for name in ("fid", "kid"):
            if name in data:
                metrics[name] = data[name]["value"] if isinstance(data[name], dict) else data[name]
        if isinstance(data.get("fd_classifier"), dict):
            metrics.update({column: data["fd_classifier"][key] for column, key in FD_CLASSIFIER_KEYS.items()
                            if data["fd_classifier"].get(key) is not None})
    kind = job_kind(job)
    done = (job / "results.json").is_file() if kind == "evaluate" else "global_step" in metrics
    return {"job": job.name, "params": params, "metrics": metrics, "kind": kind, "done": done}


def collect(sweep_dir: Path) -> tuple[list[dict], list[str], list[str]]:
    jobs = [j for j in (read_job(p) for p in sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name)) if p.is_dir()) if j]
    if not jobs:
        raise ValueError(f"{sweep_dir} holds no Hydra job directories (<job>/.hydra/overrides.yaml)")
    keys = sorted({k for j in jobs for k in j["params"]})
    swept = [k for k in keys if len({json.dumps(j["params"].get(k), default=str) for j in jobs}) > 1]
    metrics = [m for m in COLUMNS if any(m in j["metrics"] for j in jobs)]
    return jobs, swept, metrics


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    return "" if v is None else str(v)


def find_best(sweep_dir: Path, jobs: list[dict]) -> dict | None:
    """The best job: {"job", "metric", "value", "params", "search"}. A search's ``optimization_results.yaml``
    names the best parameters and value (Optuna's, whatever the metric and direction; the metric's name is the
    trial's ``optimized_metric``): the job with those parameters (and that value, if several have them); "job" is
    None when it is not in this directory (a stored study continued from an earlier sweep). Otherwise (a grid
    sweep) the job with the lowest val/loss; None without any."""
    results_file = sweep_dir / "optimization_results.yaml"
    results = yaml.safe_load(results_file.read_text()) if results_file.is_file() else None
    if isinstance(results, dict) and "best_params" in results:  # a multi-objective study has "solutions" instead
        params, value = results["best_params"] or {}, results.get("best_value")
        matches = [j for j in jobs if all(j["params"].get(k) == v for k, v in params.items())]
        metric = "val/loss"
        if matches:
            config = sweep_dir / matches[0]["job"] / ".hydra" / "config.yaml"
            metric = (yaml.safe_load(config.read_text()) or {}).get("optimized_metric") if config.is_file() else None
            metric = metric or "val/loss"
            matches = [j for j in matches if j["metrics"].get(metric) == value] or matches
        return {"job": matches[0]["job"] if matches else None, "metric": metric, "value": value, "params": params,
                "search": True}
    done = [j for j in jobs if isinstance(j["metrics"].get("val/loss"), (int, float))]
    if not done:
        return None
    job = min(done, key=lambda j: j["metrics"]["val/loss"])
    return {"job": job["job"], "metric": "val/loss", "value": job["metrics"]["val/loss"], "params": job["params"],
            "search": False}


def best_line(best: dict, swept: list[str]) -> str:
    keys = list(best["params"]) if best["search"] else swept
    params = " ".join(f"{k}={best['params'].get(k)}" for k in keys)  # in full: to be passed to a run
    where = f"{'trial' if best['search'] else 'job'} {best['job']}" if best["job"] is not None \
        else "trial (not in this directory: an earlier sweep of the stored study)"
    return f"best: {where} {best['metric']}={_fmt(best['value'])}" + (f" params {params}" if params else "")


def write_tables(sweep_dir: Path, jobs, swept, metrics, best: dict | None = None) -> tuple[Path, Path]:
    header = ["job", *swept, *metrics]
    rows = [[j["job"], *(j["params"].get(k) for k in swept), *(j["metrics"].get(m) for m in metrics)] for j in jobs]
    csv_path, md_path = sweep_dir / "report.csv", sweep_dir / "report.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    marked = best["job"] if best else None
    lines += ["| " + " | ".join(_fmt(v) + (" (best)" if i == 0 and v == marked else "") for i, v in enumerate(row)) + " |"
              for row in rows]
    for kind, written in (("train", "metrics.json"), ("evaluate", "results.json")):
        unfinished = [j["job"] for j in jobs if j["kind"] == kind and not j["done"]]
        if unfinished:  # no metrics.json / results.json: the job failed (its error is in the sweep's log) or is still running
            lines += ["", f"no {written} (failed or running): job {', '.join(unfinished)}"]
    if best:
        lines += ["", best_line(best, swept)]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def plot(sweep_dir: Path, jobs, swept, metrics) -> Path | None:
    shown = [m for m in metrics if m != "global_step"]
    if not swept or not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), len(swept), figsize=(4.5 * len(swept), 3.5 * len(shown)), squeeze=False)
    for col, param in enumerate(swept):
        others = [k for k in swept if k != param]
        groups: dict[str, list] = {}
        for j in jobs:
            label = ", ".join(f"{k}={_fmt(j['params'].get(k))}" for k in others) or "all"
            groups.setdefault(label, []).append(j)
        values = sorted({_fmt(j["params"].get(param)) for j in jobs}, key=lambda v: (not _is_number(v), float(v) if _is_number(v) else v))
        for row, metric in enumerate(shown):
            ax = axes[row][col]
            for label, members in groups.items():
                pts = sorted((values.index(_fmt(j["params"].get(param))), j["metrics"][metric]) for j in members if j["metrics"].get(metric) is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            chance = {j["metrics"]["chance"] for j in jobs if j["metrics"].get("chance") is not None}
            reference = {"class_accuracy": (chance.pop(), "chance") if len(chance) == 1 else None,  # samples ignoring their class
                         "diversity_ratio": (1.0, "as diverse as the data")}.get(metric)
            if reference is not None:
                line = ax.axhline(reference[0], color="grey", linestyle="--", linewidth=1, label=reference[1])
                ax.legend(**({} if len(groups) > 1 else {"handles": [line]}), fontsize=7)
            ax.set_xticks(range(len(values)), values)
            ax.set_xlabel(param)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if len(groups) > 1 and row == 0:
                ax.legend(fontsize=7)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title(sweep_dir, jobs), width=int(8 * 4.5 * len(swept)))))  # ~8 characters an inch
    fig.tight_layout()
    path = sweep_dir / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def title(sweep_dir: Path, jobs) -> str:
    """``sweep <dir>: N jobs``; an evaluate sweep of one checkpoint also names it (its run folder and file)."""
    text = f"sweep {sweep_dir.name}: {len(jobs)} jobs"
    if all(j["kind"] == "evaluate" for j in jobs):
        ckpts = {str(j["params"].get("ckpt")) for j in jobs}
        text = f"evaluate {text}"
        if len(ckpts) == 1 and None not in {j["params"].get("ckpt") for j in jobs}:
            path = Path(ckpts.pop())
            text += f" of {path.parent.parent.name + '/' if path.parent.name == 'checkpoints' else ''}{path.name}"
    return text


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def report(sweep_dir: str | Path) -> dict:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep={sweep_dir} does not exist or is not a directory: pass a Hydra multirun directory "
                         "(outputs/train/multirun/<date_time>)")
    jobs, swept, metrics = collect(sweep_dir)
    best = find_best(sweep_dir, jobs)
    csv_path, md_path = write_tables(sweep_dir, jobs, swept, metrics, best)
    png = plot(sweep_dir, jobs, swept, metrics)
    print(md_path.read_text(), end="")
    print(f"written {csv_path}, {md_path}" + (f", {png}" if png else ""))
    return {"jobs": jobs, "swept": swept, "metrics": metrics, "best": best}


def make_report(cfg: DictConfig) -> dict:
    """``report(cfg.sweep)``; a missing or bad ``sweep`` is a one-line UsageError."""
    if OmegaConf.is_missing(cfg, "sweep") or cfg.sweep is None:
        raise UsageError("sweep is required: pass sweep=<a Hydra multirun directory, e.g. outputs/train/multirun/<date_time>>")
    return build_or_usage_error("sweep", lambda: report(Path(str(cfg.sweep)).expanduser()))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="report")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    make_report(cfg)


if __name__ == "__main__":
    main()
