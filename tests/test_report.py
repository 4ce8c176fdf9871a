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
