"""The figures and grids hold what they say: enlarged pixels of the right images, the right t in each column's label,
a title, and no figure written over another."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data import DigitsDataModule
from diffusion.figures import make_figure
from diffusion.plots.grids import GridLayout, grid_array, labelled_figure, readable_scale, save_new
from diffusion.run.errors import UsageError
from tests.conftest import REPO, snapshot
from tests.run.test_errors import compose_cfg

SIDE, PAD, SCALE = 16, 2, 4  # digits: 16 px images, 2 px padding, enlarged 4 x to 64 px


def draw(*overrides: str):
    """``python -m diffusion.figures <overrides>``, in this process: the composed config, drawn."""
    return make_figure(compose_cfg(*overrides, config_name="figures"))


def refused(*overrides: str) -> str:
    """The one-line UsageError ``python -m diffusion.figures <overrides>`` stops with."""
    with pytest.raises(UsageError) as err:
        draw(*overrides)
    assert "\n" not in str(err.value)
    return str(err.value)


def figures_cli(tmp_path, *overrides: str):
    return subprocess.run([sys.executable, "-m", "diffusion.figures", *overrides, f"hydra.run.dir={tmp_path / 'h'}"],
                          cwd=REPO, capture_output=True, text=True)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))[:, :, 0].astype(int)  # the figures are grey: R = G = B


def labels(path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


def uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> uint8 by the definition (x + 1) * 127.5, rounded."""
    return ((x.double().clamp(-1, 1) + 1) * 127.5).round().numpy().astype(int)


def enlarged(image: np.ndarray, k: int = SCALE) -> np.ndarray:
    return np.kron(image, np.ones((k, k), dtype=int))  # every pixel a k x k block


def cell(figure: np.ndarray, box: tuple[int, int], r: int, c: int) -> np.ndarray:
    """Image (r, c) of a figure whose grid starts at ``box`` = (x, y): 2 px white padding, 4 x enlarged 16 px."""
    x, y = box
    top, left = y + SCALE * (PAD + r * (SIDE + PAD)), x + SCALE * (PAD + c * (SIDE + PAD))
    return figure[top : top + SCALE * SIDE, left : left + SCALE * SIDE]


def grid_box(path) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in labels(path)["Grid"].split())


def test_readable_scale_is_the_smallest_integer_reaching_64_px():
    assert [readable_scale(s) for s in (8, 16, 28, 32, 63, 64, 128)] == [8, 4, 3, 2, 2, 1, 1]


def test_grid_array_is_the_images_enlarged_by_nearest_neighbour_with_white_padding():
    images = torch.rand(5, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # some clipped
    grid = grid_array(images, nrow=3).astype(int)
    assert grid.shape == (SCALE * (2 * (SIDE + PAD) + PAD), SCALE * (3 * (SIDE + PAD) + PAD))  # 2 rows of 3
    for k in range(5):
        assert np.array_equal(cell(grid, (0, 0), k // 3, k % 3), enlarged(uint8(images[k, 0])))
    assert (grid[: SCALE * PAD] == 255).all() and (grid[:, : SCALE * PAD] == 255).all()  # white padding
    assert (cell(grid, (0, 0), 1, 2) == 255).all()  # the sixth place is empty
    rgb = grid_array(torch.zeros(2, 3, 32, 32), nrow=2)  # 32 px: enlarged 2 x, one row of two
    assert rgb.shape == (2 * (32 + 2 * PAD), 2 * (2 * (32 + PAD) + PAD), 3) and (rgb[2 * PAD : 66, 2 * PAD : 66] == 128).all()


def test_labelled_figure_holds_the_grid_unresampled_and_a_label_over_each_column(tmp_path):
    images = torch.rand(6, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = grid_array(images, nrow=3)
    layout = GridLayout.of(6, SIDE, 3, scale=SCALE)
    columns, rows = ["t=0", "t=500", "t=1000"], ["step 10", "step 20"]
    fig = labelled_figure(grid, layout, "a title", columns, rows)
    assert [t.get_text() for t in fig.texts] == ["a title", *columns, *rows]
    path = save_new(fig, tmp_path / "f.png")
    figure = pixels(path)
    x, y, w, h = grid_box(path)
    assert (w, h) == (grid.shape[1], grid.shape[0]) and labels(path)["Columns"] == " | ".join(columns)
    assert np.array_equal(figure[y : y + h, x : x + w], grid)  # pixel for pixel
    outside = figure.copy()
    outside[y : y + h, x : x + w] = 255
    assert (outside[y + h :] == 255).all() and (outside[:, x + w :] == 255).all()  # text only above and left
    band = figure[:y] < 128  # the title and column labels
    for c in range(3):  # each column label is drawn centred over its column
        centre = x + SCALE * (PAD + c * (SIDE + PAD)) + SCALE * SIDE / 2
        dark = np.nonzero(band[y - 25 :, int(centre) - 30 : int(centre) + 30].any(0))[0]
        assert len(dark) > 5 and abs(dark.mean() + int(centre) - 30 - centre) < 4
    for r in range(2):  # each row label left of its row
        middle = y + SCALE * (PAD + r * (SIDE + PAD)) + SCALE * SIDE / 2
        dark = np.nonzero((figure[y : y + h, :x] < 128).any(1))[0] + y
        mine = dark[abs(dark - middle) < SCALE * SIDE / 2]
        assert len(mine) > 5 and abs(mine.mean() - middle) < 4
    with pytest.raises(FileExistsError):
        save_new(fig, path)


def test_schedules_figure(tmp_path):
    path = draw("figure=schedules", "T=200", f"out={tmp_path}")
    assert path.name == "schedules_T200.png" and Image.open(path).size == (1000, 400) and path.stat().st_size > 10_000
    assert draw("figure=schedules", f"out={tmp_path}").name == "schedules_T1000.png"  # the README's: T=1000


def test_forward_figure_columns_are_q_xt_x0_at_their_labelled_t_and_nothing_is_overwritten(tmp_path, capsys):
    linear = draw("figure=forward", "n=2", "columns=5", f"out={tmp_path}", "data=digits", "schedule=linear")
    first = linear.read_bytes()
    cosine = draw("figure=forward", "n=2", "columns=5", f"out={tmp_path}", "data=digits", "schedule=cosine")
    assert cosine != linear and "cosine" in cosine.name and "linear" in linear.name and "T1000" in linear.name
    assert linear.read_bytes() == first, "the second figure must not replace the first"
    before = snapshot(tmp_path)
    # the same settings again (the training defaults: data=digits, schedule=linear): refused, nothing written
    assert "already exists" in refused("figure=forward", "n=2", "columns=5", f"out={tmp_path}")
    assert snapshot(tmp_path) == before
    short = draw("figure=forward", "n=2", "columns=3", f"out={tmp_path}", "schedule=linear", "schedule.T=10")
    assert short.name == "forward_linear_T10_digits_n2_cols3_seed0.png" and labels(short)["Columns"] == "t=0 | t=5 | t=10"

    meta = labels(linear)
    assert "T=1000" in meta["Title"] and "linear" in meta["Title"]
    times = [int(s.removeprefix("t=")) for s in meta["Columns"].split(" | ")]
    assert times == [0, 250, 500, 750, 1000]
    dm = DigitsDataModule(image_size=16, seed=42)  # the training config's data and seed
    dm.setup()
    x0 = torch.stack([dm.train_set[i] for i in range(2)]).double() / 127.5 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).double()  # --seed 0: one eps per image
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)  # Ho et al.: abar_1 .. abar_T
    figure, (x, y, _, _) = pixels(linear), grid_box(linear)
    for c, t in enumerate(times):
        a = 1.0 if t == 0 else abar[t - 1].item()  # x_0 itself at t = 0
        xt = a**0.5 * x0 + (1 - a) ** 0.5 * eps  # q(x_t | x_0), eq. 4
        for r in range(2):
            assert np.abs(cell(figure, (x, y), r, c) - enlarged(uint8(xt[r, 0]))).max() <= 1, (r, t)


def test_reverse_figure_columns_are_labelled_with_their_t(ckpt, tmp_path):
    from diffusion.training.module import DiffusionModule

    path = draw("figure=reverse", f"ckpt={ckpt}", "n=2", "transitions=4", "sampler=ddim", "sampler.num_steps=8",
                  f"out={tmp_path}")
    assert path.name == "reverse_ddim_8steps_4transitions_last_n2_seed0.png"
    meta = labels(path)
    assert "ddim, 8 steps, eta 0" in meta["Title"]
    # DDIM 'leading', 8 steps of T=1000: 0-based timesteps 875, 750, ..., 0; kept: x_T and the states after steps
    # 2, 4, 6, 8, i.e. x at 0-based 875 (t=876), 625, 375, 125 (t = 0-based + 1) and x_0
    assert meta["Columns"] == "t=876 | t=626 | t=376 | t=126 | t=0"
    figure, (x, y, w, h) = pixels(path), grid_box(path)
    assert (w, h) == (SCALE * (5 * (SIDE + PAD) + PAD), SCALE * (2 * (SIDE + PAD) + PAD))
    module = DiffusionModule.from_checkpoint(ckpt)
    x_T = torch.randn(2, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    x_0 = module.sample(2, sampler=module.named_sampler("ddim", 8), generator=torch.Generator().manual_seed(0)).samples
    for r in range(2):
        assert np.array_equal(cell(figure, (x, y), r, 0), enlarged(uint8(x_T[r, 0])))
        assert np.array_equal(cell(figure, (x, y), r, 4), enlarged(uint8(x_0[r, 0])))

    # the README's command (one image): DDPM, all 1000 steps, x_T then every 100th t down to x_0
    ddpm = draw("figure=reverse", f"ckpt={ckpt}", "sampler=ddpm", "transitions=10", "n=1", f"out={tmp_path}")
    assert ddpm.name == "reverse_ddpm_1000steps_10transitions_last_n1_seed0.png"
    assert labels(ddpm)["Columns"] == " | ".join(f"t={t}" for t in range(1000, -1, -100))
    assert np.array_equal(cell(pixels(ddpm), grid_box(ddpm)[:2], 0, 0), enlarged(uint8(x_T[0, 0])))


def test_progression_rows_are_the_checkpoints_by_step(finished_run, tmp_path, capsys):
    from diffusion.training.module import DiffusionModule

    run, figs = finished_run[0], tmp_path / "figs"
    figs.mkdir()
    # best-epoch001.ckpt and last.ckpt: the same step, one checkpoint
    assert "one distinct checkpoint (step 4" in refused("figure=progression", f"run={run}", f"out={figs}")
    assert list(figs.iterdir()) == []

    two = tmp_path / "run"
    (two / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.ckpt", two / "checkpoints" / "last.ckpt")
    earlier = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    earlier.update(global_step=2, epoch=0, state_dict=earlier["current_model_state"])  # other weights, step 2
    torch.save(earlier, two / "checkpoints" / "epoch000.ckpt")
    path = draw("figure=progression", f"run={two}", "n=3", f"out={figs}")
    assert labels(path)["Rows"] == "step 2, epoch 0 | step 4, epoch 1" and "steps2-4" in path.name
    figure, box = pixels(path), grid_box(path)[:2]
    for r, name in enumerate(["epoch000.ckpt", "last.ckpt"]):
        expected = DiffusionModule.from_checkpoint(two / "checkpoints" / name).sample(
            3, generator=torch.Generator().manual_seed(0)).samples
        for c in range(3):
            assert np.array_equal(cell(figure, box, r, c), enlarged(uint8(expected[c, 0]))), (name, c)


def test_figure_errors_are_one_line_before_any_work_and_help_lists_the_options(tmp_path):
    """The command line: each bad input is one line on stderr naming it (and what is allowed), exit status 2, no
    traceback, nothing written; ``--help`` lists the figures' options (conf/figures.yaml)."""
    out = tmp_path / "figs"
    for overrides, text in [
        ([], "figure is required: pass figure=<schedules|forward|reverse|progression>"),
        (["figure=histogram"], "figure='histogram' is invalid: allowed values are schedules, forward, reverse, progression"),
        (["figure=reverse", f"ckpt={tmp_path / 'none.ckpt'}"], f"ckpt={tmp_path / 'none.ckpt'} does not exist"),
    ]:
        proc = figures_cli(tmp_path, *overrides, f"out={out}")
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {text}") and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr and not out.exists()
    help_ = figures_cli(tmp_path, "--help")
    assert help_.returncode == 0
    config = help_.stdout.split("== Config ==")[1]
    for key in ("figure: ???", "out: figures", "ckpt: null", "transitions: null", "run: null", "classes: null",
                "guidance_scale: null", "trust_checkpoint: false", "wandb_run: null"):
        assert key in config, key


@pytest.mark.parametrize("overrides, text", [
    (["figure=schedules", "ckpt=x"], "ckpt=x is not an option of figure=schedules: its options are T (and out, seed"),
    (["figure=progression", "run=.", "transitions=5"], "transitions=5 is not an option of figure=progression"),
    (["figure=reverse", "ckpt=.", "data=digits"], "data=<DigitsDataModule> is not an option of figure=reverse"),
    (["figure=forward", "sampler=ddim"], "sampler=<DDIMSampler> is not an option of figure=forward"),
    (["figure=forward", "+schedule.T=5"], "schedule.* needs schedule=<option>"),
    (["figure=forward", "n=0"], "n=0 is invalid: it must be an integer >= 1"),
    (["figure=forward", "columns=1"], "columns=1 is invalid: it must be an integer >= 2 (t = 0 and t = T)"),
    (["figure=schedules", "T=2.5"], "T=2.5 is invalid: it must be an integer >= 1"),
    (["figure=reverse", "ckpt=.", "transitions=0"], "transitions=0 is invalid: it must be an integer >= 1"),
    (["figure=schedules", "seed=x"], "seed='x' is invalid: it must be an integer"),
    (["figure=reverse"], "ckpt is required by figure=reverse: pass ckpt=<"),
    (["figure=progression"], "run is required by figure=progression: pass run=<"),
    (["figure=progression", "run=nowhere"], "run=nowhere does not exist or is not a directory"),
    (["figure=schedules", "wandb_run=nowhere"], "wandb_run=nowhere is not a training run directory"),
])
def test_bad_options_are_refused_in_one_line_before_any_work(overrides, text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert text in refused(*overrides, f"out={tmp_path / 'figs'}")
    assert not (tmp_path / "figs").exists()
    (tmp_path / "file").write_text("")
    assert "out=" in refused("figure=schedules", f"out={tmp_path / 'file' / 'figs'}")  # a file on the way


def test_reverse_figure_of_a_conditional_checkpoint_has_one_named_row_per_class(cond_ckpt, tmp_path):
    from diffusion.training.module import DiffusionModule

    module = DiffusionModule.from_checkpoint(cond_ckpt)
    path = draw("figure=reverse", f"ckpt={cond_ckpt}", "classes=[7,2]", "sampler.guidance_scale=3", "transitions=3",
                  f"out={tmp_path}")
    assert path.name == "reverse_ddim_3steps_3transitions_cond_classes7-2_w3_n1_seed0.png"  # the classes and w
    meta = labels(path)
    assert meta["Rows"] == "7 | 2" and "ddim, 3 steps, guidance 3, eta 0" in meta["Title"]
    figure, box = pixels(path), grid_box(path)
    assert box[3] == SCALE * (2 * (SIDE + PAD) + PAD)  # two rows: one per class
    x_T = torch.randn(2, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    guided = module.sample(2, sampler=module.named_sampler(None, guidance_scale=3.0), labels=torch.tensor([7, 2]),
                           generator=torch.Generator().manual_seed(0)).samples
    conditional = module.sample(2, labels=torch.tensor([7, 2]), generator=torch.Generator().manual_seed(0)).samples
    for r in range(2):
        assert np.array_equal(cell(figure, box[:2], r, 0), enlarged(uint8(x_T[r, 0])))
        assert np.array_equal(cell(figure, box[:2], r, 3), enlarged(uint8(guided[r, 0])))
        assert not np.array_equal(cell(figure, box[:2], r, 3), enlarged(uint8(conditional[r, 0])))  # w = 3, not 1

    every = draw("figure=reverse", f"ckpt={cond_ckpt}", "n=2", "transitions=1", f"out={tmp_path}")
    assert every.name == "reverse_ddim_3steps_1transitions_cond_classesall_w1_n2_seed0.png"
    assert labels(every)["Rows"] == " | ".join(str(k) for k in range(10) for _ in range(2))  # 2 rows of each class
    assert "guidance 1 (conditional)" in labels(every)["Title"]
    figure, box = pixels(every), grid_box(every)
    expected = module.sample(20, labels=torch.arange(10).repeat_interleave(2), generator=torch.Generator().manual_seed(0)).samples
    for r in (0, 7, 19):
        assert np.array_equal(cell(figure, box[:2], r, 1), enlarged(uint8(expected[r, 0]))), r


def test_progression_of_a_conditional_run_has_one_named_column_per_image(tmp_path):
    from diffusion.training.module import DiffusionModule
    from tests.conftest import make_conditional_checkpoint

    run = tmp_path / "run"
    for step, seed in ((1, 0), (2, 1)):  # two checkpoints with different weights
        path = make_conditional_checkpoint(run / "checkpoints" / f"step{step}.ckpt", seed=seed)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        torch.save({**ckpt, "global_step": step}, path)
    path = draw("figure=progression", f"run={run}", "classes=[3,7]", "n=2", "sampler.guidance_scale=2",
                  f"out={tmp_path / 'figs'}")
    assert path.name == "progression_run_steps1-2_classes3-7_w2_n2_seed0.png"
    meta = labels(path)
    assert meta["Columns"] == "3 | 3 | 7 | 7" and meta["Rows"] == "step 1, epoch 0 | step 2, epoch 0"
    figure, box = pixels(path), grid_box(path)[:2]
    for r, name in enumerate(["step1.ckpt", "step2.ckpt"]):
        module = DiffusionModule.from_checkpoint(run / "checkpoints" / name)
        expected = module.sample(4, sampler=module.named_sampler(None, guidance_scale=2.0), labels=torch.tensor([3, 3, 7, 7]),
                                 generator=torch.Generator().manual_seed(0)).samples
        for c in range(4):
            assert np.array_equal(cell(figure, box, r, c), enlarged(uint8(expected[c, 0]))), (name, c)


@pytest.mark.parametrize("which, args, text", [
    ("cond", ["classes=[10]"], "classes=[10] is invalid: class 10 is not in 0..9"),
    ("cond", ["classes=x"], "classes='x' is invalid: it must be all or a list of class indices in 0..9"),
    ("cond", ["sampler.guidance_scale=-1"], "sampler guidance_scale=-1 is invalid"),
    ("plain", ["classes=[3]"], "classes=[3] is invalid for ckpt="),
    ("plain", ["sampler.guidance_scale=2"], "sampler.guidance_scale=2 is invalid for ckpt="),
])
def test_class_and_guidance_errors_of_the_figures_are_one_line(which, args, text, cond_ckpt, ckpt, tmp_path):
    path = cond_ckpt if which == "cond" else ckpt
    for chosen in (["figure=reverse", f"ckpt={path}"], ["figure=progression", f"run={tmp_path / 'run'}"]):
        if chosen[0] == "figure=progression":  # a run of two distinct checkpoints of that kind
            (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
            for step in (1, 2):
                ckpt_ = torch.load(path, map_location="cpu", weights_only=False)
                torch.save({**ckpt_, "global_step": step}, tmp_path / "run" / "checkpoints" / f"s{step}.ckpt")
        assert text in refused(*chosen, *args, f"out={tmp_path / 'figs'}")
        assert not (tmp_path / "figs").exists()  # refused before any work
