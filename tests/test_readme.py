"""Every command README.md shows is run by a test, so that the README stays true.

Each line of README.md's ```bash blocks (split at ``&&``) must have an entry in COVERAGE, one line per command, saying
how the suite runs it:

- TRAIN: run here, in this process (``diffusion.train.train`` on the composed config), with SMALL settings appended:
  one batch (``trainer.fast_dev_run``), a narrow network, a one-image final grid, the data on generated image
  folders and IDX files under a fake ``$HOME`` (the README's paths);
- ONE_DEVICE: the same on one CPU device (``trainer.devices=1 trainer.strategy=auto``), for commands that ask for
  GPUs this machine has not; the multi-device part is mapped to the test that runs it on CPU ranks;
- SWEEP: a ``-m`` command: Hydra's own sweeper splits it into jobs, as many as its comment's "# N jobs" says,
  and every job's config is composed and its network built (small); test_train runs real sweeps;
- CI: a setup line that ``.ci/run`` executes verbatim (checked here); EXTRA: ``pip install -e ".[x]"`` of an extra
  whose packages ``.[dev]``, which CI installs, already holds;
- "tests/[<package>/]test_x.py::test_name": the existing test that runs it (with small settings: the shared ``ckpt`` and
  ``finished_run`` fixtures); the function must exist and must not be marked slow.

Whatever its entry, every command of a Hydra CLI is also read as a shell and Hydra read it: ``$HOME`` expanded,
``~`` only where bash expands it, Hydra's override parser, the composed config (every key and option must exist)
and, for training configs, the network built at the data's size. A README command without an entry fails
test_every_readme_command_is_covered; an entry whose command left the README fails it too.
"""

# ruff: noqa: E501 - COVERAGE holds one README command per line, as long as the command

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion.train import build_module
from tests.conftest import REPO

README = REPO / "README.md"
TRAIN, ONE_DEVICE, SWEEP, CI, EXTRA = "train", "train on one device", "sweep", "ci", "extra"

COVERAGE = {
    "python3 -m venv .venv": CI,
    ". .venv/bin/activate": CI,
    'pip install -e ".[dev]"': CI,
    "pytest": CI,
    "python -m diffusion.train": TRAIN,
    # sample, evaluate, draw, compare
    "python -m diffusion.sample ckpt=outputs/train/<run>/checkpoints/last.ckpt": "tests/test_sample.py::test_sample_cli_writes_grid_and_npz_reproducibly",
    "python -m diffusion.sample ckpt=... sampler=ddpm n=16 seed=1 ema=false": "tests/test_sample.py::test_raw_weights_and_ddpm_sampler",
    # samplers
    "python -m diffusion.sample ckpt=... sampler.num_steps=20": "tests/test_sample.py::test_readme_sampler_commands_draw_what_their_sampler_draws",
    "python -m diffusion.sample ckpt=... sampler=dpmsolver++ sampler.num_steps=15": "tests/test_sample.py::test_readme_sampler_commands_draw_what_their_sampler_draws",
    "python -m diffusion.sample ckpt=... sampler=heun sampler.num_steps=10 sampler.s_churn=40": "tests/test_sample.py::test_readme_sampler_commands_draw_what_their_sampler_draws",
    "python -m diffusion.sample ckpt=... sampler=euler sampler.sigmas=exponential": "tests/test_sample.py::test_readme_sampler_commands_draw_what_their_sampler_draws",
    "python -m diffusion.train sampler=plms sampler.num_steps=25": TRAIN,
    "python -m diffusion.evaluate ckpt=... metrics=[nll] max_images=256": "tests/test_evaluate.py::test_full_bound_reports_terms_per_quarter",
    "python -m diffusion.evaluate ckpt=... nll.num_timesteps=100": "tests/test_evaluate.py::test_nll_from_a_checkpoint_alone",
    "python -m diffusion.evaluate ckpt=... metrics=[fid,kid] fid.weights=$HOME/weights-inception-2015-12-05-6726825d.pth": ("tests/metrics/test_metrics.py::test_evaluate_fid_kid_cli_with_a_custom_feature_extractor", "tests/metrics/test_metrics.py::test_evaluate_fid_without_weights_fails_before_work", "tests/test_readme.py::test_fid_weights_path_reaches_the_weights_lookup"),
    "python -m diffusion.evaluate ckpt=... wandb_run=outputs/train/<run>": "tests/test_evaluate.py::test_results_and_figures_go_to_the_training_runs_wandb",
    "python -m diffusion.evaluate ckpt=... metrics=[nll,fid] devices=4": "tests/metrics/test_metrics.py::test_evaluate_on_two_ranks",
    "python -m diffusion.figures figure=schedules out=figures/": "tests/test_figures.py::test_schedules_figure",
    "python -m diffusion.figures figure=forward out=figures/ data=digits schedule=cosine": "tests/test_figures.py::test_forward_figure_columns_are_q_xt_x0_at_their_labelled_t_and_nothing_is_overwritten",
    "python -m diffusion.figures figure=reverse ckpt=... sampler=ddpm transitions=10 out=figures/": "tests/test_figures.py::test_reverse_figure_columns_are_labelled_with_their_t",
    "python -m diffusion.figures figure=progression run=outputs/train/<run> out=figures/": "tests/test_figures.py::test_progression_rows_are_the_checkpoints_by_step",
    "python -m diffusion.report sweep=outputs/train/multirun/<date_time>": "tests/test_report.py::test_report_on_a_2x2_sweep",
    'python -m diffusion.compare ckpt=... "samplers=[ddim,dpmsolver++,heun,euler,ddpm]" "nfe=[5,10,20,50,100]"': "tests/test_compare.py::test_compare_cli_writes_the_comparison_and_a_second_run_changes_nothing",
    "python -m diffusion.evaluate ckpt=... metrics=[fd_classifier]": "tests/metrics/test_metrics_classifier.py::test_evaluate_offers_fd_classifier",
    "python -m diffusion.app ckpt=...": ("tests/test_app.py::test_the_page_generates_the_models_samples_in_headless_chromium", "tests/test_app.py::test_generate_returns_the_grid_the_strip_and_a_summary"),
    'pip install -e ".[app]"': EXTRA,
    "python -m diffusion.app ckpt=outputs/train/<run>/checkpoints/last.ckpt": "tests/test_app.py::test_the_page_generates_the_models_samples_in_headless_chromium",
    # three families
    "python -m diffusion.train process=edm": TRAIN,
    "python -m diffusion.train process=flow": TRAIN,
    "python -m diffusion.train -m process=gaussian,edm,flow": (SWEEP, "tests/test_families.py::test_one_sweep_trains_the_three_families"),
    'python -m diffusion.compare ckpt=... "nfe=[5,10,20,50]"': "tests/test_families.py::test_compare_runs_every_sampler_that_reverses_the_process",
    "python -m diffusion.train process=edm sampler=dpmpp_2m process.P_mean=-1.0": TRAIN,
    "python -m diffusion.train process=flow process.timestep_sampling=uniform process.shift=3": TRAIN,
    # change one thing
    "python -m diffusion.train schedule=cosine model.base_channels=384": (TRAIN, "tests/test_train.py::test_readme_override_example_reaches_the_unet"),
    "python -m diffusion.train sampler=ddpm module.sample_every_n_epochs=10": TRAIN,
    "python -m diffusion.train sampler.num_steps=100 sampler.eta=1.0": TRAIN,
    "python -m diffusion.train model=simple_unet data.image_size=32": TRAIN,
    "python -m diffusion.train trainer.max_epochs=100 optimizer.lr=1e-3 callbacks.ema.decay=0.999": TRAIN,
    "python -m diffusion.train debug=fast": TRAIN,
    # your data
    "python -m diffusion.train data=folder data.root=$HOME/images data.image_size=64": TRAIN,
    "python -m diffusion.train data=ffhq data.root=$HOME/ffhq data.limit=10000": TRAIN,
    "python -m diffusion.train data=dog data.root=$HOME/dogs-vs-cats/train": TRAIN,
    "python -m diffusion.train data=simpsons data.root=$HOME/simpsons": TRAIN,
    "python -m diffusion.train data=cars data.root=$HOME/cars": TRAIN,
    # share a model
    "python -m diffusion.export ckpt=outputs/train/<run>/checkpoints/last.ckpt format=safetensors out=shared/digits": "tests/test_export.py::test_safetensors_export_reproduces_the_checkpoints_samples_exactly",
    "python -m diffusion.sample ckpt=shared/digits": "tests/test_export.py::test_sample_reads_an_exported_folder_and_train_fine_tunes_from_it",
    "python -m diffusion.train init_from=shared/digits trainer.max_epochs=10": "tests/test_export.py::test_sample_reads_an_exported_folder_and_train_fine_tunes_from_it",
    "python -m diffusion.export ckpt=... format=diffusers out=shared/wide_diffusers": "tests/test_export.py::test_diffusers_export_loads_in_diffusers_and_reads_back",
    "python -m diffusion.sample ckpt=$HOME/my_unet sampler=ddim": ("tests/test_export.py::test_diffusers_export_loads_in_diffusers_and_reads_back", "tests/sharing/test_diffusers_bridge.py::test_import_unet_folder_samples_like_ddim_pipeline"),
    # class-conditional models and guidance
    "python -m diffusion.train data.conditional=true": TRAIN,
    "python -m diffusion.sample ckpt=outputs/train/<run>/checkpoints/last.ckpt classes=all n=8 sampler.guidance_scale=2": "tests/training/test_conditional.py::test_sample_cli_draws_the_chosen_classes_of_the_checkpoint",
    'python -m diffusion.sample ckpt=... "classes=[3,7]" n=16 sampler.guidance_scale=4 sampler.guidance_rescale=0.7': "tests/training/test_conditional.py::test_sample_cli_draws_the_chosen_classes_of_the_checkpoint",
    "python -m diffusion.evaluate -m ckpt=... metrics=[fd_classifier] fid.num_samples=400 sampler.guidance_scale=0,1,2,4": (SWEEP, "tests/test_evaluate_conditional.py::test_a_guidance_sweep_and_its_report"),
    "python -m diffusion.report sweep=outputs/evaluate/multirun/<date_time>": "tests/test_evaluate_conditional.py::test_a_guidance_sweep_and_its_report",
    "python -m diffusion.train data=mnist data.root=$HOME/data data.conditional=true": TRAIN,
    "python -m diffusion.train data=cars data.root=$HOME/cars data.conditional=true": TRAIN,
    "python -m diffusion.train data=folder data.root=$HOME/dogs-vs-cats/train data.conditional=true \"data.class_from='^(cat|dog)\\.'\"": TRAIN,
    "python -m diffusion.train data=flowers data.root=$HOME/flowers": TRAIN,
    "python -m diffusion.train data=mnist data.root=$HOME/data": TRAIN,
    "python -m diffusion.train data=fashion_mnist data.root=$HOME/data data.download=true": TRAIN,
    "python -m diffusion.train experiment=human64 data.root=$HOME/ffhq trainer.devices=4 trainer.strategy=ddp": (ONE_DEVICE, "tests/test_train.py::test_ddp_two_cpu_ranks"),
    # improved DDPM, objectives, attention, cold diffusion
    "python -m diffusion.train model.learn_sigma=true process.loss_type=hybrid sampler=ddpm": TRAIN,
    "python -m diffusion.train -m model.learn_sigma=true process.loss_type=vlb process.timestep_sampling=uniform,importance": (SWEEP, "tests/processes/test_timesteps.py::test_timestep_sampling_choices"),
    "python -m diffusion.train -m process=gaussian,blur": (SWEEP, "tests/processes/test_blur.py::test_process_blur_trains_samples_and_draws_figures_from_the_cli"),
    "python -m diffusion.train -m process=blur schedule.routine=incremental,constant schedule.kernel_std=0.1,1.0": SWEEP,
    "python -m diffusion.sample ckpt=<blur run>/checkpoints/last.ckpt sampler=cold sampler.prior_noise_std=0.02": "tests/processes/test_blur.py::test_process_blur_trains_samples_and_draws_figures_from_the_cli",
    "python -m diffusion.train -m process.objective=eps,x0,v process.min_snr_gamma=null,5": (SWEEP, "tests/processes/test_objectives.py::test_improved_ddpm_options_train_sample_and_evaluate_from_the_cli"),
    'python -m diffusion.train -m model.block_attention=none,self,cbam model.skip_gates=false,true "model.attention_resolutions=[4],[8,4]"': (SWEEP, "tests/models/test_models.py::test_cbam_and_skip_gates_keep_shapes_and_train"),
    # sweeps, multi-GPU, resume
    "python -m diffusion.train -m schedule.T=500,750,1000 schedule.beta_end=0.01,0.02": (SWEEP, "tests/test_train.py::test_multirun_writes_one_directory_per_combination"),
    "python -m diffusion.train -m schedule=linear,cosine sampler.num_steps=20,50": SWEEP,
    "python -m diffusion.train trainer.devices=4 trainer.strategy=ddp trainer.precision=bf16-mixed": (ONE_DEVICE, "tests/test_train.py::test_ddp_two_cpu_ranks"),
    "python -m diffusion.train -m schedule.T=500,1000 trainer.devices=4 trainer.strategy=ddp": (SWEEP, "tests/test_train.py::test_sweep_with_ddp_runs_each_job_once_on_two_ranks"),
    "python -m diffusion.train ckpt_path=outputs/train/<run>/checkpoints/last.ckpt trainer.max_epochs=100": "tests/test_train.py::test_resume_continues_exactly_like_an_uninterrupted_run",
    # cluster
    'pip install -e ".[cluster]"': EXTRA,
    "python -m diffusion.train -m hydra/launcher=slurm hydra.launcher.partition=gpu schedule.T=500,1000 trainer.devices=4": (SWEEP, "tests/run/test_cluster.py::test_slurm_sweep_renders_one_array_job_of_two_nodes_with_four_gpus_each"),
    "python -m diffusion.train -m hydra/launcher=submitit_local schedule.T=500,1000": (SWEEP, "tests/run/test_cluster.py::test_submitit_local_sweep_runs_each_job_in_its_directory_and_the_report_reads_it"),
    "python -m diffusion.train -m hydra/launcher=slurm hydra.launcher.partition=gpu trainer.num_nodes=2 trainer.devices=4 trainer.strategy=ddp": (SWEEP, "tests/run/test_cluster.py::test_slurm_sweep_renders_one_array_job_of_two_nodes_with_four_gpus_each"),
    "python -m diffusion.train hparams_search=digits_optuna hydra.sweeper.n_trials=30": "tests/run/test_hparams_search.py::test_a_three_trial_search_finds_and_reports_its_best_trial",
    "torchrun --nnodes 2 --node-rank 0 --nproc-per-node 4 --master-addr node0 --master-port 29500 -m diffusion.train trainer.num_nodes=2 trainer.devices=4 trainer.strategy=ddp": "tests/test_train.py::test_torchrun_two_nodes_agree_on_one_run_directory",
    "python experiments/gpu_check.py --out outputs/gpu_check": "tests/test_gpu_check.py::test_cpu_quick_check_measures_every_part",
    # speed
    'pip install -e ".[bench]"': EXTRA,
    "python experiments/benchmark.py": "tests/test_benchmark.py::test_benchmark_writes_json",
    "python experiments/benchmark.py --processes edm,flow": "tests/test_benchmark.py::test_the_families_are_timed_in_the_same_run",
    "python experiments/cli_startup.py": "tests/test_cli_startup.py::test_the_startup_benchmark_writes_its_table",
    # the first run
    "python experiments/first_run.py --out outputs/first_run": "tests/test_first_run.py::test_a_candidates_seconds_add_up_to_the_profilers_and_the_wall_clock",
    "python experiments/first_run.py --only default --out outputs/first_run": "tests/test_first_run.py::test_a_candidates_seconds_add_up_to_the_profilers_and_the_wall_clock",
    "python experiments/first_run.py --judge outputs/train/<run>": "tests/test_first_run.py::test_judging_a_run_you_trained",
    "python experiments/benchmark.py model.base_channels=128 model.channel_mult=[1,2,2,2] model.attention_resolutions=[16] data.image_size=64 --batch 16 --warmup 1 --iters 1 --repeats 3 --no-loader": "tests/test_benchmark.py::test_matched_diffusers_model_is_within_ten_percent",
    "python experiments/benchmark.py trainer.precision=bf16-mixed model.compile=true model.channels_last=true --device cuda": ("tests/models/test_speed.py::test_speed_option_trains_to_the_same_loss", "tests/models/test_speed.py::test_compile_trains_to_the_same_loss_and_keeps_the_checkpoint_format", "tests/models/test_speed.py::test_channels_last_reaches_the_network"),
}

RUNNERS = {TRAIN, ONE_DEVICE, SWEEP, CI, EXTRA}
#: the Hydra CLIs and the config each composes
HYDRA_CONFIGS = {"diffusion.train": "config", "diffusion.sample": "sample", "diffusion.evaluate": "evaluate",
                 "diffusion.compare": "compare", "diffusion.app": "app", "diffusion.export": "export",
                 "diffusion.figures": "figures", "diffusion.report": "report",
                 "experiments/benchmark.py": "config"}
#: appended to a command that runs here: one batch, a narrow network, one image in the final grid
SMALL = ["trainer.fast_dev_run=true", "data.batch_size=2", "model.base_channels=8", "module.num_samples=1", "logger=none"]


# ----------------------------------------------------------------------------------------------- reading README.md
def readme_lines(text: str | None = None) -> list[tuple[str, str]]:
    """(command, its comment) for each command of README.md's ```bash blocks; ``a && b`` is two commands."""
    text = README.read_text() if text is None else text
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            command, comment = split_comment(line)
            for part in command.split("&&"):
                if part.strip():
                    found.append((" ".join(part.split()), comment))
    return found


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's command and its ``# comment`` (a ``#`` starting a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1:].strip()
    return line, ""


def shell_words(command: str, home: Path, placeholders: dict[str, str] | None = None) -> list[str]:
    """The argv bash would pass: README placeholders filled in, ``$HOME`` expanded, ``~`` expanded only where bash
    expands it (a word starting ``~/``, or ``NAME=~/`` with NAME an identifier: not ``data.root=~/...``)."""
    for key, value in (placeholders or {}).items():
        command = command.replace(key, value)
    command = re.sub(r"\$(HOME\b|\{HOME\})", str(home), command)
    words = []
    for word in shlex.split(command):
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*=)?~(?=/|$)", word)
        words.append(word if m is None else (m.group(1) or "") + str(home) + word[m.end():])
    return words


def program(words: list[str]) -> tuple[str, list[str]]:
    """(``diffusion.train`` | ``experiments/benchmark.py`` | ..., its arguments)."""
    if words[:2] in (["python", "-m"], ["python3", "-m"]):
        return words[2], words[3:]
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    return words[0], words[1:]


def hydra_jobs(args: list[str]) -> list[list[str]]:
    """The override lists of the jobs Hydra runs for these arguments: one, or one per combination with ``-m``
    (Hydra's own parser and BasicSweeper). Options of the script itself (``--batch 16``) are left out."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)  # raises on what Hydra cannot read, e.g. a bare ~
    if not multirun:
        return [[o.input_line for o in parsed]]
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for job in jobs]


def compose_job(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from diffusion.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def entries(how) -> tuple:
    return how if isinstance(how, tuple) else (how,)


def commands_with(runner: str) -> list[str]:
    return [c for c, how in COVERAGE.items() if runner in entries(how)]


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A $HOME holding what the README's paths point at: image folders and MNIST/FashionMNIST IDX files."""
    from tests.data.test_data import make_image_folder, make_mnist

    home = tmp_path_factory.mktemp("home")
    for folder in ("images", "ffhq", "dogs-vs-cats/train", "simpsons", "flowers"):
        make_image_folder(home / folder)
    for name in ("Audi TT", "BMW M3"):  # StanfordCars by class: one folder per class
        make_image_folder(home / "cars" / name)
    for extra in ("broken.jpg", "sub/white.png"):  # Kaggle's dogs-vs-cats holds cat.N.jpg and dog.N.jpg only
        (home / "dogs-vs-cats" / "train" / extra).unlink()
    make_mnist(home / "data", "MNIST")
    make_mnist(home / "data", "FashionMNIST")
    return home


# ----------------------------------------------------------------------------------------------- coverage
def test_every_readme_command_is_covered():
    commands = {c for c, _ in readme_lines()}
    assert commands, "no ```bash block found in README.md"
    uncovered = sorted(commands - set(COVERAGE))
    assert not uncovered, "README commands no test runs (add each to COVERAGE in tests/test_readme.py):\n" + "\n".join(uncovered)
    stale = sorted(set(COVERAGE) - commands)
    assert not stale, "COVERAGE entries whose command is no longer in README.md:\n" + "\n".join(stale)


def test_readme_lines_are_read_as_a_shell_reads_them():
    text = '```bash\na b=1 "c=[4],[8,4]"   # 12 jobs\nx && y # z\n```\n```\n$ not bash\n```\n'
    assert readme_lines(text) == [('a b=1 "c=[4],[8,4]"', "12 jobs"), ("x", "z"), ("y", "z")]
    home = Path("/h")
    assert shell_words("p data.root=~/x ckpt=~/y ~/z $HOME/w", home) == ["p", "data.root=~/x", "ckpt=/h/y", "/h/z", "/h/w"]
    assert hydra_jobs(["-m", "a=1,2", "b=[4],[8,4]", "--flag"]) == [["a=1", "b=[4]"], ["a=1", "b=[8,4]"], ["a=2", "b=[4]"], ["a=2", "b=[8,4]"]]


def _test_function(test_id: str) -> ast.FunctionDef | None:
    path, _, name = test_id.partition("::")
    file = REPO / path
    if not file.is_file():
        return None
    tree = ast.parse(file.read_text())
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name.split("[")[0]), None)


def test_mapped_tests_exist_and_run_in_the_fast_suite():
    ids = sorted({e for how in COVERAGE.values() for e in entries(how) if e not in RUNNERS})
    assert all(re.fullmatch(r"tests/(\w+/)?test_\w+\.py::test_\w+(\[.*\])?", i) for i in ids), ids
    missing = [i for i in ids if _test_function(i) is None]
    assert not missing, f"COVERAGE names tests that do not exist: {missing}"
    slow = [i for i in ids if any("slow" in ast.unparse(d) for d in _test_function(i).decorator_list)]
    assert not slow, f"COVERAGE names slow tests, which `pytest` does not run: {slow}"


def test_setup_lines_are_what_ci_runs():
    ci = {" ".join(line.split()) for line in (REPO / ".ci" / "run").read_text().splitlines()}
    missing = [c for c in commands_with(CI) if c not in ci]
    assert not missing, f".ci/run does not run these README setup lines: {missing}"


def test_extras_exist_and_ci_installs_their_packages():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = set(extras["dev"])
    for command in commands_with(EXTRA):
        (extra,) = re.fullmatch(r'pip install -e "\.\[(\w+)\]"', command).groups()
        assert extra in extras, command
        assert set(extras[extra]) <= dev, f"{command}: CI installs .[dev], which lacks {set(extras[extra]) - dev}"


# ----------------------------------------------------------------------------------------------- Hydra reads them
HYDRA_COMMANDS = [c for c in COVERAGE if c.startswith("python") and program(shlex.split(c.replace("<blur run>", "x")))[0] in HYDRA_CONFIGS]


def _network(cfg):
    """The module of a training config at the data's size and channels (a bad model setting: one-line UsageError)."""
    from diffusion.run.errors import build_or_usage_error

    return build_or_usage_error("model", lambda: build_module(cfg, cfg.data.get("channels", 1), cfg.data.image_size))


READ_ONLY = [c for c in HYDRA_COMMANDS if not {TRAIN, ONE_DEVICE} & set(entries(COVERAGE[c]))]


@pytest.mark.parametrize("command", READ_ONLY, ids=READ_ONLY)
def test_hydra_reads_the_command_and_builds_every_job(command, home):
    """As the shell and Hydra read it: the overrides parse, every job's config composes, its network fits its data;
    a sweep makes the number of jobs its comment says. (Commands run here are read the same way when they run.)"""
    words = shell_words(command, home, {"<blur run>": "blur", "<run>": "run", "<date_time>": "d"})
    prog, args = program(words)
    jobs = hydra_jobs(args)
    comment = dict(readme_lines()).get(command, "")
    stated = re.search(r"(\d+) jobs?\b", comment)
    if stated:
        assert len(jobs) == int(stated.group(1)), f"{command} makes {len(jobs)} jobs, the README says {comment!r}"
    if "-m" in args:  # a sweep says how many runs it starts, and Hydra starts that many
        assert SWEEP in entries(COVERAGE[command]) and stated, f"{command}: a sweep's comment must say '# N jobs'"
    trains = prog in ("diffusion.train", "experiments/benchmark.py")
    for job in jobs:
        small = ["model.base_channels=8", "model.compile=false"] if trains else []  # torch.compile: tests/models/test_speed.py
        cfg = compose_job(HYDRA_CONFIGS.get(prog, "config"), job + small)
        if trains:  # a narrow network, otherwise as the job builds it
            assert _network(cfg).model.image_size == cfg.data.image_size


# ----------------------------------------------------------------------------------------------- run here
def _make_small(cfg, out: Path, cache: Path) -> None:
    """SMALL's other half, by what the composed config has: a 2-step grid (a sampler without steps: a 20-step
    schedule), no worker or decoding processes, the run directory and the image cache in tmp."""
    cfg.paths.output_dir, cfg.paths.cache_dir = str(out), str(cache)
    if "num_steps" in cfg.sampler:
        cfg.sampler.num_steps = 2
    else:
        cfg.schedule.T = 20
    for key in ("num_workers", "decode_workers"):
        if key in cfg.data:
            cfg.data[key] = 0


RUN_HERE = commands_with(TRAIN) + commands_with(ONE_DEVICE)


@pytest.mark.parametrize("command", RUN_HERE, ids=RUN_HERE)
def test_train_command_runs(command, home, tmp_path, monkeypatch):
    import diffusion.train
    from diffusion.train import train

    built = []
    monkeypatch.setattr(diffusion.train, "build_module", lambda *a, **k: built.append(build_module(*a, **k)) or built[-1])
    words = shell_words(command, home)
    prog, args = program(words)
    assert prog == "diffusion.train"
    (job,) = hydra_jobs(args)
    if ONE_DEVICE in entries(COVERAGE[command]):
        job += ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto"]
    out = tmp_path / "out"
    cfg = compose_job("config", [*job, *SMALL])
    _make_small(cfg, out, tmp_path / "cache")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"])), metrics
    (module,) = built
    assert module.model.image_size == cfg.data.image_size and module.model.in_channels == cfg.data.get("channels", 1)
    with Image.open(out / "samples" / "final.png") as grid:  # the final grid of one image
        if module.num_classes is None:
            assert grid.size[0] == grid.size[1] >= cfg.data.image_size
        else:  # data.conditional=true: one image of each class, a row each, named
            assert module.num_classes == len(module.class_names) >= 2
            assert grid.text["Rows"] == " | ".join(module.class_names)


def test_error_example_is_what_the_command_prints(tmp_path):
    """The README's ``$ command`` / ``error: ...`` example: the error the run raises, word for word."""
    from diffusion.run.errors import UsageError
    from diffusion.train import train

    examples = re.findall(r"^```\n\$ (python -m diffusion\.train [^\n]*)\n(error: [^\n]*)\n```", README.read_text(), flags=re.M)
    assert examples, "README.md shows no error example"
    for command, expected in examples:
        (job,) = hydra_jobs(program(shell_words(command, tmp_path))[1])
        with pytest.raises(UsageError) as err:
            train(compose_job("config", [*job, "logger=none", f"paths.output_dir={tmp_path / 'o'}"]))
        assert f"error: {err.value}" == expected
    assert not (tmp_path / "o").exists(), "nothing may be written before the error"


def test_python_example_samples_a_checkpoint(ckpt):
    """The README's ```python block, on the shared run's checkpoint (10 DDIM steps for its 100): 16 images in
    [-1, 1] at the model's size."""
    (code,) = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert "outputs/train/<run>/checkpoints/last.ckpt" in code and "num_steps=100" in code
    code = code.replace("outputs/train/<run>/checkpoints/last.ckpt", str(ckpt)).replace("num_steps=100", "num_steps=10")
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the README's own example
    images, m = scope["images"], scope["m"]
    assert images.shape == (16, *m.image_shape) and images.min() >= -1 and images.max() <= 1 and images.std() > 0


def test_fid_weights_path_reaches_the_weights_lookup(home, monkeypatch):
    """The FID command's ``fid.weights=$HOME/...`` reaches diffusion.metrics.inception_weights as that file; a
    ``~`` that Hydra receives quoted (``'fid.weights="~/..."'``) is expanded there too."""
    from diffusion.metrics import INCEPTION_FILE, inception_weights

    (command,) = [c for c in COVERAGE if "fid.weights=" in c]
    (home / INCEPTION_FILE).write_bytes(b"stand-in")
    monkeypatch.setenv("HOME", str(home))
    (job,) = hydra_jobs(program(shell_words(command, home, {"ckpt=...": "ckpt=x.ckpt"}))[1])
    cfg = compose_job("evaluate", job)
    assert inception_weights(cfg.fid.weights) == str(home / INCEPTION_FILE)
    quoted = compose_job("evaluate", [f'fid.weights="~/{INCEPTION_FILE}"'])
    assert inception_weights(quoted.fid.weights) == str(home / INCEPTION_FILE)
