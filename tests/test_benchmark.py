"""The benchmark script runs on a tiny config and writes its JSON with every field (no timing assertions)."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_benchmark_writes_json(tmp_path):
    cmd = [sys.executable, "experiments/benchmark.py", "model.base_channels=8", "--batch", "4", "--warmup", "1",
           "--iters", "1", "--repeats", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    ours = result["ours"]
    for key in ["params", "train_images_per_s", "train_step_ms", "sample_images_per_s_per_step", "sample_step_ms", "peak_memory_mb"]:
        assert ours[key] > 0, key
    assert result["config"]["batch"] == 4 and "train img/s" in proc.stdout
    assert result["data_loader_images_per_s"] > 0 and "data loader" in proc.stdout
