"""The sampling page (#7): its generate function, its one-line errors, and the page itself driven in headless
Chromium: pick a sampler and settings, click Generate, and find the model's own samples on the page."""

import io
import os
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

