"""diffusion.compare: every sampler at every NFE from the same starting noise; the CSV, the Markdown table, the plot
and the grids hold what was measured and drawn; skipped and inexact cells say so; nothing is written over; bad input
is one line before any work."""

import csv
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.compare import compare, starting_noise
from diffusion.plots.grids import grid_array, to_uint8
from diffusion.run.errors import UsageError
from diffusion.samplers.registry import sampler_config, sampler_names
from diffusion.training.module import DiffusionModule
from tests.conftest import run_train, snapshot
from tests.test_readme import compose_job

N, BATCH = 8, 8


def config(ckpt, cache, out, *overrides):
    cfg = compose_job("compare", [f"ckpt={ckpt}", f"n={N}", f"batch_size={BATCH}", "kid_subsets=5",
                                  f"paths.cache_dir={cache}", *overrides])
    cfg.paths.output_dir = str(out)
    return cfg


@pytest.fixture(scope="module")
def run(ckpt, classifier_cache, tmp_path_factory):
    """One comparison: ddim and ddpm at NFE 2 and 4, and at 1001 (more steps than T = 1000: skipped)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    rows = compare(config(ckpt, classifier_cache, out, "samplers=[ddim,ddpm]", "nfe=[2,4,1001]"))
    return out, rows


@pytest.fixture(scope="module")
def module(ckpt):
    return DiffusionModule.from_checkpoint(ckpt)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def first_table(markdown: str) -> dict:
    """{(sampler, NFE column): cell} of the first Markdown table."""
    lines = next(block for block in markdown.split("\n\n") if block.startswith("| sampler")).splitlines()
    nfes = [int(h.split()[1]) for h in lines[0].strip("|").split("|")[1:]]
    cells = {}
    for line in lines[2:]:
        name, *values = [c.strip() for c in line.strip("|").split("|")]
        cells.update({(name, k): v for k, v in zip(nfes, values)})
    return cells


def png_text(path) -> dict:
    with Image.open(path) as im:
        return dict(im.text)


def grid_pixels(path) -> np.ndarray:
    """The image grid inside a labelled figure (its box is in the PNG's text chunks)."""
    x, y, w, h = (int(v) for v in png_text(path)["Grid"].split())
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))[y : y + h, x : x + w, 0]


def test_csv_and_markdown_hold_every_sampler_at_every_nfe(run, module):
    out, _ = run
    table = read_csv(out / "compare.csv")
    assert [(r["sampler"], int(r["target_nfe"])) for r in table] == [(s, k) for s in ("ddim", "ddpm") for k in (2, 4, 1001)]
    assert list(table[0])[:8] == ["sampler", "target_nfe", "num_steps", "nfe", "fd_classifier", "kid", "kid_std", "seconds_per_image"]
    cells = first_table((out / "compare.md").read_text())
    for r in table:
        if int(r["target_nfe"]) == 1001:
            assert r["status"] == "skipped" and "T=1000" in r["note"] and r["fd_classifier"] == "" and cells[(r["sampler"], 1001)] == "skipped"
            continue
        built = module.build_sampler(sampler_config(r["sampler"]), num_steps=int(r["num_steps"]))
        assert r["status"] == "ok" and int(r["nfe"]) == built.nfe == int(r["target_nfe"])  # the NFE it spent
        value = float(r["fd_classifier"])
        assert value > 0 and float(r["seconds_per_image"]) > 0 and math.isfinite(float(r["kid"]))
        assert float(cells[(r["sampler"], int(r["nfe"]))]) == pytest.approx(value, rel=1e-3)  # the same number
    assert "validation accuracy" in (out / "compare.md").read_text()


def test_the_plot_is_a_readable_labelled_image(run, ckpt):
    out, _ = run
    with Image.open(out / "compare.png") as im:
        assert im.size[0] >= 1000 and im.size[1] >= 400
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10 and (pixels < 100).mean() > 0.005, "lines and text, not a blank image"
    title = png_text(out / "compare.png")["Title"]
    assert f"{ckpt.parent.parent.name}/{ckpt.name}" in title and "fd_classifier" in title and f"n={N}" in title and "seed 0" in title


def test_each_grid_is_what_its_sampler_draws_from_the_shared_noise(run, module):
    """The grids' pixels against direct runs of each sampler from one prior draw of seed 0 (ddpm's later noise:
    seed 1): every sampler started from that same noise."""
    out, _ = run
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["ddim_nfe2.png", "ddim_nfe4.png", "ddpm_nfe2.png", "ddpm_nfe4.png"]
    noise = module.process.sample_prior((N, *module.image_shape), torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(next(starting_noise(module.process, module.image_shape, N, BATCH, 0)), noise)
    other = module.process.sample_prior((N, *module.image_shape), torch.Generator().manual_seed(5), "cpu")
    nrow = math.ceil(math.sqrt(N))
    for name, k in (("ddim", 2), ("ddim", 4), ("ddpm", 2), ("ddpm", 4)):
        sampler = module.named_sampler(name, num_steps=k)
        assert name != "ddim" or sampler.eta == 0

        def draw(x, sampler=sampler):
            return to_uint8(sampler.sample(module.model, noise=x, generator=torch.Generator().manual_seed(1)).samples)

        figure = grid_pixels(out / "grids" / f"{name}_nfe{k}.png")
        assert np.array_equal(figure, grid_array(draw(noise), nrow=nrow)), f"{name} at NFE {k}"
        assert not np.array_equal(figure, grid_array(draw(other), nrow=nrow))
        assert f"NFE {k}" in png_text(out / "grids" / f"{name}_nfe{k}.png")["Title"]


def test_a_sampler_that_cannot_spend_the_nfe_records_what_it_spent(ckpt, classifier_cache, tmp_path, monkeypatch):
    from diffusion.samplers.ddim import DDIMSampler

    monkeypatch.setattr(DDIMSampler, "steps_for_nfe", classmethod(lambda cls, nfe: nfe - 1))  # as if it could not
    rows = compare(config(ckpt, classifier_cache, tmp_path / "o", "samplers=[ddim]", "nfe=[3]", "n=4"))
    (row,) = read_csv(tmp_path / "o" / "compare.csv")
    assert (row["target_nfe"], row["num_steps"], row["nfe"]) == ("3", "2", "2") and rows[0].nfe == 2
    assert first_table((tmp_path / "o" / "compare.md").read_text())[("ddim", 3)].endswith("(2 NFE)")
    assert "NFE 2 (asked 3)" in png_text(tmp_path / "o" / "grids" / "ddim_nfe3.png")["Title"]


def test_no_samplers_named_means_every_sampler_that_reverses_the_process(ckpt, classifier_cache, tmp_path):
    rows = compare(config(ckpt, classifier_cache, tmp_path / "o", "samplers=null", "nfe=[1]", "n=2"))
    assert [r.sampler for r in rows] == sampler_names("gaussian") and "cold" not in sampler_names("gaussian")


@pytest.mark.parametrize("overrides, text", [
    (["nfe=[0,5]"], "nfe=[0, 5] is invalid"),
    (["nfe=[]"], "nfe=[] is invalid"),
    (["nfe=[5,5]"], "distinct"),
    (["samplers=[ddim,bogus]"], "'bogus' is not a sampler; allowed values are "),
    (["samplers=[cold]"], "cold does not reverse its gaussian process; allowed values are ddim"),
    (["n=1"], "n=1 is invalid"),
    (["metric=lpips"], "metric='lpips' is invalid"),
    (["split=test"], "split='test' is invalid"),
    (["batch_size=0"], "batch_size=0 is invalid"),
    (["ckpt=/nonexistent.ckpt"], "ckpt=/nonexistent.ckpt does not exist"),
    (["fid.weights=/none.pth", "metric=fid"], "/none.pth"),
    (["classifier.epochs=0"], "classifier.epochs=0 is invalid"),
])
def test_bad_input_is_one_line_before_any_work(ckpt, classifier_cache, tmp_path, overrides, text):
    with pytest.raises(UsageError) as err:
        compare(config(ckpt, classifier_cache, tmp_path / "o", *overrides))
    assert text in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists(), "nothing is written before the error"


def test_compare_cli_writes_the_comparison_and_a_second_run_changes_nothing(ckpt, classifier_cache, tmp_path):
    """The CLI as the README runs it (two samplers, tiny n); a second run into the same directory is refused in one
    line before any work and leaves every file as it was."""
    out = tmp_path / "o"
    args = [f"ckpt={ckpt}", "samplers=[ddim,ddpm]", "nfe=[2]", "n=4", f"paths.cache_dir={classifier_cache}", f"hydra.run.dir={out}"]
    proc = run_train(*args, tmp_path=tmp_path, module="diffusion.compare")
    assert proc.returncode == 0, proc.output[-3000:]
    assert "classifier read from" in proc.output and re.search(r"\| ddim \| [0-9.]+ \|", proc.stdout)
    assert {p.name for p in out.iterdir()} >= {"compare.csv", "compare.md", "compare.png", "grids", ".hydra"}
    before = snapshot(out)
    for name in ("compare.csv", "compare.md", "compare.png", "grids"):  # any one of them is enough to refuse
        held = tmp_path / f"held_{name}"
        held.mkdir()
        (held / name).mkdir() if name == "grids" else (held / name).write_text("mine")
        with pytest.raises(UsageError, match=f"already holds {name}: choose another hydra.run.dir"):
            compare(config(ckpt, classifier_cache, held))
        assert [p.name for p in held.iterdir()] == [name]
    with pytest.raises(UsageError, match="already holds compare.csv"):
        compare(config(ckpt, classifier_cache, out, "samplers=[ddim,ddpm]", "nfe=[2]", "n=4"))
    assert snapshot(out) == before


def _script():
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("compare_samplers", REPO / "experiments" / "compare_samplers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_readme_script_asks_for_the_readme_comparison_and_never_writes_over_docs(tmp_path, monkeypatch):
    script = _script()
    args = script.overrides("x.ckpt", ["n=256", "device=cuda"])
    assert args == ["ckpt=x.ckpt", "samplers=[ddim,dpmsolver++,heun,euler,ddpm]", "nfe=[5,10,20,50,100]", "n=256",
                    "batch_size=500", "seed=0", "device=cuda"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "compare_samplers.md").write_text("the old table")
    monkeypatch.setattr(script.subprocess, "run", lambda *a, **k: pytest.fail("compare ran although docs/ holds a table"))
    with pytest.raises(SystemExit, match="compare_samplers.md exists"):
        script.main(["x.ckpt", "--docs", str(docs)])
    assert (docs / "compare_samplers.md").read_text() == "the old table"


@pytest.mark.slow
def test_readme_script_publishes_the_runs_plot_and_table(ckpt, classifier_cache, tmp_path):
    script = _script()
    docs, out = tmp_path / "docs", tmp_path / "run"
    docs.mkdir()
    script.main([str(ckpt), "samplers=[ddim]", "nfe=[2]", "n=4", "batch_size=4", f"paths.cache_dir={classifier_cache}",
                 "--docs", str(docs), "--out", str(out)])
    for name, target in script.PUBLISHED.items():
        assert (docs / target).read_bytes() == (out / name).read_bytes()
