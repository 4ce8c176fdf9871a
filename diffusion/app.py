"""A page to sample a checkpoint: ``python -m diffusion.app ckpt=PATH [port=7860]``, then open http://127.0.0.1:7860.

Pick the sampler, its steps (and DDIM's eta), the seed and the number of images, press Generate, and see the grid
and the reverse-process strip (a few of the images from x_T to x_0). Needs the optional ``app`` extra
(``pip install -e ".[app]"``: gradio). The page loads nothing from the internet.
"""

from __future__ import annotations

import logging
import os
import time

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image

from diffusion.grids import grid_image
from diffusion.module import DiffusionModule
from diffusion.samplers.registry import sampler_config, sampler_name
from diffusion.samplers.registry import sampler_names as registered_names
from diffusion.runtime import CONFIG_DIR, UsageError, build_or_usage_error, exits_on_usage_error, require_ckpt
from diffusion.sample import resolve_device

log = logging.getLogger("diffusion.app")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is first imported: no usage reports


def sampler_names(module: DiffusionModule) -> list[str]:
    """The samplers that reverse this checkpoint's process (the registry's), its trained one first."""
    trained = sampler_name(module.hparams.sampler)
    return [trained] + [name for name in registered_names(module.process.kind) if name != trained]


def to_pil(images: torch.Tensor, nrow: int) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one RGB grid image, enlarged (nearest) so that small images fill the page."""
    return grid_image(images, nrow=nrow, scale=max(1, 256 // images.shape[-1])).convert("RGB")


def generate(module: DiffusionModule, sampler: str, steps: int, eta: float, seed: int, count: int,
             strip_images: int = 4, strip_points: int = 9) -> tuple[Image.Image, Image.Image, str]:
    """(grid of ``count`` samples, reverse-process strip of the first ``strip_images``, a one-line summary)."""
    own = sampler == sampler_name(module.hparams.sampler)  # the trained sampler keeps its own settings
    options = {"eta": float(eta)} if "eta" in own_config(module, sampler) else {}  # the samplers that have an eta
    chosen = module.named_sampler(None if own else sampler, int(steps), **options)
    start = time.perf_counter()
    generator = torch.Generator(device=module.device).manual_seed(int(seed))
    out = module.sample(int(count), sampler=chosen, generator=generator, return_trajectory=True,
                        trajectory_points=strip_points, progress=True)
    seconds = time.perf_counter() - start
    grid = to_pil(out.samples.cpu(), nrow=max(1, round(int(count) ** 0.5)))
    strip = out.trajectory[:, :strip_images].transpose(0, 1)  # rows: images, columns: x_T ... x_0
    strip = to_pil(strip.reshape(-1, *strip.shape[2:]), nrow=out.trajectory.shape[0])
    summary = f"{count} images with {chosen.describe()}, seed {seed}: {seconds:.1f} s on {module.device}"
    return grid, strip, summary


def own_config(module: DiffusionModule, name: str) -> dict:
    """The config the page builds ``name`` from: the checkpoint's for its trained sampler, else the registry's."""
    return dict(module.hparams.sampler) if name == sampler_name(module.hparams.sampler) else sampler_config(name)


def default_eta(module: DiffusionModule, name: str) -> float:
    return float(own_config(module, name).get("eta", 0.0))


def build_app(module: DiffusionModule, ckpt: str = "", max_count: int = 64, strip_images: int = 4, strip_points: int = 9):
    """The Gradio Blocks page for ``module``."""
    import gradio as gr

    names = sampler_names(module)
    T = module.process.num_timesteps
    trained_steps = module.hparams.sampler.get("num_steps") or T

    def run(sampler, steps, eta, seed, count, progress=gr.Progress(track_tqdm=True)):
        try:
            return generate(module, sampler, steps, eta, seed, count, strip_images, strip_points)
        except ValueError as err:  # a bad combination (e.g. a grid that repeats timesteps): show it, keep serving
            raise gr.Error(str(err)) from err

    with gr.Blocks(title="diffusion: sample a checkpoint") as demo:
        gr.Markdown(f"### Sample `{ckpt}`\n{type(module.process).__name__}, T = {T}, "
                    f"{'EMA' if module.has_ema else 'raw'} weights, images {tuple(module.image_shape)}")
        with gr.Row():
            with gr.Column(scale=1):
                sampler = gr.Dropdown(names, value=names[0], label="sampler", elem_id="sampler")
                steps = gr.Slider(1, T, value=min(trained_steps, T), step=1, label="steps (network calls: heun 2 per "
                                  "step, plms + 1, pndm + 9)", elem_id="steps")
                eta = gr.Slider(0.0, 1.0, value=default_eta(module, names[0]), step=0.1, interactive="eta" in own_config(module, names[0]),
                                label="eta (DDIM, Euler ancestral: 0 deterministic, 1 fresh noise every step)", elem_id="eta")
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                count = gr.Slider(1, max_count, value=min(16, max_count), step=1, label="images", elem_id="count")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                grid = gr.Image(label="samples", type="pil", format="png", elem_id="grid")
                strip = gr.Image(label="reverse process: x_T (left) to x_0 (right)", type="pil", format="png",
                                 elem_id="strip")
                info = gr.Textbox(label="run", interactive=False, elem_id="info")
        # a sampler's own eta (its yaml's, or the checkpoint's for its trained sampler); fixed where it has none
        sampler.change(lambda name: gr.update(value=default_eta(module, name), interactive="eta" in own_config(module, name)),
                       sampler, eta)
        button.click(run, [sampler, steps, eta, seed, count], [grid, strip, info])
    return demo


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="app")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    require_ckpt(cfg)
    if not isinstance(cfg.port, int) or not 1 <= cfg.port <= 65535:
        raise UsageError(f"port={cfg.port!r} is invalid: it must be an integer in [1, 65535]")
    try:
        import gradio as gr
    except ImportError as exc:
        raise UsageError('the app needs gradio: pip install -e ".[app]"') from exc
    module = build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema))
    module = module.to(resolve_device(cfg.device))
    demo = build_app(module, str(cfg.ckpt), cfg.max_count, cfg.strip_images, cfg.strip_points)
    log.info("serving %s on http://%s:%d", cfg.ckpt, cfg.host, cfg.port)
    local_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=False, show_error=True, theme=local_fonts, footer_links=[])


if __name__ == "__main__":
    main()
