"""The benchmark script: its JSON holds every field for both frameworks, and diffusers' model is matched in size."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DModel

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
from benchmark import FIELDS, MATCH_TOLERANCE, diffusers_config  # noqa: E402

from diffusion.models import UNet  # noqa: E402


def test_benchmark_writes_json(tmp_path):
    cmd = [sys.executable, "experiments/benchmark.py", "model.base_channels=8", "--batch", "4", "--warmup", "1",
           "--iters", "1", "--repeats", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    for name in ("ours", "diffusers"):
        for key in FIELDS:
            assert result[name][key] > 0, (name, key)
    for key in FIELDS:
        assert result["ratio_ours_to_diffusers"][key] == pytest.approx(result["ours"][key] / result["diffusers"][key])
    assert abs(result["ratio_ours_to_diffusers"]["params"] - 1) <= MATCH_TOLERANCE
    assert set(result["sampler_overhead"]) == {"ddim_pct", "ddpm_pct"} and all(v > 0 for v in result["sampler_overhead"].values())
    assert result["config"]["batch"] == 4 and result["diffusers_version"] and result["device"].startswith("cpu")
    assert result["data_loader_images_per_s"] > 0
    assert "ours/diff" in proc.stdout and "sampler overhead" in proc.stdout and "data loader" in proc.stdout


@pytest.mark.parametrize(
    "model, channels, size",
    [
        (dict(base_channels=16, channel_mult=[1, 2, 4], num_res_blocks=2, attention_resolutions=[4]), 1, 16),  # digits default
        (dict(base_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2, attention_resolutions=[16]), 3, 64),
        (dict(base_channels=64, channel_mult=[1, 2, 4, 8], num_res_blocks=1, attention_resolutions=[8, 4], num_heads=4), 3, 32),
        (dict(base_channels=32, channel_mult=[1, 2], num_res_blocks=3, attention_resolutions=[], dropout=0.1), 1, 28),
    ],
)
def test_matched_diffusers_model_is_within_ten_percent(model, channels, size):
    ours = UNet(in_channels=channels, image_size=size, **model)
    config = diffusers_config(model, channels, size)
    with torch.device("meta"):  # parameter counts without allocating the large one
        theirs = UNet2DModel(**config)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert abs(n_theirs / n_ours - 1) <= MATCH_TOLERANCE, (n_ours, n_theirs)
    x = torch.randn(2, channels, size, size)
    if size <= 32:  # and it runs on our inputs with our output shape
        with torch.no_grad():
            assert UNet2DModel(**config)(x, torch.tensor([3, 7])).sample.shape == ours(x, torch.tensor([3, 7])).shape
