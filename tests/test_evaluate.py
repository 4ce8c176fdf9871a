"""The evaluate CLI: NLL in bits/dim from a checkpoint alone, errors, no overwriting."""

import json

import pytest

from tests.conftest import run_train


def evaluate_cli(tmp_path, *overrides):
    return run_train(*overrides, tmp_path=tmp_path, module="diffusion.evaluate")


@pytest.fixture(scope="module")
def ckpt(finished_run):
    return finished_run[0] / "checkpoints" / "last.ckpt"


def test_nll_from_a_checkpoint_alone(ckpt, tmp_path):
    out = tmp_path / "o"
    proc = evaluate_cli(tmp_path, f"ckpt={ckpt}", "max_images=8", "batch_size=4", "nll.num_timesteps=20", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.output[-3000:]
    nll = json.loads((out / "results.json").read_text())["nll"]
    assert nll["num_images"] == 8 and nll["num_timesteps"] == 20
    assert nll["bpd"] == pytest.approx(nll["prior_bpd"] + nll["vb_bpd"], rel=1e-5)
    assert 0 < nll["prior_bpd"] < 0.01 and nll["bpd"] > 0
    assert "bpd=" in proc.output


def test_full_bound_reports_terms_per_quarter(ckpt, tmp_path):
    out = tmp_path / "o"
    proc = evaluate_cli(tmp_path, f"ckpt={ckpt}", "max_images=2", "batch_size=2", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.output[-3000:]
    nll = json.loads((out / "results.json").read_text())["nll"]
    assert nll["num_timesteps"] == 1000 and "decoder_bpd" in nll
    quarters = sum(nll[f"vb_bpd_q{q}"] for q in range(4))
    assert quarters == pytest.approx(nll["vb_bpd"], rel=1e-4)


@pytest.mark.parametrize("overrides, text", [(["metrics=[nll,fid2]"], "fid2"), (["split=test"], "split='test'"), (["nll.num_timesteps=0"], "num_timesteps=0")])
def test_evaluate_bad_input(ckpt, tmp_path, overrides, text):
    proc = evaluate_cli(tmp_path, f"ckpt={ckpt}", "max_images=2", *overrides, f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.output
    assert not (tmp_path / "o" / "results.json").exists()


def test_evaluate_never_overwrites(ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    proc = evaluate_cli(tmp_path, f"ckpt={ckpt}", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "already holds results.json" in proc.stderr
    assert (out / "results.json").read_text() == "{}"
