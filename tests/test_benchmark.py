"""The benchmark script: its JSON holds every field for both frameworks, and diffusers' model is matched in size;
its FLOP count is the closed form of known layers, and its FLOP/s and % of the matmul peak follow from its numbers."""

import json
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
from benchmark import FIELDS, MATCH_TOLERANCE, Contender, count_flops, diffusers_config, matmul_peak  # noqa: E402

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

    # achieved FLOP/s: the counted FLOPs over the measured time, against the fp32 matmul peak of a 32-true run
    peak = result["matmul_peak"]
    assert peak["reference"] == "fp32" and peak["fp32_gflop_per_s"] > 0 and peak["bf16_gflop_per_s"] > 0
    for name in ("ours", "diffusers"):
        r = result[name]
        for step in ("train", "sample"):
            rate = r[f"{step}_gflop"] / (r[f"{step}_step_ms"] / 1e3)
            assert r[f"{step}_gflop_per_s"] == pytest.approx(rate)
            assert r[f"{step}_pct_of_peak"] == pytest.approx(100 * rate / peak["fp32_gflop_per_s"])
        # training: the forward pass and a backward pass of about twice it (the first layer needs no input gradient,
        # attention's backward recomputes its scores)
        assert 2.5 < r["train_gflop"] / r["sample_gflop"] < 3.1
    assert result["ours"]["sample_gflop"] == pytest.approx(result["diffusers"]["sample_gflop"], rel=0.1)
    assert f"fp32 {peak['fp32_gflop_per_s']:.1f} GFLOP/s (n={peak['fp32_n']})" in proc.stdout
    assert f"{result['ours']['train_pct_of_peak']:.1f}%" in proc.stdout


def test_the_families_are_timed_in_the_same_run(tmp_path):
    """--processes edm,flow: one contender per family, the same network, each drawing its own training times."""
    cmd = [sys.executable, "experiments/benchmark.py", "model.base_channels=8", "--batch", "4", "--warmup", "1", "--iters", "1",
           "--repeats", "1", "--no-diffusers", "--no-loader", "--processes", "edm,flow", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["process"] == "GaussianDiffusion" and result["processes"] == ["edm", "flow"]
    for name in ("ours (edm)", "ours (flow)"):
        assert all(result[name][key] > 0 for key in FIELDS), name
        ratio = result["ratio_to_ours"][name]
        assert ratio["params"] == 1.0  # the same network
        assert ratio["train_images_per_s"] == pytest.approx(result[name]["train_images_per_s"] / result["ours"]["train_images_per_s"])
        assert f"{name} / ours: train {ratio['train_images_per_s']:.2f}x" in proc.stdout

    from benchmark import build

    setup = build(["model.base_channels=8"], batch=64, with_diffusers=False, processes=("edm", "flow"))
    ours, edm, flow = (setup.contenders[n] for n in ("ours", "ours (edm)", "ours (flow)"))
    assert ours.draw_t is None and edm.model is not ours.model
    sigma, t = edm.draw_t(), flow.draw_t()
    assert sigma.dtype == t.dtype == torch.float32 and sigma.shape == t.shape == (64,)
    assert abs(float(sigma.log().mean()) + 1.2) < 0.5 and float(t.min()) > 0 and float(t.max()) < 1  # EDM's P_mean; t in (0, 1)
    refused = subprocess.run([sys.executable, "experiments/benchmark.py", "--processes", "edm,bogus"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.strip() == "--processes bogus is not a process: allowed blur, edm, flow, gaussian"


class TwoConvs(nn.Module):
    def __init__(self, cin, mid, cout, k):
        super().__init__()
        self.a, self.b = nn.Conv2d(cin, mid, k, padding=k // 2), nn.Conv2d(mid, cout, k, padding=k // 2)

    def forward(self, x, t=None):
        return self.b(self.a(x))


def _contender(model, x0, loss=None):
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01}
    return Contender("m", model, model, loss or (lambda x, t: model(x, t).square().mean()), lambda x, t: model(x, t),
                     x0, 10, sgd, nullcontext)


def test_flop_count_is_the_closed_form_of_convolutions():
    n, cin, mid, cout, k, hw = 3, 2, 5, 4, 3, 6
    contender = _contender(TwoConvs(cin, mid, cout, k), torch.randn(n, cin, hw, hw))
    fwd_a, fwd_b = 2 * n * cin * mid * k * k * hw * hw, 2 * n * mid * cout * k * k * hw * hw
    assert count_flops(contender.sample_step) == fwd_a + fwd_b
    # backward: the weight gradient of both convolutions (one forward's worth each) and the input gradient of the
    # second only (the data needs none)
    assert count_flops(contender.train_step) == (fwd_a + fwd_a) + (fwd_b + 2 * fwd_b)


def test_flop_count_includes_attention_on_a_cpu():
    b, heads, length, dim = 2, 3, 16, 8
    proj = nn.Linear(dim, dim)

    def attend(x, t=None):
        q = proj(x)
        return F.scaled_dot_product_attention(q, q, q)

    x0 = torch.randn(b, heads, length, dim)
    linear = 2 * b * heads * length * dim * dim
    attention = 2 * (2 * b * heads * length * length * dim)  # q k^T and (softmax) v
    contender = _contender(proj, x0, loss=lambda x, t: attend(x).square().mean())
    contender.forward = contender._sample_step = attend
    assert count_flops(contender.sample_step) == linear + attention


def test_matmul_peak_is_measured_in_fp32_and_bf16():
    for dtype in ("fp32", "bf16"):
        peak = matmul_peak(torch.device("cpu"), dtype, min_seconds=0.01)
        assert peak["gflop_per_s"] > 0 and peak["n"] in (256, 512, 1024, 2048)


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


def test_steps_switch_the_mode_only_on_a_change(monkeypatch):
    """Module.train() walks every submodule (0.6 ms for these UNets): it is no part of a step (Lightning switches
    once per epoch), so the timed steps switch only when the mode changes."""
    contender = _contender(TwoConvs(1, 2, 1, 3), torch.randn(2, 1, 4, 4))
    calls, original = [], nn.Module.train

    def train(self, mode=True):
        if self is contender.model:
            calls.append(mode)
        return original(self, mode)

    monkeypatch.setattr(nn.Module, "train", train)
    for step in [contender.train_step] * 3 + [contender.sample_step] * 3 + [contender.train_step]:
        step()
    assert calls == [False, True]
    assert contender.model.training and contender.model.a.training
