"""A page to sample a checkpoint: ``python -m diffusion.app ckpt=PATH [port=7860]``, then open http://127.0.0.1:7860.

Pick the sampler and its steps, the seed (-1, the default: a new random seed at each press; the seed used is shown
beside the result) and the number of images, press Generate, and see the grid and the reverse-process strip (a few
of the images from x_T to x_0, each column labelled with its t, each row with its image). The sampler's own controls
(DDIM's eta, DPM-Solver's order, Heun's churn, ...) come from the sampler registry (each class's ``controls``) and
show only for the samplers that take them; a class-conditional checkpoint (trained with ``data.conditional=true``)
adds a class picker ("all classes" or some of them) and the classifier-free guidance scale w and its rescale (Lin et
al. 2023): the grid then has one row of "images per class" per chosen class, named left of it.

Every field is checked before any work: a bad value gets a one-line message on the page (and none in the server's
log). The grid and the strip download under names made of their settings (``digits_ddim-50_seed-1234_n-16.png``),
with the settings, and the ``python -m diffusion.sample`` command that draws the same images, in the PNG's text
chunks (``PIL.Image.open(path).text``). Requests queue: ``concurrency`` of them sample at once, the rest wait (at
most ``queue_size``). ``host=0.0.0.0`` serves other machines: set ``DIFFUSION_APP_AUTH=user:password`` (in the
environment, never on the command line) to ask for a login. Needs the optional ``app`` extra
(``pip install -e ".[app]"``: gradio). The page loads nothing from the internet.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig
from PIL import Image

from diffusion.checks import check_whole, is_whole
from diffusion.plots.grids import grid_image, labelled_grid_image, plural, save_png
from diffusion.run.config import CONFIG_DIR
from diffusion.run.errors import UsageError, build_or_usage_error, exits_on_usage_error
from diffusion.run.outputs import require_ckpt
from diffusion.samplers.registry import sampler_config, sampler_controls, sampler_name
from diffusion.samplers.registry import sampler_names as registered_names
from diffusion.sharing.reproduce import grid_settings

if TYPE_CHECKING:  # torch and the module load once the settings that need no checkpoint have passed
    import torch

    from diffusion.training.module import DiffusionModule

log = logging.getLogger("diffusion.app")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is first imported: no usage reports

#: the seed field's value that asks for a new random seed at each press
RANDOM_SEED = -1
SEED_MAX = 2**63 - 1
#: the environment variable holding the page's logins: ``user:password``, several separated by commas
AUTH_ENV = "DIFFUSION_APP_AUTH"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: the class picker's choice that stands for every class of the model
ALL_CLASSES = "all"


def sampler_names(module: DiffusionModule) -> list[str]:
    """The samplers that reverse this checkpoint's process (the registry's), its trained one first."""
    trained = sampler_name(module.hparams.sampler)
    return [trained] + [name for name in registered_names(module.process.kind) if name != trained]


def to_pil(images: torch.Tensor, nrow: int) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one RGB grid image, enlarged (nearest) so that small images fill the page."""
    return grid_image(images, nrow=nrow, scale=max(1, 256 // images.shape[-1])).convert("RGB")


def check_seed(seed) -> int:
    """The seed to draw with: the field's whole number in [0, 2^63 - 1] (an int, or a float such as 3.0), or a new
    random one for -1."""
    if is_whole(seed) and seed == RANDOM_SEED:
        return secrets.randbelow(2**32)
    if seed is None or seed == "":
        raise ValueError("seed is empty: it must be a whole number in [0, 2^63 - 1], or -1 for a random seed")
    if not is_whole(seed) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed={seed!r} is invalid: it must be a whole number in [0, 2^63 - 1], or -1 for a random seed")
    return int(seed)


def chosen_classes(module: DiffusionModule, classes) -> torch.Tensor | None:
    """The class indices to draw: every class for None or a choice holding ``"all"`` (a class-conditional model),
    None for an unconditional model without classes; a one-line ValueError for an empty choice, classes the model
    does not have, or classes for an unconditional model."""
    import torch

    from diffusion.samplers.guidance import check_labels

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


def own_config(module: DiffusionModule, name: str) -> dict:
    """The config the page builds ``name`` from: the checkpoint's for its trained sampler, else the registry's."""
    return dict(module.hparams.sampler) if name == sampler_name(module.hparams.sampler) else sampler_config(name)


def controls_of(module: DiffusionModule, name: str):
    """The controls of sampler ``name`` on this checkpoint's page (the guidance ones for a class-conditional one)."""
    return sampler_controls(name, conditional=module.num_classes is not None)


def default_value(module: DiffusionModule, name: str, control):
    """A control's starting value for sampler ``name``: its config's (the checkpoint's for its trained sampler)."""
    value = own_config(module, name).get(control.name)
    if value is None:  # e.g. guidance in a checkpoint written before it existed
        value = sampler_config(name).get(control.name)
    return value if control.choices is not None else float(value)


def data_name(module: DiffusionModule, ckpt: str) -> str:
    """A short name of what the checkpoint draws, for file names: its data's ``name`` (or class: ``digits``), else
    the checkpoint file's stem."""
    data = module.hparams.get("data") or {}
    name = data.get("name") or re.sub(r"DataModule$", "", str(data.get("_target_", "")).rsplit(".", 1)[-1]).lower()
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", name or Path(ckpt).stem or "samples").strip("-") or "samples"


@dataclass
class Generated:
    """What one press draws: the grid, the reverse-process strip, a one-line summary, the seed used, and the
    settings (the PNG text chunks of both downloads); ``name``: the downloads' file name, without ``.png``."""

    grid: Image.Image
    strip: Image.Image
    summary: str
    seed: int
    name: str
    settings: dict = field(default_factory=dict)

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write the grid and the strip (with the settings in their text chunks) as ``<name>.png`` and
        ``<name>_strip.png`` into ``directory``, each file complete or absent (written aside, then renamed)."""
        paths = []
        for image, path in ((self.grid, directory / f"{self.name}.png"), (self.strip, directory / f"{self.name}_strip.png")):
            part = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
            save_png(image, part, self.settings)
            os.replace(part, path)
            paths.append(path)
        return paths[0], paths[1]


def count_field(module: DiffusionModule) -> str:
    """The name the count field goes by in messages: ``images``, or ``images per class`` (class-conditional)."""
    return "images per class" if module.num_classes is not None else "images"


def read_fields(module: DiffusionModule, sampler: str, steps, seed, count, options: dict | None = None, classes=None,
                max_count: int = 64) -> tuple[dict, dict[str, str]]:
    """The fields as :func:`generate` draws with them (``steps``, ``count``: ints; ``seed``: an int, a new random
    one for -1; ``options``: each control's value; ``classes``: :func:`chosen_classes`), and a one-line message per
    bad field (``sampler``, ``steps``, ``count``, ``seed``, a control's name, ``classes``), in that order; the
    options are checked only for a known sampler, an option it does not take first."""
    values, errors = {}, {}

    def read(name, check):
        try:
            values[name] = check()
        except ValueError as err:
            errors[name] = str(err)

    names = sampler_names(module)
    if sampler not in names:
        errors["sampler"] = f"sampler={sampler!r} is invalid: allowed values are {', '.join(names)}"
    read("steps", lambda: check_whole("steps", steps, 1, module.process.num_timesteps))
    read("count", lambda: check_whole(count_field(module), count, 1, max_count))
    read("seed", lambda: check_seed(seed))
    if sampler in names:
        controls = {c.name: c for c in controls_of(module, sampler)}
        options = dict(options or {})
        for name in sorted(set(options) - set(controls)):
            errors[name] = (f"sampler {sampler} has no control {name!r} on this page: it takes "
                            f"{', '.join(controls) or 'none'}")
        checked = {}
        for name, value in options.items():
            if name in controls:
                try:
                    checked[name] = controls[name].check(value)
                except ValueError as err:
                    errors[name] = str(err)
        values["options"] = checked
    read("classes", lambda: chosen_classes(module, classes))
    return values, errors


def check_fields(module: DiffusionModule, sampler: str, steps, seed, count, options: dict | None = None, classes=None,
                 max_count: int = 64) -> dict[str, str]:
    """A one-line message per bad field (field -> message: ``sampler``, ``steps``, ``count``, ``seed``, a control's
    name, ``classes``), empty when all are fine: the checks :func:`generate` makes before any work."""
    return read_fields(module, sampler, steps, seed, count, options, classes, max_count)[1]


def generate(module: DiffusionModule, sampler: str, steps, seed, count, options: dict | None = None, classes=None,
             strip_images: int = 4, strip_points: int = 9, ckpt: str = "", ema: bool = True, max_count: int = 64,
             progress=None) -> Generated:
    """Draw ``count`` images (of each of ``classes`` for a class-conditional model) with ``sampler`` at ``steps``
    and the sampler's ``options`` (its controls: ``{"eta": 0.5}``; guidance for a class-conditional model), from
    ``seed`` (-1: a random one): the grid, the reverse-process strip of the first ``strip_images`` (labelled: t per
    column, image per row), a summary, and the settings that draw them again.

    Every value is checked before any work (one-line ValueError naming it and what is allowed). A class-conditional
    model: ``classes`` None or a list holding ``"all"`` is every class; the grid has one named row per class and the
    strip follows the first image of each class (:func:`strip_order`). ``progress(done, total)``: after each call."""
    import torch

    values, errors = read_fields(module, sampler, steps, seed, count, options, classes, max_count)
    if errors:
        raise ValueError(next(iter(errors.values())))
    steps, count, seed, options, labels_of = (values[k] for k in ("steps", "count", "seed", "options", "classes"))
    own = sampler == sampler_name(module.hparams.sampler)  # the trained sampler keeps its own settings
    chosen = module.named_sampler(None if own else sampler, steps, **options)
    labels = None if labels_of is None else labels_of.repeat_interleave(count)  # class by class: one row each
    n = count if labels is None else len(labels)
    start = time.perf_counter()
    generator = torch.Generator(device=module.device).manual_seed(seed)
    out = module.sample(n, sampler=chosen, generator=generator, return_trajectory=True,
                        trajectory_points=strip_points, progress=progress or False, labels=labels)
    seconds = time.perf_counter() - start
    images, trajectory = out.samples.cpu(), out.trajectory.cpu()
    times = chosen.kept_times(strip_points)  # the t of each column, x_T first
    described = chosen.describe()
    if labels is None:
        grid = to_pil(images, nrow=max(1, round(count ** 0.5)))
        picked = list(range(min(strip_images, n)))
        row_labels = [f"image {i + 1}" for i in picked]
        what = plural(count, "image")
    else:
        class_names = [module.class_names[k] for k in labels_of.tolist()]
        grid = labelled_grid_image(images, count, f"{described}, seed {seed}", row_labels=class_names).convert("RGB")
        picked = strip_order(len(class_names), count, strip_images)
        row_labels = [f"{module.class_names[int(labels[i])]}, image {i % count + 1}" for i in picked]
        listed = ", ".join(class_names) if len(class_names) <= 20 else f"{len(class_names)} classes"
        which = (f"all classes ({listed})" if len(class_names) == module.num_classes
                 else f"class{'es' * (len(class_names) > 1)} {listed}")
        what = f"{plural(n, 'image')}, {count} of each of {which},"
        described += ", guidance 1 (conditional)" if chosen.guidance_scale == 1.0 else ""
    strip = trajectory[:, picked].transpose(0, 1)  # rows: images, columns: x_T ... x_0
    strip = labelled_grid_image(strip.reshape(-1, *strip.shape[2:]), trajectory.shape[0],
                                f"reverse process, x_T to x_0: {chosen.describe()}, seed {seed}",
                                column_labels=times, row_labels=row_labels).convert("RGB")
    summary = f"{what} with {described}, seed {seed}: {seconds:.1f} s on {module.device}"
    parts = [data_name(module, ckpt), f"{sampler}-{steps}"]
    if labels is not None:
        chosen_list = labels_of.tolist()
        parts.append("all" if len(chosen_list) == module.num_classes else "classes-" + "-".join(map(str, chosen_list)))
        parts.append(f"w-{chosen.guidance_scale:g}")
    parts += [f"seed-{seed}", f"n-{count}"]
    settings = grid_settings("diffusion.app", ckpt, ema, module.has_ema, sampler, own, {"num_steps": steps, **options},
                             seed, count, n, chosen.describe(), None if labels is None else labels_of.tolist())
    return Generated(grid, strip, summary, seed, "_".join(parts), settings)  # one batch of all n: batch_size n


def steps_info(module: DiffusionModule, name: str, steps) -> str:
    """What ``steps`` mean for sampler ``name``: its network calls per image (every timestep for a full chain)."""
    try:
        steps = check_whole("steps", steps, 1, module.process.num_timesteps)
        sampler = module.named_sampler(None if name == sampler_name(module.hparams.sampler) else name, steps)
    except ValueError as err:
        return str(err)
    T = module.process.num_timesteps
    every = f": every one of the T = {T} timesteps" if sampler.nfe == T and not module.process.continuous_time else ""
    return f"{name}, {plural(sampler.num_steps, 'step')}: {plural(sampler.nfe, 'network call')} per image{every}"


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


def page_controls(module: DiffusionModule, names: list[str]) -> dict:
    """One widget spec per control name over all ``names`` (a control shared by samplers, like eta, is one widget)."""
    controls = {}
    for name in names:
        for control in controls_of(module, name):
            controls.setdefault(control.name, control)
    return controls


def prune(directory: Path, max_age_s: float = 3600.0) -> None:
    """Remove the downloads older than ``max_age_s`` (the page's copies are in gradio's own cache)."""
    now = time.time()
    for path in directory.glob("*.png"):
        try:
            if now - path.stat().st_mtime > max_age_s:
                path.unlink()
        except OSError:
            pass


def build_app(module: DiffusionModule, ckpt: str = "", max_count: int = 64, strip_images: int = 4, strip_points: int = 9,
              ema: bool = True, downloads: Path | None = None):
    """The Gradio Blocks page for ``module``. Fields (elem_ids): ``sampler``, ``steps``, ``seed`` (with ``random``
    and ``reuse`` buttons), ``count``, one per sampler control (its name: ``eta``, ``order``, ...; only the chosen
    sampler's are visible), for a class-conditional model ``classes`` and ``guidance_scale``, ``guidance_rescale``;
    results ``grid``, ``strip``, ``info`` and ``used_seed``. Each field's bad value is shown inline beside it."""
    import gradio as gr

    names = sampler_names(module)
    T = module.process.num_timesteps
    trained_steps = module.hparams.sampler.get("num_steps") or T
    conditional = module.num_classes is not None
    controls = page_controls(module, names)
    downloads = Path(downloads or tempfile.mkdtemp(prefix="diffusion-app-"))
    downloads.mkdir(parents=True, exist_ok=True)

    def fields(sampler, values, classes) -> tuple[dict, list | None]:
        """The page's widget values as :func:`generate` takes them: the chosen sampler's controls, the classes."""
        own = {c.name for c in controls_of(module, sampler)} if sampler in names else set()
        options = {name: value for name, value in zip(controls, values) if name in own}
        return options, picked_classes(classes) if conditional else None

    def request(sampler, steps, seed, count, values, classes, progress=None) -> Generated:
        options, classes = fields(sampler, values, classes)
        return generate(module, sampler, steps, seed, count, options, classes, strip_images, strip_points, ckpt=ckpt,
                        ema=ema, max_count=max_count, progress=progress)

    def run(sampler, steps, seed, count, *rest, progress=gr.Progress()):
        values, classes = (rest[:-1], rest[-1]) if conditional else (rest, None)
        try:
            result = request(sampler, steps, seed, count, values, classes,
                             lambda done, total: progress((done, total), desc="sampling", unit="network calls"))
        except ValueError as err:  # shown on the page; the app keeps serving, and logs no traceback
            raise gr.Error(str(err), print_exception=False) from None
        prune(downloads)
        grid_path, strip_path = result.save(downloads)
        return str(grid_path), str(strip_path), result.summary, result.seed

    def validate(sampler, steps, seed, count, *rest):
        """One message per field, shown beside it before any work (the same checks as :func:`generate`'s)."""
        values, classes = (rest[:-1], rest[-1]) if conditional else (rest, None)
        options, classes = fields(sampler, values, classes)
        errors = check_fields(module, sampler, steps, seed, count, options, classes, max_count)
        order = ["sampler", "steps", "seed", "count", *controls] + (["classes"] if conditional else [])  # the inputs'
        return [gr.validate(name not in errors, errors.get(name, "")) for name in order]

    with gr.Blocks(title="diffusion: sample a checkpoint", delete_cache=(3600, 3600)) as demo:
        what = f", {module.num_classes} classes" if conditional else ""
        time = "continuous time" if module.process.continuous_time else f"T = {T}"
        gr.Markdown(f"### Sample `{ckpt}`\n{type(module.process).__name__}, {time}, "
                    f"{'EMA' if module.has_ema else 'raw'} weights, images {tuple(module.image_shape)}{what}")
        with gr.Row():
            with gr.Column(scale=1):
                sampler = gr.Dropdown(names, value=names[0], label="sampler", elem_id="sampler")
                first = min(trained_steps, T)
                steps = gr.Slider(1, T, value=first, step=1, label="steps",
                                  info=steps_info(module, names[0], first), elem_id="steps")
                with gr.Row():
                    seed = gr.Number(value=RANDOM_SEED, precision=None, label="seed (-1: a new random seed each press)",
                                     elem_id="seed", scale=3)
                    dice = gr.Button("random", elem_id="random", scale=1, min_width=60)
                    reuse = gr.Button("reuse last", elem_id="reuse", scale=1, min_width=60)
                if conditional:  # count images of each chosen class: one row per class
                    count = gr.Slider(1, max_count, value=max(1, min(8, max_count, 64 // module.num_classes)), step=1,
                                      label="images per class (one row per class)", elem_id="count")
                    classes = gr.CheckboxGroup(picker_choices(module), value=[ALL_CLASSES], label="classes",
                                               elem_id="classes")
                else:
                    count = gr.Slider(1, max_count, value=min(16, max_count), step=1, label="images",
                                      elem_id="count")
                widgets = []
                first_controls = {c.name for c in controls_of(module, names[0])}
                for name, control in controls.items():
                    visible = name in first_controls
                    value = default_value(module, names[0] if visible else next(
                        n for n in names if name in {c.name for c in controls_of(module, n)}), control)
                    if control.choices is not None:
                        widgets.append(gr.Dropdown(list(control.choices), value=value, label=control.label,
                                                   visible=visible, elem_id=name))
                    else:
                        widgets.append(gr.Slider(control.minimum, control.maximum, value=value, step=control.step,
                                                 label=control.label, visible=visible, elem_id=name))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                # the class grid and the strip carry their own titles: no label over them
                grid = gr.Image(label="samples" + (" (one row per class)" if conditional else ""), type="filepath",
                                format="png", elem_id="grid", show_label=not conditional)
                strip = gr.Image(label="reverse process: x_T (left) to x_0 (right)", type="filepath", format="png",
                                 elem_id="strip", show_label=False)
                with gr.Row():
                    info = gr.Textbox(label="run", interactive=False, elem_id="info", scale=4)
                    used_seed = gr.Number(label="seed used", precision=0, interactive=False, elem_id="used_seed", scale=1)

        def on_sampler(name, steps_value):
            own = {c.name: c for c in controls_of(module, name)} if name in names else {}
            updates = [gr.update(visible=key in own, label=own[key].label if key in own else control.label,
                                 **({"value": default_value(module, name, own[key])} if key in own else {}))
                       for key, control in controls.items()]
            return [gr.update(info=steps_info(module, name, steps_value))] + updates

        sampler.change(on_sampler, [sampler, steps], [steps, *widgets])
        steps.change(lambda name, value: gr.update(info=steps_info(module, name, value)), [sampler, steps], steps)
        dice.click(lambda: RANDOM_SEED, None, seed)
        reuse.click(lambda used: used if used is not None else RANDOM_SEED, used_seed, seed)
        inputs = [sampler, steps, seed, count, *widgets] + ([classes] if conditional else [])
        if conditional:
            def on_select(selection, evt):
                return toggled(selection, evt.value, evt.selected)

            # gradio passes the event to a parameter annotated gr.SelectData (set as an object here: this module's
            # annotations are strings, and gradio, imported lazily, is not among its globals to resolve them)
            on_select.__annotations__["evt"] = gr.SelectData
            classes.select(on_select, classes, classes)
        # preprocess=False: the fields reach the checks as sent (gradio would round a slider's 2.5 and refuse 17 > max
        # without naming the field), so every message is ours, beside its field
        button.click(run, inputs, [grid, strip, info, used_seed], validator=validate, show_progress_on=[grid], preprocess=False,
                     api_name="generate")
    demo.downloads = downloads
    return demo


def logins(environ=os.environ) -> list[tuple[str, str]] | None:
    """The page's logins from ``DIFFUSION_APP_AUTH`` (``user:password``, several separated by commas), None if unset;
    a UsageError (naming the variable, never the password) for a malformed value."""
    value = environ.get(AUTH_ENV)
    if value is None or not value.strip():
        return None
    pairs = [entry.split(":", 1) for entry in value.split(",")]
    if any(len(p) != 2 or not p[0].strip() or not p[1] for p in pairs):
        raise UsageError(f"{AUTH_ENV} is invalid: it must be user:password, several separated by commas "
                         "(e.g. export DIFFUSION_APP_AUTH=ana:<password>)")
    return [(user.strip(), password) for user, password in pairs]


def serving_warning(host: str, port: int, auth) -> str | None:
    """The warning for a page served beyond this machine with no login (None when local or behind one)."""
    if auth is None and host not in LOCAL_HOSTS:
        return (f"serving beyond this machine (host={host}) with no login: anyone who reaches port {port} can use it; "
                f"set {AUTH_ENV}=user:password in the environment to ask for one")
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="app")
@exits_on_usage_error
def main(cfg: DictConfig) -> None:
    require_ckpt(cfg)
    if not isinstance(cfg.port, int) or not 1 <= cfg.port <= 65535:
        raise UsageError(f"port={cfg.port!r} is invalid: it must be an integer in [1, 65535]")
    for key in ("max_count", "concurrency", "queue_size", "strip_images"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            raise UsageError(f"{key}={cfg[key]!r} is invalid: it must be a positive integer")
    auth = logins()
    try:
        import gradio as gr
    except ImportError as exc:
        raise UsageError('the app needs gradio: pip install -e ".[app]"') from exc
    from diffusion.run.sampling import resolve_device
    from diffusion.training.module import DiffusionModule  # every check above needs no torch: a typo answers at once

    module = build_or_usage_error("ckpt", lambda: DiffusionModule.from_checkpoint(cfg.ckpt, ema=cfg.ema,
                                                                                 trust=cfg.get("trust_checkpoint", False)))
    module = module.to(resolve_device(cfg.device))
    demo = build_app(module, str(cfg.ckpt), cfg.max_count, cfg.strip_images, cfg.strip_points, ema=cfg.ema)
    demo.queue(default_concurrency_limit=cfg.concurrency, max_size=cfg.queue_size)
    warning = serving_warning(cfg.host, cfg.port, auth)
    if warning:
        log.warning(warning)
    log.info("serving %s on http://%s:%d (%s; %d request%s at once, %d queued at most)", cfg.ckpt, cfg.host, cfg.port,
             "login required" if auth else "no login", cfg.concurrency, "s" * (cfg.concurrency != 1), cfg.queue_size)
    local_fonts = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=cfg.host, server_port=cfg.port, share=False, show_error=True, theme=local_fonts,
                footer_links=[], auth=auth, auth_message="diffusion: sign in to sample" if auth else None)


if __name__ == "__main__":
    main()
