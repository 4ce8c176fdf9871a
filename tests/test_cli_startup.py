"""Help and configuration errors answer before any heavy import (#19 item 10).

Each command runs as a user types it (``python -m diffusion.<cli> ...``, in one fresh interpreter for all the cases
below, one after another) and the test reads what it printed, its exit status, and which heavy packages were
imported by then: none of torch, Lightning, wandb, torchvision, scipy or matplotlib. Not timed (timings are
``experiments/cli_startup.py``'s, in the README): the imports are what makes the difference between ~1 s and ~10 s.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion.data import ImageDataModule
from diffusion.data.settings import check_data
from diffusion.models import SimpleUNet, UNet
from diffusion.models.settings import check_network, check_simple_unet, check_unet

HEAVY = ("torch", "lightning", "wandb", "torchvision", "scipy", "matplotlib", "gradio")

#: runs each case as ``python -m <cli> <args>`` would, in this one process, and reports its exit status, its last
#: line on stderr, the length of its stdout and the heavy packages imported so far
DRIVER = r"""
import contextlib, io, json, runpy, sys, warnings
{prelude}
warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package")  # the CLIs import each other
heavy, cases, report = {heavy!r}, json.loads(sys.argv[1]), []
for argv in cases:
    sys.argv = list(argv)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
    lines = err.getvalue().strip().splitlines()
    report.append({{"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": lines,
                    "heavy": sorted(m for m in heavy if m in sys.modules)}})
print(json.dumps(report))
"""


def run_cases(cases: list[list[str]], cwd, prelude: str = "") -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(heavy=HEAVY, prelude=prelude), json.dumps(cases)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CLIS = ("train", "sample", "evaluate", "compare", "export", "figures", "report", "app")


def test_every_cli_answers_help_without_torch(tmp_path):
    report = run_cases([[f"diffusion.{cli}", "--help"] for cli in CLIS], tmp_path)
    for cli, case in zip(CLIS, report):
        assert case["code"] == 0, (cli, case["stderr"])
        assert case["heavy"] == [], f"diffusion.{cli} --help imported {case['heavy']}"
        assert "Powered by Hydra" in case["stdout"] and "== Config ==" in case["stdout"], cli  # Hydra's help, in full
    train = report[0]["stdout"]
    # run.config.share_config_store (Hydra shares its ConfigStore instead of copying it per group listed) changes no word
    unshared = "import diffusion.run.config\nfrom hydra.core.config_store import ConfigStore\ndel ConfigStore.__deepcopy__"
    assert run_cases([["diffusion.train", "--help"]], tmp_path, unshared)[0]["stdout"] == train
    assert "schedule: blur, continuous_cosine, cosine, linear, none, quadratic, sigmoid" in train  # the groups it lists
    assert "sampler: cold, ddim, ddpm, dpmpp_2m, dpmsolver++, euler, euler_ancestral, flow_euler, flow_heun, heun, plms, pndm, unipc" in train
    assert "process: blur, edm, flow, gaussian" in train


def refused(tmp_path) -> list[tuple[list[str], str]]:
    """(command line, the one line it must print): each refused before torch."""
    ckpt = tmp_path / "some.ckpt"  # exists: the checks after the path's own
    ckpt.write_bytes(b"not read")
    out = f"hydra.run.dir={tmp_path / 'run'}"
    train = [
        (["model.base_channels=-1"], "model base_channels=-1 is invalid: it must be a positive integer"),
        (["model.num_res_blocks=0"], "model num_res_blocks=0 is invalid: it must be a positive integer"),
        (["model.channel_mult=[]"], "model channel_mult=[] is invalid: it must be a non-empty list of positive integers"),
        (["model.dropout=1.5"], "model dropout=1.5 is invalid: it must lie in [0, 1)"),
        (["model.norm_groups=6"], "model norm_groups=6 is invalid: it must divide the channel count of every GroupNorm "
                                  "(16, 32, 48, 64, 96, 128 here), e.g. 4; null: gcd(32, channels // 4) per layer"),
        (["model.attention_resolutions=[5]"],
         "model attention_resolutions=[5] is invalid: [5] not among the network's resolutions [16, 8, 4]"),
        (["model.block_attention=soft"], "model block_attention='soft' is invalid: allowed values are none, self, cbam"),
        (["model.compile=fast"], "model compile='fast' is invalid: allowed values are false, true, default, "
                                 "reduce-overhead, max-autotune"),
        (["+model.widht=3"], "model.widht is not a setting of UNet: its settings are base_channels, channel_mult"),
        (["model=simple_unet", "model.activation=tanh"],
         "model activation='tanh' is invalid: allowed values are relu, leaky_relu"),
        (["data.image_size=18"], "model image_size=18 cannot be halved 2 times for channel_mult=[1, 2, 4]: use a "
                                 "multiple of 4 or fewer levels"),
        (["schedule.T=0"], "schedule T=0 is invalid: the number of diffusion steps must be an integer >= 1"),
        (["schedule=cosine", "schedule.max_beta=1.5"], "schedule max_beta=1.5 is invalid: it must lie in (0, 1)"),
        (["schedule.beta_start=0.5", "schedule.beta_end=0.1"], "schedule beta_start=0.5 is invalid: it must be smaller than beta_end=0.1"),
        (["data.batch_size=0"], "data batch_size=0 is invalid: it must be a positive integer"),
        (["data.val_fraction=1.0"], "data val_fraction=1.0 is invalid: it must lie in [0, 1)"),
        (["data.conditional=yes"], "data conditional='yes' is invalid: allowed values are true, false"),
        (["optimizer.lr=-1"], "optimizer.lr=-1 is invalid: it must be a finite number > 0"),
        (["trainer.devices=0"], "trainer.devices=0 is invalid: it must be a positive number of devices"),
        (["init_from=/nonexistent.ckpt"], "init_from=/nonexistent.ckpt does not exist: pass a checkpoint"),
        (["ckpt_path=/nonexistent.ckpt"], "ckpt_path=/nonexistent.ckpt does not exist or is not a file"),
    ]
    cases = [(["diffusion.train", out, *args], line) for args, line in train]
    missing = "ckpt=/nonexistent.ckpt does not exist: pass a checkpoint written by python -m diffusion.train"
    for cli in ("sample", "evaluate", "compare", "export", "app"):
        cases.append(([f"diffusion.{cli}", out, "ckpt=/nonexistent.ckpt"], missing))
    cases += [
        (["diffusion.sample", out, f"ckpt={ckpt}", "n=0"], "n=0 is invalid: it must be a positive integer"),
        (["diffusion.evaluate", out, f"ckpt={ckpt}", "metrics=[bpd]"],
         "metrics=['bpd'] is invalid: allowed metrics are nll, fid, kid, fd_classifier"),
        (["diffusion.compare", out, f"ckpt={ckpt}", "nfe=[0]"], "nfe=[0] is invalid: it must be a list of distinct positive"),
        (["diffusion.export", out, f"ckpt={ckpt}", "format=onnx"], "format='onnx' is invalid: allowed values are safetensors, diffusers"),
        (["diffusion.app", out, f"ckpt={ckpt}", "port=0"], "port=0 is invalid: it must be an integer in [1, 65535]"),
        (["diffusion.app", out], "ckpt is required: pass ckpt=<path to a checkpoint written by python -m diffusion.train>"),
        (["diffusion.figures", out, "figure=bogus"], "figure='bogus' is invalid: allowed values are schedules, forward, reverse"),
        (["diffusion.report", out, "sweep=/nonexistent"], "sweep=/nonexistent does not exist or is not a directory"),
    ]
    return cases


def test_a_refused_setting_answers_in_one_line_before_torch(tmp_path):
    cases = refused(tmp_path)
    report = run_cases([argv for argv, _ in cases], tmp_path)
    for (argv, line), case in zip(cases, report):
        assert case["code"] == 2, (argv, case["stderr"])
        assert len(case["stderr"]) == 1 and case["stderr"][0].startswith(f"error: {line}"), (argv, case["stderr"])
        assert case["heavy"] == [], f"{' '.join(argv)} imported {case['heavy']} before refusing"
    run = tmp_path / "run"  # Hydra makes the run directory before the task starts: nothing is written into it
    assert not run.exists() or not any(run.iterdir())


def test_the_network_checks_are_the_networks_own():
    """The torch-free checks take each network's (and the data modules') own arguments, with its defaults, and refuse
    what it refuses with the same words (they are the one copy: the constructors call them)."""
    for network, check in ((UNet, check_unet), (SimpleUNet, check_simple_unet), (ImageDataModule, check_data)):
        theirs = {k: p.default for k, p in inspect.signature(network.__init__).parameters.items() if k != "self"}
        ours = {k: p.default for k, p in inspect.signature(check).parameters.items()}
        assert ours == theirs, network.__name__
    bad = [dict(base_channels=-1), dict(channel_mult=[]), dict(dropout=1.0), dict(attention_resolutions=[5]),
           dict(block_attention="soft"), dict(image_size=18, channel_mult=[1, 2, 4], attention_resolutions=[]),
           dict(num_classes=1)]
    for kwargs in bad:
        with pytest.raises(ValueError) as built:
            UNet(**kwargs)
        with pytest.raises(ValueError) as checked:
            check_network({"_target_": "diffusion.models.UNet", **kwargs}, image_size=kwargs.get("image_size", 32))
        assert str(checked.value) == str(built.value), kwargs
    with pytest.raises(ValueError, match="model activation='tanh' is invalid"):
        SimpleUNet(activation="tanh")
    check_network({"_target_": "my.own.Network", "width": -1})  # a user's network: its own constructor judges it


def test_the_startup_benchmark_writes_its_table(tmp_path):
    """``experiments/cli_startup.py`` (the README's Start-up table): one row per CLI asked for, with both timings,
    and the floors (``import torch``, a bare Hydra app)."""
    out = tmp_path / "startup.md"
    script = Path(__file__).resolve().parents[1] / "experiments" / "cli_startup.py"
    subprocess.run([sys.executable, str(script), "--repeats", "1", "--only", "report", "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=300)
    rows = out.read_text().strip().splitlines()
    assert rows[0] == "| command | `--help` | a refused setting |" and len(rows) == 5
    assert re.fullmatch(r"\| `import torch` \| \d+\.\d\d s \|  \|", rows[2]), rows[2]
    assert re.fullmatch(r"\| `python -m diffusion.report` \| \d+\.\d\d s \| \d+\.\d\d s \(`sweep=/nonexistent`\) \|", rows[4]), rows[4]
