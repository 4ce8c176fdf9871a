"""FID/KID wiring (with a small stand-in feature extractor) and the Inception weights requirement."""

import json

import pytest
import torch

from diffusion.data import DigitsDataModule
from diffusion.metrics import INCEPTION_FILE, fid_kid, inception_weights
from tests.conftest import run_train
from tests.helpers import TinyFeatures


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(image_size=16, batch_size=8)
    dm.setup()
    return torch.stack([dm.train_set[i] for i in range(120)])


def test_fid_kid_of_a_set_against_itself_and_against_noise(digits):
    a, b = digits[:60], digits[60:]
    noise = torch.randint(0, 256, b.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    same = fid_kid(a, a, TinyFeatures(), kid_subset_size=1000, kid_subsets=10)
    other_digits = fid_kid(a, b, TinyFeatures(), kid_subset_size=1000, kid_subsets=10)
    vs_noise = fid_kid(a, noise, TinyFeatures(), kid_subset_size=1000, kid_subsets=10)
    assert abs(same["fid"]) < 1e-3
    assert abs(same["kid"]) < 0.05 * vs_noise["kid"]  # unbiased MMD on random subsets: ~0, either sign
    assert same["kid_subset_size"] == 60, "KID's subset size must not exceed the number of samples"
    assert vs_noise["fid"] > 20 * other_digits["fid"] > 0
    assert vs_noise["kid"] > 20 * abs(other_digits["kid"])


def test_under_ddp_every_rank_updates_and_computes_the_whole_sets_value(digits, tmp_path):
    import socket

    import torch.multiprocessing as mp

    from tests.helpers import fid_kid_on_a_shard

    real, fake = digits[:45], digits[60:105]  # shards of 23 and 22; KID's subsets are then whole sets, in any order
    torch.manual_seed(0)
    single = fid_kid(real, fake, TinyFeatures(), kid_subset_size=1000, kid_subsets=3)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fid_kid_on_a_shard, args=(2, port, real, fake, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["shard"] for r in ranks] == [23, 22], "each rank must update with its own shard only"
    for r in ranks:  # every rank computed, and got the value of the whole sets
        assert r["fid"] == pytest.approx(single["fid"], rel=1e-4)
        assert r["kid"] == pytest.approx(single["kid"], rel=1e-4, abs=1e-7)
        assert r["kid_subset_size"] == 45 and r["num_real"] == 45 and r["num_fake"] == 45


def test_missing_inception_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSION_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ValueError) as err:
        inception_weights(str(tmp_path / "nope.pth"))
    assert INCEPTION_FILE in str(err.value) and "fid.weights=" in str(err.value) and "nope.pth" in str(err.value)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv("DIFFUSION_INCEPTION_WEIGHTS", str(weights))
    assert inception_weights(None) == str(weights)


def test_evaluate_fid_kid_cli_with_a_custom_feature_extractor(ckpt, tmp_path):
    out = tmp_path / "o"
    proc = run_train(
        f"ckpt={ckpt}", "metrics=[fid,kid]", "max_images=24", "fid.num_steps=3", "fid.kid_subsets=5",
        "fid.feature_extractor={_target_: tests.helpers.TinyFeatures}", f"hydra.run.dir={out}",
        tmp_path=tmp_path, module="diffusion.evaluate",
    )
    assert proc.returncode == 0, proc.output[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["fid"]["value"] > 0 and results["fid"]["num_fake"] == 24 and results["fid"]["num_steps"] == 3
    assert results["kid"]["subset_size"] == 24


def test_evaluate_on_two_ranks(ckpt, tmp_path):
    out = tmp_path / "o"
    proc = run_train(
        f"ckpt={ckpt}", "metrics=[nll,fid]", "max_images=10", "batch_size=4", "nll.num_timesteps=4", "fid.num_steps=2",
        "devices=2", "device=cpu", "fid.feature_extractor={_target_: tests.helpers.TinyFeatures}", f"hydra.run.dir={out}",
        tmp_path=tmp_path, module="diffusion.evaluate",
    )
    assert proc.returncode == 0, proc.output[-3000:]
    assert "rank 0 of 2 evaluates 5 of 10 images" in proc.output and "rank 1 of 2 evaluates 5 of 10 images" in proc.output
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["nll"]["num_images"] == 10 and results["nll"]["bpd"] > 0
    assert results["fid"]["num_real"] == 10 and results["fid"]["num_fake"] == 10 and results["fid"]["value"] > 0


def test_evaluate_fid_without_weights_fails_before_work(ckpt, tmp_path):
    out = tmp_path / "o"
    proc = run_train(f"ckpt={ckpt}", "metrics=[nll,fid]", f"fid.weights={tmp_path / 'none.pth'}", f"hydra.run.dir={out}",
                     tmp_path=tmp_path, module="diffusion.evaluate")
    assert proc.returncode == 2 and INCEPTION_FILE in proc.stderr and "Traceback" not in proc.output
    assert not (out / "results.json").exists() and "NLL" not in proc.output
