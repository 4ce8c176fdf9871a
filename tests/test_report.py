"""The sweep report on a fake 2x2 multirun directory."""

import csv
import json
import subprocess
import sys

import yaml

from diffusion.report import report
from tests.conftest import REPO


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


def test_report_on_a_2x2_sweep(tmp_path):
    losses = fake_sweep(tmp_path)
    out = report(tmp_path)
    assert out["swept"] == ["schedule.T", "schedule.beta_end"]  # trainer.max_epochs did not vary
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert len(rows) == 4
    got = {(int(r["schedule.T"]), float(r["schedule.beta_end"])): float(r["val/loss"]) for r in rows}
    assert got == losses
    assert rows[0]["nll_bpd"] == "1.5" and rows[1]["nll_bpd"] == ""
    md = (tmp_path / "report.md").read_text().splitlines()
    assert len(md) == 2 + 4 + 2 and md[0].startswith("| job | schedule.T | schedule.beta_end | val/loss")
    # a grid sweep's best job: the lowest val/loss (0.025), named in its row and in the last line
    assert md[5].startswith("| 3 (best) | 1000 | 0.02 | 0.025 |") and "(best)" not in "".join(md[2:5])
    assert md[-1] == "best: job 3 val/loss=0.025 params schedule.T=1000 schedule.beta_end=0.02"
    from PIL import Image

    with Image.open(tmp_path / "report.png") as im:
        assert im.size[0] > 400 and im.size[1] > 300


def test_report_cli_rejects_a_directory_without_jobs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffusion.report", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "holds no Hydra job directories" in proc.stderr


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
