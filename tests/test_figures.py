"""Every figure command writes a PNG of the expected size."""

import subprocess
import sys

import torch
from PIL import Image

from diffusion.data import DigitsDataModule
from diffusion.figures import main
from tests.conftest import REPO


def size(path):
    with Image.open(path) as im:
        return im.size


def grid_size(rows, cols, side=16, pad=2):
    return (cols * (side + pad) + pad, rows * (side + pad) + pad)


def test_schedules_figure(tmp_path):
    path = main(["schedules", "--T", "200", "--out", str(tmp_path)])
    assert size(path) == (1000, 400) and path.stat().st_size > 10_000


def test_forward_figure_on_digits(tmp_path):
    path = main(["forward", "--n", "3", "--columns", "5", "--out", str(tmp_path), "data=digits", "schedule=cosine"])
    assert size(path) == grid_size(3, 5)
    with Image.open(path) as im:
        cells = torch.tensor(list(im.convert("L").getdata()), dtype=torch.float32).reshape(im.size[1], im.size[0])
    first, last = cells[2:18, 2:18], cells[2:18, 2 + 4 * 18 : 18 + 4 * 18]
    dm = DigitsDataModule(image_size=16, seed=42)  # the training config's data and seed
    dm.setup()
    clean = dm.train_set[0][0].float()

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()

    assert corr(first, clean) > 0.98  # t = 0: the real image
    assert abs(corr(last, clean)) < 0.3  # t = T-1: noise


def test_reverse_and_progression_figures(finished_run, tmp_path):
    run = finished_run[0]
    path = main(["reverse", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--n", "2", "--transitions", "4",
                 "--sampler", "ddim", "--num-steps", "8", "--out", str(tmp_path)])
    assert size(path) == grid_size(2, 5) and "4transitions" in path.name
    steps = {torch.load(p, map_location="cpu", weights_only=False)["global_step"] for p in (run / "checkpoints").glob("*.ckpt")}
    path = main(["progression", "--run", str(run), "--n", "3", "--out", str(tmp_path)])
    assert size(path) == grid_size(len(steps), 3)


def test_figure_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffusion.figures", "reverse", "--ckpt", str(tmp_path / "none.ckpt")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "none.ckpt" in proc.stderr and "Traceback" not in proc.stderr
