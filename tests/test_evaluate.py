"""The evaluate CLI: NLL in bits/dim from a checkpoint alone, errors, no overwriting."""

import json

import pytest

from tests.conftest import run_train, snapshot


def evaluate_cli(tmp_path, *overrides):
    return run_train(*overrides, tmp_path=tmp_path, module="diffusion.evaluate")


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


@pytest.mark.parametrize("overrides, text", [(["metrics=[nll,fid2]"], "fid2"), (["split=test"], "split='test'"), (["nll.num_timesteps=0"], "num_timesteps=0"), (["devices=0"], "devices=0")])
def test_evaluate_bad_input(ckpt, tmp_path, overrides, text):
    proc = evaluate_cli(tmp_path, f"ckpt={ckpt}", "max_images=2", *overrides, f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and text in proc.stderr and "Traceback" not in proc.output
    assert not (tmp_path / "o" / "results.json").exists()


def test_evaluate_never_overwrites(ckpt, tmp_path):
    """A refused run leaves the directory as it was, its .hydra/ config included."""
    out = tmp_path / "o"
    (out / ".hydra").mkdir(parents=True)
    (out / "results.json").write_text("{}")
    (out / ".hydra" / "overrides.yaml").write_text("- max_images=3\n")
    before = snapshot(out)
    proc = evaluate_cli(tmp_path, f"ckpt={ckpt}", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "already holds results.json" in proc.stderr
    assert snapshot(out) == before


def test_results_and_figures_go_to_the_training_runs_wandb(finished_run, tmp_path, monkeypatch):
    import glob
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from diffusion.figures import make_figure
    from tests.conftest import clean_env
    from tests.run.test_errors import compose_cfg
    from tests.wandb_records import history, records

    run = tmp_path / "run"  # a copy: the session's run stays as the other tests expect it
    shutil.copytree(finished_run[0], run)
    first = next(Path(p) for p in glob.glob(str(run / "wandb" / "offline-run-*")))
    run_id = first.name.rsplit("-", 1)[-1]
    proc = evaluate_cli(tmp_path, f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "max_images=2", "nll.num_timesteps=5",
                        f"wandb_run={run}", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 0, proc.output[-3000:]
    for key, value in clean_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    figure = make_figure(compose_cfg("figure=schedules", "T=50", f"out={tmp_path / 'figs'}", f"wandb_run={run}",
                                     config_name="figures"))
    import wandb

    wandb.teardown()  # logged in this process: let W&B's service finish writing the run file before it is read
    appended = [p for p in (run / "wandb").glob(f"offline-run-*-{run_id}") if p != first]
    rows = {}
    for p in appended:
        for key, values in history(next(p.glob("run-*.wandb"))).items():
            rows.setdefault(key, []).extend(values)
    assert rows["eval/nll_bpd"][0] > 0, "the evaluation must reach the training run's W&B id"
    assert any("figures/schedules" in key for key in rows)
    # both sit at the training run's last step (2 epochs of 2 batches) on its charts' axis, not at W&B's new _step 0
    logged = [r for p in appended for r in records(next(p.glob("run-*.wandb")))]
    assert [r["trainer/global_step"] for r in logged] == [4, 4]
    (image,) = [r for r in logged if "figures/schedules/path" in r]
    media = next(p for p in appended if (p / "files" / image["figures/schedules/path"]).is_file()) / "files"
    assert image["figures/schedules/caption"] == figure.name
    assert np.array_equal(np.asarray(Image.open(media / image["figures/schedules/path"])), np.asarray(Image.open(figure)))
