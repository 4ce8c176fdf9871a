"""How long the CLIs take to answer ``--help`` and a one-line configuration error: fresh processes, best of
``--repeats``, on this machine (the README's "Start-up" table). A benchmark, not a test: tests/test_cli_startup.py
checks what makes the difference (no torch, Lightning, wandb, ... imported before the answer).

    python experiments/cli_startup.py [--repeats 3] [--only train sample ...] [--out table.md]

Each command runs as typed, from a temporary folder (so nothing is written into the project). ``import torch`` and a
bare Hydra app's ``--help`` are timed too: the floors the CLIs stand on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: (CLI, the refused setting timed for it)
ERRORS = {
    "train": "model.base_channels=-1",
    "sample": "ckpt=/nonexistent.ckpt",
    "evaluate": "ckpt=/nonexistent.ckpt",
    "compare": "ckpt=/nonexistent.ckpt",
    "export": "ckpt=/nonexistent.ckpt",
    "figures": "figure=bogus",
    "report": "sweep=/nonexistent",
    "app": "ckpt=/nonexistent.ckpt",
}

BARE_APP = '''
import hydra
@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    pass
main()
'''


def best_of(argv: list[str], repeats: int, cwd: str, expect: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != expect:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}, expected {expect}: {proc.stderr[-500:]}")
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    parser.add_argument("--only", nargs="+", choices=list(ERRORS), default=list(ERRORS), help="these CLIs only")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as cwd:
        bare = Path(cwd, "bare.py")
        bare.write_text(BARE_APP)
        rows = [("`import torch`", best_of([py, "-c", "import torch"], args.repeats, cwd, 0), None),
                ("a bare Hydra app", best_of([py, str(bare), "--help"], args.repeats, cwd, 0), None)]
        for cli in args.only:
            setting, module = ERRORS[cli], f"diffusion.{cli}"
            rows.append((f"`python -m {module}`", best_of([py, "-m", module, "--help"], args.repeats, cwd, 0),
                         (setting, best_of([py, "-m", module, setting], args.repeats, cwd, 2))))
    lines = ["| command | `--help` | a refused setting |", "|---|---|---|"]
    for name, helped, refused in rows:
        lines.append(f"| {name} | {helped:.2f} s | " + (f"{refused[1]:.2f} s (`{refused[0]}`)" if refused else "") + " |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
