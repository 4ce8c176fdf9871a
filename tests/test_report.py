"""The sweep report on a fake 2x2 multirun directory."""

import csv
import json
import subprocess
import sys

import pytest
import yaml

from diffusion.report import make_report, report
from diffusion.run.errors import UsageError
from tests.conftest import REPO
from tests.run.test_errors import compose_cfg


def fake_sweep(root):
    losses = {(500, 0.01): 0.04, (500, 0.02): 0.03, (1000, 0.01): 0.035, (1000, 0.02): 0.025}
    for i, ((T, beta_end), loss) in enumerate(losses.items()):
        job = root / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"schedule.T={T}", f"schedule.beta_end={beta_end}", "trainer.max_epochs=3"]))
        (job / "metrics.json").write_text(json.dumps({"metrics": {"val/loss": loss, "train/loss_epoch": loss + 0.01}, "global_step": 30}))
    (root / "0" / "eval").mkdir()
    (root / "0" / "eval" / "results.json").write_text(json.dumps({"nll": {"bpd": 1.5}}))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return losses


def report_cli(tmp_path, *overrides: str):
    """``python -m diffusion.report <overrides>`` from the repository root (Hydra's run directory in tmp)."""
    return subprocess.run([sys.executable, "-m", "diffusion.report", *overrides, f"hydra.run.dir={tmp_path / 'h'}"],
                          cwd=REPO, capture_output=True, text=True)


def test_report_on_a_2x2_sweep(tmp_path):
    """The README's ``python -m diffusion.report sweep=outputs/train/multirun/<date_time>`` on a fake 2 x 2 sweep."""
    sweep = tmp_path / "sweep"
    losses = fake_sweep(sweep)
    proc = report_cli(tmp_path, f"sweep={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith((sweep / "report.md").read_text()) and "written" in proc.stdout
    written = {name: (sweep / name).read_bytes() for name in ("report.csv", "report.md")}
    out = make_report(compose_cfg(f"sweep={sweep}", config_name="report"))  # again, in this process: the same tables
    assert {name: (sweep / name).read_bytes() for name in written} == written
    assert out["swept"] == ["schedule.T", "schedule.beta_end"]  # trainer.max_epochs did not vary
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 4
    got = {(int(r["schedule.T"]), float(r["schedule.beta_end"])): float(r["val/loss"]) for r in rows}
    assert got == losses
    assert rows[0]["nll_bpd"] == "1.5" and rows[1]["nll_bpd"] == ""
    md = (sweep / "report.md").read_text().splitlines()
    assert len(md) == 2 + 4 + 2 and md[0].startswith("| job | schedule.T | schedule.beta_end | val/loss")
    # a grid sweep's best job: the lowest val/loss (0.025), named in its row and in the last line
    assert md[5].startswith("| 3 (best) | 1000 | 0.02 | 0.025 |") and "(best)" not in "".join(md[2:5])
    assert md[-1] == "best: job 3 val/loss=0.025 params schedule.T=1000 schedule.beta_end=0.02"
    from PIL import Image

    with Image.open(sweep / "report.png") as im:
        assert im.size[0] > 400 and im.size[1] > 300


def test_report_cli_refuses_bad_sweeps_in_one_line_and_help_lists_its_option(tmp_path):
    (tmp_path / "empty").mkdir()
    for overrides, text in [([f"sweep={tmp_path / 'empty'}"], "holds no Hydra job directories"),
                            ([], "sweep is required: pass sweep=<a Hydra multirun directory"),
                            ([f"sweep={tmp_path / 'none'}"], "does not exist or is not a directory")]:
        proc = report_cli(tmp_path, *overrides)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and text in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert list((tmp_path / "empty").iterdir()) == [] and not (tmp_path / "none").exists()
    with pytest.raises(UsageError, match="is not a directory"):
        make_report(compose_cfg(f"sweep={tmp_path / 'none'}", config_name="report"))
    help_ = report_cli(tmp_path, "--help")
    assert help_.returncode == 0 and "sweep: ???" in help_.stdout.split("== Config ==")[1]


def test_report_on_an_evaluate_sweep_with_a_failed_job(tmp_path):
    """``diffusion.evaluate -m ... sampler.guidance_scale=0,1,2,4``: each job's own results.json (no metrics.json)
    gives its row; a job without results.json is named as failed, none as lacking metrics.json."""
    fd = {0: 30.0, 1: 20.0, 2: 25.0}
    for i, w in enumerate([0, 1, 2, 4]):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["ckpt=/r/checkpoints/last.ckpt", f"sampler.guidance_scale={w}"]))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task_name": "evaluate", "ckpt": "/r/checkpoints/last.ckpt"}))
        if w in fd:  # the job of w=4 failed
            (job / "results.json").write_text(json.dumps({"fd_classifier": {
                "value": fd[w], "class_accuracy": 0.5 + 0.1 * w, "confident": 0.9, "diversity_ratio": 1.0 - 0.2 * w,
                "chance": 0.1, "kid": 0.01}}))
    out = report(tmp_path)
    assert out["swept"] == ["sampler.guidance_scale"] and out["best"] is None
    assert out["metrics"] == ["fd_classifier", "class_accuracy", "confident", "diversity_ratio"]
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [(r["sampler.guidance_scale"], r["fd_classifier"], r["class_accuracy"]) for r in rows] == [
        ("0", "30.0", "0.5"), ("1", "20.0", "0.6"), ("2", "25.0", "0.7"), ("4", "", "")]
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0] == "| job | sampler.guidance_scale | fd_classifier | class_accuracy | confident | diversity_ratio |"
    assert md[-1] == "no results.json (failed or running): job 3" and "metrics.json" not in "".join(md)
    from diffusion.report import collect, title

    assert title(tmp_path, collect(tmp_path)[0]) == f"evaluate sweep {tmp_path.name}: 4 jobs of r/last.ckpt"
