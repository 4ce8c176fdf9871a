"""Regenerate the README's figures and its timing of the default runs: ``python experiments/readme_figures.py``.

Trains the digits default (``python -m diffusion.train``) and the cold-diffusion default (``process=blur``) as a user
would, each timed (wall clock, peak RSS of the training process), draws the forward, reverse and schedule figures
with ``diffusion.figures``, and copies them into ``docs/`` (``--docs``). Writes ``timings.json`` with the numbers the
README quotes. Run it on a machine doing nothing else: the timings are the point.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


#: runs a command and prints its peak RSS in KiB: each measured command gets its own parent, so its peak is its own
_MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(*args: str) -> dict:
    """Run ``python -m <args>`` from the repository root; returns its wall time and peak RSS."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", *args], cwd=REPO, check=True,
                          stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    *printed, peak_kib = proc.stdout.strip().splitlines()
    print("\n".join(printed))
    return {"command": "python -m " + " ".join(args), "seconds": round(seconds, 1), "peak_rss_mb": round(int(peak_kib) / 1024)}


def one_file(folder: Path, pattern: str) -> Path:
    (path,) = sorted(folder.glob(pattern))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "readme_figures", help="run folders (must be new)")
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="where the README's figures go")
    args = parser.parse_args()
    out, docs = args.out.resolve(), args.docs.resolve()
    if out.exists():
        sys.exit(f"error: --out {out} exists: pass a new folder")
    figs = out / "figures"
    timings = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
                          f"{len(__import__('os').sched_getaffinity(0))} cores, python {platform.python_version()}"}

    timings["digits"] = run("diffusion.train", f"hydra.run.dir={out / 'digits'}")
    timings["blur"] = run("diffusion.train", "process=blur", f"hydra.run.dir={out / 'blur'}")
    def figure(name: str, *overrides: str) -> None:  # into figs/<name>/, Hydra's log beside it
        run("diffusion.figures", *overrides, f"out={figs / name}", f"hydra.run.dir={figs / name}")

    figure("schedules", "figure=schedules")
    figure("forward", "figure=forward", "n=4", "data=digits")
    figure("blur_forward", "figure=forward", "n=8", "process=blur")
    figure("reverse", "figure=reverse", f"ckpt={out / 'digits' / 'checkpoints' / 'last.ckpt'}", "sampler=ddpm",
           "transitions=10")
    figure("blur_reverse", "figure=reverse", f"ckpt={out / 'blur' / 'checkpoints' / 'last.ckpt'}")

    for name, source in {
        "digits_final.png": out / "digits" / "samples" / "final.png",
        "digits_blur_final.png": out / "blur" / "samples" / "final.png",
        "schedules.png": one_file(figs / "schedules", "*.png"),
        "digits_forward.png": one_file(figs / "forward", "*.png"),
        "digits_blur_forward.png": one_file(figs / "blur_forward", "*.png"),
        "digits_reverse_ddpm.png": one_file(figs / "reverse", "*.png"),
        "digits_blur_reverse.png": one_file(figs / "blur_reverse", "*.png"),
    }.items():
        shutil.copyfile(source, docs / name)
    for run_name in ("digits", "blur"):
        metrics = json.loads((out / run_name / "metrics.json").read_text())
        timings[run_name].update(val_loss=metrics["metrics"].get("val/loss"), global_step=metrics["global_step"])
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
