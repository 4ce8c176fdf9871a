"""experiments/gpu_check.py on a CPU (``--device cpu --quick``): every part runs, and the JSON and the Markdown table
hold the machine, positive numbers of both frameworks, equal EMA weights on the 2 DDP ranks, the same numbers in both
files; a failing part is reported and the rest still runs; a used output directory is refused."""

import json
import sys

import pytest
import torch

from tests.conftest import REPO, snapshot

sys.path.insert(0, str(REPO / "experiments"))
import gpu_check  # noqa: E402
from benchmark import FIELDS, MATCH_TOLERANCE  # noqa: E402


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    returned = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    return out, returned


def _row(md: str, start: str) -> str:
    rows = [line for line in md.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, rows)
    return rows[0]


def _section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1].split("\n## ", 1)[0]


def test_cpu_quick_check_measures_every_part(quick_check):
    out, returned = quick_check
    report = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert report["command"] == returned["command"]

    m = report["machine"]
    assert m["torch"] == torch.__version__ and m["gpu_count"] == 0 and m["gpus"] == [] and m["cpu"] and m["cpu_count"] >= 1
    machine = _row(md, "**Machine:**")
    assert machine.startswith("**Machine:** no GPU (CPU run)")
    assert f"torch {torch.__version__}" in machine and f"CPU {m['cpu']} ({m['cpu_count']} cores)" in machine

    # 1. against diffusers: both configurations, the larger one really larger, every field positive, sizes matched
    bench = report["benchmark"]
    assert list(bench) == ["digits", "dog32"] and all(e["ok"] for e in bench.values())
    assert (bench["digits"]["config"]["image_size"], bench["dog32"]["config"]["image_size"]) == (16, 32)
    assert bench["dog32"]["config"]["channels"] == 3 and bench["dog32"]["config"]["channels_last"] is True
    table = _section(md, "## Training and sampling throughput")
    for name, e in bench.items():
        for who in ("ours", "diffusers"):
            assert all(e[who][key] > 0 for key in FIELDS), (name, who)
        assert abs(e["ratio_ours_to_diffusers"]["params"] - 1) <= MATCH_TOLERANCE
        row = _row(table, f"| {name} | 4 |")
        assert f"| {e['ours']['train_images_per_s']:.1f} | {e['diffusers']['train_images_per_s']:.1f} |" in row
        assert f"| {e['ratio_ours_to_diffusers']['train_images_per_s']:.2f}x |" in row

    # 2. whole DDIM chains, ours and diffusers'
    table = _section(md, "## DDIM-5 sampling")
    for name in ("digits", "dog32"):
        e = report["sampling"][name]
        assert e["ok"] and e["sampler"] == "ddim, 5 steps, eta 0" and e["batch"] == 4
        assert e["ours_images_per_s"] > 0 and e["diffusers_images_per_s"] > 0
        assert f"| {e['ours_images_per_s']:.1f} | {e['diffusers_images_per_s']:.1f} |" in _row(table, f"| {name} | 4 |")

    # 3. human64's network (64 px, 3 channels) with and without gradient checkpointing, in both precisions
    memory = report["memory"]
    assert set(memory) == {"32-true", "32-true gradient_checkpointing", "bf16-mixed", "bf16-mixed gradient_checkpointing"}
    for key, e in memory.items():
        assert e["ok"] and e["peak_memory_mb"] > 0 and e["kind"] == "peak_rss" and e["image_size"] == 64 and e["batch"] == 1
        assert e["gradient_checkpointing"] == key.endswith("checkpointing")
    table = _section(md, "## human64")
    assert "peak RSS of the whole process" in table
    for precision in ("32-true", "bf16-mixed"):
        row = _row(table, f"| {precision} | 1 |")
        assert f"| {memory[precision]['peak_memory_mb']:.0f} | {memory[precision + ' gradient_checkpointing']['peak_memory_mb']:.0f} |" in row

    # 4. DDP: a real training run on 2 gloo ranks, both trained, equal EMA weights, one run directory
    ddp = report["ddp"]
    assert ddp["ok"] and ddp["world_size"] == 2 and ddp["ranks"] == [0, 1] and ddp["ema_equal"] is True
    assert ddp["images_per_s"] > 0 and ddp["global_step"] == 3
    assert all(r["train_images"] > 0 and r["train_seconds"] > 0 and r["global_step"] == 3 for r in ddp["per_rank"])
    assert len({r["ema_hash"] for r in ddp["per_rank"]}) == 1
    assert f"| 2 | yes | {ddp['images_per_s']:.1f} | 3 |" in _section(md, "## DDP")
    assert (out / "ddp_run" / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "ddp_logs").exists(), "a DDP rank wrote a run directory of its own"

    assert "**Result:** every part passed" in md
    assert sorted(p.name for p in out.iterdir()) == ["ddp_run", "ddp_train.log", "gpu_check.json", "gpu_check.md", "synthetic_images"]


def test_a_failed_part_is_reported_and_the_rest_still_run(tmp_path):
    report = {"command": "python experiments/gpu_check.py", "date": "today", "machine": gpu_check.machine("cpu"),
              "plan": gpu_check.make_plan("cpu", True, "dog32", tmp_path)}
    check = gpu_check.Check(tmp_path, report)
    check.run("benchmark", "digits", lambda: 1 / 0)
    check.run("sampling", "digits", lambda: {"sampler": "ddim, 5 steps", "batch": 4, "ours_images_per_s": 10.0,
                                            "ours_seconds_per_batch": 0.4})
    check.run("memory", "32-true", lambda: {"peak_memory_mb": 123.0, "batch": 1, "params": 2e5})
    md = (tmp_path / "gpu_check.md").read_text()
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["benchmark"]["digits"] == {"ok": False, "error": "ZeroDivisionError: division by zero",
                                            "seconds": saved["benchmark"]["digits"]["seconds"]}
    assert saved["sampling"]["digits"]["ok"] and saved["memory"]["32-true"]["peak_memory_mb"] == 123.0
    assert "| digits | failed: ZeroDivisionError: division by zero |" in _section(md, "## Training and sampling")
    assert "| digits | 4 | 10.0 | n/a | n/a | 0.400 |" in _section(md, "## DDIM-5 sampling")
    assert "| 32-true | 1 | 0.2 | 123 | n/a | n/a |" in _section(md, "## human64")
    assert "**Result:** 1 failed: benchmark digits" in md


def test_ddp_verdict_names_unequal_ema_and_missing_ranks():
    probes = [{"global_rank": r, "world_size": 2, "global_step": 3, "ema_hash": h, "train_images": 8, "train_seconds": 0.5}
              for r, h in ((0, "aa"), (1, "bb"))]
    verdict = gpu_check.summarize_ddp(probes, 2)
    assert verdict["ema_equal"] is False and verdict["images_per_s"] == pytest.approx(32.0)
    assert gpu_check.failures({"ddp": {"ok": True, **verdict}}) == ["ddp (EMA weights differ between ranks)"]
    assert gpu_check.summarize_ddp([{**p, "ema_hash": "aa"} for p in probes], 2)["ema_equal"] is True
    with pytest.raises(RuntimeError, match="expected probes of ranks 0..1"):
        gpu_check.summarize_ddp(probes[:1], 2)


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "--device cpu needs --quick"),
    (["--device", "cpu", "--quick", "--parts", "benchmark,speed"], "--parts 'benchmark,speed' is invalid"),
    (["--device", "tpu", "--quick"], "--device 'tpu' is invalid"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main([*args, "--out", str(tmp_path / "new")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_used_output_directory_is_refused_and_kept(quick_check, capsys):
    out, _ = quick_check
    before = snapshot(out)
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert exit_.value.code == 2 and "is not an empty directory" in capsys.readouterr().err
    assert snapshot(out) == before


def test_gpu_plan_and_machine_line(monkeypatch, tmp_path):
    """What a GPU run would do (no GPU here): the benchmark's switches, DDP on every GPU after the other parts,
    the presets' own batches; and the machine line names the GPUs, the driver and CUDA."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    plan = gpu_check.make_plan("cuda", False, "dog32", tmp_path)
    switches = ["trainer.precision=bf16-mixed", "model.compile=true", "model.channels_last=true"]
    assert plan["configs"] == {"digits": switches, "dog32": ["experiment=dog32", f"data.root={tmp_path}", *switches]}
    assert plan["batch"] is None and plan["memory"]["batch"] is None and plan["sampling"]["num_steps"] == 50
    assert plan["memory"]["precisions"] == ["32-true", "bf16-mixed"] and plan["memory"]["kind"] == "cuda_max_allocated"
    ddp = plan["ddp"]
    assert ddp["world_size"] == 8 and ddp["overlap"] is False
    assert {"trainer.accelerator=gpu", "trainer.devices=8", "trainer.strategy=ddp", gpu_check.PROBE} <= set(ddp["overrides"])
    assert not any("compile" in o or "base_channels" in o for o in ddp["overrides"])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # before Ampere
    assert "trainer.precision=16-mixed" in gpu_check.make_plan("cuda", False, "dog32", tmp_path)["configs"]["digits"]

    m = {**gpu_check.machine("cpu"), "gpu_count": 2, "driver": "570.86", "cuda": "12.8",
         "gpus": [{"name": "NVIDIA H200", "memory_gib": 139.8, "capability": "9.0"}] * 2}
    assert gpu_check.machine_line(m).startswith("**Machine:** 2 x NVIDIA H200 (140 GiB each), driver 570.86, CUDA 12.8, torch ")
