"""A page to sample a checkpoint: ``python -m diffusion.app ckpt=PATH [port=7860]``, then open http://127.0.0.1:7860.

Pick the sampler, its steps (and DDIM's eta), the seed and the number of images, press Generate, and see the grid
and the reverse-process strip (a few of the images from x_T to x_0). A class-conditional checkpoint (trained with
``data.conditional=true``) adds a class picker ("all classes" or some of them), the classifier-free guidance scale
w (1 conditional, 0 unconditional, > 1 guided) and its rescale (Lin et al. 2023); the grid then has one row of
"images per class" per chosen class, named left of it, and the strip follows one image of each of the first classes.
Needs the optional ``app`` extra (``pip install -e ".[app]"``: gradio). The page loads nothing from the internet.
"""

from __future__ import annotations

import logging
import os
import time

import hydra
import torch
from omegaconf import DictConfig
from PIL import Image

from diffusion.grids import class_rows_image, grid_image, plural
from diffusion.module import DiffusionModule
from diffusion.runtime import CONFIG_DIR, UsageError, build_or_usage_error, exits_on_usage_error, require_ckpt
from diffusion.sample import resolve_device
from diffusion.samplers.guidance import check_labels
from diffusion.samplers.registry import sampler_config, sampler_name
from diffusion.samplers.registry import sampler_names as registered_names

log = logging.getLogger("diffusion.app")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is first imported: no usage reports


def sampler_names(module: DiffusionModule) -> list[str]:
    """The samplers that reverse this checkpoint's process (the registry's), its trained one first."""
    trained = sampler_name(module.hparams.sampler)
    return [trained] + [name for name in registered_names(module.process.kind) if name != trained]


def to_pil(images: torch.Tensor, nrow: int) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one RGB grid image, enlarged (nearest) so that small images fill the page."""
    return grid_image(images, nrow=nrow, scale=max(1, 256 // images.shape[-1])).convert("RGB")


#: the class picker's choice that stands for every class of the model
ALL_CLASSES = "all"


def chosen_classes(module: DiffusionModule, classes) -> torch.Tensor | None:
    """The class indices to draw: every class for None or a choice holding ``"all"`` (a class-conditional model),
    None for an unconditional model without classes; a one-line ValueError for an empty choice, classes the model
    does not have, or classes for an unconditional model."""
    if module.num_classes is None:
        if classes is None:
            return None
        raise ValueError(f"classes={classes} is invalid: this model is unconditional (trained without "
                         "data.conditional=true); sample it without classes")
    classes = [classes] if isinstance(classes, (str, int)) else list(classes) if classes is not None else None
    if classes is None or ALL_CLASSES in classes:
        return torch.arange(module.num_classes)
    if not classes:
        raise ValueError("no class is chosen: pick at least one class, or all classes")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in classes):
        raise ValueError(f"classes={classes} is invalid: it must be all or class indices in 0..{module.num_classes - 1}")
    return check_labels(classes, module.num_classes)


def strip_order(num_classes: int, per_class: int, k: int) -> list[int]:
    """The indices of the first ``k`` images of a class-rows grid taken class by class: the first image of each
    class, then the second of each, ...: the strip shows as many classes as it has rows."""
    return [c * per_class + j for j in range(per_class) for c in range(num_classes)][:k]


def generate(module: DiffusionModule, sampler: str, steps: int, eta: float, seed: int, count: int,
             strip_images: int = 4, strip_points: int = 9, classes=None, guidance_scale: float = 1.0,
             guidance_rescale: float = 0.0) -> tuple[Image.Image, Image.Image, str]:
    """(grid of ``count`` samples, reverse-process strip of the first ``strip_images``, a one-line summary).

    A class-conditional model: ``count`` images of each of ``classes`` (None or a list holding ``"all"``: every
    class; else class indices), guided at ``guidance_scale`` (rescale ``guidance_rescale``), one named row per class;
    the strip follows the first image of each class (:func:`strip_order`). ValueError (one line) for a bad value."""
    labels_of = chosen_classes(module, classes)
    own = sampler == sampler_name(module.hparams.sampler)  # the trained sampler keeps its own settings
    options = {"eta": float(eta)} if "eta" in own_config(module, sampler) else {}  # the samplers that have an eta
    if labels_of is not None:  # only a class-conditional model has a guidance scale on the page
        options.update(guidance_scale=float(guidance_scale), guidance_rescale=float(guidance_rescale))
    chosen = module.named_sampler(None if own else sampler, int(steps), **options)
    count = int(count)
    labels = None if labels_of is None else labels_of.repeat_interleave(count)  # class by class: one row each
    n = count if labels is None else len(labels)
    start = time.perf_counter()
    generator = torch.Generator(device=module.device).manual_seed(int(seed))
    out = module.sample(n, sampler=chosen, generator=generator, return_trajectory=True,
                        trajectory_points=strip_points, progress=True, labels=labels)
    seconds = time.perf_counter() - start
    images, trajectory = out.samples.cpu(), out.trajectory.cpu()
    if labels is None:
        grid = to_pil(images, nrow=max(1, round(count ** 0.5)))
        strip = trajectory[:, :strip_images].transpose(0, 1)  # rows: images, columns: x_T ... x_0
        strip = to_pil(strip.reshape(-1, *strip.shape[2:]), nrow=trajectory.shape[0])
        summary = f"{plural(int(count), 'image')} with {chosen.describe()}, seed {seed}: {seconds:.1f} s on {module.device}"
        return grid, strip, summary
    names = [module.class_names[k] for k in labels_of.tolist()]
    title = f"{chosen.describe()}, seed {seed}"
    grid = class_rows_image(images, count, names, title).convert("RGB")
    picked = strip_order(len(names), count, strip_images)
    strip = trajectory[:, picked].transpose(0, 1)  # rows: images (one per class first), columns: x_T ... x_0
    strip_labels = [module.class_names[int(labels[i])] for i in picked]
    strip = class_rows_image(strip.reshape(-1, *strip.shape[2:]), trajectory.shape[0], strip_labels,
                             f"reverse process, x_T to x_0: {title}").convert("RGB")
    listed = ", ".join(names) if len(names) <= 20 else f"{len(names)} classes"
    what = f"all classes ({listed})" if len(names) == module.num_classes else f"class{'es' * (len(names) > 1)} {listed}"
    described = chosen.describe() + (", guidance 1 (conditional)" if chosen.guidance_scale == 1.0 else "")
    summary = f"{plural(n, 'image')}, {count} of each of {what}, with {described}, seed {seed}: {seconds:.1f} s on {module.device}"
    return grid, strip, summary


def own_config(module: DiffusionModule, name: str) -> dict:
    """The config the page builds ``name`` from: the checkpoint's for its trained sampler, else the registry's."""
    return dict(module.hparams.sampler) if name == sampler_name(module.hparams.sampler) else sampler_config(name)


def default_eta(module: DiffusionModule, name: str) -> float:
    return float(own_config(module, name).get("eta", 0.0))


def picker_choices(module: DiffusionModule) -> list[tuple[str, str | int]]:
    """The class picker's (label, value) choices: "all classes", then each class by name (its index as value)."""
    return [("all classes", ALL_CLASSES)] + [(name, k) for k, name in enumerate(module.class_names)]


def picked_classes(selection) -> list:
    """The picker's selection as :func:`generate` takes it: ``["all"]``, or the chosen indices in class order."""
    selection = list(selection or [])
    return [ALL_CLASSES] if ALL_CLASSES in selection else sorted(selection)


def toggled(selection, value, selected: bool) -> list:
    """The picker after ``value`` was checked (``selected``) or unchecked: checking "all classes" clears the classes,
    checking a class clears "all classes" (the two mean different grids). ``selection`` may be the value before the
    click (gradio's select event sends that) or after it."""
    rest = [v for v in (selection or []) if v != value]
    if not selected:
        return rest
    return [ALL_CLASSES] if value == ALL_CLASSES else [v for v in rest if v != ALL_CLASSES] + [value]


def build_app(module: DiffusionModule, ckpt: str = "", max_count: int = 64, strip_images: int = 4, strip_points: int = 9):
    """The Gradio Blocks page for ``module``; a class-conditional one gets the class picker (elem_id ``classes``),
    the guidance scale (``guidance``) and its rescale (``rescale``)."""
    import gradio as gr

    names = sampler_names(module)
    T = module.process.num_timesteps
    trained_steps = module.hparams.sampler.get("num_steps") or T
    conditional = module.num_classes is not None

    def shown(call):
        try:
            return call()
        except ValueError as err:  # a bad combination (e.g. a grid that repeats timesteps, a class the model has
            raise gr.Error(str(err)) from err  # not): show it, keep serving

    def run(sampler, steps, eta, seed, count, progress=gr.Progress(track_tqdm=True)):
        return shown(lambda: generate(module, sampler, steps, eta, seed, count, strip_images, strip_points))

    def run_conditional(sampler, steps, eta, seed, count, classes, w, phi, progress=gr.Progress(track_tqdm=True)):
        return shown(lambda: generate(module, sampler, steps, eta, seed, count, strip_images, strip_points,
                                      classes=picked_classes(classes), guidance_scale=w, guidance_rescale=phi))

    with gr.Blocks(title="diffusion: sample a checkpoint") as demo:
        what = f", {module.num_classes} classes" if conditional else ""
        gr.Markdown(f"### Sample `{ckpt}`\n{type(module.process).__name__}, T = {T}, "
                    f"{'EMA' if module.has_ema else 'raw'} weights, images {tuple(module.image_shape)}{what}")
        with gr.Row():
            with gr.Column(scale=1):
                sampler = gr.Dropdown(names, value=names[0], label="sampler", elem_id="sampler")
                steps = gr.Slider(1, T, value=min(trained_steps, T), step=1, label="steps (network calls: heun 2 per "
                                  "step, plms + 1, pndm + 9)", elem_id="steps")
                eta = gr.Slider(0.0, 1.0, value=default_eta(module, names[0]), step=0.1, interactive="eta" in own_config(module, names[0]),
                                label="eta (DDIM, Euler ancestral: 0 deterministic, 1 fresh noise every step)", elem_id="eta")
                seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                if conditional:  # count images of each chosen class: one row per class
                    count = gr.Slider(1, max_count, value=max(1, min(8, max_count, 64 // module.num_classes)), step=1,
                                      label="images per class (one row per class)", elem_id="count")
                    classes = gr.CheckboxGroup(picker_choices(module), value=[ALL_CLASSES], label="classes",
                                               elem_id="classes")
                    trained = module.hparams.sampler
                    guidance = gr.Slider(0.0, 10.0, value=min(10.0, float(trained.get("guidance_scale", 1.0))), step=0.5,
                                         label="guidance scale w (1 conditional, 0 unconditional, > 1 guided)",
                                         elem_id="guidance")
                    rescale = gr.Slider(0.0, 1.0, value=float(trained.get("guidance_rescale", 0.0)), step=0.05,
                                        label="guidance rescale (Lin et al. 2023: 0 off; counters over-saturation at "
                                        "large w)", elem_id="rescale")
                else:
                    count = gr.Slider(1, max_count, value=min(16, max_count), step=1, label="images", elem_id="count")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                grid = gr.Image(label="samples" + (" (one row per class)" if conditional else ""), type="pil",
                                format="png", elem_id="grid")
                strip = gr.Image(label="reverse process: x_T (left) to x_0 (right)", type="pil", format="png",
                                 elem_id="strip")
                info = gr.Textbox(label="run", interactive=False, elem_id="info")
        # a sampler's own eta (its yaml's, or the checkpoint's for its trained sampler); fixed where it has none
        sampler.change(lambda name: gr.update(value=default_eta(module, name), interactive="eta" in own_config(module, name)),
                       sampler, eta)
        if conditional:
            def on_select(selection, evt):
                return toggled(selection, evt.value, evt.selected)

            # gradio passes the event to a parameter annotated gr.SelectData (set as an object here: this module's
            # annotations are strings, and gradio, imported lazily, is not among its globals to resolve them)
            on_select.__annotations__["evt"] = gr.SelectData
            classes.select(on_select, classes, classes)
            button.click(run_conditional, [sampler, steps, eta, seed, count, classes, guidance, rescale], [grid, strip, info])
        else:
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
    module = build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema,
                                                                                 trust=cfg.get("trust_checkpoint", False)))
    module = module.to(resolve_device(cfg.device))
    demo = build_app(module, str(cfg.ckpt), cfg.max_count, cfg.strip_images, cfg.strip_points)
    log.info("serving %s on http://%s:%d", cfg.ckpt, cfg.host, cfg.port)
    local_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=False, show_error=True, theme=local_fonts, footer_links=[])


if __name__ == "__main__":
    main()
