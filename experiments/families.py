"""The three families side by side (README, "Three families"): quality against NFE for each family's samplers, from
checkpoints trained with the same network, data and epochs (``experiments/first_run.py --only default,edm,flow``).

    python experiments/families.py --out outputs/families gaussian=<run>/checkpoints/last.ckpt \
        edm=<run>/checkpoints/last.ckpt flow=<run>/checkpoints/last.ckpt

Each checkpoint goes through ``python -m diffusion.compare`` (the same noise, ``--n`` images, fd_classifier against
the validation split) with every sampler that reverses its process, into ``--out/<family>/`` (a family whose
``compare.csv`` is already there is read, not run again); ``families.md`` lists every row, ``families.png`` plots each
family's best sampler (lowest mean FD over the NFEs) against NFE.
"""

from __future__ import annotations

import argparse
import ast
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def compare(name: str, ckpt: str, out: Path, nfe: str, n: int) -> list[dict]:
    run = out / name
    if not (run / "compare.csv").is_file():
        cmd = [sys.executable, "-m", "diffusion.compare", f"ckpt={ckpt}", f"nfe={nfe}", f"n={n}", f"hydra.run.dir={run}"]
        subprocess.run(cmd, cwd=REPO, check=True)
    with open(run / "compare.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row["status"] == "ok"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="family=checkpoint")
    parser.add_argument("--out", type=Path, default=Path("outputs/families"))
    parser.add_argument("--nfe", default="[5,10,20,50]")
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args(argv)
    nfes = [int(k) for k in ast.literal_eval(args.nfe)]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for spec in args.runs:
        name, _, ckpt = spec.partition("=")
        rows[name] = compare(name, ckpt, args.out, args.nfe, args.n)
    lines = ["| family | sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    best = {}
    for name, family in rows.items():
        samplers = sorted({r["sampler"] for r in family})
        means = {}
        for s in samplers:
            mine = {int(r["target_nfe"]): r for r in family if r["sampler"] == s}
            cells = [f"{float(mine[k]['fd_classifier']):.2f}" + ("" if int(mine[k]["nfe"]) == k else f" ({mine[k]['nfe']})")
                     if k in mine else "-" for k in nfes]
            lines.append(f"| {name} | {s} | " + " | ".join(cells) + " |")
            means[s] = sum(float(r["fd_classifier"]) for r in mine.values()) / max(1, len(mine))
        if means:  # a family none of whose cells ran has no best sampler (its rows say why)
            best[name] = min(means, key=means.get)
    (args.out / "families.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, sampler in best.items():
        mine = sorted(((int(r["nfe"]), float(r["fd_classifier"])) for r in rows[name] if r["sampler"] == sampler))
        ax.plot([k for k, _ in mine], [v for _, v in mine], marker="o", label=f"{name} ({sampler})")
    ax.set_xscale("log")
    ax.set_xticks(nfes, [str(k) for k in nfes])
    ax.minorticks_off()
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("fd_classifier (lower is better)")
    ax.set_title("Three families on the digits default (same UNet, data, 50 epochs):\neach family's best sampler, "
                 f"{args.n} samples against the validation digits", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "families.png")
    print(f"written {args.out / 'families.md'} and {args.out / 'families.png'}")


if __name__ == "__main__":
    main()
