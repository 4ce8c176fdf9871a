"""The sampling page (#7): its generate function, its one-line errors, and the page itself driven in headless
Chromium: pick a sampler and settings, click Generate, and find the model's own samples on the page."""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from diffusion.app import generate, sampler_names
from diffusion.module import DiffusionModule
from tests.conftest import REPO, clean_env, run_train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def test_generate_returns_the_grid_the_strip_and_a_summary(ckpt):
    module = DiffusionModule.from_checkpoint(ckpt)
    from diffusion.samplers.registry import sampler_class, sampler_names as registered

    names = sampler_names(module)
    assert names[0] == "ddim" and sorted(names) == sorted(registered("gaussian"))  # the trained one first, then the registry's
    assert "cold" not in names and {"euler", "heun", "plms"} <= set(names)
    assert all("gaussian" in sampler_class(n).reverses for n in names)
    grid, strip, summary = generate(module, "ddim", steps=4, eta=0.0, seed=1, count=6, strip_images=3, strip_points=5)
    scale = 256 // 16
    cell = (16 + 2) * scale
    assert grid.size == (2 * scale + 2 * cell, 2 * scale + 3 * cell)  # 6 images: round(sqrt 6) = 2 per row, 3 rows
    assert strip.size == (2 * scale + 5 * cell, 2 * scale + 3 * cell)  # 3 images x 5 states (4 steps + x_T)
    assert summary.startswith("6 images with ddim, 4 steps, eta 0, seed 1")
    again, _, _ = generate(module, "ddim", steps=4, eta=0.0, seed=1, count=6, strip_images=3, strip_points=5)
    other, _, _ = generate(module, "ddim", steps=4, eta=0.0, seed=2, count=6, strip_images=3, strip_points=5)
    assert np.array_equal(np.asarray(grid), np.asarray(again)) and not np.array_equal(np.asarray(grid), np.asarray(other))
    # the strip's last column is the grid's first image: the chain ends at the sample
    s = np.asarray(strip)[2 * scale : 2 * scale + 16 * scale, -(cell) : -(2 * scale)]
    g = np.asarray(grid)[2 * scale : 2 * scale + 16 * scale, 2 * scale : 2 * scale + 16 * scale]
    assert np.array_equal(s, g)


@pytest.mark.parametrize("overrides, text", [
    ([], "ckpt is required"),
    (["ckpt=/nonexistent.ckpt"], "ckpt=/nonexistent.ckpt does not exist"),
    (["ckpt=x.ckpt", "port=0"], "port=0 is invalid"),
])
def test_bad_app_settings_are_one_line_errors(tmp_path, overrides, text):
    proc = run_train(*overrides, f"hydra.run.dir={tmp_path / 'a'}", tmp_path=tmp_path, module="diffusion.app", timeout=120)
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.output, proc.output[-2000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_app(ckpt, tmp_path):
    """``python -m diffusion.app ckpt=...`` as a user starts it, on a free port: (url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "diffusion.app", f"ckpt={ckpt}", f"port={port}", f"hydra.run.dir={tmp_path / 'app'}"]
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "the app did not serve within 120 s"
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.browser
def test_the_page_generates_the_models_samples_in_headless_chromium(served_app, ckpt):
    if CHROMIUM is None:
        if os.environ.get("DIFFUSION_REQUIRE_BROWSER"):
            pytest.fail("DIFFUSION_REQUIRE_BROWSER is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("no chromium on this machine (apt-get install -y chromium); CI installs it and runs this test")
    from playwright.sync_api import sync_playwright

    url, _ = served_app
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
        page.goto(url, wait_until="networkidle")
        page.locator("#sampler input").click()
        page.get_by_role("option", name="ddim").click()
        for elem, value in (("steps", "5"), ("eta", "0"), ("count", "4")):
            field = page.locator(f"#{elem} input[type=number]")
            field.fill(value)
            field.press("Enter")
        page.locator("#seed input").fill("3")
        assert page.locator("#grid img").count() == 0  # nothing before the click
        page.click("#generate")
        page.wait_for_selector("#grid img", timeout=120_000)
        page.wait_for_selector("#strip img", timeout=120_000)
        page.wait_for_function("document.querySelector('#info textarea').value.length > 0", timeout=120_000)
        info = page.locator("#info textarea").input_value()
        width = page.locator("#grid img").evaluate("img => img.complete ? img.naturalWidth : 0")
        src = page.locator("#grid img").get_attribute("src")
        browser.close()
    assert info.startswith("4 images with ddim, 5 steps, eta 0, seed 3"), info
    assert width > 0  # the image loaded and rendered
    shown = Image.open(io.BytesIO(urllib.request.urlopen(urllib.parse.urljoin(url, src)).read())).convert("RGB")
    expected, _, _ = generate(DiffusionModule.from_checkpoint(ckpt), "ddim", 5, 0.0, 3, 4)
    assert np.array_equal(np.asarray(shown), np.asarray(expected))  # the page shows this model's samples, as PNG
    assert outside == []  # the page loads nothing from the internet



# ------------------------------------------------------------------ class-conditional checkpoints (#16)
PAGE_SIDE, PAGE_PAD, PAGE_SCALE = 16, 2, 4  # a class-rows grid of digits: 16 px, 2 px padding, enlarged to 64 px


def class_cell(image, r: int, c: int) -> np.ndarray:
    """Image (r, c) of a labelled class-rows grid (its box in the PNG's text chunk "Grid"), one channel."""
    x, y = (int(v) for v in image.info["Grid"].split()[:2])
    top, left = y + PAGE_SCALE * (PAGE_PAD + r * (PAGE_SIDE + PAGE_PAD)), x + PAGE_SCALE * (PAGE_PAD + c * (PAGE_SIDE + PAGE_PAD))
    return np.asarray(image.convert("RGB"))[top : top + PAGE_SCALE * PAGE_SIDE, left : left + PAGE_SCALE * PAGE_SIDE, 0].astype(int)


def pixels_of(x) -> np.ndarray:
    """An image in [-1, 1] as the page shows it: uint8 by (x + 1) * 127.5, each pixel a 4 x 4 block."""
    u8 = ((x.double().clamp(-1, 1) + 1) * 127.5).round().numpy().astype(int)
    return np.kron(u8, np.ones((PAGE_SCALE, PAGE_SCALE), dtype=int))


def test_conditional_generate_draws_one_row_per_chosen_class_at_the_guidance_scale(cond_ckpt):
    import torch

    module = DiffusionModule.from_checkpoint(cond_ckpt)
    grid, strip, summary = generate(module, "ddim", 3, 0.0, seed=5, count=3, strip_images=3, strip_points=4, classes=[2, 7])
    assert grid.info["Rows"] == "2 | 7"  # one row per chosen class, named by the class
    w, h = (int(v) for v in grid.info["Grid"].split()[2:])
    assert (w, h) == (PAGE_SCALE * (3 * (PAGE_SIDE + PAGE_PAD) + PAGE_PAD), PAGE_SCALE * (2 * (PAGE_SIDE + PAGE_PAD) + PAGE_PAD))
    assert summary.startswith("6 images, 3 of each of classes 2, 7, with ddim, 3 steps, eta 0, guidance 1 (conditional), seed 5")
    # an independent redraw: the checkpoint's own sampler (w = 1, no guidance option), labels class by class
    labels = torch.tensor([2, 2, 2, 7, 7, 7])
    conditional = module.sample(6, generator=torch.Generator().manual_seed(5), labels=labels).samples
    for r in range(2):
        for c in range(3):
            assert np.array_equal(class_cell(grid, r, c), pixels_of(conditional[3 * r + c, 0])), (r, c)
    # the strip follows the first image of each class, then the second...: rows 2, 7, 2; it ends at those samples
    assert strip.info["Rows"] == "2 | 7 | 2"
    for r, i in enumerate([0, 3, 1]):
        assert np.array_equal(class_cell(strip, r, 3), pixels_of(conditional[i, 0])), r

    guided, _, text = generate(module, "ddim", 3, 0.0, seed=5, count=3, classes=[2, 7], guidance_scale=3.0, guidance_rescale=0.5)
    assert "guidance 3 (rescale 0.5), eta 0, seed 5" in text
    assert not np.array_equal(np.asarray(guided), np.asarray(grid))  # w = 3 is not w = 1
    expected = module.sample(6, sampler=module.named_sampler(None, guidance_scale=3.0, guidance_rescale=0.5),
                             generator=torch.Generator().manual_seed(5), labels=labels).samples
    assert not torch.equal(expected, conditional)
    for r in range(2):
        for c in range(3):
            assert np.array_equal(class_cell(guided, r, c), pixels_of(expected[3 * r + c, 0])), (r, c)

    every, _, text = generate(module, "ddim", 3, 0.0, seed=5, count=1, classes=None)  # the default: all classes
    assert every.info["Rows"] == " | ".join(str(k) for k in range(10)) and "all classes (0, 1, 2" in text
    assert int(every.info["Grid"].split()[3]) == PAGE_SCALE * (10 * (PAGE_SIDE + PAGE_PAD) + PAGE_PAD)
    for bad, text in (([10], "class 10 is not in 0..9"), ([], "no class is chosen"), (["x"], "classes=['x'] is invalid")):
        with pytest.raises(ValueError, match=re.escape(text)):
            generate(module, "ddim", 3, 0.0, seed=5, count=1, classes=bad)


def test_the_class_picker_and_guidance_are_on_the_page_of_a_conditional_checkpoint_only(cond_ckpt, ckpt):
    import gradio as gr

    from diffusion.app import build_app, toggled

    def components(demo):
        return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}

    demo = build_app(DiffusionModule.from_checkpoint(cond_ckpt))
    parts = components(demo)
    picker, guidance, rescale = parts["classes"], parts["guidance"], parts["rescale"]
    assert isinstance(picker, gr.CheckboxGroup) and picker.value == ["all"]
    assert picker.choices == [("all classes", "all")] + [(str(k), k) for k in range(10)]
    assert (guidance.minimum, guidance.maximum, guidance.step, guidance.value) == (0, 10, 0.5, 1)
    assert "1 conditional, 0 unconditional, > 1 guided" in guidance.label
    assert (rescale.minimum, rescale.maximum, rescale.value) == (0, 1, 0) and parts["count"].label.startswith("images per class")
    run = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "run_conditional")
    grid, _, summary = run("ddim", 3, 0.0, 0, 1, [7, 3], 2.0, 0.0)  # the picker's order of clicks: rows in class order
    assert grid.info["Rows"] == "3 | 7" and "guidance 2" in summary
    for bad, text in (([10], "class 10 is not in 0..9"), ([], "no class is chosen")):
        with pytest.raises(gr.Error, match=re.escape(text)):  # shown on the page; the app keeps serving
            run("ddim", 3, 0.0, 0, 1, bad, 1.0, 0.0)
    # checking "all classes" clears the classes, checking a class clears "all classes"
    for before, after in ((["all"], ["all", 7]), ([3], [3, 7])):  # the selection before the click (gradio's) or after
        assert toggled(before, 7, True) == toggled(after, 7, True) == [k for k in before if k != "all"] + [7]
    assert toggled([3, 7], "all", True) == toggled([3, 7, "all"], "all", True) == ["all"]
    assert toggled([3, 7], 7, False) == toggled([3], 7, False) == [3]

    plain = components(build_app(DiffusionModule.from_checkpoint(ckpt)))
    assert not {"classes", "guidance", "rescale"} & set(plain) and plain["count"].label == "images"


@pytest.mark.browser
def test_the_class_picker_and_guidance_drive_the_grid_in_headless_chromium(cond_ckpt):
    if CHROMIUM is None:
        if os.environ.get("DIFFUSION_REQUIRE_BROWSER"):
            pytest.fail("DIFFUSION_REQUIRE_BROWSER is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("no chromium on this machine (apt-get install -y chromium); CI installs it and runs this test")
    from playwright.sync_api import sync_playwright

    from diffusion.app import build_app

    module = DiffusionModule.from_checkpoint(cond_ckpt)
    demo = build_app(module, str(cond_ckpt))  # served in this process: the CLI's start is the test above's
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, footer_links=[])
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page()
            page.goto(url, wait_until="networkidle")
            boxes = page.locator("#classes input[type=checkbox]")
            assert boxes.count() == 11 and boxes.nth(0).is_checked()  # "all classes", then 0..9; all by default
            page.locator("#classes label", has_text=re.compile(r"^\s*7\s*$")).click()
            page.locator("#classes label", has_text=re.compile(r"^\s*3\s*$")).click()
            page.wait_for_function("!document.querySelectorAll('#classes input[type=checkbox]')[0].checked", timeout=30_000)
            checked = [boxes.nth(i).is_checked() for i in range(11)]
            for elem, value in (("steps", "3"), ("count", "2"), ("guidance", "3")):
                field = page.locator(f"#{elem} input[type=number]")
                field.fill(value)
                field.press("Enter")
            page.locator("#seed input").fill("4")
            page.click("#generate")
            page.wait_for_function("document.querySelector('#info textarea').value.length > 0", timeout=120_000)
            info = page.locator("#info textarea").input_value()
            src = page.locator("#grid img").get_attribute("src")
            browser.close()
        shown = Image.open(io.BytesIO(urllib.request.urlopen(urllib.parse.urljoin(url, src)).read())).convert("RGB")
    finally:
        demo.close()
    assert checked == [False] + [k in (3, 7) for k in range(10)]  # checking a class cleared "all classes"
    assert info.startswith("4 images, 2 of each of classes 3, 7, with ddim, 3 steps, guidance 3, eta 0, seed 4"), info
    expected, _, _ = generate(module, "ddim", 3, 0.0, 4, 2, classes=[3, 7], guidance_scale=3.0)
    assert np.array_equal(np.asarray(shown), np.asarray(expected))  # this model's class rows, guided at w = 3
