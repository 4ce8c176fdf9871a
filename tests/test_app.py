"""The sampling page (#7): its generate function, its one-line errors, and the page itself driven in headless
Chromium: pick a sampler and settings, click Generate, and find the model's own samples on the page."""

import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion.app import generate, sampler_names
from diffusion.training.module import DiffusionModule
from tests.conftest import REPO, clean_env, run_train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def cell(image, layout_box, r: int, c: int, side: int, scale: int) -> np.ndarray:
    """Image (r, c) of a grid whose images start at ``layout_box`` (x, y), ``side`` px enlarged ``scale`` times,
    2 px padding: one channel."""
    x, y = layout_box
    top, left = y + scale * (2 + r * (side + 2)), x + scale * (2 + c * (side + 2))
    return np.asarray(image.convert("RGB"))[top : top + scale * side, left : left + scale * side, 0].astype(int)


def test_generate_returns_the_grid_the_strip_and_a_summary(ckpt):
    import torch

    module = DiffusionModule.from_checkpoint(ckpt)
    from diffusion.samplers.registry import sampler_class
    from diffusion.samplers.registry import sampler_names as registered

    names = sampler_names(module)
    assert names[0] == "ddim" and sorted(names) == sorted(registered("gaussian"))  # the trained one first, then the registry's
    assert "cold" not in names and {"euler", "heun", "plms"} <= set(names)
    assert all("gaussian" in sampler_class(n).reverses for n in names)
    calls = []
    out = generate(module, "ddim", steps=4, seed=1, count=6, options={"eta": 0.0}, strip_images=3, strip_points=5,
                   ckpt=str(ckpt), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # one bar, counting the network calls
    scale = 256 // 16
    pitch = (16 + 2) * scale
    assert out.grid.size == (2 * scale + 2 * pitch, 2 * scale + 3 * pitch)  # 6 images: round(sqrt 6) = 2 per row, 3 rows
    assert out.summary.startswith("6 images with ddim, 4 steps, eta 0, seed 1")
    # the strip: a column per kept state, labelled with its t (DDIM's leading grid of 4 steps: t = 751, 501, 251, 1,
    # then x_0), a row per image, labelled with its index
    assert out.strip.info["Columns"] == "t=751 | t=501 | t=251 | t=1 | t=0"
    assert out.strip.info["Rows"] == "image 1 | image 2 | image 3"
    box = tuple(int(v) for v in out.strip.info["Grid"].split()[:2])
    # its last column is the grid's first images, its first their x_T: the sampler's prior draw from the seed
    expected = module.sample(6, sampler=module.named_sampler(None, 4, eta=0.0), generator=torch.Generator().manual_seed(1)).samples
    u8 = ((expected.clamp(-1, 1) + 1) * 127.5).round().numpy().astype(int)
    noise = torch.randn((6, 1, 16, 16), generator=torch.Generator().manual_seed(1))
    noise_u8 = ((noise.clamp(-1, 1) + 1) * 127.5).round().numpy().astype(int)
    for i in range(3):
        assert np.array_equal(cell(out.strip, box, i, 4, 16, 4), np.kron(u8[i, 0], np.ones((4, 4), dtype=int))), i
        assert np.array_equal(cell(out.strip, box, i, 0, 16, 4), np.kron(noise_u8[i, 0], np.ones((4, 4), dtype=int))), i
        assert np.array_equal(cell(out.grid, (0, 0), i // 2, i % 2, 16, scale), np.kron(u8[i, 0], np.ones((scale, scale), dtype=int)))
    again = generate(module, "ddim", 4, 1, 6, {"eta": 0.0})
    other = generate(module, "ddim", 4, 2, 6, {"eta": 0.0})
    assert np.array_equal(np.asarray(out.grid), np.asarray(again.grid)) and not np.array_equal(np.asarray(out.grid), np.asarray(other.grid))
    # what drew it, as diffusion.sample options: the downloads' name and PNG text
    assert out.name == "digits_ddim-4_seed-1_n-6"
    assert {k: out.settings[k] for k in ("ckpt", "weights", "sampler", "sampler.num_steps", "sampler.eta", "seed", "n")} == {
        "ckpt": str(ckpt), "weights": "EMA", "sampler": "ddim", "sampler.num_steps": 4, "sampler.eta": 0.0, "seed": 1, "n": 6}
    # -1: a new random seed each time, reported; the same seed again draws the same images
    first, second = generate(module, "ddim", 4, -1, 2), generate(module, "ddim", 4, -1, 2)
    assert first.seed != second.seed and f"seed {first.seed}:" in first.summary and 0 <= first.seed < 2**32
    assert np.array_equal(np.asarray(generate(module, "ddim", 4, first.seed, 2).grid), np.asarray(first.grid))


@pytest.mark.parametrize("field, value, text", [
    ("seed", None, "seed is empty: it must be a whole number in [0, 2^63 - 1], or -1 for a random seed"),
    ("seed", -3, "seed=-3 is invalid: it must be a whole number in [0, 2^63 - 1], or -1"),
    ("seed", 2.5, "seed=2.5 is invalid"),
    ("seed", 2.0**63, "seed=9.223372036854776e+18 is invalid"),
    ("seed", "7", "seed='7' is invalid"),
    ("steps", 2.5, "steps=2.5 is invalid: it must be a whole number in [1, 1000]"),
    ("steps", 0, "steps=0 is invalid"),
    ("count", 65, "images=65 is invalid: it must be a whole number in [1, 64]"),
    ("sampler", "cold", "sampler='cold' is invalid: allowed values are ddim, "),
    ("options", {"eta": 1.5}, "sampler eta=1.5 is invalid: it must be a number in [0, 1]"),
    ("options", {"order": 2}, "sampler ddim has no control 'order' on this page: it takes eta, spacing"),
    ("options", {"spacing": "middle"}, "sampler spacing='middle' is invalid: allowed values are leading, trailing"),
    ("options", {"guidance_scale": 2.0}, "sampler ddim has no control 'guidance_scale'"),  # an unconditional model
])
def test_every_field_is_checked_before_any_work(ckpt, field, value, text, monkeypatch):
    module = DiffusionModule.from_checkpoint(ckpt)
    monkeypatch.setattr(module, "sample", lambda *a, **k: pytest.fail("sampled before the fields were checked"))
    request = {"sampler": "ddim", "steps": 3, "seed": 0, "count": 2, "options": {}, **{field: value}}
    with pytest.raises(ValueError, match=re.escape(text)):
        generate(module, **request)


def test_the_page_and_generate_check_the_fields_with_one_function(ckpt, monkeypatch):
    """check_fields gives each bad field its one-line message (the first is what generate raises); the page's
    validator shows each beside its field, in the inputs' order, and nothing for a hidden sampler's controls."""
    from diffusion.app import build_app, check_fields

    module = DiffusionModule.from_checkpoint(ckpt)
    monkeypatch.setattr(module, "sample", lambda *a, **k: pytest.fail("sampled before the fields were checked"))
    assert check_fields(module, "ddim", 3, 0, 2, {"eta": 0.5}) == {}
    errors = check_fields(module, "ddim", 2.5, "7", 65, {"eta": 1.5, "order": 2, "spacing": "leading"})
    assert errors == {"steps": "steps=2.5 is invalid: it must be a whole number in [1, 1000]",
                      "count": "images=65 is invalid: it must be a whole number in [1, 64]",
                      "seed": "seed='7' is invalid: it must be a whole number in [0, 2^63 - 1], or -1 for a random seed",
                      "order": "sampler ddim has no control 'order' on this page: it takes eta, spacing",
                      "eta": "sampler eta=1.5 is invalid: it must be a number in [0, 1]"}
    with pytest.raises(ValueError, match=re.escape(errors["steps"]) + "$"):  # generate: the first message
        generate(module, "ddim", 2.5, "7", 65, {"eta": 1.5, "order": 2})
    assert check_fields(module, "cold", 3, 0, 2, {"order": 9}) == {  # an unknown sampler: its options are not read
        "sampler": f"sampler='cold' is invalid: allowed values are {', '.join(sampler_names(module))}"}
    assert check_fields(module, "ddim", 3, 0, 2, classes=[1]) == {
        "classes": "classes=[1] is invalid: this model is unconditional (trained without data.conditional=true); "
                   "sample it without classes"}
    demo = build_app(module, str(ckpt))
    (validate,) = {f.validator for f in demo.fns.values() if getattr(f, "validator", None) is not None}
    parts = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    order = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None) in
             {"eta", "spacing", "order", "algorithm_type", "sigmas", "s_churn"}]
    values = {k: parts[k].value for k in order} | {"eta": 1.5, "order": 7}  # order: dpmsolver++'s, hidden for ddim
    results = validate("ddim", 3, 2.5, 0, *[values[k] for k in order])
    messages = dict(zip(["sampler", "steps", "seed", "count", *order], results))
    assert {k: r["message"] for k, r in messages.items() if not r["is_valid"]} == {
        "seed": "seed=2.5 is invalid: it must be a whole number in [0, 2^63 - 1], or -1 for a random seed",
        "count": "images=0 is invalid: it must be a whole number in [1, 64]",
        "eta": "sampler eta=1.5 is invalid: it must be a number in [0, 1]"}
    assert all(r == {"__type__": "validate", "is_valid": True, "message": ""} for r in results if r["is_valid"])
    assert len(results) == 4 + len(order)


def test_each_sampler_shows_the_controls_it_takes_from_the_registry(ckpt):
    """The page's widgets are the registry's controls (each class's ``controls``): the chosen sampler's are visible,
    at its defaults (the checkpoint's own for its trained sampler); the steps say what they cost."""
    import gradio as gr

    from diffusion.app import build_app, steps_info
    from diffusion.samplers.registry import sampler_class

    module = DiffusionModule.from_checkpoint(ckpt)
    demo = build_app(module, str(ckpt))
    parts = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    every = {c.name for n in sampler_names(module) for c in sampler_class(n).controls}
    assert every == {"eta", "spacing", "order", "algorithm_type", "sigmas", "s_churn"} and every <= set(parts)
    assert parts["eta"].visible and parts["spacing"].visible and not parts["order"].visible  # ddim, trained
    assert parts["steps"].step == 1 and parts["seed"].value == -1
    on_sampler = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "on_sampler")
    order = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None) in every]  # the widgets' order

    def shown(name, steps):
        steps_update, *updates = on_sampler(name, steps)
        return steps_update["info"], {k: u.get("value") for k, u in zip(order, updates) if u["visible"]}

    info, visible = shown("dpmsolver++", 20)
    assert visible == {"order": 2, "algorithm_type": "dpmsolver++", "spacing": "linspace"}  # conf/sampler/dpmsolver++.yaml
    assert info == "dpmsolver++, 20 steps: 20 network calls per image"
    assert shown("heun", 10)[1] == {"sigmas": "karras", "s_churn": 0.0} and shown("plms", 10)[1] == {"spacing": "leading"}
    assert shown("euler_ancestral", 10)[1] == {"sigmas": "karras", "eta": 1.0} and shown("ddim", 3)[1]["eta"] == 0.0
    assert steps_info(module, "heun", 10) == "heun, 10 steps: 19 network calls per image"  # 2 per step but the last
    assert steps_info(module, "ddpm", 1000) == "ddpm, 1000 steps: 1000 network calls per image: every one of the T = 1000 timesteps"
    assert steps_info(module, "ddpm", 2.5) == "steps=2.5 is invalid: it must be a whole number in [1, 1000]"
    # the page's run: a bad field is shown on the page (gr.Error, no traceback in the log), good ones draw
    run = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "run")
    values = [parts[k].value for k in order]
    assert len(values) == len(every)
    with pytest.raises(gr.Error, match=re.escape("seed=2.5 is invalid")) as err:
        run("ddim", 3, 2.5, 2, *values)
    assert err.value.print_exception is False
    grid_path, strip_path, summary, used = run("ddim", 3, 4, 2, *values)
    assert Path(grid_path).name == "digits_ddim-3_seed-4_n-2.png" and Path(strip_path).name == "digits_ddim-3_seed-4_n-2_strip.png"
    assert Image.open(grid_path).text["seed"] == "4" and used == 4 and summary.startswith("2 images with ddim, 3 steps")


def test_the_download_reproduces_its_pixels_with_diffusion_sample(ckpt, tmp_path):
    """The PNG text's ``command`` (``python -m diffusion.sample ...``) draws the images the page showed."""
    import shlex

    from diffusion.app import build_app

    demo = build_app(DiffusionModule.from_checkpoint(ckpt), str(ckpt), downloads=tmp_path / "dl")
    run = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "run")
    parts = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    order = [k for k in ("eta", "spacing", "order", "algorithm_type", "sigmas", "s_churn") if k in parts]
    order = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None) in order]
    values = {k: parts[k].value for k in order} | {"eta": 0.5}
    grid_path, _, _, used = run("ddim", 4, 11, 3, *[values[k] for k in order])
    text = Image.open(grid_path).text
    assert text["sampler.eta"] == "0.5" and text["seed"] == "11" and text["n"] == "3"
    command = shlex.split(text["command"])
    assert command[:3] == ["python", "-m", "diffusion.sample"] and "+sampler.eta=0.5" in command
    proc = run_train(*command[3:], f"hydra.run.dir={tmp_path / 'sample'}", tmp_path=tmp_path, module="diffusion.sample")
    assert proc.returncode == 0, proc.output[-2000:]
    drawn = np.load(tmp_path / "sample" / "samples.npz")["samples"]  # (3, 16, 16, 1) uint8
    page = Image.open(grid_path)
    scale = 256 // 16
    for i in range(3):  # the page's grid: round(sqrt 3) = 2 per row
        assert np.array_equal(cell(page, (0, 0), i // 2, i % 2, 16, scale), np.kron(drawn[i, :, :, 0].astype(int), np.ones((scale, scale), dtype=int))), i


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(ckpt, tmp_path, *overrides: str, env: dict | None = None, host: str = "127.0.0.1"):
    """``python -m diffusion.app ckpt=... <overrides>`` as a user starts it, on a free port: (url, process, log path)."""
    port = free_port()
    cmd = [sys.executable, "-m", "diffusion.app", f"ckpt={ckpt}", f"port={port}", f"host={host}",
           f"hydra.run.dir={tmp_path / 'app'}", *overrides]
    log_path = tmp_path / "app.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**clean_env(tmp_path), **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError:  # served, behind a login
                break
            except OSError:
                assert time.time() < deadline, "the app did not serve within 120 s"
                time.sleep(0.5)
        yield url, proc, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def served_app(ckpt, tmp_path):
    with serve(ckpt, tmp_path) as served:
        yield served


def require_chromium():
    if CHROMIUM is None:
        if os.environ.get("DIFFUSION_REQUIRE_BROWSER"):
            pytest.fail("DIFFUSION_REQUIRE_BROWSER is set but chromium is not installed (apt-get install -y chromium)")
        pytest.skip("no chromium on this machine (apt-get install -y chromium); CI installs it and runs this test")


def set_field(page, elem: str, value: str) -> None:
    field = page.locator(f"#{elem} input[type=number]")
    field.fill(value)
    field.press("Enter")


def generated(page, previous: str = "") -> str:
    """Wait for the run's summary to change from ``previous`` (a press finished), and return it."""
    page.wait_for_function(f"document.querySelector('#info textarea').value.length > 0 && "
                           f"document.querySelector('#info textarea').value !== {previous!r}", timeout=120_000)
    return page.locator("#info textarea").input_value()


def fetched(url: str, src: str):
    return Image.open(io.BytesIO(urllib.request.urlopen(urllib.parse.urljoin(url, src)).read()))


@pytest.mark.browser
def test_the_page_generates_the_models_samples_in_headless_chromium(served_app, ckpt, tmp_path):
    """As a person uses it: settings, Generate, the model's own samples; a random seed that is shown; bad fields
    refused beside them with no traceback in the log; DDPM's controls; the labelled strip; one progress bar; the
    download's name and PNG text, which draw the same pixels again."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    url, _, log_path = served_app
    outside, trackers = [], set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(accept_downloads=True)
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
        page.goto(url, wait_until="networkidle")
        assert page.locator("#seed input").input_value() == "-1"  # a new random seed each press, by default
        # bad fields: a message beside the field, nothing drawn
        page.locator("#seed input").fill("2.5")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#seed').innerText.includes('is invalid')", timeout=30_000)
        seed_message = page.locator("#seed").inner_text()
        page.locator("#seed input").fill("")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#seed').innerText.includes('seed is empty')", timeout=30_000)
        page.locator("#seed input").fill(str(2**64))
        page.click("#generate")
        page.wait_for_function("document.querySelector('#seed').innerText.includes('seed=1844674407370955')", timeout=30_000)
        page.locator("#seed input").fill("3")
        set_field(page, "steps", "2.5")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#steps').innerText.includes('steps=2.5 is invalid')", timeout=30_000)
        assert page.locator("#grid img").count() == 0  # nothing was drawn
        # the model's samples at chosen settings
        page.locator("#sampler input").click()
        page.get_by_role("option", name="ddim").click()
        for elem, value in (("steps", "5"), ("eta", "0"), ("count", "4")):
            set_field(page, elem, value)
        page.click("#generate")
        while not page.locator("#info textarea").input_value():  # one progress bar while it samples
            trackers.add(page.locator("[data-testid=status-tracker]:not(.hide)").count())
            page.wait_for_timeout(20)
        info = generated(page)
        # the summary can arrive before the browser has decoded the image: wait for it to render (or time out)
        page.wait_for_function("(() => { const img = document.querySelector('#grid img');"
                               " return img !== null && img.complete && img.naturalWidth > 0; })()", timeout=30_000)
        grid_src = page.locator("#grid img").get_attribute("src")
        strip_src = page.locator("#strip img").get_attribute("src")
        width = page.locator("#grid img").evaluate("img => img.naturalWidth")
        with page.expect_download() as download:
            page.locator("#grid [data-testid=download-link]").click()
        download.value.save_as(tmp_path / "downloaded.png")
        name = download.value.suggested_filename
        # the random seed: two presses differ, each shows its seed
        page.locator("#random").click()
        page.wait_for_function("document.querySelector('#seed input').value === '-1'", timeout=30_000)
        page.click("#generate")
        first = generated(page, info)
        first_seed = page.locator("#used_seed input").input_value()
        first_src = page.locator("#grid img").get_attribute("src")
        page.click("#generate")
        second = generated(page, first)
        second_seed = page.locator("#used_seed input").input_value()
        second_src = page.locator("#grid img").get_attribute("src")
        page.locator("#reuse").click()  # the last seed back in the field: the same grid again
        page.wait_for_function(f"document.querySelector('#seed input').value === '{second_seed}'", timeout=30_000)
        # DDPM: no eta; the steps say what they run
        page.locator("#sampler input").click()
        page.get_by_role("option", name="ddpm").click()
        page.wait_for_function("!document.querySelector('#eta') || document.querySelector('#eta').offsetParent === null", timeout=30_000)
        set_field(page, "steps", "1000")
        page.wait_for_function("document.querySelector('#steps').innerText.includes('every one of the T = 1000')", timeout=30_000)
        spacing_shown = page.locator("#spacing").is_visible()
        browser.close()
    assert "seed=2.5 is invalid: it must be a whole number in [0, 2^63 - 1], or -1 for a random seed" in seed_message
    assert info.startswith("4 images with ddim, 5 steps, eta 0, seed 3"), info
    assert width > 0 and max(trackers) == 1, trackers  # the image rendered; one progress bar at most (on the grid)
    shown = fetched(url, grid_src).convert("RGB")
    expected = generate(DiffusionModule.from_checkpoint(ckpt), "ddim", 5, 3, 4, {"eta": 0.0})
    assert np.array_equal(np.asarray(shown), np.asarray(expected.grid))  # the page shows this model's samples, as PNG
    strip = fetched(url, strip_src)
    assert strip.text["Columns"] == "t=801 | t=601 | t=401 | t=201 | t=1 | t=0" and strip.text["Rows"] == "image 1 | image 2 | image 3 | image 4"
    # the download: named from its settings, which it holds, and which draw the same pixels again
    assert name == "digits_ddim-5_seed-3_n-4.png"
    text = Image.open(tmp_path / "downloaded.png").text
    assert (text["sampler"], text["sampler.num_steps"], text["sampler.eta"], text["seed"], text["n"], text["ckpt"]) == (
        "ddim", "5", "0.0", "3", "4", str(ckpt))
    again = generate(DiffusionModule.from_checkpoint(text["ckpt"]), text["sampler"], int(text["sampler.num_steps"]),
                     int(text["seed"]), int(text["n"]), {"eta": float(text["sampler.eta"])})
    assert np.array_equal(np.asarray(Image.open(tmp_path / "downloaded.png").convert("RGB")), np.asarray(again.grid))
    assert first_seed != second_seed and f"seed {first_seed}:" in first and f"seed {second_seed}:" in second
    assert first_src != second_src
    assert spacing_shown  # DDPM's own control: the spacing of its respaced chain below T steps
    log = log_path.read_text()
    assert "Traceback" not in log and "Error" not in log, log[-3000:]  # bad fields leave nothing in the server's log
    assert outside == []  # the page loads nothing from the internet


def test_eight_people_pressing_generate_at_once_all_get_their_images_behind_a_login(ckpt, tmp_path):
    """``host=0.0.0.0`` with ``DIFFUSION_APP_AUTH``: no request without the login; eight concurrent ones with it all
    complete (queued, one sampling at a time: memory bounded), each the images of its seed; beyond max_count is
    refused with its message."""
    import concurrent.futures

    from gradio_client import Client

    with serve(ckpt, tmp_path, "max_count=16", env={"DIFFUSION_APP_AUTH": "ana:s3cret"}, host="0.0.0.0") as (url, proc, log_path):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.parse.urljoin(url, "gradio_api/info"), timeout=10)
        assert refused.value.code in (401, 403)
        with pytest.raises(Exception):
            Client(url, verbose=False)  # no login, no page
        client = Client(url, auth=("ana", "s3cret"), verbose=False)
        inputs = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"]["parameters"]
        defaults = {p["parameter_name"]: p["parameter_default"] for p in inputs}

        def press(seed):
            return client.predict(**{**defaults, "sampler": "ddim", "steps": 3, "seed": seed, "count": 16}, api_name="/generate")

        rss_before = peak_rss_kib(proc.pid)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(press, range(8)))
        peak = peak_rss_kib(proc.pid)
        with pytest.raises(Exception, match=re.escape("images=17 is invalid: it must be a whole number in [1, 16]")):
            client.predict(**{**defaults, "sampler": "ddim", "steps": 3, "seed": 0, "count": 17}, api_name="/generate")
        log = log_path.read_text()
    assert [r[3] for r in results] == list(range(8))  # every request completed, with its own seed
    module = DiffusionModule.from_checkpoint(ckpt)
    for seed in (0, 7):
        expected = generate(module, "ddim", 3, seed, 16, {"eta": 0.0}).grid
        assert np.array_equal(np.asarray(Image.open(results[seed][0]).convert("RGB")), np.asarray(expected)), seed
    assert "login required; 1 request at once" in log and "with no login" not in log
    print(f"server peak RSS {rss_before / 1024:.0f} MiB before, {peak / 1024:.0f} MiB after 8 concurrent requests")
    assert peak < rss_before + 600 * 1024, (rss_before, peak)  # one sampling at a time: bounded


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory (VmHWM), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_serving_beyond_localhost_without_a_login_warns_and_logins_come_from_the_environment():
    from diffusion.app import logins, serving_warning
    from diffusion.run.errors import UsageError

    assert logins({}) is None and logins({"DIFFUSION_APP_AUTH": "ana:s3:cret, bo:pw"}) == [("ana", "s3:cret"), ("bo", "pw")]
    for bad in ("ana", "ana:", ":s3cret", "ana:s3cret,bo"):
        with pytest.raises(UsageError, match="DIFFUSION_APP_AUTH is invalid: it must be user:password") as err:
            logins({"DIFFUSION_APP_AUTH": bad})
        assert "s3cret" not in str(err.value)  # the message never repeats a password
    assert "with no login" in serving_warning("0.0.0.0", 7860, None)
    assert serving_warning("0.0.0.0", 7860, [("ana", "x")]) is None and serving_warning("127.0.0.1", 7860, None) is None


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
    out = generate(module, "ddim", 3, seed=5, count=3, strip_images=3, strip_points=4, classes=[2, 7])
    grid, strip, summary = out.grid, out.strip, out.summary
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
    assert strip.info["Rows"] == "2, image 1 | 7, image 1 | 2, image 2"
    assert strip.info["Columns"] == "t=667 | t=334 | t=1 | t=0"  # DDIM's leading grid of 3 steps, then x_0
    assert out.name == "digits_ddim-3_classes-2-7_w-1_seed-5_n-3" and out.settings["classes"] == "[2, 7]"
    for r, i in enumerate([0, 3, 1]):
        assert np.array_equal(class_cell(strip, r, 3), pixels_of(conditional[i, 0])), r

    result = generate(module, "ddim", 3, seed=5, count=3, classes=[2, 7],
                      options={"guidance_scale": 3.0, "guidance_rescale": 0.5})
    guided, text = result.grid, result.summary
    assert result.settings["sampler.guidance_scale"] == 3.0 and "sampler.guidance_scale=3.0" in result.settings["command"]
    assert "guidance 3 (rescale 0.5), eta 0, seed 5" in text
    assert not np.array_equal(np.asarray(guided), np.asarray(grid))  # w = 3 is not w = 1
    expected = module.sample(6, sampler=module.named_sampler(None, guidance_scale=3.0, guidance_rescale=0.5),
                             generator=torch.Generator().manual_seed(5), labels=labels).samples
    assert not torch.equal(expected, conditional)
    for r in range(2):
        for c in range(3):
            assert np.array_equal(class_cell(guided, r, c), pixels_of(expected[3 * r + c, 0])), (r, c)

    result = generate(module, "ddim", 3, seed=5, count=1, classes=None)  # the default: all classes
    every, text = result.grid, result.summary
    assert every.info["Rows"] == " | ".join(str(k) for k in range(10)) and "all classes (0, 1, 2" in text
    assert int(every.info["Grid"].split()[3]) == PAGE_SCALE * (10 * (PAGE_SIDE + PAGE_PAD) + PAGE_PAD)
    for bad, text in (([10], "class 10 is not in 0..9"), ([], "no class is chosen"), (["x"], "classes=['x'] is invalid")):
        with pytest.raises(ValueError, match=re.escape(text)):
            generate(module, "ddim", 3, seed=5, count=1, classes=bad)


def test_the_class_picker_and_guidance_are_on_the_page_of_a_conditional_checkpoint_only(cond_ckpt, ckpt):
    import gradio as gr

    from diffusion.app import build_app, toggled

    def components(demo):
        return {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}

    demo = build_app(DiffusionModule.from_checkpoint(cond_ckpt))
    parts = components(demo)
    picker, guidance, rescale = parts["classes"], parts["guidance_scale"], parts["guidance_rescale"]
    assert isinstance(picker, gr.CheckboxGroup) and picker.value == ["all"]
    assert picker.choices == [("all classes", "all")] + [(str(k), k) for k in range(10)]
    assert (guidance.minimum, guidance.maximum, guidance.step, guidance.value) == (0, 10, 0.5, 1)
    assert "1 conditional, 0 unconditional, > 1 guided" in guidance.label
    assert (rescale.minimum, rescale.maximum, rescale.value) == (0, 1, 0) and parts["count"].label.startswith("images per class")
    run = next(f.fn for f in demo.fns.values() if f.fn is not None and f.fn.__name__ == "run")
    order = [b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None) in
             ("eta", "spacing", "order", "algorithm_type", "sigmas", "s_churn", "guidance_scale", "guidance_rescale")]
    values = {k: parts[k].value for k in order}

    def press(classes, w):
        return run("ddim", 3, 0, 1, *[{**values, "guidance_scale": w}[k] for k in order], classes)

    grid_path, _, summary, _ = press([7, 3], 2.0)  # the picker's order of clicks: rows in class order
    assert Image.open(grid_path).text["Rows"] == "3 | 7" and "guidance 2" in summary
    for bad, text in (([10], "class 10 is not in 0..9"), ([], "no class is chosen")):
        with pytest.raises(gr.Error, match=re.escape(text)):  # shown on the page; the app keeps serving
            press(bad, 1.0)
    # checking "all classes" clears the classes, checking a class clears "all classes"
    for before, after in ((["all"], ["all", 7]), ([3], [3, 7])):  # the selection before the click (gradio's) or after
        assert toggled(before, 7, True) == toggled(after, 7, True) == [k for k in before if k != "all"] + [7]
    assert toggled([3, 7], "all", True) == toggled([3, 7, "all"], "all", True) == ["all"]
    assert toggled([3, 7], 7, False) == toggled([3], 7, False) == [3]

    plain = components(build_app(DiffusionModule.from_checkpoint(ckpt)))
    assert not {"classes", "guidance_scale", "guidance_rescale"} & set(plain) and plain["count"].label == "images"


@pytest.mark.browser
def test_the_class_picker_and_guidance_drive_the_grid_in_headless_chromium(cond_ckpt):
    require_chromium()
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
            for elem, value in (("steps", "3"), ("count", "2"), ("guidance_scale", "3")):
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
    expected = generate(module, "ddim", 3, 4, 2, classes=[3, 7], options={"guidance_scale": 3.0}).grid
    assert np.array_equal(np.asarray(shown), np.asarray(expected))  # this model's class rows, guided at w = 3
