"""The README's sampler comparison, from a trained checkpoint (it trains nothing):

    python experiments/compare_samplers.py outputs/train/<run>/checkpoints/last.ckpt [override ...]

runs ``python -m diffusion.compare`` on the checkpoint with the samplers and NFEs of the README (DEFAULTS below; an
override such as ``n=256`` or ``device=cuda`` replaces its key) into ``outputs/compare/readme_<date_time>/``, then
copies the run's compare.png and compare.md to docs/compare_samplers.png and docs/compare_samplers.md. Existing docs
files are never written over: the script stops before any work if either exists (move the old ones away first).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {
    "samplers": "[ddim,dpmsolver++,heun,euler,ddpm]",
    "nfe": "[5,10,20,50,100]",
    "n": "1000",          # samples per sampler and NFE (the digits default holds 180 validation images)
    "batch_size": "500",
    "seed": "0",
}
#: the run's file -> the docs file
PUBLISHED = {"compare.png": "compare_samplers.png", "compare.md": "compare_samplers.md"}


def overrides(ckpt: str, extra: list[str]) -> list[str]:
    """DEFAULTS with every ``key=value`` of ``extra`` in place of its key, and the checkpoint."""
    chosen = dict(DEFAULTS)
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {item!r} is not an override: pass key=value (e.g. n=256)")
        chosen[key] = value
    return [f"ckpt={ckpt}", *(f"{k}={v}" for k, v in chosen.items())]


def publish(run_dir: Path, docs: Path) -> list[Path]:
    """Copy the run's plot and table into ``docs`` (each target must not exist: exclusive create)."""
    written = []
    for name, target in PUBLISHED.items():
        with open(docs / target, "xb") as f:
            f.write((run_dir / name).read_bytes())
        written.append(docs / target)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="a checkpoint written by python -m diffusion.train")
    parser.add_argument("overrides", nargs="*", help="diffusion.compare overrides, e.g. n=256 device=cuda")
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="where the plot and the table go")
    parser.add_argument("--out", type=Path, default=None, help="the compare run directory (default: a new one)")
    args = parser.parse_args(argv)
    held = [args.docs / t for t in PUBLISHED.values() if (args.docs / t).exists()]
    if held:
        raise SystemExit(f"error: {held[0]} exists: move it away first (nothing is written over)")
    out = args.out or REPO / "outputs" / "compare" / f"readme_{datetime.now():%Y-%m-%d_%H-%M-%S}"
    command = [sys.executable, "-m", "diffusion.compare", *overrides(args.ckpt, args.overrides), f"hydra.run.dir={out}"]
    print(" ".join(command), flush=True)
    proc = subprocess.run(command, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)
    written = publish(out, args.docs)
    print("written " + ", ".join(str(p) for p in written) + f" (the run: {out})")
    return written


if __name__ == "__main__":
    main()
