"""The three families from the command line (issue #28): ``process=edm`` and ``process=flow`` through every CLI --
train (and resume, a sweep over the families, class-conditional training), sample, compare, evaluate, figures,
export -- and their bad inputs refused in one line. The math is proven in tests/processes/test_edm.py,
tests/processes/test_flow.py and tests/samplers/test_continuous.py; here, what each command writes."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusion.samplers.registry import sampler_names
from diffusion.sharing.checkpoints import read_checkpoint
from tests.conftest import FAST, REPO, clean_env, run_train

FAMILY = {"edm": ("EDMProcess", "HeunSampler"), "flow": ("FlowMatching", "FlowEulerSampler")}


def cli(module, tmp_path, *overrides, timeout=600):
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module", params=["edm", "flow"])
def family_run(request, tmp_path_factory):
    """A short run of each continuous family (2 epochs of 2 batches, CSV logger): (kind, run dir)."""
    tmp = tmp_path_factory.mktemp(request.param)
    proc = run_train(*FAST, f"process={request.param}", "trainer.max_epochs=2", "logger=csv",
                     f"hydra.run.dir={tmp / 'out'}", tmp_path=tmp)
    assert proc.returncode == 0, proc.output[-3000:]
    return request.param, tmp / "out"


def test_training_writes_the_family_into_the_checkpoint_and_logs(family_run):
    kind, out = family_run
    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    hp = ckpt["hyper_parameters"]
    process, sampler = FAMILY[kind]
    assert hp["process"]["_target_"].endswith(process) and hp["sampler"]["_target_"].endswith(sampler)
    assert hp["schedule"]["_target_"] == "diffusion.processes.schedules.NoSchedule"
    assert ckpt["global_step"] == 4
    rows = list(csv.DictReader(open(next((out / "csv").rglob("metrics.csv")))))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) == 4 and all(np.isfinite(losses)) and all(0 < v < 10 for v in losses)
    # the per-quartile losses of the process's own time (edm: quartiles of the log-normal sigmas) were logged
    quartiles = [r[f"train/loss_q{q}"] for r in rows for q in range(4) if r.get(f"train/loss_q{q}")]
    assert quartiles and all(np.isfinite(float(v)) for v in quartiles)
    assert (out / "samples" / "final.png").stat().st_size > 0


def test_resume_continues_a_family_run(family_run, tmp_path):
    kind, out = family_run
    proc = run_train(*FAST, f"process={kind}", "trainer.max_epochs=3", "logger=csv",
                     f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'resumed'}",
                     tmp_path=tmp_path)
    assert proc.returncode == 0, proc.output[-3000:]
    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_sample_and_the_exported_folder_draw_the_same_pixels(family_run, tmp_path):
    kind, out = family_run
    ckpt = out / "checkpoints" / "last.ckpt"
    exported = tmp_path / "exported"
    proc = cli("diffusion.export", tmp_path, f"ckpt={ckpt}", f"out={exported}")
    assert proc.returncode == 0, proc.output[-2000:]
    common = ["n=4", "seed=1", "sampler.num_steps=3"]
    a = cli("diffusion.sample", tmp_path, f"ckpt={ckpt}", *common, f"hydra.run.dir={tmp_path / 'a'}")
    b = cli("diffusion.sample", tmp_path, f"ckpt={exported}", *common, f"hydra.run.dir={tmp_path / 'b'}")
    assert a.returncode == 0 and b.returncode == 0, (a.output + b.output)[-3000:]
    sa, sb = (np.load(tmp_path / d / "samples.npz")["samples"] for d in "ab")
    assert sa.shape == (4, 16, 16, 1) and np.array_equal(sa, sb)
    assert sa.std() > 0  # not a constant image
    refused = cli("diffusion.export", tmp_path, f"ckpt={ckpt}", f"out={tmp_path / 'd'}", "format=diffusers")
    # edm: no diffusers pipeline runs EDMEulerScheduler; flow maps (tests/sharing/test_diffusers_bridge.py), but not
    # the digits default's GroupNorms (one group count per width)
    expected = {"edm": "process=edm cannot be exported to diffusers: DDPMPipeline",
                "flow": "different group counts"}[kind]
    assert refused.returncode == 2 and expected in refused.stderr, refused.stderr
    assert not (tmp_path / "d").exists()


def test_compare_runs_every_sampler_that_reverses_the_process(family_run, classifier_cache, tmp_path):
    kind, out = family_run
    proc = cli("diffusion.compare", tmp_path, f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "nfe=[3]", "n=4",
               "batch_size=4", "kid_subsets=2", f"paths.cache_dir={classifier_cache}", f"hydra.run.dir={tmp_path / 'c'}")
    assert proc.returncode == 0, proc.output[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "c" / "compare.csv")))
    assert sorted({r["sampler"] for r in rows}) == sampler_names(kind)


def test_evaluate_says_where_nll_is_not_defined(family_run, tmp_path):
    kind, out = family_run
    proc = cli("diffusion.evaluate", tmp_path, f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "metrics=[nll]",
               f"hydra.run.dir={tmp_path / 'e'}")
    assert proc.returncode == 2 and "Traceback" not in proc.output
    assert f"its {kind} process has no discrete variational bound" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_reverse_figure_is_labelled_in_the_process_time(family_run, tmp_path):
    kind, out = family_run
    proc = cli("diffusion.figures", tmp_path, "figure=reverse", f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "n=1",
               "transitions=2", "sampler.num_steps=2", f"out={tmp_path / 'f'}")
    assert proc.returncode == 0, proc.output[-2000:]
    (png,) = (tmp_path / "f").glob("reverse_*.png")
    from PIL import Image

    labels = Image.open(png).text["Columns"].split(" | ")  # the figure's column labels, saved in its text chunks
    assert labels == (["σ=80", "σ=0.002", "σ=0"] if kind == "edm" else ["t=1", "t=0.5", "t=0"])


def test_forward_figure_is_labelled_in_the_process_time(tmp_path):
    from PIL import Image

    for kind, first, last in (("edm", "σ=0.002", "σ=80"), ("flow", "t=0.25", "t=1")):
        proc = cli("diffusion.figures", tmp_path, "figure=forward", f"process={kind}", "n=2", "columns=5",
                   f"out={tmp_path / kind}")
        assert proc.returncode == 0, proc.output[-2000:]
        (png,) = (tmp_path / kind).glob(f"forward_{kind}_*.png")
        labels = Image.open(png).text["Columns"].split(" | ")
        assert len(labels) == 5 and labels[1] == first and labels[-1] == last


def test_one_sweep_trains_the_three_families(tmp_path):
    """The README's ``-m process=gaussian,edm,flow``: three jobs, each with its family's schedule and sampler."""
    proc = run_train("-m", "process=gaussian,edm,flow", *FAST, "logger=none", "final_samples=false",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.output[-3000:]
    targets = []
    for job in range(3):
        hp = read_checkpoint(tmp_path / "sweep" / str(job) / "checkpoints" / "last.ckpt")["hyper_parameters"]
        targets.append((hp["process"]["_target_"].rsplit(".", 1)[-1], hp["schedule"]["_target_"].rsplit(".", 1)[-1],
                        hp["sampler"]["_target_"].rsplit(".", 1)[-1]))
    assert targets == [("GaussianDiffusion", "LinearSchedule", "DDIMSampler"), ("EDMProcess", "NoSchedule", "HeunSampler"),
                       ("FlowMatching", "NoSchedule", "FlowEulerSampler")]


def test_class_conditional_flow_with_guidance(tmp_path):
    proc = run_train(*FAST, "process=flow", "data.conditional=true", "logger=none", "final_samples=false",
                     f"hydra.run.dir={tmp_path / 'o'}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.output[-3000:]
    s = cli("diffusion.sample", tmp_path, f"ckpt={tmp_path / 'o' / 'checkpoints' / 'last.ckpt'}", "classes=[3,7]", "n=2",
            "sampler.num_steps=3", "sampler.guidance_scale=2", f"hydra.run.dir={tmp_path / 's'}")
    assert s.returncode == 0, s.output[-3000:]
    assert np.load(tmp_path / "s" / "samples.npz")["samples"].shape == (4, 16, 16, 1)


@pytest.mark.parametrize("overrides,text", [
    (["process=edm", "schedule.beta_end=0.01"], "schedule.beta_end=0.01 is invalid with process=edm: it has no beta schedule"),
    (["process=edm", "schedule=cosine"], "schedule=cosine is invalid with process=edm"),
    (["process=edm", "process.sigma_min=80", "process.sigma_max=1"], "process.sigma_min=80 is invalid with process.sigma_max=1"),
    (["process=edm", "process.P_std=0"], "process.P_std=0 is invalid: it must be a finite number > 0"),
    (["process=edm", "process.sigma_data=0"], "process.sigma_data=0 is invalid"),
    (["process=flow", "process.logit_std=-1"], "process.logit_std=-1 is invalid"),
    (["process=flow", "process.shift=0"], "process.shift=0 is invalid"),
    (["process=edm", "sampler=ddim"], "sampler=ddim is invalid for process=edm: it reverses process=gaussian; use "
                                      "sampler=dpmpp_2m|euler|euler_ancestral|heun"),
    (["process=flow", "sampler=heun"], "sampler=heun is invalid for process=flow"),
    (["sampler=flow_euler"], "sampler=flow_euler is invalid for process=gaussian"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, overrides, text):
    proc = run_train(*overrides, "logger=none", f"hydra.run.dir={tmp_path / 'o'}", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.output[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and text in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_the_settings_checks_need_no_torch():
    """diffusion.train refuses the continuous processes' settings before it imports torch (preflight.check_config)."""
    code = ("import sys; from omegaconf import OmegaConf; from diffusion.run.preflight import check_process\n"
            "cfg = OmegaConf.create({'process': {'_target_': 'diffusion.processes.EDMProcess', 'P_std': 0},"
            " 'schedule': {'_target_': 'diffusion.processes.schedules.NoSchedule'}})\n"
            "try:\n    check_process(cfg)\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout.splitlines()
    assert out[0].startswith("UsageError process.P_std=0 is invalid") and out[1] == "False"


def test_speed_switches_and_the_module_see_c_noise():
    """The network of process=edm is called with c_noise = ln(sigma) / 4 (floats), flow's with 1000 t."""
    from diffusion.training.module import DiffusionModule

    seen = []
    for proc in ({"_target_": "diffusion.processes.EDMProcess", "_partial_": True},
                 {"_target_": "diffusion.processes.FlowMatching", "_partial_": True, "timestep_sampling": "uniform"}):
        module = DiffusionModule(
            model={"_target_": "diffusion.models.UNet", "in_channels": 1, "image_size": 8, "base_channels": 8,
                   "channel_mult": [1], "attention_resolutions": []},
            schedule={"_target_": "diffusion.processes.schedules.NoSchedule"},
            sampler={"_target_": "diffusion.samplers.karras.HeunSampler" if "EDM" in proc["_target_"] else
                     "diffusion.samplers.flow.FlowEulerSampler", "_partial_": True, "num_steps": 2},
            optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}, process=proc)
        handle = module.model.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
        t = module.process.sample_timesteps(4, "cpu", torch.Generator().manual_seed(0))
        module.process.training_losses(module.model, torch.zeros(4, 1, 8, 8), t, torch.randn(4, 1, 8, 8))
        handle.remove()
        expected = t.log() / 4 if "EDM" in proc["_target_"] else 1000 * t
        torch.testing.assert_close(seen[-1], expected)


def test_the_sampling_page_draws_each_family(family_run):
    """The app's generate(): the family's own sampler and another that reverses it, with the page's reverse strip."""
    from diffusion.app import generate, sampler_names as page_samplers
    from diffusion.training.module import DiffusionModule

    kind, out = family_run
    module = DiffusionModule.from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert sorted(page_samplers(module)) == sampler_names(kind)
    other = "dpmpp_2m" if kind == "edm" else "flow_heun"
    for name in ("heun" if kind == "edm" else "flow_euler", other):
        made = generate(module, name, 3, 0, 2, strip_images=2, strip_points=3)
        assert made.grid.size[0] > 0 and made.strip.size[0] > made.strip.size[1]
        assert f"{name}, 3 steps" in made.summary


def test_a_flow_run_with_one_group_count_exports_to_diffusers_and_samples_the_same_pixels(tmp_path):
    """process=flow model.norm_groups=auto (one group count at every width): format=diffusers writes a
    DDPMPipeline with FlowMatchEulerDiscreteScheduler, and ckpt=<that folder> draws the checkpoint's own pixels."""
    proc = run_train(*FAST, "process=flow", "model.norm_groups=auto", "logger=none", "final_samples=false",
                     f"hydra.run.dir={tmp_path / 'o'}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.output[-3000:]
    ckpt, folder = tmp_path / "o" / "checkpoints" / "last.ckpt", tmp_path / "pipe"
    proc = cli("diffusion.export", tmp_path, f"ckpt={ckpt}", f"out={folder}", "format=diffusers")
    assert proc.returncode == 0, proc.output[-2000:]
    import json

    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    from diffusion.training.module import DiffusionModule

    groups = {m.num_groups for m in DiffusionModule.from_checkpoint(ckpt).model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {json.loads((folder / "unet" / "config.json").read_text())["norm_num_groups"]}  # one count, theirs
    common = ["n=4", "seed=1", "sampler.num_steps=3"]
    a = cli("diffusion.sample", tmp_path, f"ckpt={ckpt}", *common, f"hydra.run.dir={tmp_path / 'a'}")
    b = cli("diffusion.sample", tmp_path, f"ckpt={folder}", *common, f"hydra.run.dir={tmp_path / 'b'}")
    assert a.returncode == 0 and b.returncode == 0, (a.output + b.output)[-3000:]
    sa, sb = (np.load(tmp_path / d / "samples.npz")["samples"] for d in "ab")
    assert sa.std() > 0 and np.abs(sa.astype(int) - sb.astype(int)).max() <= 1  # uint8: float32 rounding at most
